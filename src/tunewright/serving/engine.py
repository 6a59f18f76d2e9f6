"""Serving work: generation jobs run as one left-padded batch, with per-row limits and streaming.

A greedy batch runs tunewright's greedy loop (generate.greedy_decode), any other one `model.generate`.
Each new token of every row goes to its `RowState` (through the loop's `on_token`, or a stopping
criterion): it ends a row at EOS, at a stop string, at the row's own `max_tokens` or when its
client has gone, and it streams the row's new text as it grows. The final text of a row is the same
whether it was streamed or not, because both come from the same `RowState`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from tunewright.config import GenerationSettings
from tunewright.data import collate_prompts
from tunewright.errors import TunewrightError
from tunewright.generate import generate_batch, stop_token_ids, to_generation_config
from tunewright.predictor import predict_rows
from tunewright.serving.errors import APIError
from tunewright.serving.pool import ServedModel

log = logging.getLogger(__name__)

# Jobs batch together only when these settings agree (max_tokens and stop may differ per row).
SAMPLING_FIELDS = ("do_sample", "temperature", "top_k", "top_p", "num_beams", "repetition_penalty")


@dataclass
class Delta:
    index: int
    text: str


@dataclass
class Finished:
    index: int
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    index: int
    error: BaseException


@dataclass
class Predicted:
    records: list[dict[str, Any]]


Event = Delta | Finished | Failed | Predicted
Sink = Callable[[Event], None]


@dataclass(eq=False)
class GenerationJob:
    """One choice of one prompt: what the worker generates and where it sends the text."""

    model: ServedModel
    prompt_ids: list[int]
    max_tokens: int
    settings: GenerationSettings
    sink: Sink
    index: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    request_id: str = ""
    stream: bool = False
    cancelled: bool = False

    @property
    def batch_key(self) -> Hashable:
        sampling = tuple(getattr(self.settings, name) for name in SAMPLING_FIELDS)
        # A seeded job shares a batch only with its own request, so the same seed gives the same text.
        seeded = (self.request_id, self.seed) if self.seed is not None else None
        return (self.model.name, sampling, seeded)

    def fail(self, error: BaseException) -> None:
        self.sink(Failed(self.index, error))

    def run_batch(self, batch: list[GenerationJob]) -> None:
        run_generation(batch)


@dataclass(eq=False)
class PredictJob:
    """Rows of input columns for `tunewright predict`; runs alone (predict batches internally)."""

    model: ServedModel
    rows: list[dict[str, Any]]
    sink: Sink
    all_probabilities: bool = False
    cancelled: bool = False

    @property
    def batch_key(self) -> Hashable | None:
        return None

    def fail(self, error: BaseException) -> None:
        self.sink(Failed(0, error))

    def run_batch(self, batch: list[PredictJob]) -> None:
        run_predict(self)  # predict jobs never share a batch (batch_key is None)


Job = GenerationJob | PredictJob


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    found = [text.find(stop) for stop in stops if stop and stop in text]
    return min(found) if found else None


def _held_back(text: str, stops: tuple[str, ...]) -> str:
    """Text safe to stream: no half-decoded character and no possible start of a stop string."""
    text = text.rstrip("\ufffd")
    keep = len(text)
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                keep = min(keep, len(text) - size)
                break
    return text[:keep]


class RowState:
    """The tokens and text of one row as they are generated."""

    def __init__(self, job: GenerationJob, tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]) -> None:
        self.job, self.tokenizer, self.stop_ids = job, tokenizer, stop_ids
        self.ids: list[int] = []
        self.text = ""
        self.sent = ""
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> None:
        if self.finished:
            return
        if self.job.cancelled:
            self.finish_reason = "cancelled"
            return
        if token in self.stop_ids:
            self.finish_reason = "stop"
            return
        self.ids.append(token)
        if self.job.stop or self.job.stream:
            self.text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
            cut = _first_stop(self.text, self.job.stop)
            if cut is not None:
                self.text, self.finish_reason = self.text[:cut], "stop"
        if not self.finished and len(self.ids) >= self.job.max_tokens:
            self.finish_reason = "length"
        if self.job.stream and not self.finished:
            self._send(_held_back(self.text, self.job.stop))

    def _send(self, text: str) -> None:
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.job.sink(Delta(self.job.index, text[len(self.sent) :]))
            self.sent = text

    def close(self) -> None:
        """Report the final text (and stream whatever was held back)."""
        if self.job.cancelled:
            return
        if not (self.job.stop or self.job.stream):
            self.text = str(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        if self.job.stream:
            self._send(self.text)
        self.job.sink(
            Finished(
                self.job.index,
                self.text,
                self.finish_reason or "length",
                len(self.job.prompt_ids),
                len(self.ids),
            )
        )


class RowTracker(StoppingCriteria):
    """Feeds each step's new tokens to the rows; a row is done when its RowState says so."""

    def __init__(self, rows: list[RowState]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        for row, token in zip(self.rows, input_ids[:, -1].tolist(), strict=True):  # (B,) newest tokens
            row.push(token)
        done = torch.tensor([row.finished for row in self.rows], dtype=torch.bool, device=input_ids.device)
        return cast(torch.BoolTensor, done)  # (B,)


class AllCancelled(StoppingCriteria):
    """Beam search: ends the whole search once every job in the batch is cancelled (timeout, client gone)."""

    def __init__(self, jobs: list[GenerationJob]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        stop = all(job.cancelled for job in self.jobs)
        return cast(torch.BoolTensor, torch.full((input_ids.shape[0],), stop, device=input_ids.device))  # (B*beams,)


@contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Sample from `seed` without disturbing the global random state."""
    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def run_generation(jobs: list[GenerationJob]) -> None:
    """Generate every job's row in one left-padded batch (all jobs share model and sampling settings).

    Plain greedy batches run tunewright's greedy loop (packed prefill, finished rows leave the
    batch); sampling and beams run `generate`.
    """
    first = jobs[0]
    tokenizer = first.model.tuned.tokenizer
    stop_ids = stop_token_ids(tokenizer)
    rows = [RowState(job, tokenizer, stop_ids) for job in jobs]
    config = to_generation_config(first.settings, tokenizer, max(job.max_tokens for job in jobs))
    # Beam search cannot stream rows step by step in transformers; its rows are replayed afterwards.
    track = first.settings.num_beams == 1
    with first.model.active() as model:
        device = next(model.parameters()).device
        padded = collate_prompts([job.prompt_ids for job in jobs], tokenizer.pad_token_id)
        batch = {name: tensor.to(device) for name, tensor in padded.items()}  # (B, T)

        def push(row: int, token: int) -> bool:  # the greedy loop's hook: True once the row is done
            rows[row].push(token)
            return rows[row].finished

        criteria = StoppingCriteriaList([RowTracker(rows) if track else AllCancelled(jobs)])
        with seeded(first.seed, device):
            new_tokens = generate_batch(model, batch, first.settings, config, stop_ids, on_token=push,
                                        stopping_criteria=criteria)
        if not track:  # beams: replay each row's tokens (greedy and sampled rows were tracked as they came)
            for row, tokens in zip(rows, new_tokens, strict=True):
                for token in tokens:
                    row.push(token)
    for row in rows:
        row.close()


def run_predict(job: PredictJob) -> None:
    """Exactly what `tunewright predict` returns, for rows of input columns."""
    try:
        with job.model.active():
            frame = predict_rows(job.model.tuned, job.rows, all_probabilities=job.all_probabilities)
    except TunewrightError as error:  # a missing column or bad value: the client's to fix
        job.fail(APIError(400, str(error), param="rows"))
        return
    job.sink(Predicted(json.loads(frame.to_json(orient="records", force_ascii=False))))
