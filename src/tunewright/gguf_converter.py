"""llama.cpp's own Hugging Face -> GGUF converter, taken from a pinned release and run as a subprocess.

PyPI has no package of the converter itself: the `gguf` package (gguf-py) holds the container
writer only, and its release lags the converter's needs. llama-cpp-python's source release
vendors llama.cpp at one commit: `convert_hf_to_gguf.py`, its `conversion/` package and the
gguf-py it was written against. tunewright fetches that release once (hash-checked), keeps those
three pieces in its cache, and runs the script in a child process, where the vendored gguf-py
comes first on `sys.path` and the `gguf` package that transformers reads GGUF with is untouched.

`python -m tunewright.gguf_converter` fetches it ahead of time (`make install` does).
Set TUNEWRIGHT_LLAMA_CPP to a llama.cpp checkout to use that converter instead.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from tunewright.errors import ExportError
from tunewright.model import cache_dir

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON = "0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
SCRIPT = "convert_hf_to_gguf.py"
# What the script needs from the vendored tree (it imports `conversion` and puts gguf-py on sys.path).
KEPT = (SCRIPT, "conversion", "gguf-py", "LICENSE")
VENDORED = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def converter_dir() -> Path:
    """The folder holding convert_hf_to_gguf.py (TUNEWRIGHT_LLAMA_CPP, else the cached release)."""
    override = os.environ.get("TUNEWRIGHT_LLAMA_CPP")
    if override:
        return Path(override)
    return cache_dir() / f"llama.cpp-convert-{LLAMA_CPP_PYTHON}"


def _download_sdist(folder: Path) -> Path:
    """pip download of the pinned source release, hash-checked by pip and again here."""
    requirement = folder / "requirement.txt"
    requirement.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n")
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
        "--require-hashes", "-r", str(requirement), "-d", str(folder),
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    sdist = folder / SDIST_NAME
    if result.returncode != 0 or not sdist.is_file():
        reason = (result.stderr.strip().splitlines() or ["no file"])[-1]
        raise ExportError(
            f"export: could not fetch llama.cpp's converter (pip download llama-cpp-python=={LLAMA_CPP_PYTHON}: "
            f"{reason}); run `python -m tunewright.gguf_converter` where PyPI is reachable, or set "
            "TUNEWRIGHT_LLAMA_CPP to a llama.cpp checkout"
        )
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        raise ExportError(f"export: {SDIST_NAME} has sha256 {digest}, expected {SDIST_SHA256}; not used")
    return sdist


def _extract_converter(sdist: Path, target: Path) -> None:
    with tarfile.open(sdist) as archive:
        members = [
            member for member in archive.getmembers()
            if member.name.startswith(VENDORED) and member.name[len(VENDORED):].split("/")[0] in KEPT
        ]
        archive.extractall(target, members=members, filter="data")
    vendored = target / VENDORED
    for name in KEPT:
        (vendored / name).rename(target / name)
    shutil.rmtree(target / VENDORED.split("/")[0])


def ensure_converter() -> Path:
    """The converter's folder, fetched into the cache the first time (about 75 MB, once).

    Raises:
        ExportError: TUNEWRIGHT_LLAMA_CPP has no convert_hf_to_gguf.py, or the fetch failed.
    """
    folder = converter_dir()
    if (folder / SCRIPT).is_file():
        return folder
    if os.environ.get("TUNEWRIGHT_LLAMA_CPP"):
        raise ExportError(f"TUNEWRIGHT_LLAMA_CPP: {folder} has no {SCRIPT}; point it at a llama.cpp checkout")
    log.info("Fetching llama.cpp's GGUF converter (llama-cpp-python %s source, once)", LLAMA_CPP_PYTHON)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".llama.cpp-fetch-", dir=folder.parent) as scratch:
        staging = Path(scratch) / "converter"
        _extract_converter(_download_sdist(Path(scratch)), staging)
        try:
            staging.rename(folder)  # atomic: a half-extracted converter is never found
        except OSError:
            if not (folder / SCRIPT).is_file():  # not merely a concurrent fetch that finished first
                raise
    return folder


def convert(model_dir: Path, outfile: Path, outtype: str, metadata: Path) -> float:
    """Run the converter on a Hugging Face folder; returns the seconds it took.

    `metadata` is a JSON file of GGUF `general.*` keys (name, description, sampling defaults).

    Raises:
        ExportError: the converter failed (its last error line is in the message).
    """
    folder = ensure_converter()
    command = [
        sys.executable, str(folder / SCRIPT), str(model_dir), "--outfile", str(outfile),
        "--outtype", outtype, "--metadata", str(metadata),
    ]
    started = time.perf_counter()
    env = {key: value for key, value in os.environ.items() if key != "NO_LOCAL_GGUF"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=folder, env=env)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise ExportError(
            f"export --format gguf: llama.cpp's converter failed on this model ({lines[-1] if lines else 'no output'})"
        )
    return time.perf_counter() - started


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_converter())
