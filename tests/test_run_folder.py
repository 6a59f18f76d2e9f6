"""The run folder: a start that fails before training leaves nothing in the way of the retry, and
`train --overwrite` replaces only a run folder holding nothing but what tunewright writes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import yaml
from conftest import copy_rows
from typer.testing import CliRunner

import tunewright
from tunewright.cli import app
from tunewright.config import load_config
from tunewright.errors import RunFolderError
from tunewright.run import check_complete, read_status, set_status, start_run


@pytest.fixture
def fast_config(tiny_config: dict) -> dict:
    return {**tiny_config, "trainer": {"max_steps": 1, "batch_size": 4, "checkpoint_steps": None,
                                       "precision": "fp32"},
            "preprocessing": {"split": [1.0, 0.0, 0.0]}}


def write_inputs(folder: Path, config: dict) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    data = folder / "data.csv"
    copy_rows(8).to_csv(data, index=False)
    return config_path, data


def train_cli(config: Path, data: Path, output: Path, *extra: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["--quiet", "train", "-c", str(config), "-d", str(data), "-o", str(output),
                                      *extra])
    return result.exit_code, " ".join(result.output.split())


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.mark.parametrize(
    ("broken", "exit_code"),
    [
        ({"base_model": "EMPTY_FOLDER"}, 4),  # fails while loading the model
        ({"adapter": {"type": "lora", "r": 4, "target_modules": ["no_such_module"]}}, None),  # fails wrapping it
    ],
    ids=["model-load", "adapter-wrap"],
)
def test_a_start_that_failed_before_training_does_not_block_the_retry(
    broken: dict, exit_code: int | None, fast_config: dict, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    bad = {**fast_config, **broken}
    if bad["base_model"] == "EMPTY_FOLDER":
        bad["base_model"] = str(tmp_path / "empty")
    bad_config, data = write_inputs(tmp_path / "bad", bad)
    good_config, _ = write_inputs(tmp_path / "good", fast_config)
    output = tmp_path / "run"

    code, message = train_cli(bad_config, data, output)
    assert code != 0 and (exit_code is None or code == exit_code), message
    assert read_status(output)["status"] == "failed"  # the attempt is recorded, with its error

    code, message = train_cli(good_config, data, output)  # same -o, no --overwrite
    assert code == 0, message
    check_complete(output)
    assert load_config(output / "config.yaml").base_model == fast_config["base_model"]


@pytest.mark.parametrize("state", ["failed", "interrupted", "running"])
def test_only_a_run_that_never_trained_is_started_again(state: str, fast_config: dict, tmp_path: Path) -> None:
    config = load_config(fast_config)
    run_dir = tmp_path / "run"
    start_run(run_dir, config)
    set_status(run_dir, state, pid=2**22 + 1, host=socket.gethostname())  # a process that does not exist
    start_run(run_dir, config)  # nothing trained yet: reused
    assert read_status(run_dir)["status"] == "running"
    (run_dir / "training_log.jsonl").write_text('{"step": 1}\n', encoding="utf-8")  # training began
    set_status(run_dir, state, pid=2**22 + 1, host=socket.gethostname())
    with pytest.raises(RunFolderError, match="already holds a run; pass --overwrite"):
        start_run(run_dir, config)


def test_a_run_starting_elsewhere_or_alive_here_is_not_reused(fast_config: dict, tmp_path: Path) -> None:
    config = load_config(fast_config)
    run_dir = tmp_path / "run"
    start_run(run_dir, config)
    for host, pid in [("another-host", 2**22 + 1), (socket.gethostname(), os.getppid())]:
        set_status(run_dir, "running", pid=pid, host=host)  # may still be loading its model
        with pytest.raises(RunFolderError, match="already holds a run"):
            start_run(run_dir, config)


def test_overwrite_refuses_a_folder_that_is_not_a_run(fast_config: dict, tmp_path: Path) -> None:
    """`train -o proj --overwrite`, where proj holds the user's config, CSV and notes, deletes nothing."""
    project = tmp_path / "proj"
    config, data = write_inputs(project, fast_config)
    (project / "notes.txt").write_text("my notes", encoding="utf-8")
    before = snapshot(project)
    # The data inside the folder: refused as a source.
    code, message = train_cli(config, data, project, "--overwrite")
    assert code == RunFolderError.exit_code and "the output folder contains the dataset" in message, message
    # Config and data elsewhere: refused as not a run folder, listing what it holds.
    other_config, other_data = write_inputs(tmp_path / "inputs", fast_config)
    code, message = train_cli(other_config, other_data, project, "--overwrite")
    assert code == RunFolderError.exit_code, message
    assert "not a tunewright run folder (no run.json)" in message
    assert "config.yaml, data.csv, notes.txt" in message
    code, message = train_cli(other_config, other_data, project)  # without --overwrite: no --overwrite hint
    assert code == RunFolderError.exit_code and "is not a tunewright run folder" in message, message
    assert "--overwrite" not in message
    assert snapshot(project) == before


@pytest.fixture
def trained_run(fast_config: dict, tmp_path: Path) -> Path:
    return tunewright.train(fast_config, copy_rows(8), tmp_path / "runs" / "r1", show_progress=False).run_dir


def test_overwrite_names_files_tunewright_did_not_write_and_deletes_nothing(
    trained_run: Path, fast_config: dict, tmp_path: Path
) -> None:
    config, data = write_inputs(tmp_path / "inputs", fast_config)
    (trained_run / "notes.txt").write_text("observations", encoding="utf-8")
    (trained_run / "plots").mkdir()
    before = snapshot(trained_run)
    code, message = train_cli(config, data, trained_run, "--overwrite")
    assert code == RunFolderError.exit_code, message
    assert "--overwrite would delete notes.txt, plots, which tunewright did not write" in message
    assert snapshot(trained_run) == before
    (trained_run / "notes.txt").unlink()
    (trained_run / "plots").rmdir()
    code, message = train_cli(trained_run / "config.yaml", data, trained_run, "--overwrite")  # its own config
    assert code == 0, message
    check_complete(trained_run)


def test_overwrite_refuses_the_run_it_continues_from(trained_run: Path, fast_config: dict, tmp_path: Path) -> None:
    config, data = write_inputs(tmp_path / "inputs", fast_config)
    before = snapshot(trained_run)
    for output, expected in [(trained_run, "the output folder is the --from-run run"),
                             (trained_run.parent, "the output folder contains the --from-run run"),
                             (trained_run / "more", "the output folder is inside the --from-run run")]:
        code, message = train_cli(config, data, output, "--overwrite", "--from-run", str(trained_run))
        assert code == RunFolderError.exit_code and expected in message, message
    assert snapshot(trained_run) == before


def test_a_symlinked_source_is_recognised(trained_run: Path, fast_config: dict, tmp_path: Path) -> None:
    config, data = write_inputs(tmp_path / "inputs", fast_config)
    link = tmp_path / "link"
    link.symlink_to(trained_run, target_is_directory=True)
    code, message = train_cli(config, data, link, "--overwrite", "--from-run", str(trained_run))
    assert code == RunFolderError.exit_code and "is the --from-run run" in message, message


def test_overwrite_through_a_symlink_keeps_the_link(trained_run: Path, fast_config: dict, tmp_path: Path) -> None:
    config, data = write_inputs(tmp_path / "inputs", fast_config)
    link = tmp_path / "link"
    link.symlink_to(trained_run, target_is_directory=True)
    first = json.loads((trained_run / "run.json").read_text())["started"]
    code, message = train_cli(config, data, link, "--overwrite")
    assert code == 0, message
    assert link.is_symlink() and json.loads((trained_run / "run.json").read_text())["started"] > first


def test_an_output_that_is_a_file_is_refused(fast_config: dict, tmp_path: Path) -> None:
    config, data = write_inputs(tmp_path / "inputs", fast_config)
    target = tmp_path / "results.txt"
    target.write_text("keep me", encoding="utf-8")
    for extra in ((), ("--overwrite",)):
        code, message = train_cli(config, data, target, *extra)
        assert code == RunFolderError.exit_code and "exists and is not a folder" in message, message
    assert target.read_text(encoding="utf-8") == "keep me"
