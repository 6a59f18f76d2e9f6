"""Reference log-probs computed once per dataset and reference, kept beside the run, reused after.

DPO's reference model never changes, so its log-probs of every chosen and rejected response are
fixed numbers: computing them once saves a forward pass per training step. They are stored in
`<parent of the run>/.reference_cache/<key>.safetensors`, beside the run folder (so `--overwrite`
and later runs in the same folder reuse them, and the sealed run folder stays as it is).

The key hashes what the numbers depend on: the token ids of every pair (so the data, tokenizer,
prompt template, chat template and length rule) and the reference's identity (the base model
with its adapter disabled, or an earlier run's or model folder's weight files). Any change gives
a new key, so a stale cache is never read; a damaged or mismatched file is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tunewright.preference_data import PreferenceExample
from tunewright.preference_objective import Reference, collate_pairs

log = logging.getLogger(__name__)

CACHE_DIR = ".reference_cache"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json")


def folder_identity(folder: Path) -> list[tuple[str, int, int]]:
    """(name, size, mtime) of a model folder's weight and config files: changes when they are replaced."""
    if not folder.is_dir():
        return []
    return sorted((entry.name, entry.stat().st_size, entry.stat().st_mtime_ns)
                  for entry in folder.iterdir() if entry.is_file() and entry.name.endswith(WEIGHT_SUFFIXES))


def reference_identity(base_model: str, reference_path: str | None, dtype: torch.dtype) -> dict[str, object]:
    """What the reference model is, for the cache key."""
    if reference_path is not None:
        return {"kind": "folder", "path": str(Path(reference_path).resolve()),
                "files": folder_identity(Path(reference_path)), "dtype": str(dtype)}
    return {"kind": "adapter_disabled", "base_model": base_model, "files": folder_identity(Path(base_model)),
            "dtype": str(dtype)}


def cache_key(examples: Sequence[PreferenceExample], identity: dict[str, object]) -> str:
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode())
    for example in examples:
        digest.update(json.dumps([example.prompt_ids, example.chosen_ids, example.rejected_ids]).encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def compute_reference_logps(policy: nn.Module, reference: Reference, examples: Sequence[PreferenceExample],
                            batch_size: int, pad_id: int, device: torch.device) -> torch.Tensor:
    """(N, 2) summed log-probs of each pair's chosen and rejected response under the reference."""
    rows = []
    for start in range(0, len(examples), batch_size):
        # Copies without reference log-probs, so that the collated batch carries none.
        chunk = [PreferenceExample(e.prompt_ids, e.chosen_ids, e.rejected_ids)
                 for e in examples[start : start + batch_size]]
        batch = {key: value.to(device) for key, value in collate_pairs(chunk, pad_id).items()}
        logps = reference.log_probs(policy, batch)[0].float().cpu()  # (2B,)
        rows.append(torch.stack(logps.chunk(2), dim=1))  # (B, 2)
    return torch.cat(rows) if rows else torch.zeros((0, 2))


def read_cache(path: Path, count: int) -> torch.Tensor | None:
    """The cached (count, 2) tensor, or None if absent, damaged or of another size (then recomputed)."""
    if not path.is_file():
        return None
    try:
        logps = load_file(path)["reference_logps"]
    except (SafetensorError, KeyError, OSError) as error:
        log.warning("%s: unreadable reference cache (%s); computing it again", path, error)
        return None
    if logps.shape != (count, 2) or not torch.isfinite(logps).all():
        log.warning("%s: reference cache does not fit the data; computing it again", path)
        return None
    return logps


def write_cache(path: Path, logps: torch.Tensor, identity: dict[str, object]) -> None:
    """Written under a temporary name and renamed: a cache file is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    save_file({"reference_logps": logps.contiguous()}, str(temporary),
              metadata={"reference": json.dumps(identity, sort_keys=True)})
    os.replace(temporary, path)


def attach_reference_logps(examples: Sequence[PreferenceExample], policy: nn.Module, reference: Reference,
                           identity: dict[str, object], cache_dir: Path | None, batch_size: int, pad_id: int,
                           device: torch.device, write: bool = True) -> str:
    """Fill every example's `reference_logps` from the cache, computing (and storing) it when missing.

    Returns "reused" or "computed".
    """
    if not examples:
        return "reused"
    key = cache_key(examples, identity)
    path = cache_dir / f"{key}.safetensors" if cache_dir is not None else None
    logps = read_cache(path, len(examples)) if path is not None else None
    status = "reused"
    if logps is None:
        logps = compute_reference_logps(policy, reference, examples, batch_size, pad_id, device)
        status = "computed"
        if path is not None and write:
            write_cache(path, logps, identity)
    for example, (chosen, rejected) in zip(examples, logps.tolist(), strict=True):
        example.reference_logps = (chosen, rejected)
    log.info("reference log-probs of %d pairs %s (%s)", len(examples), status, path or "not stored")
    return status
