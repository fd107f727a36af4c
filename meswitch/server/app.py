"""The OpenAI-compatible HTTP API over a Switch (FastAPI).

    GET  /v1/models                 auto, base and every expert (description, parent base)
    POST /v1/chat/completions       plain or streaming (server-sent events)
    POST /v1/completions            plain or streaming
    GET  /health, GET /metrics      liveness and Prometheus metrics
    POST /admin/experts             add an expert from a bundle on the server (API key)
    DELETE /admin/experts/{name}    remove an expert (API key)

`model` is an expert name, "base" (the plain base model) or "auto" (the bundle's router picks;
a conversation that continues an answer of this server stays with the expert that gave it,
unless the router is confident the new turn belongs elsewhere). The response's `model` field
and the `x-meswitch-expert` header say which expert answered.

All state lives in the app (app.state): the Switch, the router, metrics. Errors use OpenAI's
JSON shape; no traceback ever reaches a client.

The app needs only the Switch's serving surface: `bundle` (manifest and expert entries),
`experts`, `description`, `submit`, `stats`, `add_expert`, `remove_expert`. Another object
with that surface serves the same API: meswitch.server.ray_serve.RemoteSwitch forwards requests
to Switch replicas on Ray Serve; its `submit` is a coroutine, its requests may carry
`response_headers`, and it reports `replica_stats()` for /metrics.
"""
from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..bundle.format import BundleError
from ..runtime.engine import QueueFullError, RequestError, SamplingParams
from ..runtime.store import MemoryBudgetError
from .conversations import ConversationMemory
from .metrics import ServerMetrics
from .schemas import AddExpertRequest, ChatCompletionRequest, CompletionRequest

log = logging.getLogger("meswitch.server")
BASE_MODEL = "base"
AUTO_MODEL = "auto"
DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 1 << 20  # 1 MiB of JSON is far beyond any prompt that fits the context


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = status, message, type_, param, code, headers


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class GuardMiddleware:
    """Refuses bodies over max_body_bytes (413) and, when a key is set, requests to /v1 and
    /admin without `Authorization: Bearer KEY` (401)."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, on_error):
        self.app, self.api_key, self.max_body, self.on_error = app, api_key, max_body_bytes, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key is not None and (path.startswith("/v1/") or path.startswith("/admin/")):
            auth = headers.get("authorization", "")
            token = auth[7:] if auth.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                resp = self.on_error(401, "missing or invalid API key", "invalid_request_error", code="invalid_api_key")
                return await resp(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            too_big = self.on_error(413, f"request body larger than {self.max_body} bytes", "invalid_request_error")
            length = headers.get("content-length")
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


def create_app(switch, router=None, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES,
               retry_after: int = 1, conversations: ConversationMemory | None = None) -> FastAPI:
    app = FastAPI(title="meswitch", version="1", docs_url=None, redoc_url=None)
    app.state.switch = switch
    app.state.router = router
    app.state.metrics = ServerMetrics(switch)
    app.state.conversations = conversations if conversations is not None else ConversationMemory()
    metrics: ServerMetrics = app.state.metrics
    base_name = switch.bundle.manifest["base"].get("reference") or "base"

    # ----- errors ---------------------------------------------------------------------------------
    def error_response(status: int, message: str, type_: str, param=None, code=None, headers=None) -> JSONResponse:
        metrics.errors.labels(str(status)).inc()
        return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

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
        log.exception("internal error on %s", request.url.path)
        return error_response(500, "internal server error", "server_error")

    # ----- body size and API key: a plain ASGI middleware (BaseHTTPMiddleware would hide client
    # disconnects from the endpoints, and they cancel generations) --------------------------------------
    app.add_middleware(GuardMiddleware, api_key=api_key, max_body_bytes=max_body_bytes, on_error=error_response)

    # ----- models ---------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models():
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

        def route():
            previous = app.state.conversations.previous(messages) if messages else None
            try:
                return router.route(query, previous_expert=previous)
            except TypeError:  # a router without conversation stickiness
                return router.route(query)

        d = await run_in_threadpool(route)
        expert = None if d.expert in (None, BASE_MODEL) else d.expert
        if expert is not None and expert not in switch.bundle.experts:  # removed since the router was trained
            expert = None
        metrics.routes.labels(expert or BASE_MODEL, str(bool(d.fallback)).lower()).inc()
        return expert, {"x-meswitch-route-confidence": f"{d.confidence:.3f}",
                        "x-meswitch-route-fallback": str(bool(d.fallback)).lower()}

    def sampling(body, max_tokens: int | None) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens or DEFAULT_MAX_TOKENS, temperature=float(body.temperature),
                              top_p=float(body.top_p), stop=body.stop_list(), seed=body.seed)

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
        except QueueFullError as e:
            metrics.requests.labels(endpoint, label, "429").inc()
            raise APIError(429, f"{e}; retry later", "rate_limit_exceeded", code="queue_full",
                           headers={"Retry-After": str(retry_after)}) from None
        except RequestError as e:
            metrics.requests.labels(endpoint, label, "400").inc()
            raise APIError(400, str(e), code="context_length_exceeded" if "context length" in str(e) else None) from None
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

        def chunk(delta_text: str, finish: str | None) -> str:
            if endpoint == "chat":
                choice = {"index": 0, "delta": {"content": delta_text} if delta_text or finish is None else {},
                          "finish_reason": finish, "logprobs": None}
                obj = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": label, "choices": [choice]}
            else:
                choice = {"index": 0, "text": delta_text, "finish_reason": finish, "logprobs": None}
                obj = {"id": rid, "object": "text_completion", "created": created, "model": label, "choices": [choice]}
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        def finish_reason(c) -> str:
            return "length" if c.finish_reason == "length" else "stop"

        if body.stream:
            async def events():
                result = None
                first = True
                try:
                    if endpoint == "chat":  # the role comes first, as OpenAI sends it
                        yield (f"data: {json.dumps({'id': rid, 'object': 'chat.completion.chunk', 'created': created, 'model': label, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': ''}, 'finish_reason': None, 'logprobs': None}]})}\n\n")
                    while True:
                        delta, done = await queue.get()
                        if delta:
                            if first:
                                metrics.ttft.labels(label).observe(time.perf_counter() - t0)
                                first = False
                            yield chunk(delta, None)
                        if done is not None:
                            result = done
                            break
                    if result.finish_reason == "error":
                        err = error_body(result.error or "generation failed", "server_error")
                        yield f"data: {json.dumps(err)}\n\n"
                    else:
                        if messages is not None:
                            app.state.conversations.remember(messages, result.text, label)
                        final = json.loads(chunk("", finish_reason(result))[6:])
                        stream_opts = (body.model_extra or {}).get("stream_options") or {}
                        if isinstance(stream_opts, dict) and stream_opts.get("include_usage"):
                            final["usage"] = usage(result)
                        yield f"data: {json.dumps(final)}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    if not req.done:  # the client went away: stop generating for it
                        req.cancel()
                    finish_metrics(result, "200" if result is not None and result.finish_reason != "error" else "499")

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

        # non-streaming: wait for the result, cancelling if the client disconnects meanwhile
        result = None
        last_check = time.monotonic()
        try:
            while result is None:
                try:
                    _, result = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    pass
                if result is None and time.monotonic() - last_check >= 0.5:
                    last_check = time.monotonic()
                    if await request.is_disconnected():
                        req.cancel()
                        finish_metrics(None, "499")
                        return Response(status_code=499)
        except asyncio.CancelledError:
            req.cancel()
            finish_metrics(None, "499")
            raise
        if result.finish_reason == "error":
            finish_metrics(result, "500" if "memory budget" not in (result.error or "") else "503")
            if "memory budget" in (result.error or ""):
                raise APIError(503, result.error, "server_error", headers={"Retry-After": str(retry_after)})
            raise APIError(500, "generation failed", "server_error")
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
        expert, info = await resolve(body.model, messages, None)
        return await generate(request, "chat", body, None, messages, expert, info)

    @app.post("/v1/completions")
    async def completions(request: Request, body: CompletionRequest):
        try:
            body.refuse_unsupported()
        except ValueError as e:
            raise APIError(400, str(e)) from None
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

    def require_admin():
        if api_key is None:
            raise APIError(403, "admin endpoints are disabled: start the server with --api-key", "permission_error")

    @app.post("/admin/experts")
    async def add_expert(body: AddExpertRequest):
        require_admin()
        try:
            await run_in_threadpool(switch.add_expert, body.name, body.source, body.source_name, body.overwrite)
        except (BundleError, ValueError, FileNotFoundError) as e:
            raise APIError(400, str(e)) from None
        return {"added": body.name, "experts": switch.experts}

    @app.delete("/admin/experts/{name}")
    async def remove_expert(name: str):
        require_admin()
        if name not in switch.bundle.experts:
            raise APIError(404, f"no expert {name!r}", code="model_not_found")
        try:
            await run_in_threadpool(switch.remove_expert, name)
        except BundleError as e:  # e.g. not supported by a remote switch
            raise APIError(400, str(e)) from None
        return {"removed": name, "experts": switch.experts}

    return app


__all__ = ["APIError", "ConversationMemory", "MemoryBudgetError", "create_app"]
