"""A tiny but real stack, built in process: a seeded 2-layer Llama and a byte-level tokenizer.

Everything goes through the real Hugging Face padding, chat-template and peft code paths; no
mocks and no Hub. Building it takes well under a second.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from accelerate.state import AcceleratorState
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(autouse=True)
def fp32_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """`trainer.precision: auto` resolves to fp32 in every test, whatever the CPU.

    On CPUs with native bf16 (AVX512-BF16, AMX) `auto` means bf16 autocast, whose rounding
    breaks the exact comparisons many tests make (packed vs unpacked, accumulation, resume).
    tests/test_precision.py covers the bf16 path and the per-device resolution explicitly.
    """
    monkeypatch.setenv("TUNEWRIGHT_CPU_BF16", "emulated")


@pytest.fixture(autouse=True)
def fresh_accelerator_state() -> Iterator[None]:
    """Each test starts with no Accelerate state: a test on CUDA is followed by one that asks for the CPU.

    Accelerate keeps one process-wide state and refuses an Accelerator(cpu=True) once a CUDA one
    exists; a run started by a user's process is one state, but the suite starts hundreds.
    """
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(autouse=True)
def cpu_only_tests(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests marked `cpu_only(reason)` run on the CPU even where CUDA is present (Accelerate's own switch)."""
    marker = request.node.get_closest_marker("cpu_only")
    if marker is None:
        return
    if not marker.kwargs.get("reason") and not marker.args:
        raise pytest.UsageError(f"{request.node.nodeid}: cpu_only needs a reason")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per byte (256) + 3 specials; lossless on any text."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for char in sorted(alphabet):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A saved tiny model folder: what `base_model: <folder>` points at in tests."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture
def tiny_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    return build_model(len(tokenizer))


def copy_rows(count: int = 24) -> pd.DataFrame:
    """A learnable toy task: the output repeats the input word."""
    words = ["cat", "dog", "sun", "sea", "red", "owl", "fig", "ink"]
    return pd.DataFrame({"word": [words[i % len(words)] for i in range(count)],
                         "echo": [words[i % len(words)] for i in range(count)]})


@pytest.fixture
def copy_csv(tmp_path: Path) -> Path:
    path = tmp_path / "copy.csv"
    copy_rows().to_csv(path, index=False)
    return path


@pytest.fixture
def tiny_config(tiny_model_dir: Path) -> dict:
    """A valid config dict for the tiny model; tests copy and change it.

    fp32 explicitly: CLI tests run `tunewright` in subprocesses, out of reach of fp32_by_default.
    """
    return {
        "base_model": str(tiny_model_dir),
        "input_features": [{"name": "word"}],
        "output_features": [{"name": "echo", "type": "text"}],
        "prompt": {"template": "say {word}:"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "trainer": {"epochs": 2, "batch_size": 4, "learning_rate": 0.01, "precision": "fp32"},
        "generation": {"max_new_tokens": 5, "batch_size": 8},
        "preprocessing": {"split": [0.75, 0.25, 0.0]},
    }


def train_tiny_run(base_model: Path, folder: Path, trainer: dict, rows_repeat: int = 1, **sections: dict) -> Path:
    """Train a one-or-two-step LoRA run of the copy task into `folder` and return it (module fixtures use it)."""
    from tunewright import api

    config = {
        "base_model": str(base_model),
        "input_features": [{"name": "word"}],
        "output_features": [{"name": "echo"}],
        "prompt": {"template": "say {word}:"},
        "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
        "trainer": {"batch_size": 4, **trainer},
        "generation": {"max_new_tokens": 3},
        "preprocessing": {"split": [1.0, 0.0, 0.0]},
        **sections,
    }
    rows = [{"word": word, "echo": word} for word in ["cat", "dog", "sun", "sea"] * rows_repeat]
    api.train(config, rows, folder, show_progress=False)
    return folder
