"""GGUF export of the default model, fine-tuned on the demo's dates: loaded back in transformers, and
run in llama.cpp itself, it answers the demo's test prompts as tunewright does; llama.cpp tokenizes
text as the Hugging Face tokenizer does.

Integration: the default model, a short fine-tune on the demo's dates data, and llama.cpp built from
source by `make llama-cpp` (cached) into .venv-llamacpp; llama.cpp runs there in a subprocess
(tests/llama_cpp/runner.py). bench/gguf_export.py records the same figures for BENCHMARKS.md.

llama.cpp's pre-tokenizer for this vocabulary ("smollm") splits a run of two or more whitespace
characters before a digit differently from the Hugging Face tokenizer (which splits digits off
first, so the run ends its own piece). The test pins that as the only difference.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunewright
from tunewright.data import encode_prompts, render_prompts

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
LLAMA_PYTHON = REPO / ".venv-llamacpp" / "bin" / "python"
RUNNER = Path(__file__).parent / "llama_cpp" / "runner.py"
DATES = REPO / "examples" / "dates"
# Where llama.cpp's tokenization differs from the Hugging Face tokenizer's (see the module docstring).
KNOWN_TOKENIZER_DIFFERENCE = re.compile(r"\s{2,}\d")
PROMPTS = 10


@pytest.fixture(scope="module")
def llama_python() -> Path:
    if not LLAMA_PYTHON.is_file():
        pytest.skip("llama.cpp is not built here: run `make llama-cpp` (builds it from source once, ~10 min)")
    return LLAMA_PYTHON


@pytest.fixture(scope="module")
def dates_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = yaml.safe_load((DATES / "config.yaml").read_text())
    config["trainer"] = {**config["trainer"], "max_steps": 6, "epochs": 1}
    folder = tmp_path_factory.mktemp("dates") / "run"
    tunewright.train(config, pd.read_csv(DATES / "train.csv", dtype=str).head(64), folder, show_progress=False)
    return folder


def run_llama(python: Path, gguf: Path, prompts: list[list[int]], max_new_tokens: int,
              texts: list[str]) -> dict[str, list[list[int]]]:
    request = json.dumps({"gguf": str(gguf), "prompts": prompts, "max_new_tokens": max_new_tokens, "texts": texts})
    result = subprocess.run([str(python), str(RUNNER)], input=request, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def varied_strings(count: int = 200, seed: int = 0) -> list[str]:
    """Unicode (accents, CJK, emoji, RTL, combining marks), digit runs, whitespace runs, code, markup."""
    rng = random.Random(seed)
    pieces = [
        "hello", "Hello", "HELLO", " world", "naïve", "café", "Straße", "ﬁne", "日本語", "中文字符", "한국어",
        "Привет", "مرحبا", "שלום", "🙂", "👩‍💻", "🇫🇷", "e\u0301", "\u00e9", "1", "12", "123", "2026-10-01",
        "3.14159", "1,000,000", "0x1F", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", "<|im_start|>",
        "<|im_end|>", "def f(x):", "return x**2", "{\"a\": [1, 2]}", "<b>bold</b>", "'s", "'re", "n't",
        "...", "!!!", "—", "–", "€", "$", "%", "#", "@user", "https://example.com/a?b=c",
    ]
    strings = list(pieces)
    while len(strings) < count:
        strings.append("".join(rng.choice(pieces) for _ in range(rng.randint(2, 7))))
    return strings[:count]


def test_transformers_loads_the_f32_export_with_the_same_logits_and_text(dates_run: Path, tmp_path: Path) -> None:
    tuned = tunewright.load(dates_run)
    frame = pd.read_csv(DATES / "test.csv", dtype=str).head(30)
    ids = encode_prompts(render_prompts(frame, tuned.config), tuned.tokenizer, tuned.config.prompt.use_chat_template)
    predicted = [text.strip() for text in tuned.predict(frame)["prediction"]]
    gguf = tunewright.export(dates_run, tmp_path / "gguf", format="gguf", quantization="f32")
    merged = AutoModelForCausalLM.from_pretrained(tunewright.export(dates_run, tmp_path / "hf", merge=True)).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.no_grad():
        for prompt in ids[:5]:
            batch = torch.tensor([prompt])
            assert (from_gguf(batch).logits - merged(batch).logits).abs().max().item() < 1e-3
    for prompt, expected in zip(ids, predicted, strict=True):
        out = from_gguf.generate(torch.tensor([prompt]), max_new_tokens=tuned.config.generation.max_new_tokens,
                                 do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                 pad_token_id=tokenizer.pad_token_id)
        assert tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip() == expected


def test_llama_cpp_runs_the_export_as_tunewright_predicts(llama_python: Path, dates_run: Path,
                                                          tmp_path: Path) -> None:
    tuned = tunewright.load(dates_run)
    frame = pd.read_csv(DATES / "test.csv", dtype=str).head(PROMPTS)
    ids = encode_prompts(render_prompts(frame, tuned.config), tuned.tokenizer, tuned.config.prompt.use_chat_template)
    predicted = [text.strip() for text in tuned.predict(frame)["prediction"]]
    max_new = tuned.config.generation.max_new_tokens
    texts = varied_strings()
    hf_tokens = [tuned.tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]

    figures: dict[str, Any] = {"prompts": PROMPTS, "strings": len(texts)}
    for quantization in ("f32", "q8_0"):
        gguf = tunewright.export(dates_run, tmp_path / quantization, format="gguf", quantization=quantization)
        result = run_llama(llama_python, gguf, ids, max_new, texts)
        generated = [tuned.tokenizer.decode(tokens, skip_special_tokens=True).strip()
                     for tokens in result["generated"]]
        same = [left == right for left, right in zip(generated, predicted, strict=True)]
        figures[f"{quantization}_identical_rows"] = sum(same)
        figures[f"{quantization}_size_mb"] = round(gguf.stat().st_size / 1e6, 1)
        if quantization == "f32":
            assert generated == predicted
            mismatched = [text for text, ours, theirs in zip(texts, hf_tokens, result["tokens"], strict=True)
                          if ours != theirs]
            figures["tokenizer_identical"] = len(texts) - len(mismatched)
            figures["tokenizer_mismatches"] = mismatched
    print(json.dumps(figures, indent=2, ensure_ascii=False))
    assert figures["q8_0_identical_rows"] >= PROMPTS - 2
    unexplained = [text for text in figures["tokenizer_mismatches"] if not KNOWN_TOKENIZER_DIFFERENCE.search(text)]
    assert unexplained == []
    assert any(KNOWN_TOKENIZER_DIFFERENCE.search(text) for text in texts)  # the difference is exercised
