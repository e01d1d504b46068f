"""The OpenAI-compatible HTTP API over one served model: FastAPI routes, SSE streaming, OpenAI-shaped errors.

`ServedModel` holds the model, its tokenizer and (for causal/seq2seq models) the continuous-batching
`Engine`; `create_app(served, api_key=..., extra_routes=...)` builds the app. `extra_routes(app)` lets
a layer above (the RAG recipe) add routes; they find the model at `app.state.served` and can generate
through `await served.complete(prompt, sampling)`.

Every error a client can cause answers `{"error": {"message", "type", "param", "code"}}` with OpenAI's
status codes; an unexpected failure answers 500 with no traceback (the traceback goes to the server's log).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import UserError
from lmforge.generate import SamplingConfig
from lmforge.models import CausalLM, Encoder, Model, Seq2SeqLM, embed_texts
from lmforge.serve.engine import Engine, Finished, QueueFull, ShuttingDown
from lmforge.serve.engine import Request as EngineRequest
from lmforge.serve.schemas import ChatRequest, CompletionRequest, EmbeddingRequest, Sampling
from lmforge.tokenizer import DEFAULT_CHAT_STOP, Tokenizer

log = logging.getLogger("lmforge.serve")
DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               429: "rate_limit_error", 503: "server_error", 500: "server_error"}


class ApiError(Exception):
    """An error answered to the client as OpenAI does: HTTP status plus {"message","type","param","code"}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status)


@dataclass
class ServedModel:
    """The model behind the API. Generative models get an Engine; encoders serve embeddings."""

    model: Model
    tokenizer: Tokenizer
    name: str
    max_batch: int = 16
    max_queue: int = 256
    aliases: set[str] = field(default_factory=set)
    engine: Engine | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        if self.engine is None and isinstance(self.model, (CausalLM, Seq2SeqLM)):
            self.engine = Engine(self.model, self.tokenizer, self.max_batch, self.max_queue)
        self._embed_lock = threading.Lock()
        self._embed_waiting = 0

    def names(self) -> set[str]:
        return {self.name, *self.aliases}

    def require(self, name: str) -> None:
        if name not in self.names():
            raise ApiError(404, f"The model '{name}' does not exist; this server serves '{self.name}'",
                           "model", "model_not_found")

    def generator(self) -> Engine:
        if self.engine is None:
            raise ApiError(400, f"'{self.name}' is a {type(self.model).__name__}: it serves /v1/embeddings, "
                           "not text generation", "model", "model_not_generative")
        return self.engine

    async def complete(self, prompt: str, sampling: SamplingConfig, repetition_penalty: float = 1.0) -> Finished:
        """Generate one continuation of `prompt` through the engine (for routes added by `extra_routes`)."""
        stream = _Choices(asyncio.get_running_loop())
        ids = self.generator().encode(prompt)
        _check_prompt(self.generator(), ids, "prompt")
        stream.submit(self.generator(), 0, ids, sampling, repetition_penalty)
        return (await stream.results())[0]

    def stop(self) -> None:
        if self.engine is not None:
            self.engine.stop()


class _Choices:
    """The engine requests of one HTTP request, their streamed pieces and results, handed from the engine
    thread to the event loop through one asyncio queue of (index, kind, payload)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, streamed: bool = False) -> None:
        self.loop, self.events, self.streamed = loop, asyncio.Queue(), streamed
        self.requests: list[EngineRequest] = []

    def _put(self, item: tuple[int, str, Any]) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def submit(self, engine: Engine, index: int, ids: list[int], sampling: SamplingConfig,
               repetition_penalty: float) -> None:
        def on_text(piece: str) -> None:
            if self.streamed:  # a whole answer needs no pieces: spare the event loop one call per token
                self._put((index, "text", piece))

        request = EngineRequest(ids, sampling, on_text=on_text,
                                on_done=lambda result: self._put((index, "done", result)),
                                repetition_penalty=repetition_penalty)
        try:
            engine.submit(request)
        except QueueFull as exc:
            self.cancel()
            raise ApiError(429, str(exc), None, "queue_full") from None
        except ShuttingDown:
            self.cancel()
            raise ApiError(503, "the server is shutting down; retry on another instance", None,
                           "shutting_down") from None
        self.requests.append(request)

    def cancel(self) -> None:
        for request in self.requests:
            request.cancel()

    async def stream(self) -> AsyncIterator[tuple[int, str, Any]]:
        """Events until every request is done; a failed request raises (as an ApiError)."""
        left = len(self.requests)
        while left:
            index, kind, payload = await self.events.get()
            if kind == "done":
                left -= 1
                if isinstance(payload, Exception):
                    raise _as_api_error(payload)
            yield index, kind, payload

    async def results(self) -> list[Finished]:
        done: dict[int, Finished] = {}
        async for index, kind, payload in self.stream():
            if kind == "done":
                done[index] = payload
        return [done[i] for i in sorted(done)]


def _as_api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, UserError):
        return ApiError(400, str(exc))
    if isinstance(exc, ShuttingDown):
        return ApiError(503, "the request was cancelled by the server's shutdown", None, "shutting_down")
    log.error("generation failed", exc_info=exc)
    return ApiError(500, "the server failed while generating; see its log", None, "internal_error")


def _check_prompt(engine: Engine, ids: list[int], param: str) -> None:
    """400 for token ids outside the vocabulary or a prompt that leaves no room for one new token."""
    vocab = engine.model.cfg.vocab_size
    if any(not 0 <= i < vocab for i in ids):
        raise ApiError(400, f"{param} holds token ids outside the vocabulary [0, {vocab})", param, "invalid_value")
    bounded = not (isinstance(engine.model, Seq2SeqLM) and engine.model.cfg.positions == "relative")
    limit = engine.room - (0 if isinstance(engine.model, Seq2SeqLM) else 1)
    if bounded and len(ids) > limit:
        raise ApiError(400, f"This model's maximum context length is {engine.room} tokens; the {param} has "
                       f"{len(ids)} tokens, which leaves no room to generate. Shorten the {param}.", param,
                       "context_length_exceeded")


def _prompts(engine: Engine, prompt: str | list) -> list[list[int]]:
    """A completions prompt in any of OpenAI's forms (text, texts, ids, lists of ids) as lists of ids."""
    if isinstance(prompt, str):
        texts_or_ids: list = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        texts_or_ids = [prompt]
    else:
        texts_or_ids = prompt
    encoded = []
    for item in texts_or_ids:
        ids = engine.encode(item) if isinstance(item, str) else list(item)
        if not ids:
            raise ApiError(400, "a prompt of token ids must not be empty", "prompt", "invalid_value")
        _check_prompt(engine, ids, "prompt")
        encoded.append(ids)
    return encoded


def _refuse_unsupported(body: Sampling) -> None:
    feature = body.unsupported()
    if feature:
        raise ApiError(400, f"'{feature}' is not supported by this server; leave it out", feature, "unsupported")


def _usage(prompt_tokens: int, results: list[Finished]) -> dict[str, int]:
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _generate(served: ServedModel, body: Sampling, prompts: list[list[int]], default_max: int | None,
                    chat: bool, extra_stop: list[str]) -> JSONResponse | StreamingResponse:
    """Submit n choices per prompt and answer in OpenAI's completion or chat shape, streamed or not."""
    engine = served.generator()
    choices = _Choices(asyncio.get_running_loop(), streamed=body.stream)
    for number, ids in enumerate(prompts):
        wanted = body.max_tokens if not chat else (body.max_completion_tokens or body.max_tokens)
        budget = engine.budget(len(ids), wanted or default_max or engine.room)
        for j in range(body.n):
            sampling = body.sampling_config(budget, j)
            sampling.stop = sampling.stop + extra_stop
            choices.submit(engine, number * body.n + j, ids, sampling, body.repetition_penalty)
    prompt_tokens = sum(len(ids) for ids in prompts)
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
            "model": served.name}
    if body.stream:
        return StreamingResponse(_stream(choices, head, prompt_tokens, chat, body.include_usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    try:
        results = await choices.results()
    finally:
        choices.cancel()  # no-op for finished requests; frees the slots if this handler is cancelled
    if chat:
        out = [{"index": i, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                "finish_reason": r.finish_reason} for i, r in enumerate(results)]
        return JSONResponse({**head, "object": "chat.completion", "choices": out,
                             "usage": _usage(prompt_tokens, results)})
    out = [{"index": i, "text": r.text, "logprobs": None, "finish_reason": r.finish_reason}
           for i, r in enumerate(results)]
    return JSONResponse({**head, "object": "text_completion", "choices": out, "usage": _usage(prompt_tokens, results)})


async def _stream(choices: _Choices, head: dict, prompt_tokens: int, chat: bool,
                  include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's SSE framing: a chunk per piece, a last chunk per choice with its finish_reason, with
    include_usage a chunk with empty choices and the usage, then `data: [DONE]`."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}

    def chunk(index: int, piece: str | None, finish: str | None) -> dict:
        if chat:
            delta = {} if piece is None else {"content": piece}
            return {**head, "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return {**head, "choices": [{"index": index, "text": piece or "", "logprobs": None, "finish_reason": finish}]}

    results: list[Finished] = []
    try:
        if chat:
            for index in range(len(choices.requests)):
                yield _sse({**head, "choices": [{"index": index, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        async for index, kind, payload in choices.stream():
            if kind == "text":
                yield _sse(chunk(index, payload, None))
            else:
                results.append(payload)
                yield _sse(chunk(index, None, payload.finish_reason))
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(prompt_tokens, results)})
    except ApiError as exc:  # the status line is sent already: the error travels as an event
        yield _sse({"error": {"message": exc.message, "type": ERROR_TYPES.get(exc.status), "param": exc.param,
                              "code": exc.code}})
    finally:
        choices.cancel()  # the client may have gone: free the engine's slots
    yield "data: [DONE]\n\n"


async def _embed(served: ServedModel, body: EmbeddingRequest) -> JSONResponse:
    model, tokenizer = served.model, served.tokenizer
    if not isinstance(model, Encoder):
        raise ApiError(400, f"'{served.name}' is a {type(model).__name__}; embeddings come from an encoder "
                       "checkpoint (e.g. all-MiniLM-L6-v2)", "model", "model_not_embedding")
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not all(isinstance(t, str) for t in texts):
        raise ApiError(400, "give input as text (token-id input is not supported for embeddings)", "input",
                       "invalid_value")
    if body.dimensions is not None and body.dimensions != model.cfg.d_model:
        raise ApiError(400, f"this model's embeddings have {model.cfg.d_model} dimensions; leave out dimensions",
                       "dimensions", "invalid_value")
    lengths = [len(tokenizer.encode_for_encoder(text)) for text in texts]
    longest = max(lengths)
    if longest > model.cfg.context_length:
        raise ApiError(400, f"This model's maximum context length is {model.cfg.context_length} tokens; an input "
                       f"has {longest}. Shorten it.", "input", "context_length_exceeded")
    if served._embed_waiting >= served.max_queue:
        raise ApiError(429, f"{served._embed_waiting} embedding requests are waiting (--max_queue); retry later",
                       None, "queue_full")

    def run() -> torch.Tensor:
        with served._embed_lock, torch.inference_mode():
            return embed_texts(model, tokenizer, texts, max_length=model.cfg.context_length)

    served._embed_waiting += 1
    try:
        vectors = await run_in_threadpool(run)
    finally:
        served._embed_waiting -= 1
    data = []
    for index, vector in enumerate(vectors):
        values = vector.numpy().astype("<f4")
        embedding = base64.b64encode(values.tobytes()).decode() if body.encoding_format == "base64" \
            else values.tolist()
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    total = int(np.sum(lengths))
    return JSONResponse({"object": "list", "data": data, "model": served.name,
                         "usage": {"prompt_tokens": total, "total_tokens": total}})


class _Gate:
    """ASGI middleware: 503 while draining, the API key, the in-flight count and one log line per request
    (written when the response, streamed or not, has been sent)."""

    def __init__(self, app: Any, state: Any) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [500]

        async def sending(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, sending)
                return
            self.state.inflight += 1
            try:
                await self.app(scope, receive, sending)
            finally:
                self.state.inflight -= 1
        finally:
            client = scope.get("client") or ("-", 0)
            log.info('%s "%s %s" %d %.1fms', client[0], scope["method"], scope["path"], status[0],
                     1000 * (time.perf_counter() - start))

    def _refusal(self, scope: dict) -> ApiError | None:
        if self.state.draining:
            return ApiError(503, "the server is shutting down; retry on another instance", None, "shutting_down")
        key = self.state.api_key
        if key and scope["path"] != "/health":
            headers = dict(scope.get("headers") or [])
            given = headers.get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {key}":
                what = "No API key was given" if not given else "The API key is wrong"
                return ApiError(401, f"{what}; send 'Authorization: Bearer KEY' with the server's --api_key", None,
                                "invalid_api_key")
        return None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "the request body is invalid", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON; send a JSON object", None
    param = ".".join(loc) or None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


def create_app(served: ServedModel, api_key: str | None = None,
               extra_routes: Callable[[FastAPI], None] | None = None) -> FastAPI:
    """The API over `served`; `extra_routes(app)` adds routes of a layer above (e.g. POST /v1/rag/answer)."""
    app = FastAPI(title="lmforge", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.api_key = served, api_key
    app.state.draining, app.state.inflight = False, 0
    app.add_middleware(_Gate, state=app.state)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(UserError)
    async def user_error(_: Request, exc: UserError) -> JSONResponse:
        return ApiError(400, str(exc)).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return ApiError(400, message, param, "invalid_value").response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return ApiError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(Exception)
    async def crash(_: Request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return ApiError(500, "the server failed on this request; see its log", None, "internal_error").response()

    @app.get("/health")
    async def health() -> dict:
        engine = served.engine
        return {"status": "draining" if app.state.draining else "ok", "model": served.name,
                "running": engine.running if engine else 0, "waiting": engine.waiting if engine else 0}

    def card() -> dict:
        return {"id": served.name, "object": "model", "created": served.created, "owned_by": "lmforge"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        served.require(name)
        return card()

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> Any:
        served.require(body.model)
        _refuse_unsupported(body)
        prompts = _prompts(served.generator(), body.prompt)
        return await _generate(served, body, prompts, DEFAULT_COMPLETION_TOKENS, chat=False, extra_stop=[])

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest) -> Any:
        served.require(body.model)
        _refuse_unsupported(body)
        engine = served.generator()
        text = served.tokenizer.render_chat([m.as_dict() for m in body.messages], add_generation_prompt=True)
        ids = engine.encode(text)
        _check_prompt(engine, ids, "messages")
        extra_stop = [] if served.tokenizer.chat_template else [DEFAULT_CHAT_STOP]  # the next "User:" turn
        return await _generate(served, body, [ids], None, chat=True, extra_stop=extra_stop)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest) -> JSONResponse:
        served.require(body.model)
        return await _embed(served, body)

    if extra_routes is not None:
        extra_routes(app)
    return app


def begin_draining(app: FastAPI) -> None:
    """From now on new requests get 503; requests in flight go on (graceful shutdown's first half)."""
    app.state.draining = True


def in_flight(app: FastAPI) -> int:
    return app.state.inflight
