"""Few-shot prompts: solved training examples placed before each prompt (`prompt.few_shot`).

The pool is the training split, and only it: validation, test and prediction rows never enter it.
Leakage rule: a training row never gets itself as an example, nor any pool row with the same prompt
text (a duplicate would hand over its own answer). Picks depend only on the run's seed and the row's
text, so the same row gets the same examples in training, evaluation, predict and serve.

The pool (prompt texts, answers and, for `semantic`, their embeddings) is saved in the run folder
under few_shot/, so a loaded run never re-embeds its training data.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tunewright.config import FewShotConfig
from tunewright.errors import RunFolderError
from tunewright.sentence_encoder import cached_embeddings, embed_texts

FEW_SHOT_DIR = "few_shot"
POOL_FILE = "pool.jsonl"
VECTORS_FILE = "embeddings.safetensors"
QUERY_CHUNK = 256  # queries scored against the pool at once: a (256, N) score matrix


def row_seed(seed: int, text: str) -> int:
    """A seed per row that depends only on the run seed and the row's text (same row, same picks)."""
    digest = hashlib.sha256(f"{seed}\0{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def pick_random(pool_size: int, excluded: set[int], k: int, seed: int) -> list[int]:
    """k distinct pool indices outside `excluded`, drawn with `seed`."""
    rng = random.Random(seed)
    # A few spare draws cover the excluded rows; only a tiny pool needs the full list.
    draws = rng.sample(range(pool_size), min(pool_size, k + len(excluded)))
    allowed = [index for index in draws if index not in excluded]
    return allowed[:k]


def pick_semantic(scores: torch.Tensor, excluded: Sequence[set[int]], k: int) -> list[list[int]]:
    """Per query row of `scores` (Q, N cosine similarities): the k most similar allowed indices, most similar first."""
    scores = scores.clone()
    for row, indices in enumerate(excluded):
        if indices:
            scores[row, list(indices)] = float("-inf")
    top = torch.topk(scores, min(k, scores.shape[1]), dim=1, sorted=True)  # ties: torch keeps the lower index
    return [
        [index for index, value in zip(indices, values, strict=True) if value != float("-inf")]
        for indices, values in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]


@dataclass
class FewShotIndex:
    """The training split as solved examples: each row's rendered prompt text and its answer."""

    settings: FewShotConfig
    seed: int
    prompts: list[str]
    answers: list[str]
    vectors: torch.Tensor | None = None  # (N, D) unit rows; semantic only
    rows_by_text: dict[str, set[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rows_by_text = {}
        for row, text in enumerate(self.prompts):
            self.rows_by_text.setdefault(text, set()).add(row)

    def excluded(self, text: str, row: int | None) -> set[int]:
        return self.rows_by_text.get(text, set()) | ({row} if row is not None else set())

    def demonstrations(self, prompts: Sequence[str], in_pool: bool) -> list[str]:
        """The examples' text to place before each prompt. `in_pool`: prompts[i] is pool row i (training)."""
        if in_pool and len(prompts) != len(self.prompts):
            raise ValueError("in_pool prompts must be the pool's own rows, in order")
        excluded = [self.excluded(text, row if in_pool else None) for row, text in enumerate(prompts)]
        k = self.settings.k
        if self.settings.strategy == "random":
            picks = [
                pick_random(len(self.prompts), skip, k, row_seed(self.seed, text))
                for text, skip in zip(prompts, excluded, strict=True)
            ]
        else:
            picks = self._semantic_picks(prompts, excluded, in_pool)
        separator = self.settings.separator
        return ["".join(self.prompts[index] + self.answers[index] + separator for index in chosen) for chosen in picks]

    def _semantic_picks(self, prompts: Sequence[str], excluded: list[set[int]], in_pool: bool) -> list[list[int]]:
        assert self.vectors is not None
        queries = self.vectors if in_pool else embed_texts(list(prompts))  # (Q, D)
        picks: list[list[int]] = []
        for start in range(0, len(prompts), QUERY_CHUNK):
            scores = queries[start : start + QUERY_CHUNK] @ self.vectors.T  # (chunk, N)
            chosen = pick_semantic(scores, excluded[start : start + QUERY_CHUNK], self.settings.k)
            # The most similar example goes last, nearest the prompt it resembles.
            picks.extend(list(reversed(indices)) for indices in chosen)
        return picks


def build_index(settings: FewShotConfig, seed: int, prompts: list[str], answers: list[str]) -> FewShotIndex:
    """The pool from the training split; `semantic` embeds its prompts once (cached by content)."""
    vectors = cached_embeddings(prompts) if settings.strategy == "semantic" else None
    return FewShotIndex(settings, seed, prompts, answers, vectors)


def save_index(index: FewShotIndex, run_dir: Path) -> None:
    folder = run_dir / FEW_SHOT_DIR
    folder.mkdir(exist_ok=True)
    with (folder / POOL_FILE).open("w", encoding="utf-8") as stream:
        for prompt, answer in zip(index.prompts, index.answers, strict=True):
            stream.write(json.dumps({"prompt": prompt, "answer": answer}, ensure_ascii=False) + "\n")
    if index.vectors is not None:
        save_file({"vectors": index.vectors.contiguous()}, str(folder / VECTORS_FILE))


def load_index(settings: FewShotConfig, seed: int, run_dir: Path) -> FewShotIndex:
    """The pool saved with a run; a run without it (or a semantic run without embeddings) is refused."""
    folder = run_dir / FEW_SHOT_DIR
    pool, vectors_file = folder / POOL_FILE, folder / VECTORS_FILE
    if not pool.is_file() or (settings.strategy == "semantic" and not vectors_file.is_file()):
        missing = pool if not pool.is_file() else vectors_file
        raise RunFolderError(
            f"{missing}: the run's few-shot pool is missing (prompt.few_shot is set); retrain the run to write it"
        )
    rows = [json.loads(line) for line in pool.read_text(encoding="utf-8").splitlines()]
    vectors = load_file(str(vectors_file))["vectors"] if settings.strategy == "semantic" else None
    return FewShotIndex(settings, seed, [row["prompt"] for row in rows], [row["answer"] for row in rows], vectors)
