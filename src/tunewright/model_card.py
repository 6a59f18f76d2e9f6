"""README.md of a run folder: a model card with the base model, data, metrics and config.

peft's `save_pretrained` writes a template card full of "More Information Needed" whose base model is
the local folder the weights came from; this replaces it with what the run actually knows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tunewright.config import TunewrightConfig, config_to_dict
from tunewright.named_templates import NAMED_TEMPLATES

CARD_FILE = "README.md"
# Hub ids of the base-model aliases, for the card's metadata (the alias itself is tunewright's name).
ALIAS_HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def hub_id(base_model: str) -> str | None:
    """The base model as a Hub id, or None for a local folder or file (a path means nothing elsewhere)."""
    if base_model in ALIAS_HUB_IDS:
        return ALIAS_HUB_IDS[base_model]
    looks_local = base_model.startswith((".", "/", "~")) or base_model.endswith(".gguf") or Path(base_model).exists()
    return None if looks_local or base_model.count("/") != 1 else base_model


def front_matter(config: TunewrightConfig) -> dict[str, Any]:
    adapter = config.adapter.type if config.adapter is not None else "full"
    meta: dict[str, Any] = {
        "library_name": "peft" if adapter != "full" else "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["tunewright", adapter if adapter != "full" else "full-fine-tune"],
    }
    source = hub_id(config.base_model)
    if source is not None:
        meta["base_model"] = source
    return meta


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    """One row per scalar metric of each evaluated split (nested reports such as per-class stay in metrics.json)."""
    rows = []
    for split in ("validation", "test"):
        for name, value in (metrics.get(split) or {}).items():
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            shown = f"{value:.4f}" if isinstance(value, float) else str(value)
            rows.append(f"| {split} | {name} | {shown} |")
    if not rows:
        return ["No validation or test split was evaluated."]
    return ["| split | metric | value |", "| --- | --- | --- |", *rows]


def prompt_section(config: TunewrightConfig) -> list[str]:
    """How the run renders its input: the prompt template, or for conversation data the chat format."""
    conversation = config.conversation
    if conversation is None:
        return ["## Prompt", "", "```", config.prompt_template, "```"]
    prompt = config.prompt
    if prompt.chat_template is None:
        template = "the base model tokenizer's own"
    elif prompt.chat_template in NAMED_TEMPLATES:
        template = f"`{prompt.chat_template}` (tunewright's named template)"
    else:
        template = f"the Jinja file `{prompt.chat_template}`"
    detected = " (detected from the data)" if conversation.format == "auto" else ""
    eos = "with" if conversation.train_eos else "without"
    return [
        "## Conversations", "",
        f"- **Format:** {conversation.format}{detected}, column `{conversation.column}`",
        f"- **Chat template:** {template}, saved as chat_template.jinja",
        f"- **Trained tokens:** {conversation.train_on}, {eos} the end of turn",
        f"- **System prompt:** {prompt.system_prompt or 'none'}",
        f"- **Reasoning:** {prompt.reasoning}",
    ]


def card_text(config: TunewrightConfig, metrics: dict[str, Any], data: str, split_rows: dict[str, int]) -> str:
    output = config.output_feature
    task = f"category ({', '.join(output.labels)})" if output.type == "category" and output.labels else output.type
    task_line = f"{', '.join(config.input_columns)} → `{output.name}`, {task}"
    if config.conversation is not None:
        task_line = f"conversations in column `{config.conversation.column}` → assistant turns"
    training = metrics.get("training", {})
    trained = (
        f"{training.get('steps', '?')} optimizer steps, {training.get('trainable_parameters', '?')} of "
        f"{training.get('total_parameters', '?')} parameters trained" if training.get("type") == "finetune"
        else "nothing trained (zero-shot: trainer.type none)"
    )
    rows = ", ".join(f"{count} {split}" for split, count in split_rows.items() if count)
    lines = [
        "---", yaml.safe_dump(front_matter(config), sort_keys=False).rstrip(), "---", "",
        "# A tunewright run", "",
        f"- **Base model:** `{config.base_model}`",
        f"- **Task:** {task_line}",
        f"- **Adapter:** {config.adapter.type if config.adapter is not None else 'none (full fine-tuning)'}",
        f"- **Data:** {data} ({rows or 'no rows'} rows)",
        f"- **Training:** {trained}", "",
        *prompt_section(config), "",
        "## Metrics", "", *metrics_table(metrics), "",
        "## Use", "", "```bash",
        "tunewright predict --model THIS_FOLDER --dataset rows.csv --output predictions.csv",
        "tunewright serve --model THIS_FOLDER",
        "tunewright export --model THIS_FOLDER --output exported --merge   # a plain transformers folder",
        "```", "",
        "## Config", "", "```yaml", yaml.safe_dump(config_to_dict(config), sort_keys=False).rstrip(), "```", "",
    ]
    return "\n".join(lines)


def write_model_card(run_dir: Path, config: TunewrightConfig, metrics: dict[str, Any], data: str,
                     split_rows: dict[str, int]) -> None:
    (run_dir / CARD_FILE).write_text(card_text(config, metrics, data, split_rows), encoding="utf-8")
