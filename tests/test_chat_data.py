"""Conversation data end to end: config keys, labels from the chat masks, the saved template, and refusals."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pandas as pd
import pytest

from tunewright import api
from tunewright.chat_data import (
    MaskStats,
    check_mask_stats,
    conversation_examples,
    frame_conversations,
    history_of,
)
from tunewright.chat_templates import CHATML, LLAMA3, end_of_turn_id, run_template, set_run_template
from tunewright.config import validate_config
from tunewright.data import IGNORE_INDEX
from tunewright.errors import ConfigError, DataError
from tunewright.run import sealed_files

TWO_TURNS = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
             {"role": "user", "content": "ok"}, {"role": "assistant", "content": "bye"}]
WORDS = ["cat", "dog", "sun", "sea"]


def chat_rows(count: int = 12) -> list[dict]:
    return [{"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": word}]}
            for word in (WORDS * count)[:count]]


def chat_config(base: Path, **sections) -> dict:
    return {
        "base_model": str(base),
        "conversation": sections.pop("conversation", {}),
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "trainer": {"epochs": 1, "batch_size": 4, "learning_rate": 0.01, "precision": "fp32"},
        "generation": {"max_new_tokens": 3},
        "preprocessing": {"split": [0.75, 0.25, 0.0]},
        **sections,
    }


# ---- config -------------------------------------------------------------------------------------


def test_conversation_section_supplies_the_features(tiny_model_dir):
    config = validate_config(chat_config(tiny_model_dir, conversation={"column": "chosen"}))
    assert config.input_columns == ["chosen"] and config.output_feature.name == "chosen"
    assert validate_config(config.model_dump(mode="json")) == config  # a saved config validates again


@pytest.mark.parametrize(("changes", "message"), [
    ({"prompt": {"chat_template": "vicuna"}}, "prompt.chat_template: 'vicuna' is neither a template name"),
    ({"prompt": {"template": "{messages}"}}, "prompt.template: does not apply to conversation data"),
    ({"conversation": {"format": "messages", "speakers": {"H:": "user"}}},
     "conversation.speakers: applies to format: transcript only"),
    ({"conversation": {"train_on": "assistant"}}, "conversation.train_on"),
    ({"input_features": [{"name": "q"}]}, "conversation.column: with conversation data the features are"),
    ({"chat_template": "chatml"}, "chat_template: unknown key (chat_template is called prompt.chat_template here)"),
    ({"conversation": {"train_on_eos": True}}, "train_on_eos is called conversation.train_eos here"),
])
def test_bad_conversation_settings_name_their_key(tiny_model_dir, changes, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate_config(chat_config(tiny_model_dir, **changes))


def test_chat_settings_without_chat_data_are_refused(tiny_config):
    with pytest.raises(ConfigError, match="prompt.system_prompt: applies to conversation data or prompt.use_chat"):
        validate_config({**tiny_config, "prompt": {"system_prompt": "Be brief."}})


# ---- templates ----------------------------------------------------------------------------------


def test_named_template_and_system_prompt_are_set_on_the_tokenizer(tiny_model_dir, tokenizer):
    config = validate_config(chat_config(tiny_model_dir, prompt={"chat_template": "chatml",
                                                                  "system_prompt": "Be brief."}))
    set_run_template(config, tokenizer)
    text = tokenizer.apply_chat_template(TWO_TURNS[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    own = [{"role": "system", "content": "Mine."}, *TWO_TURNS[:1]]  # a conversation's own system turn wins
    assert tokenizer.apply_chat_template(own, tokenize=False).startswith("<|im_start|>system\nMine.<|im_end|>")


def test_template_file_missing_and_broken(tiny_model_dir, tokenizer, tmp_path):
    good = tmp_path / "t.jinja"
    good.write_text(CHATML)
    config = validate_config(chat_config(tiny_model_dir, prompt={"chat_template": str(good)}))
    assert run_template(config, tokenizer) == CHATML
    config = validate_config(chat_config(tiny_model_dir, prompt={"chat_template": str(tmp_path / "no.jinja")}))
    with pytest.raises(ConfigError, match=r"prompt\.chat_template: Jinja file .*no\.jinja not found"):
        run_template(config, tokenizer)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")
    config = validate_config(chat_config(tiny_model_dir, prompt={"chat_template": str(broken)}))
    with pytest.raises(ConfigError, match=r"broken\.jinja is not valid Jinja \(line 1"):
        run_template(config, tokenizer)


def test_conversation_data_needs_a_template(tiny_model_dir, tokenizer):
    tokenizer.chat_template = None
    config = validate_config(chat_config(tiny_model_dir))
    with pytest.raises(ConfigError, match="prompt.chat_template: the tokenizer of .* has no chat template"):
        run_template(config, tokenizer)


def test_end_of_turn_is_a_stop_token_only_when_it_is_one_token(tokenizer):
    tokenizer.chat_template = CHATML
    assert end_of_turn_id(tokenizer) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    tokenizer.chat_template = LLAMA3  # <|eot_id|> is not a token of this vocabulary
    assert end_of_turn_id(tokenizer) is None


# ---- labels -------------------------------------------------------------------------------------


def test_labels_are_the_assistant_tokens_and_end_of_turn(tiny_model_dir, tokenizer):
    config = validate_config(chat_config(tiny_model_dir, prompt={"chat_template": "chatml"}))
    set_run_template(config, tokenizer)
    [example], stats = conversation_examples(tokenizer, [TWO_TURNS], config, 1000)
    pieces = [("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False), ("yo<|im_end|>", True),
              ("\n<|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n", False), ("bye<|im_end|>", True),
              ("\n", False)]
    ids, labels = [], []
    for text, trained in pieces:
        piece_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece_ids
        labels += piece_ids if trained else [IGNORE_INDEX] * len(piece_ids)
    assert example.input_ids == ids
    assert example.labels == labels
    assert stats == MaskStats(rows=1, eos_trained=True, trained_tokens=7, tokens=len(ids))


def test_last_assistant_only_and_no_eos(tiny_model_dir, tokenizer):
    config = validate_config(chat_config(tiny_model_dir, prompt={"chat_template": "chatml"},
                                         conversation={"train_on": "last_assistant", "train_eos": False}))
    set_run_template(config, tokenizer)
    [example], stats = conversation_examples(tokenizer, [TWO_TURNS], config, 1000)
    assert tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX]) == "bye"
    assert not stats.eos_trained


def test_truncation_counts_cut_turns_and_lost_targets(tiny_model_dir, tokenizer):
    config = validate_config(chat_config(tiny_model_dir, prompt={"chat_template": "chatml"}))
    set_run_template(config, tokenizer)
    short = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y"}]
    examples, stats = conversation_examples(tokenizer, [TWO_TURNS, short], config, 30)
    assert len(examples) == 1  # the second row's answer lies beyond 30 tokens: it is skipped, not trained empty
    assert stats.target_truncated_away == 1 and stats.turns_cut == 2 + 2 and stats.problem_rows == [2]
    assert len(examples[0].input_ids) == 30


def test_no_trained_token_is_refused_and_many_lost_rows_warn(caplog):
    with pytest.raises(DataError, match="train.jsonl: no row has a trained token .*conversation.train_on"):
        check_mask_stats(MaskStats(rows=3, no_trained_token=2, target_truncated_away=1), "train.jsonl")
    with caplog.at_level(logging.WARNING):
        check_mask_stats(MaskStats(rows=10, no_trained_token=1, target_truncated_away=1, problem_rows=[3, 7]), "d")
    assert "2 of 10 row(s) train nothing" in caplog.text and "data rows 3, 7" in caplog.text


def test_train_refuses_data_with_nothing_to_train(tiny_model_dir, tmp_path):
    config = chat_config(tiny_model_dir, preprocessing={"split": [1.0, 0.0, 0.0], "max_input_length": 8})
    with pytest.raises(DataError, match="no row has a trained token .*raise preprocessing.max_input_length"):
        api.train(config, chat_rows(4), tmp_path / "run", show_progress=False)


# ---- formats ------------------------------------------------------------------------------------


def test_hh_rlhf_transcripts_are_detected(tiny_model_dir, tokenizer):
    """Transcripts written as in ../shared/data/hh-rlhf-harmless (inline, so the test never needs that folder)."""
    frame = pd.DataFrame({"chosen": [
        "\n\nHuman: What is a fig?\n\nAssistant: A sweet fruit.",
        "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Name an owl.\n\nAssistant: The barn owl.",
    ]})
    config = validate_config(chat_config(tiny_model_dir, conversation={"column": "chosen"}))
    conversations = frame_conversations(frame, config.conversation)
    assert all(m[0]["role"] == "user" and m[-1]["role"] == "assistant" for m in conversations)
    assert conversations[0][0]["content"] == frame["chosen"][0].split("\n\nHuman: ")[1].split("\n\nAssistant:")[0]


def test_sharegpt_and_json_string_cells(tiny_model_dir):
    config = validate_config(chat_config(tiny_model_dir, conversation={"column": "conversations"}))
    cell = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    frame = pd.DataFrame({"conversations": [cell, json.dumps(cell)]})
    assert frame_conversations(frame, config.conversation) == [TWO_TURNS[:2]] * 2


def test_missing_column_and_unknown_role_name_the_row(tiny_model_dir):
    config = validate_config(chat_config(tiny_model_dir))
    with pytest.raises(DataError, match="dataset: column 'messages' not found"):
        frame_conversations(pd.DataFrame({"text": ["a"]}), config.conversation)
    bad = pd.DataFrame({"messages": [TWO_TURNS, [{"role": "robot", "content": "x"}]]})
    with pytest.raises(DataError, match="row 2, column 'messages': unknown role 'robot'"):
        frame_conversations(bad, config.conversation)
    with pytest.raises(DataError, match="row 1, column 'messages': empty"):
        frame_conversations(pd.DataFrame({"messages": [[]]}), validate_config(
            chat_config(tiny_model_dir, conversation={"format": "messages"})).conversation)


def test_history_strips_reasoning_from_every_earlier_turn():
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>x</think>a"},
                {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]
    assert history_of(messages, "strip") == [messages[0], {"role": "assistant", "content": "a"}, messages[2]]
    assert history_of(messages) == messages[:3]


@pytest.mark.parametrize("content", [
    "<think>x</think>a", "<think>x</think> \n a <think>y</think>b", "no reasoning", "<think>never closed",
    "a<think>x<think>y</think>b</think>c", "</think>a<think>", "<think></think>", "pre <think>x</think>\n",
])
def test_saved_template_strips_reasoning_as_training_does(tiny_model_dir, tokenizer, content):
    config = validate_config(chat_config(tiny_model_dir, prompt={"chat_template": "chatml", "reasoning": "strip"}))
    set_run_template(config, tokenizer)
    history = [{"role": "user", "content": "q"}, {"role": "assistant", "content": content},
               {"role": "user", "content": "q2"}]
    rendered = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    expected = tokenizer.apply_chat_template(history_of(history, "strip"), chat_template=CHATML, tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == expected
    last = [*history, {"role": "assistant", "content": content}]  # the turn being written keeps its reasoning
    assert tokenizer.apply_chat_template(last, tokenize=False).endswith(content + "<|im_end|>\n")


# ---- a run --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_run(tiny_model_dir, tmp_path_factory) -> Path:
    config = chat_config(tiny_model_dir, prompt={"chat_template": "chatml", "system_prompt": "Echo."})
    folder = tmp_path_factory.mktemp("chat") / "run"
    api.train(config, chat_rows(), folder, show_progress=False)
    return folder


def test_run_saves_and_seals_its_template(chat_run):
    saved = (chat_run / "chat_template.jinja").read_text()
    assert saved.endswith(CHATML) and '"Echo."' in saved
    assert "chat_template.jinja" in sealed_files(chat_run)
    assert api.load(chat_run).tokenizer.chat_template == saved


def test_run_predicts_and_evaluates_conversations(chat_run):
    tuned = api.load(chat_run)
    predictions = api.predict(tuned, chat_rows(2))
    assert len(predictions["prediction"]) == 2
    metrics = api.evaluate(tuned, chat_rows(4))
    assert metrics["rows"] == 4 and metrics["loss"] > 0
    metrics_file = json.loads((chat_run / "metrics.json").read_text())
    assert metrics_file["validation"]["rows"] == 3


def test_a_template_that_cannot_stop_is_warned_about(tiny_model_dir, tokenizer, caplog):
    config = validate_config(chat_config(tiny_model_dir, prompt={"chat_template": "llama3"}))
    with caplog.at_level(logging.WARNING):
        set_run_template(config, tokenizer)
    assert "closes each turn with '<|eot_id|>', which is not one token of this tokenizer" in caplog.text


def test_a_conversation_the_template_refuses_names_its_row(tiny_model_dir, tokenizer):
    config = validate_config(chat_config(tiny_model_dir, prompt={"chat_template": "mistral"}))
    set_run_template(config, tokenizer)
    late_system = [{"role": "user", "content": "x"}, {"role": "system", "content": "y"},
                   {"role": "assistant", "content": "z"}]  # mistral folds a system turn into the first user turn only
    with pytest.raises(DataError, match="data row 2: the chat template refused the conversation .*user, assistant"):
        conversation_examples(tokenizer, [TWO_TURNS, late_system], config, 1000)

