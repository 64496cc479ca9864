"""The OpenAI-compatible HTTP front end (FastAPI + uvicorn, in the server process, on the same Service
and scheduler as gRPC): a thin adapter over zenjax/serve/service.py.

    POST /v1/chat/completions   messages -> chat template (content never spells control tokens by default)
    POST /v1/completions        prompt: text (control tokens parsed: the caller writes the whole prompt)
                                or token ids
    GET  /v1/models             the one served model
    GET  /health                200 {"status": "serving"}; 503 while loading or draining (no API key needed)

Walk of one request:
    1. ASGI middleware (`_Guard`): API key (authorization: Bearer KEY) on /v1/*, body bounded by
       Limits.http_body_bytes before anything is parsed (413);
    2. pydantic body model -> 400 naming the field on a type error; OpenAI parameters -> the neutral
       sampling dict (`_sampling`); what the sampler cannot do (presence/frequency penalties, logprobs,
       n > 1, tools) -> 400 naming the parameter, never silently ignored;
    3. Service.prepare in its prep pool, Service.submit; the Request's events are bridged onto this
       event loop (`_AsyncEvents`);
    4. a watcher task cancels the Request the moment the client disconnects (the scheduler frees the slot
       at its next step), streaming or not;
    5. events -> one JSON body, or SSE chunks ending with `data: [DONE]`. Extensions standard clients
       ignore: request `"prefill_progress": true` adds chunks with `choices: []` and
       `"prefill_progress": {"prefilled_tokens", "prompt_tokens"}` while a long prompt prefills.

Errors have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 invalid_request_error,
401 bad API key, 404 unknown model, 413 body too large, 429 queue full, 503 loading/draining.
Sampling extensions accepted as in vLLM: top_k (-1 or 0: off), min_p, repetition_penalty, ignore_eos,
stop_token_ids.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from zenjax.serve.errors import InvalidRequest, ServiceError
from zenjax.serve.metrics import log_event
from zenjax.serve.events import Delta, Failed, Finished, Progress
from zenjax.serve.service import Service

_HTTP_STATUS = {"invalid_request": 400, "unauthenticated": 401, "queue_full": 429, "internal": 500,
                "unavailable": 503, "deadline_exceeded": 504}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error",
               504: "server_error"}
# service field -> OpenAI parameter name in messages and `param`
_PARAM = {"max_new_tokens": "max_tokens", "prompt": "prompt"}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _ERROR_TYPE.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def _error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status)


def _service_error(e: ServiceError, chat: bool) -> JSONResponse:
    names = dict(_PARAM, prompt="messages" if chat else "prompt")
    param = None if e.param is None else names.get(e.param, e.param)
    return _error(_HTTP_STATUS[e.code], e.renamed(names), param, e.code)


# ---------------------------------------------------------------- request bodies
class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")     # unknown OpenAI fields (user, metadata, ...) are ignored
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool = False
    prefill_progress: bool = False               # extension: SSE chunks with prefill progress


class ChatBody(_Common):
    messages: list[dict[str, Any]]
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None


class CompletionBody(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


def _refuse_unsupported(b: _Common) -> None:
    """Parameters the engine cannot honour: a clear 400 rather than a silently different result."""
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(b, name):
            raise InvalidRequest(f"{name}: not supported by this server's sampler; use repetition_penalty "
                                 f"(multiplicative, as in Hugging Face) or send 0", name)
    if b.n not in (None, 1):
        raise InvalidRequest(f"n={b.n}: only n=1 is supported", "n")
    if b.logprobs or b.top_logprobs:
        raise InvalidRequest("logprobs: not supported by this server", "logprobs")
    if b.logit_bias:
        raise InvalidRequest("logit_bias: not supported by this server", "logit_bias")
    if isinstance(b, ChatBody):
        if b.tools:
            raise InvalidRequest("tools: tool calling is not supported by this server", "tools")
        if b.response_format and b.response_format.get("type", "text") != "text":
            raise InvalidRequest("response_format: only {'type': 'text'} is supported", "response_format")
    if isinstance(b, CompletionBody):
        if b.echo:
            raise InvalidRequest("echo: not supported by this server", "echo")
        if b.suffix:
            raise InvalidRequest("suffix: not supported by this server", "suffix")
        if b.best_of not in (None, 1):
            raise InvalidRequest(f"best_of={b.best_of}: only 1 is supported", "best_of")


def _sampling(b: _Common) -> dict:
    if b.max_tokens is not None and b.max_completion_tokens is not None and b.max_tokens != b.max_completion_tokens:
        raise InvalidRequest("max_tokens and max_completion_tokens differ; send one", "max_completion_tokens")
    stop = (b.stop,) if isinstance(b.stop, str) else tuple(b.stop or ())
    top_k = b.top_k
    if top_k == -1:                     # vLLM's spelling of "off"
        top_k = 0
    return dict(max_new_tokens=b.max_completion_tokens if b.max_completion_tokens is not None else b.max_tokens,
                temperature=b.temperature, top_p=b.top_p, top_k=top_k, min_p=b.min_p,
                repetition_penalty=b.repetition_penalty, seed=b.seed, stop=stop,
                stop_token_ids=tuple(b.stop_token_ids or ()), ignore_eos=b.ignore_eos)


def _chat_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> {role, content: str}; content may be a list of text parts."""
    out = []
    for i, m in enumerate(messages):
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise InvalidRequest(f"messages[{i}].content[{j}]: only text parts are supported",
                                         f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        role = m.get("role")
        if role == "developer":         # OpenAI's newer name for the system role
            role = "system"
        out.append({**{k: v for k, v in m.items() if k not in ("content", "name")}, "role": role, "content": content})
    return out


def _completion_prompt(p) -> str | list[int]:
    if isinstance(p, list):
        if p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise InvalidRequest(f"prompt: {len(p)} prompts in one request; send one (n=1 only)", "prompt")
            return p[0]
    return p


# ---------------------------------------------------------------- events onto the loop
class _AsyncEvents:
    """Request.events for a coroutine: the scheduler thread's put() lands in an asyncio.Queue."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.q = loop, asyncio.Queue()

    def put(self, ev) -> None:
        try:
            self.loop.call_soon_threadsafe(self.q.put_nowait, ev)
        except RuntimeError:            # loop closed (server stopping): nobody is listening any more
            pass


async def _watch_disconnect(http: HttpRequest, req) -> None:
    while True:
        msg = await http.receive()
        if msg["type"] == "http.disconnect":
            req.cancel("client")
            return


# ---------------------------------------------------------------- the app
def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="zenjax", docs_url=None, redoc_url=None, openapi_url=None)
    s = service

    @app.exception_handler(RequestValidationError)
    async def _validation(_request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            s.metrics.malformed.labels(transport="http").inc()
            log_event("malformed_request", logging.WARNING, transport="http", error=err.get("msg"))
            return _error(400, f"request body is not valid JSON: {err.get('msg')}", None, "invalid_json")
        param = ".".join(loc) or None
        s.reject("", InvalidRequest(f"{param or 'body'}: {err.get('msg', 'invalid')}", param), transport="http")
        return _error(400, f"{param or 'body'}: {err.get('msg', 'invalid')}", param, "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request, exc: StarletteHTTPException):
        if exc.status_code == 400:      # FastAPI: the body is not decodable (e.g. invalid UTF-8)
            s.metrics.malformed.labels(transport="http").inc()
            log_event("malformed_request", logging.WARNING, transport="http", error=str(exc.detail))
            return _error(400, f"request body is not valid JSON: {exc.detail}", None, "invalid_json")
        return _error(exc.status_code, str(exc.detail), None, None)

    @app.get("/health")
    async def health():
        state = s.state
        return JSONResponse({"status": state}, status_code=200 if state == "serving" else 503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": s.model_name, "object": "model", "created": s.created,
                                            "owned_by": "zenjax", "max_model_len": s.limits.max_model_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, http: HttpRequest):
        return await _complete(s, body, http, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HttpRequest):
        return await _complete(s, body, http, chat=False)

    return _Guard(app, s)


async def _complete(s: Service, body: _Common, http: HttpRequest, chat: bool):
    arrival = time.monotonic()
    rid = (http.headers.get("x-request-id") or "")[:64]
    loop = asyncio.get_running_loop()
    try:
        s.check_serving()
        rid = s.new_request_id(http.headers.get("x-request-id"))
        if body.model != s.model_name:
            s.reject(rid, InvalidRequest(f"model {body.model!r} not served", "model"), transport="http")
            return _error(404, f"model {body.model!r} does not exist; this server serves {s.model_name!r} "
                               f"(see /v1/models)", "model", "model_not_found")
        _refuse_unsupported(body)
        prompt = _chat_messages(body.messages) if chat else _completion_prompt(body.prompt)
        events = _AsyncEvents(loop)
        req = await loop.run_in_executor(s.prep_pool, lambda: s.prepare(prompt, _sampling(body), rid,
                                                                         arrival=arrival, events=events))
        s.submit(req)
    except ServiceError as e:
        s.reject(rid, e, transport="http")
        return _service_error(e, chat)
    watcher = asyncio.create_task(_watch_disconnect(http, req))
    kind = "chat.completion" if chat else "text_completion"
    head = {"id": ("chatcmpl-" if chat else "cmpl-") + rid, "created": int(time.time()), "model": s.model_name}
    try:
        first = await events.q.get()
    except BaseException:
        req.cancel("client")
        watcher.cancel()
        raise
    if isinstance(first, Failed):
        watcher.cancel()
        return _service_error(_failed(first), chat)
    if body.stream:
        gen = _sse(events, first, req, watcher, head, kind, chat, body)
        return StreamingResponse(gen, media_type="text/event-stream", headers={"x-request-id": rid})
    try:
        text, ev = [], first
        while not isinstance(ev, (Finished, Failed)):
            if isinstance(ev, Delta):
                text.append(ev.text)
            ev = await events.q.get()
    finally:
        watcher.cancel()
        req.cancel()                       # no-op when finished
    if isinstance(ev, Failed):
        return _service_error(_failed(ev), chat)
    choice = {"index": 0, "finish_reason": ev.reason, "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": "".join(text)}
    else:
        choice["text"] = "".join(text)
    return JSONResponse({**head, "object": kind, "choices": [choice], "usage": _usage(ev)},
                        headers={"x-request-id": rid})


def _failed(ev: Failed) -> ServiceError:
    from zenjax.serve.errors import BY_CODE
    return BY_CODE.get(ev.code, BY_CODE["internal"])(ev.message)


def _usage(ev: Finished) -> dict:
    u = ev.usage
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.generated_tokens,
            "total_tokens": u.prompt_tokens + u.generated_tokens,
            # OpenAI's field for prompt tokens served from a cache: here the prefix-reused tokens
            "prompt_tokens_details": {"cached_tokens": u.reused_tokens}}


async def _sse(events: _AsyncEvents, first, req, watcher, head, kind, chat, body: _Common):
    kind = kind + ".chunk" if chat else kind
    include_usage = bool((body.stream_options or {}).get("include_usage"))

    def chunk(choices, **extra):
        out = {**head, "object": kind, "choices": choices, **extra}
        if include_usage and "usage" not in out:
            out["usage"] = None
        return "data: " + json.dumps(out, ensure_ascii=False) + "\n\n"

    def choice(text=None, finish=None, role=False):
        c = {"index": 0, "finish_reason": finish, "logprobs": None}
        if chat:
            c["delta"] = ({"role": "assistant", "content": ""} if role else
                          ({} if text is None else {"content": text}))
        else:
            c["text"] = text or ""
        return c

    try:
        if chat:
            yield chunk([choice(role=True)])
        ev = first
        while True:
            if isinstance(ev, Progress):
                if body.prefill_progress:
                    yield chunk([], prefill_progress={"prefilled_tokens": ev.prefilled, "prompt_tokens": ev.total})
            elif isinstance(ev, Delta):
                if ev.text:
                    yield chunk([choice(ev.text)])
            elif isinstance(ev, Finished):
                yield chunk([choice(finish=ev.reason)])
                if include_usage:
                    yield chunk([], usage=_usage(ev))
                break
            elif isinstance(ev, Failed):
                e = _failed(ev)
                yield "data: " + json.dumps(error_body(_HTTP_STATUS[e.code], e.message, None, e.code)) + "\n\n"
                break
            ev = await events.q.get()
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        req.cancel()                       # the client went away mid-stream: free the slot


class _Guard:
    """ASGI middleware: API key on /v1/*, and the body read (bounded) before the app parses it."""

    def __init__(self, app, service: Service):
        self.app, self.s = app, service
        key = service.config.api_key
        self._want = None if key is None else ("bearer " + key).encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self._want is not None and scope["path"].startswith("/v1/"):
            got = headers.get(b"authorization", b"")
            if not hmac.compare_digest(got[:7].lower() + got[7:], self._want):
                log_event("request_rejected", logging.INFO, transport="http", path=scope["path"],
                          status="UNAUTHENTICATED")
                self.s.metrics.finished("rejected", "UNAUTHENTICATED")
                return await _send(send, 401, error_body(401, "missing or wrong API key: send the header "
                                                              "'Authorization: Bearer KEY'", None, "invalid_api_key"))
        cap = self.s.limits.http_body_bytes
        too_big = error_body(413, f"request body over {cap} bytes (derived from max_model_len="
                                  f"{self.s.limits.max_model_len})", None, "request_too_large")
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > cap:
            return await _send(send, 413, too_big)
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > cap:
                return await _send(send, 413, too_big)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send(send, status: int, payload: dict) -> None:
    data = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


# ---------------------------------------------------------------- uvicorn in a thread
class HttpFrontend:
    def __init__(self, service: Service):
        self.s = service
        c = service.config
        kw = {}
        if c.tls_cert:
            kw.update(ssl_certfile=c.tls_cert, ssl_keyfile=c.tls_key)
        self._config = uvicorn.Config(create_app(service), host=c.host, port=c.http_port, log_config=None,
                                      access_log=False, lifespan="off", timeout_graceful_shutdown=5,
                                      limit_concurrency=c.max_batch + c.max_queue + 64, **kw)
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def start(self, timeout: float = 60.0) -> None:
        self._thread = threading.Thread(target=self._server.run, name="zenjax-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"HTTP server did not start on {self._config.host}:{self._config.port}")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        c = self.s.config
        scheme = "https" if c.tls_cert else "http"
        log_event("http_listening", address=f"{c.host}:{self.port}", url=f"{scheme}://{c.host}:{self.port}/v1",
                  tls=bool(c.tls_cert), max_body_bytes=self.s.limits.http_body_bytes)

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
