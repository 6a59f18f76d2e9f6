"""An OpenAI-compatible HTTP server: completions, chat completions, models, /predict and /health.

`create_app` builds the FastAPI app; uvicorn is started only from cli.py. Every model call goes
through one `DynamicBatcher` worker (see batching.py), which batches concurrent requests and
switches adapters only between batches. Limits (API key, body size, concurrency) are checked in
a small ASGI middleware (limits.py) before a request reaches its endpoint; every error is a JSON body in
OpenAI's error shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunewright.config import ServeSettings
from tunewright.serving.batching import DynamicBatcher, ShuttingDown
from tunewright.serving.engine import Delta, Event, Failed, Finished, GenerationJob, Job, Predicted, PredictJob
from tunewright.serving.errors import APIError, error_body
from tunewright.serving.limits import RequestGate, error_response
from tunewright.serving.openai_schema import (
    MAX_ROWS_PER_REQUEST,
    ChatRequest,
    CompletionRequest,
    PredictRequest,
    SamplingRequest,
    chat_choice,
    chat_chunk_choice,
    chat_prompt_ids,
    check_prompt,
    completion_choice,
    completion_prompt_ids,
    new_id,
    now,
    sampling_settings,
    usage,
)
from tunewright.serving.pool import ServedModel

log = logging.getLogger(__name__)

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
        self, request: Request, jobs: list[Job], queue: asyncio.Queue[Event], watch_disconnect: bool
    ) -> AsyncIterator[Event]:
        """Submit the jobs and yield their events until each has finished; cancel them on any exit."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.request_timeout_s
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
    server: Server,
    served: ServedModel,
    body: SamplingRequest,
    prompts: list[list[int]],
    queue: asyncio.Queue[Event],
    max_tokens: int,
    stream: bool,
) -> list[Job]:
    if len(prompts) * body.n > MAX_ROWS_PER_REQUEST:
        raise APIError(
            400,
            f"prompts x n is {len(prompts) * body.n}; at most {MAX_ROWS_PER_REQUEST} per request",
            param="n",
        )
    param = "messages" if isinstance(body, ChatRequest) else "prompt"
    for ids in prompts:
        check_prompt(served, ids, max_tokens, param)
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
            stream=stream,
        )
        for p, ids in enumerate(prompts)
        for k in range(body.n)
    ]


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(models: Mapping[str, ServedModel], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving `models` (from `pool.load_models`) under `settings`."""
    settings = settings or ServeSettings()
    server = Server(models, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        yield
        # uvicorn has already let in-flight requests finish; this ends the worker.
        await run_in_threadpool(server.batcher.stop, settings.request_timeout_s)

    app = FastAPI(title="tunewright", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(RequestGate, settings=settings, counter=server.counter)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        batcher = server.batcher
        return {
            "status": "ok",
            "models": len(server.models),
            "in_flight": server.counter["in_flight"],
            "queued": batcher.pending,
            "batches": batcher.batches_run,
            "largest_batch": batcher.largest_batch,
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(served) for served in server.models.values()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        return _model_card(server.model(name))

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        body.check()
        served = server.model(body.model)
        prompt_ids = completion_prompt_ids(served, body.prompt)
        return await _generate(server, request, body, served, prompt_ids, body.max_tokens, "text_completion")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        body.check()
        served = server.model(body.model)
        prompt_ids = [chat_prompt_ids(served, body)]
        return await _generate(server, request, body, served, prompt_ids, body.requested_max_tokens, "chat.completion")

    @app.post("/predict", response_model=None)
    async def predict(body: PredictRequest, request: Request) -> Response:
        served = server.model(body.model, for_predict=True)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        job = PredictJob(served, [dict(row) for row in body.rows], _sink(queue), body.all_probabilities)
        try:
            async for event in server.events(request, [job], queue, watch_disconnect=True):
                if isinstance(event, Predicted):
                    return JSONResponse(
                        {"object": "list", "model": served.name, "predictions": event.records}
                    )
        except ClientGone:
            return Response(status_code=499)
        raise AssertionError("a predict job ends with a Predicted event")

    return app


def _model_card(served: ServedModel) -> dict[str, Any]:
    kind = "adapter" if served.parent else ("base" if not served.predictable else "model")
    return {
        "id": served.name,
        "object": "model",
        "created": 0,
        "owned_by": "tunewright",
        "root": served.parent or served.name,
        "parent": served.parent,
        "kind": kind,
    }


async def _generate(server: Server, request: Request, body: SamplingRequest, served: ServedModel,
                    prompt_ids: list[list[int]], requested_max_tokens: int | None, kind: str) -> Response:
    """Completions and chat completions alike: queue the generation jobs and answer (or stream)."""
    max_tokens = server.max_tokens(served, requested_max_tokens)
    queue: asyncio.Queue[Event] = asyncio.Queue()
    jobs = generation_jobs(server, served, body, prompt_ids, queue, max_tokens, body.stream)
    return await _respond(server, request, body, jobs, queue, kind)


async def _respond(
    server: Server,
    request: Request,
    body: SamplingRequest,
    jobs: list[Job],
    queue: asyncio.Queue[Event],
    kind: str,
) -> Response:
    response_id = new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
    if body.stream:
        chunks = _stream(server, request, body, jobs, queue, kind, response_id)
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    finished: dict[int, Finished] = {}
    try:
        async for event in server.events(request, jobs, queue, watch_disconnect=True):
            if isinstance(event, Finished):
                finished[event.index] = event
    except ClientGone:
        return Response(status_code=499)
    choice = chat_choice if kind == "chat.completion" else completion_choice
    results = [finished[index] for index in sorted(finished)]
    return JSONResponse(
        {
            "id": response_id,
            "object": kind,
            "created": now(),
            "model": body.model,
            "choices": [choice(result.index, result.text, result.finish_reason) for result in results],
            "usage": _usage(results, body.n),
        }
    )


def _usage(results: list[Finished], n: int) -> dict[str, int]:
    prompt_tokens = sum(result.prompt_tokens for result in results if result.index % n == 0)
    return usage(prompt_tokens, sum(result.completion_tokens for result in results))


async def _stream(
    server: Server,
    request: Request,
    body: SamplingRequest,
    jobs: list[Job],
    queue: asyncio.Queue[Event],
    kind: str,
    response_id: str,
) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new piece of text, a last chunk per choice, then [DONE]."""
    chat = kind == "chat.completion"
    header = {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": now(),
        "model": body.model,
    }
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, text: str | None, finish_reason: str | None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            choice = chat_chunk_choice(index, delta, finish_reason)
        else:
            choice = completion_choice(index, text or "", finish_reason)
        return _sse({**header, "choices": [choice], **extra})

    if chat:
        for job in jobs:
            yield _sse(
                {
                    **header,
                    "choices": [
                        chat_chunk_choice(job_index(job), {"role": "assistant", "content": ""}, None)
                    ],
                    **extra,
                }
            )
    finished: list[Finished] = []
    try:
        async for event in server.events(request, jobs, queue, watch_disconnect=False):
            if isinstance(event, Delta):
                yield chunk(event.index, event.text, None)
            elif isinstance(event, Finished):
                finished.append(event)
                yield chunk(event.index, None, event.finish_reason)
    except APIError as error:  # headers are sent already: the error goes in the stream
        yield _sse(error_body(error))
    else:
        if include_usage:
            yield _sse({**header, "choices": [], "usage": _usage(finished, body.n)})
    yield _sse("[DONE]")


def job_index(job: Job) -> int:
    return job.index if isinstance(job, GenerationJob) else 0


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0]
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        if first.get("type") == "json_invalid":
            message, param = "the request body is not valid JSON", None
        return error_response(APIError(400, message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(APIError(500, f"internal error ({type(error).__name__})"))
