from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from tunewright.config import BackendConfig
from tunewright.errors import ModelLoadError
from tunewright.model import context_length, ensure_pad_token, load_base_model, max_input_length, resolve_model_source


def model_with(**config) -> LlamaForCausalLM:
    base = dict(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    return LlamaForCausalLM(LlamaConfig(**base, **config))


def test_context_length_prefers_max_sequence_length() -> None:
    model = model_with(max_position_embeddings=512)
    assert context_length(model) == 512
    model.config.max_sequence_length = 300
    assert context_length(model) == 300


def test_context_length_falls_back_to_2048() -> None:
    # A config that states neither length (some architectures do not).
    assert context_length(SimpleNamespace(config=SimpleNamespace(model_type="custom"))) == 2048


def test_max_input_length_leaves_room_for_new_tokens_and_margin() -> None:
    model = model_with(max_position_embeddings=512)
    assert max_input_length(model, max_new_tokens=64) == 512 - 64 - 8
    assert max_input_length(model, max_new_tokens=64, cap=100) == 100
    with pytest.raises(ModelLoadError, match="generation.max_new_tokens=510 leaves no room"):
        max_input_length(model, max_new_tokens=510)


def test_pad_token_falls_back_to_eos_and_pads_left(tokenizer) -> None:
    tokenizer.pad_token = None
    ensure_pad_token(tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token and tokenizer.padding_side == "left"


def test_pad_token_is_added_when_there_is_no_eos(tokenizer, tiny_model) -> None:
    tokenizer.pad_token = None
    tokenizer.eos_token = None
    size = len(tokenizer)
    ensure_pad_token(tokenizer, tiny_model)
    assert tokenizer.pad_token == "<pad>" and len(tokenizer) == size + 1
    assert tiny_model.get_input_embeddings().num_embeddings == size + 1
    assert tiny_model.config.pad_token_id == tokenizer.pad_token_id


def test_load_local_folder(tiny_model_dir: Path) -> None:
    loaded = load_base_model(str(tiny_model_dir), BackendConfig())
    assert loaded.model.config.num_hidden_layers == 2
    assert loaded.tokenizer.pad_token is not None and loaded.tokenizer.padding_side == "left"


@pytest.mark.parametrize(("base_model", "message"), [
    ("./no/such/folder", "folder no/such/folder not found"),
    ("/tmp/missing-model.gguf", "GGUF file /tmp/missing-model.gguf not found"),
])
def test_unreadable_paths_are_named(base_model: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        resolve_model_source(base_model)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="is not a Hugging Face model folder \\(no config.json\\)"):
        resolve_model_source(str(tmp_path))


def test_hub_id_offline_fails_fast_and_clearly(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="Hugging Face Hub is not reachable \\(offline\\)"):
        resolve_model_source("someone/some-model")


def test_hub_kernels_are_off_unless_asked_for(tiny_model_dir: Path) -> None:
    """transformers >= 5.25 kernelizes through Hub kernels by default; a run must not reach the network for them."""
    loaded = load_base_model(str(tiny_model_dir), BackendConfig(device="cpu"))
    assert not getattr(loaded.model, "use_kernels", False)
    loaded.model.train()  # where transformers would kernelize
    loaded.model.eval()
    assert not getattr(loaded.model, "use_kernels", False)
