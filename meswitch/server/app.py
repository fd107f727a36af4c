"""The OpenAI-compatible HTTP API over a Switch (FastAPI).

    GET  /v1/models                 auto, base and every expert (description, parent base)
    POST /v1/chat/completions       plain or streaming (server-sent events)
    POST /v1/completions            plain or streaming
    GET  /health, GET /metrics      liveness and Prometheus metrics
    POST /admin/experts             add an expert from a bundle on the server (admin key)
    DELETE /admin/experts/{name}    remove an expert (admin key)

`model` is an expert name, "base" (the plain base model) or "auto" (the bundle's router picks;
a conversation that continues an answer of this server stays with the expert that gave it,
unless the router is confident the new turn belongs elsewhere). The response's `model` field
and the `x-meswitch-expert` header say which expert answered.

All state lives in the app (app.state): the Switch, the router, metrics. Errors use OpenAI's
JSON shape; typed errors map to HTTP statuses in one table (ERROR_MAP); no traceback ever
reaches a client. Inference keys (several may be accepted) and the admin key are separate; keys
are compared in constant time (as SHA-256 digests) and never logged.

The app needs only the Switch's serving surface: `bundle` (manifest and expert entries),
`experts`, `description`, `sync_bundle`, `submit`, `stats`, `add_expert`, `remove_expert`. Another object
with that surface serves the same API: meswitch.server.ray_serve.RemoteSwitch forwards requests
to Switch replicas on Ray Serve; its `submit` is a coroutine, its requests may carry
`response_headers`, and it reports `replica_stats()` for /metrics.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import inspect
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..bundle.format import BundleError, ExpertExistsError, UnknownExpertError
from ..runtime.engine import ContextLengthError, EngineStoppedError, QueueFullError, RequestError, SamplingParams
from ..runtime.store import MemoryBudgetError
from ..router.errors import RouterError
from ..runtime.switch import SourceError
from .conversations import ConversationMemory
from .metrics import ServerMetrics
from .schemas import AddExpertRequest, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("meswitch.server")
BASE_MODEL = "base"
AUTO_MODEL = "auto"
DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON is far beyond any prompt that fits the context


class APIError(Exception):
    """An error the HTTP layer itself answers (unknown model, bad parameter, admin disabled)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


class UnsupportedOperation(Exception):
    """What this deployment cannot do (e.g. admin changes on Ray Serve replicas)."""


class ReplicaGoneError(RuntimeError):
    """The process serving a request stopped and the request could not be moved (Ray Serve)."""


# Typed errors of the runtime and the bundle -> HTTP status, OpenAI error type and code, and
# whether to send Retry-After. The most specific class an error is an instance of applies. Any
# other exception is a 500 "internal server error" whose details go to the server log only.
ERROR_MAP: dict[type[BaseException], tuple[int, str, str | None, bool]] = {
    ContextLengthError: (400, "invalid_request_error", "context_length_exceeded", False),
    RequestError: (400, "invalid_request_error", None, False),
    QueueFullError: (429, "rate_limit_exceeded", "queue_full", True),
    MemoryBudgetError: (503, "server_error", "memory_budget_exceeded", True),
    EngineStoppedError: (503, "server_error", "shutting_down", False),
    UnknownExpertError: (404, "invalid_request_error", "model_not_found", False),
    ExpertExistsError: (409, "invalid_request_error", "expert_exists", False),
    SourceError: (400, "invalid_request_error", "invalid_source", False),
    RouterError: (400, "invalid_request_error", "cannot_route", False),  # a query `auto` cannot route
    UnsupportedOperation: (400, "invalid_request_error", "unsupported", False),
    ReplicaGoneError: (503, "server_error", "replica_unavailable", True),
    BundleError: (500, "server_error", "expert_unavailable", False),  # the served bundle is damaged
}


def mapped_error(exc: BaseException) -> tuple[int, str, str | None, bool] | None:
    for cls in type(exc).__mro__:
        if cls in ERROR_MAP:
            return ERROR_MAP[cls]
    return None


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    # a message may quote client input; a lone surrogate in it could not be written as UTF-8
    message = message.encode("utf-8", "replace").decode("utf-8")
    if isinstance(param, str):
        param = param.encode("utf-8", "replace").decode("utf-8")
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def key_digests(keys: str | Sequence[str] | None) -> tuple[bytes, ...] | None:
    """SHA-256 digests of the accepted keys (None: no key needed); empty keys are refused."""
    if keys is None:
        return None
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys or not all(isinstance(k, str) and k.strip() for k in keys):
        raise ValueError("API keys must be non-empty strings")
    return tuple(hashlib.sha256(k.strip().encode("utf-8")).digest() for k in keys)


def key_accepted(token: bytes, digests: tuple[bytes, ...]) -> bool:
    """Constant-time: every accepted key is compared, each comparison on equal-length digests."""
    d = hashlib.sha256(token).digest()
    ok = False
    for k in digests:
        ok |= hmac.compare_digest(d, k)
    return ok


class GuardMiddleware:
    """Refuses bodies over max_body_bytes (413); when inference keys are set, requests to /v1
    without `Authorization: Bearer KEY` (401); requests to /admin without the admin key (401),
    or all of them when no admin key is set (403)."""

    def __init__(self, app, api_keys: tuple[bytes, ...] | None, admin_keys: tuple[bytes, ...] | None,
                 max_body_bytes: int, on_error):
        self.app, self.api_keys, self.admin_keys, self.max_body, self.on_error = (
            app, api_keys, admin_keys, max_body_bytes, on_error)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v for k, v in scope["headers"]}
        path = scope["path"]
        auth = headers.get("authorization", b"")
        token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if path == "/admin" or path.startswith("/admin/"):
            if self.admin_keys is None:
                resp = self.on_error(403, "admin endpoints are disabled: start the server with --admin-key",
                                     "permission_error")
                return await resp(scope, receive, send)
            if not key_accepted(token, self.admin_keys):
                resp = self.on_error(401, "missing or invalid admin key", "invalid_request_error", code="invalid_api_key")
                return await resp(scope, receive, send)
        elif self.api_keys is not None and path.startswith("/v1/") and not key_accepted(token, self.api_keys):
            resp = self.on_error(401, "missing or invalid API key", "invalid_request_error", code="invalid_api_key")
            return await resp(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            too_big = self.on_error(413, f"request body larger than {self.max_body} bytes", "invalid_request_error")
            length = headers.get("content-length", b"").decode("latin-1") if "content-length" in headers else None
            if length is not None:
                if not length.isdigit() or int(length) > self.max_body:
                    if length.isdigit() and int(length) <= 64 * self.max_body:
                        await self._discard_body(receive)  # so the client reads the 413 instead of a reset
                    return await too_big(scope, receive, send)
            else:  # chunked: read it here, within the limit, and hand it on
                body, more = b"", True
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return
                    body += msg.get("body", b"")
                    more = msg.get("more_body", False)
                    if len(body) > self.max_body:
                        return await too_big(scope, receive, send)
                sent = False

                async def replay():
                    nonlocal sent
                    if not sent:
                        sent = True
                        return {"type": "http.request", "body": body, "more_body": False}
                    return await receive()

                return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    @staticmethod
    async def _discard_body(receive) -> None:
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            more = msg.get("more_body", False)


def confine_source(source: str, source_dirs: Sequence[Path]) -> Path:
    """An admin `source`: a bundle inside one of the server's source folders (a relative path is
    taken from the first); anything else, symlinks included, is refused."""
    if "\x00" in source:
        raise APIError(400, "source: not a valid path", param="source")
    p = Path(source)
    if not p.is_absolute():
        p = source_dirs[0] / p
    real = os.path.realpath(p)
    for d in source_dirs:
        root = os.path.realpath(d)
        if real.startswith(root.rstrip(os.sep) + os.sep):
            return Path(real)
    raise APIError(403, "source must be a bundle inside the server's source folders (meswitch serve --source-dir)",
                   "permission_error", param="source")


def create_app(switch, router=None, api_key: str | Sequence[str] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               retry_after: int = 1, admin_key: str | None = None,
               source_dirs: Sequence[str | os.PathLike] | None = None,
               conversations: ConversationMemory | None = None) -> FastAPI:
    """The FastAPI app over a Switch. api_key: one inference key or several (None: open);
    admin_key: enables /admin (None: admin disabled); source_dirs: folders the admin may add
    experts from (default: the folder holding the served bundle); conversations: where `auto`
    remembers which expert answered a conversation (default: this process's memory)."""
    app = FastAPI(title="meswitch", version="1", docs_url=None, redoc_url=None)
    app.state.switch = switch
    app.state.router = router
    app.state.metrics = ServerMetrics(switch)
    app.state.conversations = conversations if conversations is not None else ConversationMemory()
    metrics: ServerMetrics = app.state.metrics
    base_name = switch.bundle.manifest["base"].get("reference") or "base"
    sources = [Path(d) for d in (source_dirs or [Path(os.path.realpath(switch.bundle.path)).parent])]

    # ----- errors ---------------------------------------------------------------------------------
    def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
        metrics.errors.labels(str(status)).inc()
        return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)

    def status_of(exc: BaseException) -> int:
        if isinstance(exc, APIError):
            return exc.status
        m = mapped_error(exc)
        return m[0] if m else 500

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    async def _typed_error(request, exc: Exception):
        status, type_, code, retry = mapped_error(exc)
        if status >= 500:
            log.error("%s on %s: %s", type(exc).__name__, request.url.path, exc)
        return error_response(status, str(exc), type_, code=code,
                              headers={"Retry-After": str(retry_after)} if retry else None)

    for cls in ERROR_MAP:
        app.add_exception_handler(cls, _typed_error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        return error_response(400, f"{loc}: {msg}" if loc else msg, "invalid_request_error", loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return error_response(500, "internal server error", "server_error")

    # ----- body size and keys: a plain ASGI middleware (BaseHTTPMiddleware would hide client
    # disconnects from the endpoints, and they cancel generations) --------------------------------------
    api_keys, admin_keys = key_digests(api_key), key_digests(admin_key)
    if api_keys and admin_keys and set(api_keys) & set(admin_keys):
        raise ValueError("the admin key must differ from every inference key")
    app.add_middleware(GuardMiddleware, api_keys=api_keys, admin_keys=admin_keys, max_body_bytes=max_body_bytes,
                       on_error=error_response)

    # ----- models ---------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models():
        await run_in_threadpool(switch.sync_bundle)
        created = int(time.time())
        data = [{"id": AUTO_MODEL, "object": "model", "created": created, "owned_by": "meswitch",
                 "description": "routes each request to the most suitable expert" if app.state.router
                 else "routing unavailable: this bundle has no router", "parent": base_name},
                {"id": BASE_MODEL, "object": "model", "created": created, "owned_by": "meswitch",
                 "description": "the shared base model without any expert delta", "parent": None, "root": base_name}]
        for name in switch.experts:
            data.append({"id": name, "object": "model", "created": created, "owned_by": "meswitch",
                         "description": switch.description(name), "parent": base_name})
        return {"object": "list", "data": data}

    # ----- model resolution ------------------------------------------------------------------------------
    async def resolve(model: str, messages: list[dict] | None, prompt: str | None) -> tuple[str | None, dict]:
        """-> (expert or None for the base, routing info for headers/metrics)."""
        if model == BASE_MODEL:
            return None, {}
        if model != AUTO_MODEL:
            if model not in switch.bundle.experts:
                known = ", ".join([AUTO_MODEL, BASE_MODEL, *switch.experts])
                raise APIError(404, f"model {model!r} not found (available: {known})", code="model_not_found",
                               param="model")
            return model, {}
        router = app.state.router
        if router is None:
            raise APIError(400, "model 'auto' needs a router: this bundle has none (train one with "
                                "`meswitch router train`), or name an expert", param="model")
        query = messages if messages is not None else prompt
        sticky = "previous_expert" in inspect.signature(router.route).parameters  # a router may not have it

        def route():  # the conversation lookup may block (Ray Serve keeps it in another process)
            if not sticky:
                return router.route(query)
            previous = app.state.conversations.previous(messages) if messages else None
            return router.route(query, previous_expert=previous)

        d = await run_in_threadpool(route)
        expert = None if d.expert in (None, BASE_MODEL) else d.expert
        if expert is not None and expert not in switch.bundle.experts:  # removed since the router was trained
            expert = None
        metrics.routes.labels(expert or BASE_MODEL, str(bool(d.fallback)).lower()).inc()
        return expert, {"x-meswitch-route-confidence": f"{d.confidence:.3f}",
                        "x-meswitch-route-fallback": str(bool(d.fallback)).lower()}

    def sampling(body, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens or DEFAULT_MAX_TOKENS,
                              temperature=1.0 if body.temperature is None else float(body.temperature),
                              top_p=1.0 if body.top_p is None else float(body.top_p), stop=body.stop_list(),
                              seed=body.seed)

    async def next_event(request: Request, queue: asyncio.Queue, req, checked: list[float]):
        """The engine's next (text, completion-or-None), or None when the client went away
        meanwhile (its generation is cancelled): checked every 0.5 s (`checked` holds the time of
        the last check). A cancelled handler cancels the generation too."""
        try:
            while True:
                event = None
                try:
                    event = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() - checked[0] >= 0.5:
                    checked[0] = time.monotonic()
                    if await request.is_disconnected():
                        req.cancel()
                        return None
                if event is not None:
                    return event
        except asyncio.CancelledError:
            req.cancel()
            raise

    def failure(done) -> Exception:
        """The typed error a failed generation raised (attached by the Switch), else a 500."""
        exc = getattr(done, "exception", None)
        if exc is not None and mapped_error(exc) is not None:
            return exc
        log.error("generation failed: %s", done.error)
        return APIError(500, "generation failed", "server_error")

    # ----- generation core ---------------------------------------------------------------------------
    async def generate(request: Request, endpoint: str, body, prompt, messages, expert, extra_headers):
        label = expert or BASE_MODEL
        params = sampling(body, getattr(body, "max_completion_tokens", None) or body.max_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_update(req, delta, done):
            loop.call_soon_threadsafe(queue.put_nowait, (delta, done))

        t0 = time.perf_counter()
        try:
            req = switch.submit(prompt if messages is None else messages, expert, on_update=on_update, params=params)
            if inspect.isawaitable(req):  # a remote switch (Ray Serve) submits asynchronously
                req = await req
        except Exception as e:
            metrics.requests.labels(endpoint, label, str(status_of(e))).inc()
            raise
        rid = ("chatcmpl-" if endpoint == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        headers = {"x-meswitch-expert": label, **extra_headers, **getattr(req, "response_headers", {})}
        metrics.in_flight.inc()

        def finish_metrics(result, status="200"):
            metrics.in_flight.dec()
            metrics.requests.labels(endpoint, label, status).inc()
            metrics.latency.labels(label).observe(time.perf_counter() - t0)
            if result is not None:
                metrics.tokens.labels(label, "prompt").inc(result.prompt_tokens)
                metrics.tokens.labels(label, "completion").inc(result.completion_tokens)

        def usage(c):
            return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
                    "total_tokens": c.prompt_tokens + c.completion_tokens}

        def chunk_obj(delta: dict | str, finish: str | None) -> dict:
            if endpoint == "chat":
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": label,
                        "choices": [choice]}
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": "text_completion", "created": created, "model": label, "choices": [choice]}

        def sse(obj: dict) -> str:
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def text_chunk(text: str) -> str:
            return sse(chunk_obj({"content": text} if endpoint == "chat" else text, None))

        def finish_reason(c) -> str:
            return "length" if c.finish_reason == "length" else "stop"

        # Wait for the first event before answering, so that a request that fails before its
        # first token (an expert that does not fit the memory budget, a damaged expert) gets its
        # own HTTP status, streaming or not.
        checked = [time.monotonic()]
        first = await next_event(request, queue, req, checked)
        if first is None:
            finish_metrics(None, "499")
            return Response(status_code=499)
        if first[1] is not None and first[1].finish_reason == "error":
            exc = failure(first[1])
            finish_metrics(first[1], str(status_of(exc)))
            raise exc

        if body.stream:
            async def events():
                result = None
                first_token = True
                event = first
                try:
                    if endpoint == "chat":  # the role comes first, as OpenAI sends it
                        yield sse(chunk_obj({"role": "assistant", "content": ""}, None))
                    while True:
                        delta, done = event
                        if delta:
                            if first_token:
                                metrics.ttft.labels(label).observe(time.perf_counter() - t0)
                                first_token = False
                            yield text_chunk(delta)
                        if done is not None:
                            result = done
                            break
                        event = await queue.get()
                    if result.finish_reason == "error":
                        err = failure(result)
                        if isinstance(err, APIError):
                            yield sse(error_body(err.message, err.type, code=err.code))
                        else:
                            _, type_, code, _ = mapped_error(err)
                            yield sse(error_body(str(err), type_, code=code))
                    else:
                        if messages is not None:
                            app.state.conversations.remember(messages, result.text, label)
                        final = chunk_obj({} if endpoint == "chat" else "", finish_reason(result))
                        if body.include_usage:
                            final["usage"] = usage(result)
                        yield sse(final)
                    yield "data: [DONE]\n\n"
                finally:
                    if not req.done:  # the client went away: stop generating for it
                        req.cancel()
                    finish_metrics(result, "200" if result is not None and result.finish_reason != "error" else "499")

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

        # non-streaming: wait for the result, cancelling if the client disconnects meanwhile
        result = first[1]
        while result is None:
            event = await next_event(request, queue, req, checked)
            if event is None:
                finish_metrics(None, "499")
                return Response(status_code=499)
            result = event[1]
        if result.finish_reason == "error":
            exc = failure(result)
            finish_metrics(result, str(status_of(exc)))
            raise exc
        finish_metrics(result)
        if messages is not None:
            app.state.conversations.remember(messages, result.text, label)
        if endpoint == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "finish_reason": finish_reason(result), "logprobs": None}
            obj = {"id": rid, "object": "chat.completion", "created": created, "model": label, "choices": [choice]}
        else:
            choice = {"index": 0, "text": result.text, "finish_reason": finish_reason(result), "logprobs": None}
            obj = {"id": rid, "object": "text_completion", "created": created, "model": label, "choices": [choice]}
        obj["usage"] = usage(result)
        return JSONResponse(obj, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request, body: ChatCompletionRequest):
        try:
            body.refuse_unsupported()
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as e:
            raise APIError(400, str(e)) from None
        await run_in_threadpool(switch.sync_bundle)
        expert, info = await resolve(body.model, messages, None)
        return await generate(request, "chat", body, None, messages, expert, info)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        try:
            body.refuse_unsupported()
        except ValueError as e:
            raise APIError(400, str(e)) from None
        await run_in_threadpool(switch.sync_bundle)
        expert, info = await resolve(body.model, None, body.prompt)
        return await generate(request, "completion", body, body.prompt, None, expert, info)

    # ----- health, metrics, admin ---------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        s = await run_in_threadpool(switch.stats)
        return {"status": "ok", "experts": switch.experts, "router": app.state.router is not None,
                "queue_depth": s["queue_depth"], "running": s["running"]}

    @app.get("/metrics")
    async def prometheus_metrics():
        return Response(await run_in_threadpool(metrics.render), media_type="text/plain; version=0.0.4; charset=utf-8")

    # Admin: the middleware has checked the admin key (and answers 403 when none is set).
    @app.post("/admin/experts")
    async def add_expert(body: AddExpertRequest):
        source = confine_source(body.source, sources)
        await run_in_threadpool(switch.add_expert, body.name, source, body.source_name, body.overwrite)
        return {"added": body.name, "experts": switch.experts}

    @app.delete("/admin/experts/{name}")
    async def remove_expert(name: str):
        await run_in_threadpool(switch.remove_expert, name)
        return {"removed": name, "experts": switch.experts}

    return app


__all__ = ["APIError", "ConversationMemory", "ERROR_MAP", "MemoryBudgetError", "create_app"]
