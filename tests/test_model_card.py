"""A run folder's README.md is a real model card, and the README's run-folder table names every file a run writes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import train_tiny_run

from tunewright.config import validate_config
from tunewright.model_card import card_text, hub_id

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("card") / "lora"
    return train_tiny_run(tiny_model_dir, folder, {"max_steps": 2, "checkpoint_steps": 1, "precision": "fp32"},
                          rows_repeat=3, preprocessing={"split": [0.5, 0.25, 0.25]})


@pytest.fixture(scope="module")
def classifier_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Full fine-tuning with a classifier head: the other kind of weights, plus the category files."""
    folder = tmp_path_factory.mktemp("card") / "classifier"
    return train_tiny_run(tiny_model_dir, folder, {"max_steps": 1, "precision": "fp32"}, rows_repeat=3,
                          adapter=None, preprocessing={"split": [0.5, 0.5, 0.0]},
                          output_features=[{"name": "echo", "type": "category", "decoder": "classifier"}])


def run_folder_table() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## The run folder")
    return text[start : text.index("\n## ", start + 1)]


def test_the_card_says_what_the_run_is(lora_run: Path, tiny_model_dir: Path) -> None:
    card = (lora_run / "README.md").read_text(encoding="utf-8")
    assert "More Information Needed" not in card
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "peft" and "tunewright" in front["tags"]
    assert "base_model" not in front  # a local folder means nothing on another machine
    assert f"**Base model:** `{tiny_model_dir}`" in card
    assert "word → `echo`, text" in card and "say {word}:" in card
    assert re.search(r"\| validation \| exact_match \| \d\.\d{4} \|", card)
    assert re.search(r"\| test \| rows \| \d+ \|", card)
    assert "learning_rate:" in card  # the resolved config


def test_aliases_and_hub_ids_name_the_hub_model(tmp_path: Path) -> None:
    assert hub_id("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("HuggingFaceTB/SmolLM2-360M") == "HuggingFaceTB/SmolLM2-360M"
    assert hub_id(str(tmp_path)) is None and hub_id("model.gguf") is None and hub_id("./x/y") is None


def test_the_readme_names_every_file_a_run_writes(lora_run: Path, classifier_run: Path) -> None:
    table = run_folder_table()
    for run in (lora_run, classifier_run):
        for path in run.iterdir():
            name = path.name + ("/" if path.is_dir() else "")
            shown = re.sub(r"confusion_matrix_\w+\.png", "confusion_matrix_<split>.png", name)
            assert f"`{shown}" in table, f"README's run-folder table does not name {name}"


def test_a_conversation_card_shows_the_chat_format(tiny_model_dir: Path) -> None:
    config = validate_config({
        "base_model": str(tiny_model_dir), "conversation": {"column": "chat", "train_on": "last_assistant"},
        "prompt": {"chat_template": "llama3", "system_prompt": "Be brief.", "reasoning": "strip"},
    })
    card = card_text(config, {"training": {"type": "finetune", "steps": 3}}, "chats.jsonl", {"train": 4})
    assert "{chat}" not in card and "## Prompt" not in card
    assert "- **Task:** conversations in column `chat` → assistant turns" in card
    conversation = card.split("## Conversations", 1)[1].split("\n## ", 1)[0]
    for line in ["- **Format:** auto (detected from the data), column `chat`",
                 "- **Chat template:** `llama3` (tunewright's named template), saved as chat_template.jinja",
                 "- **Trained tokens:** last_assistant, with the end of turn", "- **System prompt:** Be brief.",
                 "- **Reasoning:** strip"]:
        assert line in conversation
    own = validate_config({"base_model": str(tiny_model_dir), "conversation": {"format": "messages",
                                                                               "train_eos": False}})
    card = card_text(own, {}, "chats.jsonl", {"train": 4})
    assert "- **Chat template:** the base model tokenizer's own, saved as chat_template.jinja" in card
    assert "- **System prompt:** none" in card and "- **Format:** messages, column `messages`" in card
    assert "all_assistant, without the end of turn" in card
