"""Chat templates: the named ones tunewright ships, Jinja files, and the run's template put on its tokenizer.

The template a run resolves (`prompt.chat_template`, with `prompt.system_prompt` built in) is set as the
tokenizer's `chat_template` before anything is tokenised. The run folder's tokenizer then saves it
(chat_template.jinja, sealed with the run's files), and every later step reads it from there: predict,
evaluate, the server's /v1/chat/completions and the exported folder render through the same text.
"""

from __future__ import annotations

import json
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2

from tunewright.errors import ConfigError
from tunewright.named_templates import CHATML as CHATML  # re-exported: the names users and tests know
from tunewright.named_templates import LLAMA3 as LLAMA3
from tunewright.named_templates import MISTRAL as MISTRAL
from tunewright.named_templates import NAMED_TEMPLATES as NAMED_TEMPLATES
from tunewright.named_templates import STRIP_REASONING

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # config.py imports this module; `tunewright validate` must not load transformers
    from transformers import PreTrainedTokenizerBase

    from tunewright.config import TunewrightConfig

TEMPLATE_SUFFIXES = (".jinja", ".j2")
WHERE = "prompt.chat_template"


def is_template_path(value: str) -> bool:
    """A value of prompt.chat_template that names a Jinja file rather than a template."""
    return value.lower().endswith(TEMPLATE_SUFFIXES)


def with_system_prompt(template: str, system_prompt: str) -> str:
    """`template` with a system message placed first whenever a conversation has none.

    A top-level `set` shadows the caller's `messages`, so the prompt is part of the template itself and
    plain `apply_chat_template` on an exported folder renders it too.
    """
    content = json.dumps(system_prompt, ensure_ascii=False)  # a Jinja string literal, escapes included
    return (
        "{%- if not messages or messages[0]['role'] != 'system' -%}"
        "{%- set messages = [{'role': 'system', 'content': " + content + "}] + messages -%}"
        "{%- endif -%}" + template
    )


def read_template_file(value: str) -> str:
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(f"{WHERE}: Jinja file {value} not found; give an existing file or a template name "
                          f"({', '.join(NAMED_TEMPLATES)})")
    text = path.read_text(encoding="utf-8")
    try:
        jinja2.Environment().parse(text)
    except jinja2.TemplateSyntaxError as error:
        raise ConfigError(f"{WHERE}: {value} is not valid Jinja (line {error.lineno}: {error.message}); "
                          "fix the file") from None
    return text


def run_template(config: TunewrightConfig, tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The chat template this config renders with (None: none is needed and the tokenizer has none).

    Raises:
        ConfigError: a missing or broken Jinja file, or conversation data with no template anywhere.
    """
    prompt = config.prompt
    if prompt.chat_template in NAMED_TEMPLATES:
        template: str | None = NAMED_TEMPLATES[prompt.chat_template]
    elif prompt.chat_template is not None:
        template = read_template_file(prompt.chat_template)
    else:
        own = tokenizer.chat_template
        template = own if isinstance(own, str) else None
    if template is None:
        if config.conversation is not None:
            raise ConfigError(f"{WHERE}: the tokenizer of {config.base_model} has no chat template; name one "
                              f"({', '.join(NAMED_TEMPLATES)}) or give a Jinja file")
        return None
    if prompt.system_prompt:
        template = with_system_prompt(template, prompt.system_prompt)
    # training strips reasoning from history in Python; the saved template must too, for plain transformers
    return STRIP_REASONING + template if prompt.reasoning == "strip" else template


def set_run_template(config: TunewrightConfig, tokenizer: PreTrainedTokenizerBase) -> None:
    """Put the config's chat template on the tokenizer (saved with it) when the run renders chats."""
    if config.conversation is None and not config.prompt.use_chat_template:
        return
    template = run_template(config, tokenizer)
    if template is not None:
        tokenizer.chat_template = template
        if config.conversation is not None:
            warn_unstoppable(tokenizer, template)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The token that closes an assistant turn in the tokenizer's chat template, when it is one token.

    ChatML closes a turn with `<|im_end|>`, Llama 3 with `<|eot_id|>`: generation must stop there as at EOS,
    or a model that learned to close its turns keeps talking.
    """
    template = tokenizer.chat_template
    if not isinstance(template, str):
        return None
    return _end_of_turn_id(tokenizer, template)


@lru_cache(maxsize=32)
def _end_of_turn_id(tokenizer: PreTrainedTokenizerBase, template: str) -> int | None:
    closing = turn_closing(tokenizer, template)
    if not closing:
        return None
    ids = tokenizer(closing, add_special_tokens=False)["input_ids"]
    first = tokenizer.convert_ids_to_tokens(ids[0]) if ids else None
    special = set(tokenizer.all_special_tokens) | set(tokenizer.get_added_vocab())
    return int(ids[0]) if first in special else None


def turn_closing(tokenizer: PreTrainedTokenizerBase, template: str) -> str:
    """The text `template` writes after an assistant reply ("<|im_end|>"), or "" where it cannot be found."""
    marker = "\u2063TUNEWRIGHT-REPLY\u2063"
    try:
        text = str(tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            chat_template=template, tokenize=False))
    except Exception:  # a template that refuses this conversation has no end of turn we can find
        return ""
    return text.split(marker, 1)[-1].rstrip() if marker in text else ""


def warn_unstoppable(tokenizer: PreTrainedTokenizerBase, template: str) -> None:
    """Warn when the template closes turns with text generation cannot stop on (not one special token)."""
    closing = turn_closing(tokenizer, template)
    if closing and end_of_turn_id(tokenizer) is None and closing != tokenizer.eos_token:
        log.warning("%s: the template closes each turn with %r, which is not one token of this tokenizer: "
                    "generation stops only at %r; pick a template whose markers this tokenizer has",
                    WHERE, closing, tokenizer.eos_token)
