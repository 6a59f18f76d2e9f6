// Renders an Ollama Modelfile TEMPLATE with Go's text/template, as Ollama does, for the export tests.
// Input (stdin, JSON): {"template": "...", "messages": [{"role": "user", "content": "..."}]}.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Request struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func main() {
	var request Request
	if err := json.NewDecoder(os.Stdin).Decode(&request); err != nil {
		panic(err)
	}
	parsed := template.Must(template.New("modelfile").Parse(request.Template))
	data := map[string]any{"Messages": request.Messages}
	if err := parsed.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
