"""Choosing few-shot examples from the training pool (pure; no model, no config).

Leakage rule: a query that is itself a pool row (``query_row`` = its pool index) never gets that row,
nor any pool row whose text equals the query's text (duplicates of the same text are skipped too).
"""

from __future__ import annotations

import hashlib
import random

import torch


def row_seed(seed: int, text: str) -> int:
    """A seed per row that depends only on the run seed and the row's text (same row, same picks)."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _allowed(pool_texts: list[str], query_text: str, query_row: int | None) -> list[int]:
    return [i for i, text in enumerate(pool_texts) if i != query_row and text != query_text]


def pick_random(pool_texts: list[str], query_text: str, k: int, seed: int,
                query_row: int | None = None) -> list[int]:
    """k distinct pool indices drawn with a per-row seed, never the query itself."""
    allowed = _allowed(pool_texts, query_text, query_row)
    return random.Random(row_seed(seed, query_text)).sample(allowed, min(k, len(allowed)))


def pick_semantic(pool_texts: list[str], pool_vectors: torch.Tensor, query_text: str,
                  query_vector: torch.Tensor, k: int, query_row: int | None = None) -> list[int]:
    """The k most similar pool indices (cosine; vectors are unit length), most similar first."""
    allowed = _allowed(pool_texts, query_text, query_row)
    if not allowed:
        return []
    scores = pool_vectors[allowed] @ query_vector  # (len(allowed),)
    # stable sort so ties keep pool order and results are deterministic
    order = torch.sort(scores, descending=True, stable=True).indices[:k]
    return [allowed[i] for i in order.tolist()]
