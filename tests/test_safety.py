"""Loading safely: safetensors only (pickles need an opt-in), no remote code, damaged files named."""

from __future__ import annotations

import ast
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, build_tokenizer, train_tiny_run
from typer.testing import CliRunner

from tunewright.checkpoint import CHECKPOINT_DIR, load_checkpoint
from tunewright.cli import app
from tunewright.config import BackendConfig
from tunewright.errors import ModelLoadError, RunFolderError
from tunewright.model import check_safetensors_file, load_base_model

SRC = Path(__file__).resolve().parents[1] / "src" / "tunewright"


def calls_in_src() -> list[tuple[Path, ast.Call]]:
    found = []
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found += [(path, node) for node in ast.walk(tree) if isinstance(node, ast.Call)]
    return found


def call_name(node: ast.Call) -> str:
    return ast.unparse(node.func)


def test_every_torch_load_in_src_has_weights_only_true() -> None:
    torch_loads = [(path, node) for path, node in calls_in_src() if call_name(node) == "torch.load"]
    assert torch_loads, "expected at least the checkpoint loader"
    for path, node in torch_loads:
        flags = {keyword.arg: keyword.value for keyword in node.keywords}
        value = flags.get("weights_only")
        where = f"{path}:{node.lineno}"
        assert isinstance(value, ast.Constant) and value.value is True, (
            f"{where}: torch.load without weights_only=True"
        )
    # `from torch import load` would dodge the check above; so would pickle itself.
    for path in sorted(SRC.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        assert "from torch import load" not in source, path
        assert "import pickle" not in source and "import dill" not in source, path


def test_remote_code_is_never_trusted_by_a_literal() -> None:
    for path, node in calls_in_src():
        for keyword in node.keywords:
            if keyword.arg == "trust_remote_code":
                assert not (isinstance(keyword.value, ast.Constant) and keyword.value.value is True), (
                    f"{path}:{node.lineno}: trust_remote_code=True"
                )
    assert BackendConfig().trust_remote_code is False and BackendConfig().allow_pickle_weights is False


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def to_pickle_only(folder: Path) -> None:
    model = build_model(len(build_tokenizer()))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def test_pickle_only_weights_are_refused_without_the_opt_in(model_folder: Path) -> None:
    to_pickle_only(model_folder)
    with pytest.raises(
        ModelLoadError, match=r"holds only pickle weights \(pytorch_model.bin\).*allow_pickle_weights"
    ):
        load_base_model(str(model_folder), BackendConfig(device="cpu"))


def test_pickle_weights_load_with_the_opt_in(model_folder: Path) -> None:
    to_pickle_only(model_folder)
    loaded = load_base_model(str(model_folder), BackendConfig(device="cpu", allow_pickle_weights=True))
    expected = build_model(len(build_tokenizer())).state_dict()
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_remote_code_in_a_model_folder_does_not_run(tmp_path: Path) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    (folder / "config.json").write_text(
        json.dumps(
            {
                "model_type": "tunewright_evil",
                "auto_map": {
                    "AutoConfig": "evil.EvilConfig",
                    "AutoModelForCausalLM": "evil.EvilModel",
                    "AutoTokenizer": ["evil.EvilTokenizer", None],
                },
            }
        ),
        encoding="utf-8",
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}), encoding="utf-8"
    )
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n", encoding="utf-8")
    with pytest.raises(ModelLoadError):
        load_base_model(str(folder), BackendConfig(device="cpu"))
    assert not marker.exists()


def truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda p: truncate(p, p.stat().st_size - 100), "truncated safetensors file"),
        (lambda p: truncate(p, 4), "truncated or corrupted safetensors file"),
        (
            lambda p: p.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage-header!" + b"\x00" * 64),
            "corrupted safetensors file",
        ),
    ],
)
def test_damaged_base_model_weights_name_the_file(
    model_folder: Path, tiny_config: dict, tmp_path: Path, damage, expected: str
) -> None:
    weights = model_folder / "model.safetensors"
    damage(weights)
    with pytest.raises(ModelLoadError, match=expected) as error:
        check_safetensors_file(weights)
    assert str(weights) in str(error.value)
    config = {**tiny_config, "base_model": str(model_folder)}
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    data = tmp_path / "data.csv"
    data.write_text("word,echo\ncat,cat\ndog,dog\nsun,sun\nsea,sea\n", encoding="utf-8")
    result = CliRunner().invoke(
        app, ["--quiet", "train", "-c", str(config_path), "-d", str(data), "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 4
    flat = "".join(result.output.split())
    assert "".join(str(weights).split()) in flat and "Traceback" not in result.output


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("safety-run") / "run"
    return train_tiny_run(tiny_model_dir, folder, {"max_steps": 2, "checkpoint_steps": 1}, rows_repeat=3)


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def predict_exit(run_dir: Path, tmp_path: Path) -> tuple[int, str]:
    data = tmp_path / "in.csv"
    data.write_text("word\ncat\n", encoding="utf-8")
    result = CliRunner().invoke(
        app, ["--quiet", "predict", "-d", str(data), "-o", str(tmp_path / "p.csv"), "-m", str(run_dir)]
    )
    return result.exit_code, " ".join(result.output.split())


def test_an_intact_run_loads(run_copy: Path, tmp_path: Path) -> None:
    code, output = predict_exit(run_copy, tmp_path)
    assert code == 0, output


def test_a_truncated_run_adapter_is_named(run_copy: Path, tmp_path: Path) -> None:
    weights = run_copy / "adapter_model.safetensors"
    truncate(weights, weights.stat().st_size - 10)
    code, output = predict_exit(run_copy, tmp_path)
    assert code == 5 and "adapter_model.safetensors: truncated safetensors file" in output


def test_a_bit_flip_in_run_weights_is_caught_by_the_recorded_checksum(run_copy: Path, tmp_path: Path) -> None:
    weights = run_copy / "adapter_model.safetensors"
    content = bytearray(weights.read_bytes())
    content[-3] ^= 0x01  # inside the tensor data: the header still parses and the size is right
    weights.write_bytes(bytes(content))
    code, output = predict_exit(run_copy, tmp_path)
    assert (
        code == 5 and "adapter_model.safetensors: weights file corrupted or changed since training" in output
    )


def test_pickle_files_in_a_run_folder_are_refused(run_copy: Path, tmp_path: Path) -> None:
    (run_copy / "adapter_model.bin").write_bytes(b"\x80\x04pickle")
    code, output = predict_exit(run_copy, tmp_path)
    assert code == 5 and "adapter_model.bin: pickle weights in a run folder" in output


def test_a_damaged_checkpoint_is_named(run_copy: Path) -> None:
    checkpoint = run_copy / CHECKPOINT_DIR / "step-000002"
    truncate(checkpoint / "weights.safetensors", 20)
    with pytest.raises(
        RunFolderError, match=r"step-000002/weights.safetensors: truncated.*delete .*step-000002"
    ):
        load_checkpoint(checkpoint)
    (checkpoint / "training_state.pt").write_bytes(b"garbage")
    with pytest.raises(RunFolderError, match=r"training_state.pt: damaged checkpoint file"):
        load_checkpoint(checkpoint)
