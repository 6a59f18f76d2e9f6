"""An OpenAI-compatible HTTP server: completions, chat completions, models, /predict and /health.

`create_app` builds the FastAPI app; uvicorn is started only from cli.py (with connections.py's
settings). Every model call goes through one `DynamicBatcher` worker (see batching.py, and
server.py for a request's deadline and events), which batches concurrent requests and switches
adapters only between batches. Limits (Host header, API key, body size, concurrency,
timeouts) are checked in a small ASGI middleware (limits.py) before a request reaches its endpoint;
every error is a JSON body in OpenAI's error shape. Prompts are tokenized on one thread of their
own, so a huge prompt never stalls the event loop (and /health with it).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunewright.config import ServeSettings
from tunewright.serving.engine import Delta, Event, Finished, GenerationJob, Job
from tunewright.serving.errors import APIError, error_body
from tunewright.serving.limits import RequestGate, error_response
from tunewright.serving.openai_schema import (
    ChatRequest,
    CompletionRequest,
    PredictRequest,
    SamplingRequest,
    chat_choice,
    chat_chunk_choice,
    chat_prompt_ids,
    completion_choice,
    completion_prompt_ids,
    new_id,
    now,
    usage,
)
from tunewright.serving.pool import ServedModel
from tunewright.serving.server import ClientGone, Server, checked_prompts, generation_jobs, new_tokenizer_thread

log = logging.getLogger(__name__)


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def create_app(models: Mapping[str, ServedModel], settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI app serving `models` (from `pool.load_models`) under `settings`."""
    settings = settings or ServeSettings()
    server = Server(models, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.batcher.start()
        server.tokenizer_thread = new_tokenizer_thread()
        yield
        # uvicorn has already let in-flight requests finish; this ends the worker.
        await run_in_threadpool(server.batcher.stop, settings.request_timeout_s)
        server.tokenizer_thread.shutdown(wait=False)

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
        tokenize = partial(completion_prompt_ids, served, body.prompt, body.raw_prompt)
        return await _generate(server, request, body, served, tokenize, body.max_tokens, "text_completion")

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        body.check()
        served = server.model(body.model)
        def tokenize() -> list[list[int]]:
            return [chat_prompt_ids(served, body)]

        return await _generate(server, request, body, served, tokenize, body.requested_max_tokens, "chat.completion")

    @app.post("/predict", response_model=None)
    async def predict(body: PredictRequest, request: Request) -> Response:
        served = server.model(body.model, for_predict=True)
        try:
            records = await server.predict(request, served, body)
        except ClientGone:
            return Response(status_code=499)
        return JSONResponse({"object": "list", "model": served.name, "predictions": records})

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


@dataclass
class Reply:
    """One completions or chat request's jobs, on their way to the client."""

    server: Server
    request: Request
    body: SamplingRequest
    jobs: list[Job]
    queue: asyncio.Queue[Event]
    kind: str  # "text_completion" or "chat.completion"

    @property
    def chat(self) -> bool:
        return self.kind == "chat.completion"


async def _generate(
    server: Server,
    request: Request,
    body: SamplingRequest,
    served: ServedModel,
    tokenize: Callable[[], list[list[int]]],
    requested_max_tokens: int | None,
    kind: str,
) -> Response:
    """Completions and chat completions alike: queue the generation jobs and answer (or stream)."""
    max_tokens = server.max_tokens(served, requested_max_tokens)
    prompts = await server.off_loop(partial(checked_prompts, tokenize, served, body, max_tokens))
    queue: asyncio.Queue[Event] = asyncio.Queue()
    reply = Reply(server, request, body, generation_jobs(served, body, prompts, queue, max_tokens), queue, kind)
    response_id = new_id("chatcmpl" if reply.chat else "cmpl")
    if body.stream:
        return StreamingResponse(
            _stream(reply, response_id), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    finished: dict[int, Finished] = {}
    try:
        async for event in server.events(request, reply.jobs, queue, watch_disconnect=True):
            if isinstance(event, Finished):
                finished[event.index] = event
    except ClientGone:
        return Response(status_code=499)
    choice = chat_choice if reply.chat else completion_choice
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


async def _stream(reply: Reply, response_id: str) -> AsyncIterator[str]:
    """Server-sent events: one chunk per new piece of text, a last chunk per choice, then [DONE]."""
    body, chat = reply.body, reply.chat
    header = {
        "id": response_id,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": now(),
        "model": body.model,
    }
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}

    def chunk(index: int, delta: dict[str, str] | None, text: str | None, finish_reason: str | None) -> str:
        if chat:
            choice = chat_chunk_choice(index, delta or ({} if text is None else {"content": text}), finish_reason)
        else:
            choice = completion_choice(index, text or "", finish_reason)
        return _sse({**header, "choices": [choice], **extra})

    if chat:
        for job in reply.jobs:
            yield chunk(job_index(job), {"role": "assistant", "content": ""}, None, None)
    finished: list[Finished] = []
    try:
        async for event in reply.server.events(reply.request, reply.jobs, reply.queue, watch_disconnect=False):
            if isinstance(event, Delta):
                yield chunk(event.index, None, event.text, None)
            elif isinstance(event, Finished):
                finished.append(event)
                yield chunk(event.index, None, None, event.finish_reason)
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
