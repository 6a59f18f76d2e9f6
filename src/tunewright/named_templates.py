"""The chat templates tunewright ships by name, and the Jinja prefix that strips reasoning from history.

Written for tunewright after each family's published format. Tool calls (OpenAI's `tool_calls` on an
assistant turn) and tool results (`tool` turns) are written the way each family writes them:

- chatml (Qwen 2.5 / Hermes): `<tool_call>` JSON blocks in the assistant turn, the result as a `tool` turn
  wrapped in `<tool_response>`;
- llama3 (Llama 3.1): the call as `{"name", "parameters"}` JSON, the result as an `ipython` turn;
- mistral (v3): `[TOOL_CALLS] [...]` after the instruction, the result in `[TOOL_RESULTS] … [/TOOL_RESULTS]`.

Each message renders from its own fields only, so rendering a conversation prefix by prefix only ever appends
(the loss masks rely on it). `add_generation_prompt` opens the assistant turn.
"""

from __future__ import annotations


def _call_json(arguments_key: str, with_id: bool = False) -> str:
    """Jinja writing `tool_call` as one JSON object; OpenAI's string arguments go in as they are."""
    call_id = (
        "{%- if tool_call['id'] is defined and tool_call['id'] -%}"
        "{{- ', \"id\": ' + tool_call['id'] | tojson -}}{%- endif -%}" if with_id else ""
    )
    return (
        "{%- set call = tool_call['function'] if tool_call['function'] is defined else tool_call -%}"
        "{%- set arguments = call['arguments'] if call['arguments'] is defined else {} -%}"
        "{{- '{\"name\": ' + call['name'] | tojson + ', \"" + arguments_key + "\": ' -}}"
        "{%- if arguments is string -%}{{- arguments -}}{%- else -%}{{- arguments | tojson -}}{%- endif -%}"
        + call_id + "{{- '}' -}}"
    )


HAS_CALLS = "message['role'] == 'assistant' and message['tool_calls'] is defined and message['tool_calls']"

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['role'] == 'tool' -%}"
    "{{- '<tool_response>\\n' + message['content'] + '\\n</tool_response>' -}}"
    "{%- else -%}{{- message['content'] -}}{%- endif -%}"
    "{%- if " + HAS_CALLS + " -%}{%- for tool_call in message['tool_calls'] -%}"
    "{%- if message['content'] or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    "{{- '<tool_call>\\n' -}}" + _call_json("arguments") + "{{- '\\n</tool_call>' -}}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)
LLAMA3 = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- set role = 'ipython' if message['role'] == 'tool' else message['role'] -%}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\\n\\n' + message['content'] | trim -}}"
    "{%- if " + HAS_CALLS + " -%}{%- for tool_call in message['tool_calls'] -%}"
    "{%- if message['content'] | trim or not loop.first -%}{{- '\\n' -}}{%- endif -%}"
    + _call_json("parameters") +
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}"
)
# Mistral instruct: no system role, so a system message is folded into the first user turn.
MISTRAL = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\\n\\n' -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '[INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' -}}"
    "{%- elif " + HAS_CALLS + " -%}"
    "{%- if message['content'] -%}{{- ' ' + message['content'] -}}{%- endif -%}"
    "{{- '[TOOL_CALLS] [' -}}{%- for tool_call in message['tool_calls'] -%}"
    "{%- if not loop.first -%}{{- ', ' -}}{%- endif -%}" + _call_json("arguments", with_id=True) +
    "{%- endfor -%}{{- ']' + eos_token -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- ' ' + message['content'] + eos_token -}}"
    "{%- elif message['role'] == 'tool' -%}"
    "{{- '[TOOL_RESULTS] {\"content\": ' + message['content'] | tojson -}}"
    "{%- if message['tool_call_id'] is defined and message['tool_call_id'] -%}"
    "{{- ', \"call_id\": ' + message['tool_call_id'] | tojson -}}{%- endif -%}"
    "{{- '}[/TOOL_RESULTS]' -}}"
    "{%- else -%}{{- raise_exception('the mistral template takes user, assistant and tool turns only') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
NAMED_TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL}

# Drops `<think>…</think>` blocks (and the blank after each) from every assistant message but a final one, as
# conversations.strip_reasoning does, so the saved template renders history as training saw it. Jinja has no
# regex: the content is split on "<think>", and a block ends at the first "</think>" after it.
STRIP_REASONING = (
    "{%- set tw_history = namespace(messages=[]) -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' and not loop.last and message['content'] is string"
    " and '<think>' in message['content'] -%}"
    "{%- set tw = namespace(kept='', open='') -%}"
    "{%- for piece in message['content'].split('<think>') -%}"
    "{%- if loop.first -%}{%- set tw.kept = piece -%}"
    "{%- elif '</think>' in piece -%}"
    "{%- set tw.kept = tw.kept + piece.split('</think>', 1)[1].lstrip() -%}{%- set tw.open = '' -%}"
    "{%- else -%}{%- set tw.open = tw.open + '<think>' + piece -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set tw_history.messages = tw_history.messages + [dict(message, content=tw.kept + tw.open)] -%}"
    "{%- else -%}{%- set tw_history.messages = tw_history.messages + [message] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set messages = tw_history.messages -%}"
)
