"""How a request's text becomes the prompt a served run was trained on.

A run (or zero-shot config) serves the way `tunewright predict` renders a row: the request's text
is the value of the run's one input column, rendered through `prompt.template` (after
`prompt.task`) and, when the run trained with `prompt.use_chat_template`, wrapped as the user turn
of the tokenizer's chat template. A request that cannot be rendered that way gets a 400 saying why;
`"raw_prompt": true` asks for the text as it is instead. The base model of a group of adapters has
no config of its own, so it always takes text as it is.

A conversation run (a `conversation:` section) takes whole chats: /v1/chat/completions renders the messages
through the run's chat template (RUN/chat_template.jinja) ready for the assistant's reply, as predict renders a
conversation's history; /v1/completions refuses text for it.
"""

from __future__ import annotations

import pandas as pd

from tunewright.chat_data import chat_prompt_ids, history_of
from tunewright.data import encode_prompts
from tunewright.errors import TunewrightError
from tunewright.serving.errors import APIError
from tunewright.serving.pool import ServedModel

RAW_HINT = 'or set "raw_prompt": true to send the text as it is'


def renders_prompts(served: ServedModel, raw_prompt: bool) -> bool:
    """Whether this request's text goes through the run's prompt template."""
    return served.predictable and not raw_prompt


def refuse_category(served: ServedModel) -> None:
    """A category run's answer is a label, which only /predict gives; generated text would differ."""
    if served.tuned.is_category:
        raise APIError(
            400,
            f"model: '{served.name}' is a category run: it answers with a label from POST /predict; "
            f"{RAW_HINT} and generate free text",
            param="model",
        )


def input_column(served: ServedModel) -> str:
    """The one column a request's text fills; a 400 where the run needs something else."""
    refuse_category(served)
    if served.tuned.config.conversation is not None:
        raise APIError(
            400,
            f"model: '{served.name}' was trained on conversations; send messages to /v1/chat/completions, "
            f"{RAW_HINT}",
            param="model",
        )
    columns = served.tuned.config.input_columns
    if len(columns) != 1:
        raise APIError(
            400,
            f"model: '{served.name}' renders its prompt from the columns {', '.join(columns)}; send them as "
            f"rows to POST /predict, {RAW_HINT}",
            param="model",
        )
    return columns[0]


def rendered_prompt_ids(served: ServedModel, values: list[str], param: str) -> list[list[int]]:
    """Token ids of each value rendered as the run's input column: exactly what predict feeds the model."""
    config = served.tuned.config
    frame = pd.DataFrame({input_column(served): values}, dtype=object)
    try:
        texts = served.tuned.render_frame(frame)
        ids = encode_prompts(texts, served.request_tokenizer, config.prompt.use_chat_template)
    except TunewrightError as error:  # e.g. use_chat_template with a tokenizer that has none
        raise APIError(400, f"model: '{served.name}' cannot render prompts: {error}", param="model") from None
    limit = served.tuned.max_input_len  # what predict feeds the model unchanged (longer ones it cuts)
    for prompt in ids:
        if len(prompt) > limit:
            raise APIError(
                400,
                f"{param}: the rendered prompt has {len(prompt)} tokens; '{served.name}' reads at most {limit} "
                "(tunewright predict would cut it from the left); shorten it",
                param=param,
                code="context_length_exceeded",
            )
    return list(ids)


def chat_input_value(served: ServedModel, messages: list[dict[str, str]]) -> str:
    """The input column's value in a chat, where the run trained on chat turns; a 400 otherwise."""
    column = input_column(served)
    if not served.tuned.config.prompt.use_chat_template:
        raise APIError(
            400,
            f"model: '{served.name}' was trained without a chat template (prompt.use_chat_template: false), "
            f"so a chat cannot be rendered as in training; send the text to /v1/completions, {RAW_HINT} "
            "through the tokenizer's chat template",
            param="model",
        )
    if len(messages) != 1 or messages[0]["role"] != "user":
        raise APIError(
            400,
            f"messages: '{served.name}' was trained on one user turn holding its rendered prompt; send exactly "
            f"one user message (the value of '{column}'), {RAW_HINT} through the tokenizer's chat template",
            param="messages",
        )
    return messages[0]["content"]


def conversation_prompt_ids(served: ServedModel, messages: list[dict[str, str]]) -> list[int]:
    """A conversation run: the messages through the run's chat template, as predict renders a history."""
    if messages[-1]["role"] == "assistant":
        raise APIError(400, "messages: the last message is an assistant turn; end with a user message",
                       param="messages")
    try:
        history = history_of(messages, served.tuned.config.prompt.reasoning)
        ids = chat_prompt_ids(served.request_tokenizer, [history])[0]
    except Exception as error:  # jinja raises TemplateError (or anything the template raises itself)
        raise APIError(400, f"messages: the chat template refused them ({error})", param="messages") from None
    limit = served.tuned.max_input_len
    if len(ids) > limit:
        raise APIError(400, f"messages: the rendered conversation has {len(ids)} tokens; '{served.name}' reads at "
                       f"most {limit}; shorten it", param="messages", code="context_length_exceeded")
    return ids
