"""OpenAI's HTTP API over the serving engine (node/serve.py), with FastAPI; `swarmtune serve` runs it with uvicorn.

    GET    /v1/models                   every served model: "base", each adapter (swarm ones with round and hash)
    POST   /v1/completions              prompt -> text (stream: server-sent events in OpenAI's chunk format)
    POST   /v1/chat/completions         messages -> the tokenizer's chat template -> text (stream too)
    GET    /v1/adapters                 the adapters in detail, and the base (its weight bytes, times loaded)
    POST   /v1/adapters                 {"name", "path"} loads an adapter folder; {"name", "swarm": manifest,
                                        "initial_peers": [...]} follows a swarm; the base is not reloaded
    DELETE /v1/adapters/{name}          unloads one

A request names its adapter in `model`. Honoured: max_tokens (max_completion_tokens), temperature
(0 = greedy), top_p, stop, seed, stream, stream_options.include_usage. Refused with 400: n > 1,
best_of > 1, echo, logprobs, suffix, tools. Other fields are accepted and ignored. Errors come in
OpenAI's shape, {"error": {"message", "type", "param", "code"}}: an unknown model is a 404
(code "model_not_found"), a swarm adapter that has no state yet a 503. With an API key set,
every request needs `Authorization: Bearer <key>` (the openai client's api_key).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from node.serve import Engine, NotReady, Sampling, ServeError, UnknownModel

logger = logging.getLogger(__name__)

CHAT_MAX_TOKENS = 512  # a chat request without max_tokens generates up to this many (or to the context's end)


class ApiError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _from_serve_error(e: ServeError) -> ApiError:
    if isinstance(e, UnknownModel):
        return ApiError(404, str(e), param="model", code="model_not_found")
    if isinstance(e, NotReady):
        return ApiError(503, str(e), type_="server_error", param="model", code="model_not_ready")
    return ApiError(400, str(e))


# --------------------------------------------------------------------------- request bodies


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # clients send fields we do not use (user, penalties, ...)

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1

    def sampling(self, max_tokens: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stop) > 16:
            raise ApiError(400, f"stop: at most 16 strings, got {len(stop)}", param="stop")
        return Sampling(max_tokens=max_tokens, temperature=1.0 if self.temperature is None else self.temperature,
                        top_p=1.0 if self.top_p is None else self.top_p, stop=tuple(stop), seed=self.seed)

    def refuse_unsupported(self, **fields: Any) -> None:
        if self.n != 1:
            raise ApiError(400, "n: only 1 choice per request is supported; send several requests", param="n")
        for name, value in fields.items():
            if value:
                raise ApiError(400, f"{name} is not supported by this server", param=name)


class CompletionRequest(_Common):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def plain(self) -> dict:
        content = self.content
        if isinstance(content, list):
            if any(p.type != "text" for p in content):
                raise ApiError(400, "messages: only text content parts are supported", param="messages")
            content = "".join(p.text or "" for p in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content or ""}


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    tools: list | None = None


class AdapterRequest(BaseModel):
    name: str
    path: str | None = None  # a PEFT adapter folder on this machine
    swarm: str | None = None  # or a swarm manifest on this machine, to follow that swarm
    initial_peers: list[str] | None = None  # for `swarm`; default: the server's --initial-peers


# --------------------------------------------------------------------------- the app


def _usage(gen) -> dict:
    return {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens,
            "total_tokens": gen.prompt_tokens + gen.completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def make_app(engine: Engine, *, api_key: str | None = None, initial_peers: tuple[str, ...] = (), poll_s: float = 2.0) -> FastAPI:
    """The OpenAI-compatible app over `engine`."""

    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>` (the openai client's "
                                "api_key) with the key the server was started with", code="invalid_api_key")

    app = FastAPI(title="swarmtune serve", dependencies=[Depends(authorize)], docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return JSONResponse(ApiError(400, f"{where or 'body'}: {first.get('msg', 'invalid request')}", param=where or None).body(),
                            status_code=400)

    def model_entry(served) -> dict:
        return {"object": "model", "owned_by": "swarmtune", **served.describe()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_entry(s) for s in list(engine.models.values())]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        try:
            return model_entry(engine.get(name))
        except ServeError as e:
            raise _from_serve_error(e) from None

    async def run(body: _Common, prompt_ids: list[int], sampling: Sampling, *, chat: bool):
        try:  # before any byte is sent, so the status is a real 404 / 503 / 400, streaming or not
            served = engine.get(body.model)
            if served.kind == "swarm" and served.round is None:
                raise NotReady(f"adapter {body.model!r} follows a swarm and has not downloaded its state yet; "
                               "retry in a few seconds")
        except ServeError as e:
            raise _from_serve_error(e) from None
        rid, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if not body.stream:
            try:
                gen = await run_in_threadpool(engine.generate, body.model, prompt_ids, sampling)
            except ServeError as e:
                raise _from_serve_error(e) from None
            choice = ({"index": 0, "message": {"role": "assistant", "content": gen.text}, "finish_reason": gen.finish_reason}
                      if chat else {"index": 0, "text": gen.text, "logprobs": None, "finish_reason": gen.finish_reason})
            return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                    "model": body.model, "choices": [choice], "usage": _usage(gen)}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, body.model, prompt_ids, sampling, rid=rid, created=created, chat=chat,
                                         include_usage=include_usage), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        body.refuse_unsupported(echo=body.echo, logprobs=body.logprobs is not None, best_of=(body.best_of or 1) > 1,
                                suffix=body.suffix)
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        prompt_ids = engine.encode_text(prompt) if isinstance(prompt, str) else list(prompt)
        return await run(body, prompt_ids, body.sampling(body.max_tokens or 16), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest):
        body.refuse_unsupported(logprobs=body.logprobs, tools=body.tools)
        try:
            prompt_ids = engine.encode_chat([m.plain() for m in body.messages])
        except ServeError as e:
            raise _from_serve_error(e) from None
        room = engine.context - len(prompt_ids) if engine.context else CHAT_MAX_TOKENS
        max_tokens = body.max_completion_tokens or body.max_tokens or max(1, min(CHAT_MAX_TOKENS, room))
        return await run(body, prompt_ids, body.sampling(max_tokens), chat=True)

    # ---------------------------------------------------------------- adapters at run time

    @app.get("/v1/adapters")
    async def list_adapters():
        return {"object": "list", "base": {"source": engine.base_source, "path": str(engine.base_dir),
                                           "parameter_bytes": engine.parameter_bytes(), "loads": engine.base_loads},
                "data": [s.describe() for s in list(engine.models.values()) if s.kind != "base"]}

    @app.post("/v1/adapters", status_code=201)
    async def add_adapter(body: AdapterRequest):
        if (body.path is None) == (body.swarm is None):
            raise ApiError(400, "give exactly one of path (a PEFT adapter folder) or swarm (a swarm manifest)", param="path")
        try:
            if body.path is not None:
                served = await run_in_threadpool(engine.add_folder, body.name, body.path)
            else:
                served = await run_in_threadpool(lambda: engine.add_swarm(
                    body.name, body.swarm, initial_peers=tuple(body.initial_peers or initial_peers), poll_s=poll_s))
        except ServeError as e:
            raise _from_serve_error(e) from None
        return served.describe()

    @app.delete("/v1/adapters/{name:path}")
    async def remove_adapter(name: str):
        try:
            await run_in_threadpool(engine.remove, name)
        except ServeError as e:
            raise _from_serve_error(e) from None
        return {"id": name, "object": "adapter", "deleted": True}

    return app


async def _stream(engine: Engine, model: str, prompt_ids: list[int], sampling: Sampling, *, rid: str, created: int,
                  chat: bool, include_usage: bool):
    """Server-sent events in OpenAI's chunk format; the generation runs in a thread and stops when the client
    goes away (the cancel event is checked after every token)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancel = threading.Event()

    def work() -> None:
        try:
            gen = engine.generate(model, prompt_ids, sampling, cancel=cancel,
                                  on_text=lambda piece: loop.call_soon_threadsafe(queue.put_nowait, ("text", piece)))
            loop.call_soon_threadsafe(queue.put_nowait, ("done", gen))
        except ServeError as e:
            loop.call_soon_threadsafe(queue.put_nowait, ("error", _from_serve_error(e)))
        except Exception as e:  # shown to the client as a server error, and logged with its traceback
            logger.exception("generation failed")
            loop.call_soon_threadsafe(queue.put_nowait, ("error", ApiError(500, f"{type(e).__name__}: {e}", type_="server_error")))

    def chunk(delta: dict | None, text: str | None, finish: str | None) -> dict:
        choice = ({"index": 0, "delta": delta or {}, "finish_reason": finish} if chat
                  else {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish})
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
                "model": model, "choices": [choice]}

    threading.Thread(target=work, name="generate", daemon=True).start()
    try:
        if chat:
            yield _sse(chunk({"role": "assistant", "content": ""}, None, None))
        while True:
            kind, item = await queue.get()
            if kind == "text":
                yield _sse(chunk({"content": item}, item, None))
            elif kind == "error":
                yield _sse(item.body())
                break
            else:
                yield _sse(chunk({}, "", item.finish_reason))
                if include_usage:
                    yield _sse({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                                "created": created, "model": model, "choices": [], "usage": _usage(item)})
                break
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()
