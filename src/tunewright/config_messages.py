"""One-line messages for config validation errors: key path, the value as written, and a hint.

Unknown keys get, in order: the name tunewright uses for a setting users bring from
transformers, TRL, peft, Axolotl or Ludwig; the section a known key belongs in; a few close
matches; or, for small sections, the keys it has. Never a list of every key.
"""

from __future__ import annotations

import datetime
import difflib
import json
from typing import Any

import yaml
from pydantic import BaseModel

from tunewright.config_yaml import written_as

# Names other tools use -> where the setting lives here (or what to do instead).
FOREIGN_KEYS: dict[str, str] = {
    # transformers TrainingArguments / TRL SFTConfig
    "num_train_epochs": "trainer.epochs",
    "per_device_train_batch_size": "trainer.batch_size",
    "train_batch_size": "trainer.batch_size",
    "per_device_eval_batch_size": "trainer.eval_batch_size",
    "lr": "trainer.learning_rate",
    "lr_scheduler_type": "trainer.lr_scheduler",
    "learning_rate_scheduler": "trainer.lr_scheduler",
    "logging_steps": "trainer.log_every",
    "eval_steps": "trainer.eval_every",
    "evaluation_steps": "trainer.eval_every",
    "save_steps": "trainer.checkpoint_steps",
    "save_total_limit": "trainer.keep_checkpoints",
    "mixed_precision": "trainer.precision",
    "random_seed": "trainer.seed",
    "early_stop": "trainer.early_stopping_patience",
    "enable_gradient_checkpointing": "trainer.gradient_checkpointing",
    # Axolotl
    "num_epochs": "trainer.epochs",
    "micro_batch_size": "trainer.batch_size",
    "lora_target_modules": "adapter.target_modules",
    "sample_packing": "trainer.packing",
    "chat_template": "prompt.chat_template",
    "field_messages": "conversation.column",
    "roles_to_train": "conversation.train_on",
    "train_on_eos": "conversation.train_eos",
    "default_system_message": "prompt.system_prompt",
    "assistant_only_loss": "conversation.train_on",
    # peft / bitsandbytes
    "lora_r": "adapter.r",
    "rank": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "peft_type": "adapter.type",
    "bnb_4bit_quant_type": "quantization.quant_type",
    "bnb_4bit_use_double_quant": "quantization.double_quant",
    "bnb_4bit_compute_dtype": "quantization.compute_dtype",
    # model loading
    "model_name_or_path": "base_model",
    "model_name": "base_model",
    "torch_dtype": "backend.dtype",
    "device_map": "backend.device",
    "prompt_template": "prompt.template",
}
# Settings that are spelled differently here, not only named differently: the whole hint.
FOREIGN_HINTS: dict[str, str] = {
    "bf16": "write trainer.precision: bf16",
    "fp16": "write trainer.precision: auto, fp32 or bf16; fp16 training is not offered",
    "load_in_4bit": "write quantization: {bits: 4}",
    "load_in_8bit": "write quantization: {bits: 8}",
    "lora_target_linear": "write adapter.target_modules: all-linear",
    "val_set_size": "write preprocessing.split: [train, validation, test] fractions",
    "model_type": "tunewright always fine-tunes a causal LM; remove it",
    **{
        name: "prompt and target are capped apart here: preprocessing.max_input_length and max_target_length"
        for name in ("max_seq_length", "max_length", "sequence_len", "cutoff_len")
    },
}
SETTING_ERROR = "tunewright_setting"  # error type of the schema's own cross-field checks
SMALL_SECTION = 6  # a section with at most this many keys is listed when nothing is close
VALUE_SHOWN_CHARS = 60
# What YAML reads from an unquoted scalar that is not a string: `yes`, `1`, `1.5`, `2024-01-01`.
UNQUOTED_SCALARS = (bool, int, float, datetime.date)


def _normalized(name: str) -> str:
    return name.strip().lower().replace("-", "_")


def section_class(annotation: Any) -> type[BaseModel] | None:
    """The schema class inside an annotation (`TrainerConfig`, `list[InputFeature]`, `AdapterConfig | None`)."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        for inner in (candidate, *getattr(candidate, "__args__", ())):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def section_of(root: type[BaseModel], location: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The schema class that owns the key at `location`, to suggest names from."""
    model: type[BaseModel] | None = root
    for item in location[:-1]:
        if isinstance(item, int):
            continue
        field = model.model_fields.get(str(item)) if model is not None else None
        model = section_class(field.annotation) if field is not None else None
    return model


def _sections_holding(name: str, root: type[BaseModel]) -> list[str]:
    """The top-level sections that have a key called `name`."""
    found = []
    for section, info in root.model_fields.items():
        model = section_class(info.annotation)
        if model is not None and name in model.model_fields:
            found.append(section)
    return found


def unknown_key_hint(key: str, owner: type[BaseModel] | None, root: type[BaseModel]) -> str:
    """The hint after `unknown key`, with its parentheses, or an empty string."""
    name = _normalized(key)
    if name in FOREIGN_KEYS:
        return f" ({key} is called {FOREIGN_KEYS[name]} here)"
    if name in FOREIGN_HINTS:
        return f" ({FOREIGN_HINTS[name]})"
    known = list(owner.model_fields) if owner is not None else []
    if name in known:
        return f" (did you mean '{name}'?)"
    if name in root.model_fields and owner is not root:
        return " (it is a top-level key)"
    elsewhere = _sections_holding(name, root)
    if elsewhere:
        return f" (it belongs under {' or '.join(elsewhere)})"
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.7) or difflib.get_close_matches(name, known, n=1)
    if close:
        return f" (did you mean {' or '.join(repr(c) for c in close)}?)"
    if known and len(known) <= SMALL_SECTION:
        return f" (known keys: {', '.join(known)})"
    return ""


def _shown(value: Any) -> str | None:
    """A scalar input repeated in the message (escaped, so the message stays on one line)."""
    if isinstance(value, bool | int | float) or value is None:
        return repr(value)
    if isinstance(value, str):
        text = repr(value)
        return text if len(text) <= VALUE_SHOWN_CHARS else text[: VALUE_SHOWN_CHARS - 4] + "...'"
    return None


def quote_hint(location: tuple[int | str, ...], raw: Any, nodes: yaml.Node | None) -> tuple[str, str] | None:
    """For a string key given a YAML boolean or number: (key path, the value quoted as the user wrote it).

    A list (labels) is quoted whole: `labels must be strings; quote them: ["yes", "no"]`.
    """
    container: Any = raw
    for item in location[:-1]:
        try:
            container = container[item]
        except (KeyError, IndexError, TypeError):
            return None
    if isinstance(container, list) and isinstance(location[-1], int) and len(location) > 1:
        if not all(isinstance(value, (str, *UNQUOTED_SCALARS)) for value in container):
            return None
        written = [written_as(nodes, (*location[:-1], index), value) for index, value in enumerate(container)]
        return key_path(location[:-1]), f"{location[-2]} must be strings; quote them: {json.dumps(written)}"
    value = container.get(location[-1]) if isinstance(container, dict) else None
    if isinstance(value, UNQUOTED_SCALARS):
        return key_path(location), f"must be a string; quote it: {json.dumps(written_as(nodes, location, value))}"
    return None


def key_path(location: tuple[int | str, ...]) -> str:
    """('input_features', 0, 'nme') -> 'input_features[0].nme'."""
    path = ""
    for item in location:
        path += f"[{item}]" if isinstance(item, int) else (f".{item}" if path else str(item))
    return path or "(top level)"


def describe(error: Any, root: type[BaseModel], raw: Any, nodes: yaml.Node | None) -> str:
    """One pydantic error as `key.path: what is wrong (the value given)`.

    Args:
        error: one item of `ValidationError.errors()`.
        root: the schema's top class (for unknown-key hints).
        raw: the data that was validated (to quote values as written).
        nodes: the YAML node tree of that data, when it came from a file.
    """
    location = tuple(part for part in error["loc"] if not str(part).startswith("function-after"))
    path = key_path(location)
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{path}: unknown key{unknown_key_hint(str(location[-1]), section_of(root, location), root)}"
    if kind == "missing":
        return f"{path}: required key is missing"
    if kind == "string_type" and location:
        quoted = quote_hint(location, raw, nodes)
        if quoted is not None:
            return f"{quoted[0]}: {quoted[1]}"
    message = str(error["msg"]).removeprefix("Value error, ")
    names_own_path = any(message.startswith(path + mark) for mark in (":", ".", "["))
    if kind == "value_error" and (path == "(top level)" or names_own_path):
        return message  # a cross-field check that names its own key path
    # Repeat the value for pydantic's own checks; ours (SETTING_ERROR) name the key and say what to do.
    shown = _shown(error.get("input")) if kind not in ("value_error", SETTING_ERROR) else None
    return f"{path}: {message}" + (f" (got {shown})" if shown is not None else "")
