// Renders an Ollama Modelfile TEMPLATE with Go's text/template, as Ollama does, for the export tests.
// Input (stdin, JSON): {"template": "...", "messages": [{"role": "user", "content": "...", "tool_calls": [...]}]}.
// Messages carry tool calls as Ollama's API does (arguments as an object), and templates get Ollama's `json`.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type ToolCallFunction struct {
	Name      string         `json:"name"`
	Arguments map[string]any `json:"arguments"`
}

type ToolCall struct {
	Function ToolCallFunction `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	ToolCalls []ToolCall `json:"tool_calls"`
}

type Request struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func toJSON(value any) string {
	encoded, _ := json.Marshal(value)
	return string(encoded)
}

func main() {
	var request Request
	if err := json.NewDecoder(os.Stdin).Decode(&request); err != nil {
		panic(err)
	}
	functions := template.FuncMap{"json": toJSON}
	parsed := template.Must(template.New("modelfile").Funcs(functions).Parse(request.Template))
	data := map[string]any{"Messages": request.Messages}
	if err := parsed.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
