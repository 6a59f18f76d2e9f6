"""A run folder never decides to trust its own code, and its checksums cover every file loading reads.

Trust in remote code comes only from the person running the command (`--trust-remote-code`, or
TUNEWRIGHT_TRUST_REMOTE_CODE=1), never from a run folder's saved config.yaml. run.json records a
SHA-256 of every file in the folder but run.json, metrics.json, training_log.jsonl, confusion
matrices and checkpoints/; a file changed, missing or unrecorded (or no record at all) is refused,
and `tunewright seal RUN` records the checksums again after a deliberate edit.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, build_tokenizer, train_tiny_run
from typer.testing import CliRunner

import tunewright.model
from tunewright import api
from tunewright.cli import app
from tunewright.errors import ModelLoadError, RunFolderError
from tunewright.export import export_run
from tunewright.run import CHECKSUMS_KEY, check_complete, load_run_config, read_status, write_json_atomic
from tunewright.serving.pool import load_models
from tunewright.trust import PICKLE_ENV

EVIL_AUTO_MAP = {"AutoTokenizer": ["evil.EvilTokenizer", None]}


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("trust-run") / "run"
    return train_tiny_run(tiny_model_dir, folder, {"max_steps": 1, "precision": "fp32"})


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained_run, tmp_path / "run"))


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--quiet", *args])
    return result.exit_code, " ".join(result.output.split())


def predict(run_dir: Path, tmp_path: Path, *extra: str) -> tuple[int, str]:
    data = tmp_path / "in.csv"
    data.write_text("word\ncat\n", encoding="utf-8")
    return invoke("predict", "-d", str(data), "-o", str(tmp_path / "p.csv"), "-m", str(run_dir), *extra)


def make_evil(run_dir: Path, marker: Path) -> None:
    """What the reviewer did: trust in the saved config, and an auto_map to code in the folder."""
    config_path = run_dir / "config.yaml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    config.setdefault("backend", {})["trust_remote_code"] = True
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    tokenizer_config_path = run_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text(encoding="utf-8"))
    tokenizer_config["auto_map"] = EVIL_AUTO_MAP
    tokenizer_config_path.write_text(json.dumps(tokenizer_config), encoding="utf-8")
    (run_dir / "evil.py").write_text(
        f"with open({str(marker)!r}, 'w') as f:\n    f.write('ran')\nclass EvilTokenizer:\n    pass\n",
        encoding="utf-8",
    )


def test_a_run_folder_that_trusts_itself_runs_no_code(run_copy: Path, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    make_evil(run_copy, marker)
    code, output = predict(run_copy, tmp_path)  # the edits are caught by the checksums first
    assert code == 5 and "config.yaml: file corrupted or changed since training" in output
    assert f"tunewright seal {run_copy}" in output and not marker.exists()
    # whoever edits a folder can seal it too: the checksums are not what keeps the code from running
    assert invoke("seal", str(run_copy))[0] == 0
    code, output = predict(run_copy, tmp_path)
    assert code == 0, output
    assert not marker.exists()
    load_models([str(run_copy)])  # serve
    export_run(run_copy, tmp_path / "exported")
    assert not marker.exists()


class RecordTrust:
    calls: list[bool] = []

    @classmethod
    def from_pretrained(cls, source: str, **kwargs):
        cls.calls.append(kwargs["trust_remote_code"])
        return REAL_AUTO_TOKENIZER.from_pretrained(source, **{**kwargs, "trust_remote_code": False})


REAL_AUTO_TOKENIZER = tunewright.model.AutoTokenizer


@pytest.mark.parametrize(("flag", "env", "trusted"), [((), None, False), (("--trust-remote-code",), None, True),
                                                      ((), "1", True), ((), "0", False)])
def test_only_the_person_running_the_command_grants_trust(
    run_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flag: tuple, env: str | None, trusted: bool
) -> None:
    make_evil(run_copy, tmp_path / "unused")
    (run_copy / "evil.py").unlink()
    tokenizer_config = json.loads((run_copy / "tokenizer_config.json").read_text(encoding="utf-8"))
    del tokenizer_config["auto_map"]
    (run_copy / "tokenizer_config.json").write_text(json.dumps(tokenizer_config), encoding="utf-8")
    assert invoke("seal", str(run_copy))[0] == 0  # saved config: trust_remote_code true
    if env is not None:
        monkeypatch.setenv("TUNEWRIGHT_TRUST_REMOTE_CODE", env)
    monkeypatch.setattr(tunewright.model, "AutoTokenizer", RecordTrust)
    RecordTrust.calls = []
    code, output = predict(run_copy, tmp_path, *flag)
    assert code == 0, output
    assert RecordTrust.calls and set(RecordTrust.calls) == {trusted}
    assert load_run_config(run_copy).backend.trust_remote_code is (env == "1")


def test_every_file_loading_reads_is_recorded(trained_run: Path) -> None:
    recorded = read_status(trained_run)[CHECKSUMS_KEY]
    assert {"config.yaml", "adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json",
            "tokenizer.json"} <= set(recorded)
    assert not set(recorded) & {"run.json", "metrics.json", "training_log.jsonl"}
    assert not [name for name in recorded if name.startswith("checkpoints/")]


def edit(run_dir: Path, name: str) -> None:
    path = run_dir / name
    path.write_text(path.read_text(encoding="utf-8") + " ", encoding="utf-8")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (lambda run: edit(run, "tokenizer_config.json"), "tokenizer_config.json: file corrupted or changed"),
        (lambda run: edit(run, "chat_template.jinja"), "chat_template.jinja: file corrupted or changed"),
        (lambda run: (run / "tokenizer.json").unlink(), "tokenizer.json: file missing"),
        (lambda run: (run / "evil.py").write_text("x = 1\n"), "evil.py: file added after training"),
        (lambda run: ((run / "extra").mkdir(), (run / "extra" / "t.jinja").write_text("x")),
         "extra/t.jinja: file added after training"),
    ],
    ids=["changed-tokenizer-config", "changed-template", "missing", "added", "added-in-subfolder"],
)
def test_changed_missing_or_added_files_are_refused(run_copy: Path, tmp_path: Path, damage, expected: str) -> None:
    if expected.startswith("chat_template") and not (run_copy / "chat_template.jinja").exists():
        pytest.skip("no chat template file in this run")
    damage(run_copy)
    code, output = predict(run_copy, tmp_path)
    assert code == 5 and expected in output and f"tunewright seal {run_copy}" in output
    with pytest.raises(RunFolderError) as error:
        check_complete(run_copy)
    assert "\n" not in str(error.value)
    assert invoke("seal", str(run_copy))[0] == 0
    check_complete(run_copy)  # sealed: the checksums hold again (a missing tokenizer may still fail to load)


@pytest.mark.parametrize("record", [None, "legacy", "not-a-dict"])
def test_a_run_without_a_checksum_record_is_refused(run_copy: Path, tmp_path: Path, record: str | None) -> None:
    status = read_status(run_copy)
    recorded = status.pop(CHECKSUMS_KEY)
    if record == "legacy":  # what older versions wrote: the weights only
        status["weights_sha256"] = {name: value for name, value in recorded.items() if name.endswith(".safetensors")}
    elif record == "not-a-dict":
        status[CHECKSUMS_KEY] = "ok"
    write_json_atomic(run_copy / "run.json", status)
    code, output = predict(run_copy, tmp_path)
    assert code == 5 and "run.json: no checksums of the run's files" in output
    assert f"tunewright seal {run_copy}" in output


def test_files_loading_does_not_read_may_change(run_copy: Path, tmp_path: Path) -> None:
    edit(run_copy, "metrics.json")
    edit(run_copy, "training_log.jsonl")
    shutil.rmtree(run_copy / "checkpoints", ignore_errors=True)
    assert predict(run_copy, tmp_path)[0] == 0


def test_seal_names_what_changed_and_refuses_what_it_cannot_vouch_for(run_copy: Path) -> None:
    edit(run_copy, "tokenizer_config.json")
    (run_copy / "notes.txt").write_text("mine", encoding="utf-8")
    code, output = invoke("seal", str(run_copy))
    assert code == 0 and "added: notes.txt" in output and "changed: tokenizer_config.json" in output
    check_complete(run_copy)
    (run_copy / "adapter_model.bin").write_bytes(b"pickle")
    code, output = invoke("seal", str(run_copy))
    assert code == 5 and "pickle weights in a run folder" in output
    (run_copy / "adapter_model.bin").unlink()
    status = read_status(run_copy)
    write_json_atomic(run_copy / "run.json", {**status, "status": "failed"})
    code, output = invoke("seal", str(run_copy))
    assert code == 5 and "the run is failed, not complete" in output


def test_a_saved_run_cannot_allow_pickle_weights_for_itself(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """backend.allow_pickle_weights in a run's config.yaml is ignored: pickles can run code, like auto_map."""
    base = tmp_path / "pickle-base"
    tokenizer = build_tokenizer()
    build_model(len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    torch.save(build_model(len(tokenizer)).state_dict(), base / "pytorch_model.bin")
    (base / "model.safetensors").unlink()
    # The person training opts in in their own config; the run folder saves that choice.
    run = train_tiny_run(base, tmp_path / "run", {"max_steps": 1, "precision": "fp32"},
                         backend={"allow_pickle_weights": True})
    assert yaml.safe_load((run / "config.yaml").read_text())["backend"]["allow_pickle_weights"] is True
    monkeypatch.delenv(PICKLE_ENV, raising=False)
    with pytest.raises(ModelLoadError, match="TUNEWRIGHT_ALLOW_PICKLE_WEIGHTS=1"):
        api.load(run)
    monkeypatch.setenv(PICKLE_ENV, "1")
    assert api.load(run).config.backend.allow_pickle_weights is True
