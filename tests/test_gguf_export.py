"""GGUF export: the file written by llama.cpp's own converter loads back in plain transformers with the
merged model's logits, the run's prompt rendering and greedy text; the Modelfile's TEMPLATE (run by Go's
text/template, as Ollama runs it) renders a conversation as the GGUF's chat template does.

The tiny models here carry the default model's real tokenizer: llama.cpp's converter recognises a
BPE tokenizer by its pre-tokenizer, and a made-up one is (rightly) refused.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import build_model, train_tiny_run
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import tunewright
from tunewright.cli import app
from tunewright.data import encode_prompts, render_prompts
from tunewright.exported_prompt import ollama_template, render_chat, run_chat_template
from tunewright.model import resolve_model_source

WORDS = ["cat", "a much longer word", "ink", "sea and sun", "October 1, 2026", "naïve café ☕", "x{{y}}z"]
# f32 stores the merged weights exactly; f16 rounds each weight to 11 significant bits.
LOGIT_ATOL = {"f32": 1e-4, "f16": 5e-2}
GO_RENDERER = Path(__file__).parent / "go_template" / "main.go"
runner = CliRunner()


@pytest.fixture(scope="module")
def smol_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random llama with SmolLM2's tokenizer (49,152 tokens) and chat template."""
    folder = tmp_path_factory.mktemp("smol-tiny")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m"))
    build_model(len(tokenizer), seed=3).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def train_smol_run(base: Path, folder: Path, use_chat_template: bool) -> Path:
    prompt = {"template": "say {word}:", "task": "Repeat the word.", "use_chat_template": use_chat_template}
    return train_tiny_run(base, folder, {"max_steps": 2, "learning_rate": 0.05}, prompt=prompt)


@pytest.fixture(scope="module", params=[False, True], ids=["raw-prompt", "chat-template"])
def smol_run(request: pytest.FixtureRequest, smol_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Both prompt renderings: the exported chat template differs between them."""
    return train_smol_run(smol_base, tmp_path_factory.mktemp("smol-run") / "run", request.param)


@pytest.fixture(scope="module")
def raw_run(smol_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run, for what does not depend on the prompt rendering."""
    return train_smol_run(smol_base, tmp_path_factory.mktemp("raw-run") / "run", False)


def export_cli(run: Path, output: Path, *flags: str) -> Path:
    result = runner.invoke(app, ["export", "--model", str(run), "--output", str(output), *flags])
    assert result.exit_code == 0, result.output
    return output


def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


@pytest.mark.parametrize("quantization", ["f32", "f16"])
def test_gguf_round_trip_matches_the_merged_model(smol_run: Path, tmp_path: Path, quantization: str) -> None:
    gguf_dir = export_cli(smol_run, tmp_path / "gguf", "--format", "gguf", "--quantization", quantization)
    (gguf_file,) = [path.name for path in gguf_dir.iterdir()]  # the contract: one .gguf file, nothing else
    assert gguf_file.endswith(f"-{quantization}.gguf")
    merged_dir = export_cli(smol_run, tmp_path / "merged", "--merge")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file).eval()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)

    tuned = tunewright.load(smol_run)
    frame = pd.DataFrame({"word": WORDS})
    tuned_ids = encode_prompts(render_prompts(frame, tuned.config), tuned.tokenizer,
                               tuned.config.prompt.use_chat_template)
    for word, ids in zip(WORDS, tuned_ids, strict=True):
        # The GGUF's own chat template, through plain transformers, gives the run's prompt tokens.
        text = gguf_tokenizer.apply_chat_template([{"role": "user", "content": word}], add_generation_prompt=True,
                                                  tokenize=False)
        assert gguf_tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        difference = (logits(from_gguf, ids) - logits(merged, ids)).abs().max().item()
        assert difference < LOGIT_ATOL[quantization], (word, difference)

    predicted = tuned.predict(frame)["prediction"].tolist()
    for word, ids, expected in zip(WORDS, tuned_ids, predicted, strict=True):
        out = from_gguf.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False,
                                 eos_token_id=gguf_tokenizer.eos_token_id, pad_token_id=gguf_tokenizer.pad_token_id)
        assert gguf_tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip() == expected.strip(), word


@pytest.mark.parametrize("adapter", [{"type": "full"}, {"type": "loha", "r": 4, "alpha": 8}, {"type": "ia3"}],
                         ids=["full", "loha", "ia3"])
def test_every_mergeable_run_exports(smol_base: Path, tmp_path: Path, adapter: dict) -> None:
    run = train_tiny_run(smol_base, tmp_path / "run", {"max_steps": 1, "learning_rate": 0.05}, adapter=adapter)
    gguf = tunewright.export(run, tmp_path / "gguf", format="gguf", quantization="f32")
    merged = AutoModelForCausalLM.from_pretrained(export_cli(run, tmp_path / "merged", "--merge")).eval()
    from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name).eval()
    ids = AutoTokenizer.from_pretrained(run)("say cat:")["input_ids"]
    assert (logits(from_gguf, ids) - logits(merged, ids)).abs().max().item() < LOGIT_ATOL["f32"]


def go_render(template: str, messages: list[dict[str, str]]) -> str:
    go = shutil.which("go")
    assert go is not None, "Go is needed to run Ollama's template engine: `make install` installs golang-go"
    request = json.dumps({"template": template, "messages": messages})
    result = subprocess.run([go, "run", str(GO_RENDERER)], input=request, capture_output=True, text=True,
                            check=True)
    return result.stdout


TWO_TURNS = [
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "an answer"},
    {"role": "user", "content": "naïve {{ second }} \"quoted\"\nline"},
]


def test_modelfile_template_renders_a_conversation_as_the_chat_template(smol_run: Path, tmp_path: Path) -> None:
    out = export_cli(smol_run, tmp_path / "ollama", "--format", "ollama", "--quantization", "q8_0")
    assert sorted(path.name for path in out.iterdir()) == ["Modelfile", "ollama-q8_0.gguf"]
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./ollama-q8_0.gguf\n" in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="ollama-q8_0.gguf")
    assert go_render(template, TWO_TURNS) == render_chat(tokenizer.chat_template, tokenizer, TWO_TURNS)
    # Greedy, as the run generates; stops on the end-of-turn token; at most the run's new tokens.
    assert "PARAMETER temperature 0\n" in modelfile
    assert f'PARAMETER stop "{tokenizer.eos_token}"\n' in modelfile
    assert "PARAMETER num_predict 3\n" in modelfile


def test_chat_template_renders_the_prompt_with_several_columns_and_special_text(smol_base: Path) -> None:
    tuned = tunewright.from_config({
        "base_model": str(smol_base), "input_features": [{"name": "a"}, {"name": "b"}],
        "output_features": [{"name": "y"}], "prompt": {"template": 'A "{a}" \\ {{b}}\n{b}', "use_chat_template": True},
    })
    template = run_chat_template(tuned.config, tuned.tokenizer)
    frame = pd.DataFrame({"a": ["x"], "b": ["é\ty"]})
    (rendered,) = render_prompts(frame, tuned.config)
    expected = tuned.tokenizer.apply_chat_template([{"role": "user", "content": rendered}],
                                                   add_generation_prompt=True, tokenize=False)
    # With several input columns, the message is the whole rendered prompt.
    assert render_chat(template, tuned.tokenizer, [{"role": "user", "content": rendered}]) == expected
    assert go_render(ollama_template(template, tuned.tokenizer), [{"role": "user", "content": rendered}]) == expected


def test_category_run_exports_with_a_note_on_label_scoring(smol_base: Path, tmp_path: Path) -> None:
    run = train_tiny_run(smol_base, tmp_path / "run", {"max_steps": 1},
                         output_features=[{"name": "echo", "type": "category", "decoder": "label_scoring"}])
    out = export_cli(run, tmp_path / "ollama", "--format", "ollama")
    modelfile = (out / "Modelfile").read_text()
    assert "# The run scores labels" in modelfile and "cat" in modelfile


def train_conversation_run(base: Path, folder: Path, prompt: dict) -> Path:
    rows = [{"messages": [{"role": "user", "content": word}, {"role": "assistant", "content": word}]}
            for word in ["cat", "dog", "sun", "sea"]]
    tunewright.train({"base_model": str(base), "conversation": {}, "prompt": prompt,
                      "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.0},
                      "trainer": {"max_steps": 1, "batch_size": 4, "precision": "fp32"},
                      "generation": {"max_new_tokens": 3}, "preprocessing": {"split": [1.0, 0.0, 0.0]}},
                     rows, folder, show_progress=False)
    return folder


def test_conversation_run_exports_for_ollama(smol_base: Path, tmp_path: Path) -> None:
    """SmolLM2's own template is ChatML with a default system prompt: the Modelfile renders whole chats as it."""
    run = train_conversation_run(smol_base, tmp_path / "run", {})
    out = export_cli(run, tmp_path / "ollama", "--format", "ollama", "--quantization", "q8_0")
    modelfile = (out / "Modelfile").read_text()
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file="ollama-q8_0.gguf")
    chats = [TWO_TURNS, [{"role": "system", "content": "Be brief."}, *TWO_TURNS]]
    for chat in chats:
        assert go_render(template, chat) == render_chat(tokenizer.chat_template, tokenizer, chat)
    assert 'PARAMETER stop "<|im_end|>"\n' in modelfile and "# Send the whole conversation as messages" in modelfile


def test_conversation_run_that_ollama_cannot_render_is_refused(smol_base: Path, tmp_path: Path) -> None:
    run = train_conversation_run(smol_base, tmp_path / "run", {"reasoning": "strip"})
    result = runner.invoke(app, ["export", "-m", str(run), "-o", str(tmp_path / "o"), "--format", "ollama"])
    assert result.exit_code == 7, result.output
    assert "prompt.reasoning strip removes <think> blocks from history" in result.output
    assert not (tmp_path / "o").exists()


def test_classifier_head_run_is_refused(smol_base: Path, tmp_path: Path) -> None:
    run = train_tiny_run(smol_base, tmp_path / "run", {"max_steps": 1},
                         output_features=[{"name": "echo", "type": "category", "decoder": "classifier"}])
    result = runner.invoke(app, ["export", "--model", str(run), "--output", str(tmp_path / "g"), "--format", "gguf"])
    assert result.exit_code == 7
    assert "decoder 'classifier'" in result.output and not (tmp_path / "g").exists()


@pytest.mark.parametrize(("flags", "code", "text"), [
    (["--format", "gguf", "--merge"], 2, "always merged"),
    (["--format", "gguf", "--dtype", "float16"], 7, "--quantization"),
    (["--quantization", "q8_0"], 7, "--format gguf or ollama"),
    (["--format", "gguf", "--quantization", "q4_0"], 2, "q4_0"),
])
def test_flags_that_do_not_apply_are_refused(raw_run: Path, tmp_path: Path, flags: list[str], code: int,
                                             text: str) -> None:
    result = runner.invoke(app, ["export", "--model", str(raw_run), "--output", str(tmp_path / "o"), *flags])
    assert result.exit_code == code, result.output
    assert text in result.output and not (tmp_path / "o").exists()


def test_output_folder_rules(raw_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    refused = runner.invoke(app, ["export", "-m", str(raw_run), "-o", str(out), "--format", "gguf"])
    assert refused.exit_code == 5 and "not empty" in refused.output
    refused = runner.invoke(app, ["export", "-m", str(raw_run), "-o", str(out), "--format", "gguf", "--overwrite"])
    assert refused.exit_code == 5 and "no *.gguf" in refused.output and (out / "notes.txt").exists()
    (out / "notes.txt").unlink()
    export_cli(raw_run, out, "--format", "gguf", "--quantization", "f32")
    # --overwrite replaces an earlier GGUF export (a different tensor type: still one file afterwards).
    export_cli(raw_run, out, "--format", "gguf", "--quantization", "f16", "--overwrite")
    assert [path.name for path in out.iterdir()] == ["out-f16.gguf"]
    inside = runner.invoke(app, ["export", "-m", str(raw_run), "-o", str(raw_run / "g"), "--format", "gguf"])
    assert inside.exit_code == 5 and "inside the run being exported" in inside.output


def test_converter_failures_are_one_line(raw_run: Path, tiny_model_dir: Path, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # The tests' byte-level tokenizer is not one llama.cpp knows: the converter refuses it.
    run = train_tiny_run(tiny_model_dir, tmp_path / "bytes", {"max_steps": 1})
    result = runner.invoke(app, ["export", "-m", str(run), "-o", str(tmp_path / "g"), "--format", "gguf"])
    assert result.exit_code == 8, result.output
    assert "llama.cpp's converter failed on this model" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.exporting-*"))
    monkeypatch.setenv("TUNEWRIGHT_LLAMA_CPP", str(tmp_path))
    result = runner.invoke(app, ["export", "-m", str(raw_run), "-o", str(tmp_path / "h"), "--format", "gguf"])
    assert result.exit_code == 8 and "TUNEWRIGHT_LLAMA_CPP" in result.output


def test_a_converter_that_cannot_be_fetched_is_one_line(raw_run: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNEWRIGHT_CACHE", str(tmp_path / "cache"))  # no converter cached yet
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline: no registry, nothing among the local wheels
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    result = runner.invoke(app, ["export", "-m", str(raw_run), "-o", str(tmp_path / "g"), "--format", "gguf"])
    assert result.exit_code == 8, result.output
    assert "could not fetch llama.cpp's converter" in result.output
    assert "python -m tunewright.gguf_converter" in result.output
    assert not (tmp_path / "g").exists() and not list((tmp_path / "cache").glob("llama.cpp-convert-*"))
