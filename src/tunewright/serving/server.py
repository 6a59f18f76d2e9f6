"""The state behind the endpoints: served models, the batcher, the tokenizer thread, and each
request's deadline and events.

A request's jobs go to the one `DynamicBatcher` worker; `Server.events` yields what they produce
until each has finished, the client has gone or the deadline has passed, and cancels them on any
exit. /predict is queued one model batch at a time, so a request that is abandoned or times out
stops within one batch, and other requests run between the batches of a large one.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from fastapi import Request

from tunewright.config import ServeSettings
from tunewright.serving.batching import DynamicBatcher, ShuttingDown
from tunewright.serving.engine import Event, Failed, Finished, GenerationJob, Job, Predicted, PredictJob
from tunewright.serving.errors import APIError
from tunewright.serving.openai_schema import (
    MAX_ROWS_PER_REQUEST,
    ChatRequest,
    PredictRequest,
    SamplingRequest,
    check_prompt,
    new_id,
    sampling_settings,
)
from tunewright.serving.pool import ServedModel

log = logging.getLogger(__name__)
T = TypeVar("T")

POLL_S = 0.1  # how often a waiting non-streamed request checks whether its client has gone


class ClientGone(Exception):
    """The client disconnected while its request was waiting."""


def _as_api_error(error: BaseException) -> APIError:
    if isinstance(error, APIError):
        return error
    if isinstance(error, ShuttingDown):
        return APIError(503, str(error))
    log.error("model work failed: %s: %s", type(error).__name__, error)
    return APIError(500, f"the model failed on this request ({type(error).__name__})")


class Server:
    """The state behind the endpoints: served models, limits and the batcher."""

    def __init__(self, models: Mapping[str, ServedModel], settings: ServeSettings) -> None:
        self.models, self.settings = dict(models), settings
        wait_s = settings.batch_wait_ms / 1000
        self.batcher: DynamicBatcher[Job] = DynamicBatcher(settings.max_batch_size, wait_s)
        self.counter = {"in_flight": 0}
        self.tokenizer_thread = new_tokenizer_thread()

    async def off_loop(self, call: Callable[[], T]) -> T:
        """Run `call` (tokenizing, checking prompts) on the tokenizer thread, not the event loop.

        One thread, because each model's request tokenizer must never be used by two threads at once.
        """
        return await asyncio.get_running_loop().run_in_executor(self.tokenizer_thread, call)

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.settings.request_timeout_s

    def model(self, name: str, for_predict: bool = False) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise APIError(
                404,
                f"the model '{name}' does not exist; GET /v1/models lists them",
                param="model",
                code="model_not_found",
            )
        if for_predict and not served.predictable:
            raise APIError(
                400,
                f"'{name}' is a base model with no config of its own; /predict needs a run "
                "(--model) or a zero-shot config (--config)",
                param="model",
            )
        return served

    def max_tokens(self, served: ServedModel, requested: int | None) -> int:
        if requested is not None and requested > self.settings.max_tokens:
            raise APIError(
                400,
                f"max_tokens: {requested} is above this server's limit of {self.settings.max_tokens}",
                param="max_tokens",
            )
        return requested or min(served.defaults.max_new_tokens, self.settings.max_tokens)

    async def events(
        self,
        request: Request,
        jobs: list[Job],
        queue: asyncio.Queue[Event],
        watch_disconnect: bool,
        deadline: float | None = None,
    ) -> AsyncIterator[Event]:
        """Submit the jobs and yield their events until each has finished; cancel them on any exit."""
        loop = asyncio.get_running_loop()
        deadline = deadline or self.deadline()
        pending = len(jobs)
        for job in jobs:
            self.batcher.submit(job)
        try:
            while pending:
                wait_s = max(0.0, deadline - loop.time())
                try:
                    event = await asyncio.wait_for(
                        queue.get(), min(POLL_S, wait_s) if watch_disconnect else wait_s
                    )
                except TimeoutError:
                    if watch_disconnect and await request.is_disconnected():
                        raise ClientGone from None
                    if loop.time() >= deadline:
                        raise APIError(
                            504,
                            f"the request took longer than {self.settings.request_timeout_s:g} s "
                            "and was cancelled",
                        ) from None
                    continue
                if isinstance(event, Failed):
                    raise _as_api_error(event.error)
                pending -= isinstance(event, Finished | Predicted)
                yield event
        finally:
            for job in jobs:
                job.cancelled = True  # no effect on finished jobs; stops the others between tokens

    async def predict(self, request: Request, served: ServedModel, body: PredictRequest) -> list[dict[str, Any]]:
        """/predict's records, in chunks of one model batch, each queued once the one before is done.

        The timeout and a disconnect are checked between chunks, so an abandoned request stops
        within one batch, and other requests' work runs between the chunks of a large one.
        """
        limit = self.settings.max_predict_rows
        if len(body.rows) > limit:
            raise APIError(
                400,
                f"rows: {len(body.rows)} rows sent; at most {limit} per request (--max-predict-rows); "
                "send them in several requests",
                param="rows",
            )
        deadline, size = self.deadline(), served.tuned.predict_batch_size
        records: list[dict[str, Any]] = []
        for start in range(0, len(body.rows), size):
            queue: asyncio.Queue[Event] = asyncio.Queue()
            rows = [dict(row) for row in body.rows[start : start + size]]
            job = PredictJob(served, rows, _sink(queue), body.all_probabilities)
            async for event in self.events(request, [job], queue, watch_disconnect=True, deadline=deadline):
                if isinstance(event, Predicted):
                    records.extend(event.records)
        return records


def new_tokenizer_thread() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="tunewright-tokenize")


def _sink(queue: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """Deliver events from the worker thread onto this request's event loop."""
    loop = asyncio.get_running_loop()

    def deliver(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass

    return deliver


def generation_jobs(
    served: ServedModel, body: SamplingRequest, prompts: list[list[int]], queue: asyncio.Queue[Event], max_tokens: int
) -> list[Job]:
    """One job per prompt and choice (the prompts are checked already)."""
    settings, stop, sink, request_id = (
        sampling_settings(served.defaults, body),
        body.stop_strings,
        _sink(queue),
        new_id("req"),
    )
    return [
        GenerationJob(
            served,
            ids,
            max_tokens,
            settings,
            sink,
            index=p * body.n + k,
            stop=stop,
            seed=body.seed,
            request_id=request_id,
            stream=body.stream,
        )
        for p, ids in enumerate(prompts)
        for k in range(body.n)
    ]


def checked_prompts(
    tokenize: Callable[[], list[list[int]]], served: ServedModel, body: SamplingRequest, max_tokens: int
) -> list[list[int]]:
    """Tokenize and check the prompts (on the tokenizer thread: a huge prompt must not stall the loop)."""
    prompts = tokenize()
    if len(prompts) * body.n > MAX_ROWS_PER_REQUEST:
        raise APIError(
            400,
            f"prompts x n is {len(prompts) * body.n}; at most {MAX_ROWS_PER_REQUEST} per request",
            param="n",
        )
    param = "messages" if isinstance(body, ChatRequest) else "prompt"
    for ids in prompts:
        check_prompt(served, ids, max_tokens, param)
    return prompts
