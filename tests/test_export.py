"""Export: the exported folder, reloaded with plain transformers (merged) or plain peft (adapter),
gives the same logits and the same generated text as tunewright, for every adapter type."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import copy_rows
from peft import PeftModel
from safetensors import safe_open
from test_adapters import CASES, case_config, logits_of
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from typer.testing import CliRunner

import tunewright
from tunewright.cli import app
from tunewright.errors import RunFolderError
from tunewright.export import export_run
from tunewright.run import check_complete

MERGE_ATOL = 1e-5  # merged weights re-associate float32 sums
PROMPT_LEARNING = {
    name for name, adapter in CASES.items() if adapter["type"] in ("prompt_tuning", "prefix_tuning")
}
HF_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


@pytest.fixture(scope="module", params=list(CASES))
def trained(request: pytest.FixtureRequest, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    run_dir = tmp_path_factory.mktemp(f"export-{request.param}") / "run"
    result = tunewright.train(
        case_config(tiny_model_dir, CASES[request.param]), copy_rows(), run_dir, show_progress=False
    )
    return request.param, result.run_dir


# Prompts of different lengths, so the batch is padded (exports must pad on the left).
WORDS = pd.DataFrame({"word": ["cat", "a much longer word", "ink", "sea and sun"]})


def plain_generate(model: torch.nn.Module, folder: Path, words: list[str]) -> list[str]:
    return generate_texts(model, folder, [f"say {word}:" for word in words])


def test_merged_export_loads_with_plain_transformers(trained, tmp_path: Path) -> None:
    name, run_dir = trained
    if name in PROMPT_LEARNING:
        pytest.skip("virtual tokens cannot be merged (test_cli_export_refuses_merging_virtual_tokens)")
    tuned = tunewright.load(run_dir)
    rows = WORDS
    expected_logits = logits_of(tuned.model)
    expected = tunewright.predict(tuned, rows)["prediction"].tolist()
    folder = export_run(run_dir, tmp_path / "merged", merge=True)
    for file_name in HF_FILES:
        assert (folder / file_name).is_file(), file_name
    assert not (folder / "adapter_config.json").exists()
    assert AutoTokenizer.from_pretrained(folder).padding_side == "left"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    torch.testing.assert_close(logits_of(model), expected_logits, atol=MERGE_ATOL, rtol=0)
    assert plain_generate(model, folder, rows["word"].tolist()) == expected


# peft's generic target check misreads AdaLoRA's rank_pattern keys (its loader does use them).
@pytest.mark.filterwarnings("ignore:The following rank_pattern keys did not match:RuntimeWarning")
def test_adapter_export_loads_with_plain_peft(trained, tmp_path: Path, tiny_model_dir: Path) -> None:
    name, run_dir = trained
    if CASES[name]["type"] == "full":
        pytest.skip("a full fine-tune has no adapter: it exports as a model folder (merged test)")
    tuned = tunewright.load(run_dir)
    rows = WORDS
    expected_logits = logits_of(tuned.model)
    expected = tunewright.predict(tuned, rows)["prediction"].tolist()
    folder = export_run(run_dir, tmp_path / "adapter")
    assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
    assert not (folder / "model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base.generation_config = GenerationConfig.from_pretrained(folder)  # the export's generation settings
    model = PeftModel.from_pretrained(base, folder).eval()
    assert torch.equal(logits_of(model), expected_logits)
    assert plain_generate(model, folder, rows["word"].tolist()) == expected


def test_cli_export_merged_in_bfloat16(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = tunewright.train(
        case_config(tiny_model_dir, CASES["lora"]), copy_rows(), tmp_path / "run", show_progress=False
    )
    output = tmp_path / "export"
    result = CliRunner().invoke(
        app,
        [
            "--quiet",
            "export",
            "--model",
            str(run.run_dir),
            "--output",
            str(output),
            "--merge",
            "--dtype",
            "bfloat16",
        ],
    )
    assert result.exit_code == 0, result.output
    with safe_open(output / "model.safetensors", "pt") as weights:
        dtypes = {weights.get_tensor(key).dtype for key in weights.keys()}  # noqa: SIM118
        assert not any("lora" in key for key in weights.keys())  # noqa: SIM118
    assert dtypes == {torch.bfloat16}
    generation = json.loads((output / "generation_config.json").read_text())
    assert generation["max_new_tokens"] == 5 and generation["eos_token_id"] == 2
    assert (output / "tunewright_config.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(output)
    assert model.dtype == torch.bfloat16
    # Exporting again into the same folder needs --overwrite (exit 5, one line).
    again = CliRunner().invoke(app, ["--quiet", "export", "-m", str(run.run_dir), "-o", str(output)])
    assert again.exit_code == RunFolderError.exit_code
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0]  # before loading


def test_cli_export_refuses_merging_virtual_tokens(tmp_path: Path, tiny_model_dir: Path) -> None:
    run = tunewright.train(
        case_config(tiny_model_dir, CASES["prompt_tuning"]),
        copy_rows(),
        tmp_path / "run",
        show_progress=False,
    )
    output = tmp_path / "export"
    result = CliRunner().invoke(
        app, ["--quiet", "export", "-m", str(run.run_dir), "-o", str(output), "--merge"]
    )
    assert result.exit_code == 7, result.output  # ConfigError
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be merged" in lines[0] and "export without --merge" in lines[0]
    assert not output.exists() and not list(tmp_path.glob(".export.exporting-*"))


def test_cli_export_rejects_an_unknown_dtype(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["--quiet", "export", "-m", str(tmp_path), "-o", str(tmp_path / "x"), "--dtype", "int4"]
    )
    assert result.exit_code == 2  # a usage error: click names the flag and the choices
    assert "'--dtype'" in result.stderr and "'int4' is not one of" in result.stderr


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "dates"


@pytest.mark.integration
def test_real_model_exports_predict_like_tunewright(tmp_path: Path) -> None:
    """smollm2-135m: a short LoRA fine-tune, exported merged (plain transformers) and as an adapter
    (plain peft on the base folder the adapter names), predicts exactly what tunewright predicts."""
    config = {
        "base_model": "smollm2-135m",
        "input_features": [{"name": "date"}],
        "output_features": [{"name": "iso", "type": "text"}],
        "prompt": {"template": "Rewrite the date in ISO format (YYYY-MM-DD).\nDate: {date}\nISO:"},
        "adapter": {"type": "lora", "r": 8, "target_modules": "all-linear"},
        "trainer": {"max_steps": 4, "batch_size": 4, "learning_rate": 0.002},
        "generation": {"max_new_tokens": 12, "batch_size": 8},
        "preprocessing": {"split": [1.0, 0.0, 0.0]},
    }
    rows = pd.read_csv(EXAMPLES / "train.csv").head(16)
    tests = pd.read_csv(EXAMPLES / "test.csv").head(6)
    run = tunewright.train(config, rows, tmp_path / "run", show_progress=False)
    tuned = tunewright.load(run.run_dir)
    expected = tunewright.predict(tuned, tests)["prediction"].tolist()
    prompts = [config["prompt"]["template"].format(date=date) for date in tests["date"]]

    adapter_dir = export_run(run.run_dir, tmp_path / "adapter")
    base_path = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    base.generation_config = GenerationConfig.from_pretrained(adapter_dir)
    adapted = PeftModel.from_pretrained(base, adapter_dir).eval()
    assert generate_texts(adapted, adapter_dir, prompts) == expected

    merged_dir = export_run(run.run_dir, tmp_path / "merged", merge=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    assert generate_texts(merged, merged_dir, prompts) == expected


@torch.no_grad()
def generate_texts(model: torch.nn.Module, folder: Path, prompts: list[str]) -> list[str]:
    """What a user without tunewright writes: tokenizer + generate with the folder's generation config."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    output = model.generate(**batch)
    texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return [text.strip() for text in texts]


@pytest.fixture
def run_and_neighbours(tiny_model_dir: Path, tmp_path: Path) -> Path:
    """runs/r1 (a LoRA run) next to unrelated user files in runs/."""
    config = {**case_config(tiny_model_dir, CASES["lora"]), "preprocessing": {"split": [1.0, 0.0, 0.0]}}
    config["trainer"] = {**config["trainer"], "max_steps": 1, "checkpoint_steps": None}
    run = tunewright.train(config, copy_rows(8), tmp_path / "runs" / "r1", show_progress=False)
    (tmp_path / "runs" / "notes.txt").write_text("keep", encoding="utf-8")
    return run.run_dir


def export_cli(run_dir: Path, output: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--quiet", "export", "-m", str(run_dir), "-o", str(output), *extra])
    return result.exit_code, " ".join(result.output.split())


def tree(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_export_never_writes_over_the_run_it_exports(run_and_neighbours: Path) -> None:
    """`-o runs --overwrite` replaced all of runs/; `-o runs/r1 --overwrite` destroyed the run."""
    run_dir = run_and_neighbours
    runs = run_dir.parent
    before = tree(runs)
    cases = [
        (runs, "--overwrite", "the output folder contains the run being exported"),
        (run_dir, "--overwrite", "the output folder is the run being exported"),
        (run_dir / "export", "", "the output folder is inside the run being exported"),  # would break its checksums
    ]
    for output, flag, expected in cases:
        code, message = export_cli(run_dir, output, *filter(None, [flag]))
        assert code == RunFolderError.exit_code and expected in message, message
    assert tree(runs) == before
    check_complete(run_dir)


def test_export_overwrite_replaces_only_an_export_folder(run_and_neighbours: Path, tmp_path: Path) -> None:
    run_dir = run_and_neighbours
    mine = tmp_path / "mine"  # the user's folder: no export marker
    mine.mkdir()
    (mine / "config.yaml").write_text("a: 1", encoding="utf-8")
    (mine / "data.csv").write_text("x\n1\n", encoding="utf-8")
    code, message = export_cli(run_dir, mine, "--overwrite")
    assert code == RunFolderError.exit_code, message
    assert "not a tunewright export folder (no tunewright_config.yaml)" in message
    assert "config.yaml, data.csv" in message and len(list(mine.iterdir())) == 2
    other_run = tmp_path / "runs" / "r2"  # another run is not an export either
    shutil.copytree(run_dir, other_run)
    code, message = export_cli(run_dir, other_run, "--overwrite")
    assert code == RunFolderError.exit_code and "not a tunewright export folder" in message, message
    check_complete(other_run)
    a_file = tmp_path / "model.txt"
    a_file.write_text("keep", encoding="utf-8")
    code, message = export_cli(run_dir, a_file, "--overwrite")
    assert code == RunFolderError.exit_code and "exists and is not a folder" in message, message
    assert a_file.read_text(encoding="utf-8") == "keep"


def test_export_overwrite_names_foreign_files_then_replaces_the_export(
    run_and_neighbours: Path, tmp_path: Path
) -> None:
    run_dir = run_and_neighbours
    output = tmp_path / "exported"
    assert export_cli(run_dir, output)[0] == 0
    assert (output / "adapter_config.json").is_file()
    (output / "notes.txt").write_text("keep", encoding="utf-8")
    before = tree(output)
    code, message = export_cli(run_dir, output, "--merge", "--overwrite")
    assert code == RunFolderError.exit_code, message
    assert "--overwrite would delete notes.txt, which tunewright did not write" in message
    assert tree(output) == before
    (output / "notes.txt").unlink()
    link = tmp_path / "link"  # through a symlink: the folder it points at is replaced, the link stays
    link.symlink_to(output, target_is_directory=True)
    code, message = export_cli(run_dir, link, "--merge", "--overwrite")
    assert code == 0, message
    assert link.is_symlink() and (output / "model.safetensors").is_file()
    assert not (output / "adapter_config.json").exists()  # the old export's files are gone
