"""Output folders (run folders, exports): never written over a source, and `--overwrite` deletes only
what tunewright wrote.

A folder counts as tunewright's by its marker file (`run.json` for a run, `tunewright_config.yaml`
for an export, a `.gguf` file for a GGUF export). Replacing it is refused while it holds anything
tunewright does not write (the refusal lists those entries), so a user's config, data or notes are
never deleted. An output that
is, contains or lies inside a source it reads (the run being exported, the dataset) is refused
before anything is written; paths are compared after resolving symlinks.
"""

from __future__ import annotations

import fnmatch
import shutil
from collections.abc import Collection, Iterable
from pathlib import Path

from tunewright.errors import RunFolderError

# Top-level names tunewright writes into run and export folders: its own files, and what
# transformers / peft / tokenizers `save_pretrained` write (weights, configs, tokenizer files, the card).
WRITTEN_NAMES = (
    "run.json", "config.yaml", "metrics.json", "training_log.jsonl", "confusion_matrix_*.png", "checkpoints",
    "predictions_*.jsonl", "report.html", "tensorboard", "mlflow",
    "labels.json", "tunewright_config.yaml",
    "*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "adapter_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.*",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "README.md", "*.gguf", "Modelfile",
    # an atomic write's temporary file, left by a crash
    ".run.json.*", ".metrics.json.*", ".training_log.jsonl.*", ".report.html.*", ".predictions_*",
)
LISTED_ENTRIES = 5  # entries named in a message; the rest are counted


def entry_names(folder: Path) -> list[str]:
    """The sorted names in `folder` ([] when it does not exist)."""
    return sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []


def describe_entries(names: Collection[str]) -> str:
    """`a, b, c and 4 more`: a one-line list for messages."""
    shown = ", ".join(sorted(names)[:LISTED_ENTRIES])
    return f"{shown} and {len(names) - LISTED_ENTRIES} more" if len(names) > LISTED_ENTRIES else shown


def foreign_entries(folder: Path) -> list[str]:
    """Entries of `folder` that tunewright does not write.

    Names, not a record of what was written: `tunewright seal` records whatever a folder holds,
    a user's notes included.
    """
    return [name for name in entry_names(folder)
            if not any(fnmatch.fnmatchcase(name, pattern) for pattern in WRITTEN_NAMES)]


def check_outside_sources(output: Path, sources: Iterable[tuple[str, Path]]) -> None:
    """Refuse an output folder that is a source, holds one, or lies inside a source folder.

    Args:
        output: the folder about to be written.
        sources: (what it is, path) pairs, e.g. ("the run being exported", run_dir).

    Raises:
        RunFolderError: naming the source and what to do.
    """
    target = output.resolve()
    for what, source in sources:
        resolved = Path(source).resolve()
        if target == resolved:
            problem, fix = "is", "choose another folder"
        elif target in resolved.parents:
            problem, fix = "contains", "choose a folder that does not hold it"
        elif resolved in target.parents:
            problem, fix = "is inside", "choose a folder outside it"
        else:
            continue
        raise RunFolderError(f"{output}: the output folder {problem} {what} ({source}); {fix}")


def check_replaceable(folder: Path, kind: str, marker: str) -> None:
    """Raise unless `folder` is a tunewright `kind` folder holding only what tunewright writes; `marker`
    is a name or a glob pattern (`*.gguf`).

    Raises:
        RunFolderError: not a folder, no marker (listing what it holds), or foreign entries (listed).
    """
    if not folder.is_dir():
        raise RunFolderError(f"{folder}: exists and is not a folder; choose a folder path")
    names = entry_names(folder)
    if not any(fnmatch.fnmatchcase(name, marker) for name in names):
        raise RunFolderError(
            f"{folder}: not a tunewright {kind} (no {marker}); --overwrite replaces only a {kind}, and this "
            f"folder holds {describe_entries(names)}; choose a new or empty folder"
        )
    foreign = foreign_entries(folder)
    if foreign:
        raise RunFolderError(
            f"{folder}: --overwrite would delete {describe_entries(foreign)}, which tunewright did not write; "
            "move them out of the folder or choose another folder"
        )


def remove_entries(folder: Path) -> None:
    """Delete what the folder holds (the folder stays; symlinks are removed, never followed)."""
    for path in folder.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
