"""The HTTP service (FastAPI): ``/v1/recommend``, ``/v1/recommend:batch``, ``/healthz``,
``/readyz``, ``/metrics`` over a :class:`Scheduler` and a :class:`Worker`.

Every error is JSON ``{"error": {"type": <named error>, "message": ...}}`` with a 4xx or 5xx
status (``STATUS``), never a traceback. With an API key, every route but ``/healthz`` needs
``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from ..errors import AuthenticationError, ConfigError, Overloaded, RcLLMError
from .metrics import ServerMetrics
from .payload import recommendation_json
from .scheduler import Request, Scheduler
from .schemas import BatchBody, RecommendBody

log = logging.getLogger("rcllm_sdk.serving")

STATUS = {  # named error -> HTTP status; any other RcLLMError is a 500
    "InvalidRequestError": 422,
    "UnknownItemError": 422,
    "NotEnoughCandidatesError": 422,
    "EmptyHistoryError": 422,
    "ConfigError": 422,
    "UnknownUserError": 404,
    "AuthenticationError": 401,
    "Overloaded": 503,
    "DeadlineExceeded": 504,
}
ROUTES = ("/v1/recommend", "/v1/recommend:batch", "/healthz", "/readyz", "/metrics")


@dataclass(slots=True)
class ServeSettings:
    """Scheduler bounds and the API key (``None``: no key needed)."""

    max_batch: int = 8
    max_wait_ms: float = 0.0
    max_queue: int = 64
    deadline_ms: float = 30_000.0
    api_key: str | None = None

    def __post_init__(self):
        if min(self.max_batch, self.max_queue) < 1 or self.max_wait_ms < 0 or self.deadline_ms <= 0:
            raise ConfigError(
                "serve settings: max_batch and max_queue must be >= 1, max_wait_ms >= 0, deadline_ms > 0"
            )


def error_body(exc: Exception) -> dict:
    """``{"error": {"type", "message"}}``; errors the SDK did not name stay opaque."""
    if isinstance(exc, RcLLMError):
        return {"error": {"type": type(exc).__name__, "message": str(exc)}}
    return {"error": {"type": "InternalError", "message": "internal error; see the server log"}}


def error_response(exc: Exception) -> JSONResponse:
    name = type(exc).__name__ if isinstance(exc, RcLLMError) else "InternalError"
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(int(exc.retry_after_s))
    if isinstance(exc, AuthenticationError):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc), status_code=STATUS.get(name, 500), headers=headers)


def create_app(worker, settings: ServeSettings | None = None, scheduler=None) -> FastAPI:
    """The service over ``worker`` (a :class:`~rcllm_sdk.serving.worker.Worker`); the app owns
    it: shutdown finishes admitted requests, then closes it. ``scheduler``: something with
    :class:`Scheduler`'s ``start/submit/submit_many/close/depth`` (replicas: ``replicas.RayScheduler``);
    default a local one over ``worker``."""
    settings = settings or ServeSettings()
    metrics = ServerMetrics(lambda: scheduler.depth)
    if scheduler is None:
        scheduler = Scheduler(
            worker.plan,
            worker.run,
            settings.max_batch,
            settings.max_wait_ms,
            settings.max_queue,
            settings.deadline_ms,
            on_batch=metrics.batch_size.observe,
        )
    else:
        scheduler.on_batch = metrics.batch_size.observe

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        warm = asyncio.create_task(_warm_up(worker))
        yield
        await scheduler.close()
        await warm
        worker.close()

    app = FastAPI(title="rcllm", summary="LLM recommendation with cached block KV", lifespan=lifespan)
    app.state.scheduler, app.state.worker, app.state.metrics = scheduler, worker, metrics
    _add_error_handlers(app)
    _add_auth_and_counting(app, settings.api_key, metrics)

    def served(request: Request, result) -> dict:
        e2e_s = time.monotonic() - request.arrived
        metrics.served(result, e2e_s)
        return recommendation_json(replace(result, e2e_ms=e2e_s * 1000.0))

    @app.post("/v1/recommend")
    async def recommend(body: RecommendBody) -> dict:
        """Top-``k`` items for one user (the JSON of ``rcllm recommend``, ``model_version`` included)."""
        request = _request(body)
        return served(request, await scheduler.submit(request))

    @app.post("/v1/recommend:batch")
    async def recommend_batch(body: BatchBody) -> dict:
        """Several requests, admitted together (or one 503); ``results`` holds one recommendation
        or ``{"error": ...}`` per request, in order."""
        requests = [_request(b) for b in body.requests]
        outcomes = await scheduler.submit_many(requests)
        return {
            "results": [
                error_body(o) if isinstance(o, Exception) else served(r, o)
                for r, o in zip(requests, outcomes, strict=True)
            ]
        }

    @app.get("/healthz")
    async def healthz() -> dict:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Model loaded, store reachable, warm-up done (503 until all hold)."""
        checks = {
            "model_loaded": worker.rec is not None,
            "store_reachable": await asyncio.to_thread(worker.store_reachable),
            "warmed_up": worker.warmed,
        }
        ready = all(checks.values())
        body = {"ready": ready, "checks": checks, "model_version": worker.model_version}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        """Prometheus text format."""
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    return app


def _request(body: RecommendBody) -> Request:
    return Request(
        body.user_id,
        body.k,
        variant=(body.mode, body.policy),
        candidates=body.candidates,
        timeout_s=None if body.timeout_ms is None else body.timeout_ms / 1000.0,
    )


async def _warm_up(worker) -> None:
    try:
        await asyncio.to_thread(worker.warm_up)
    except Exception:  # not ready stays visible on /readyz; the log says why
        log.exception("warm-up failed")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RcLLMError)
    async def named(_, exc: RcLLMError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors()
        )
        return JSONResponse({"error": {"type": "InvalidRequestError", "message": problems}}, status_code=422)

    @app.exception_handler(HTTPException)
    async def http(_, exc: HTTPException):
        name = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        body = {"error": {"type": name, "message": str(exc.detail)}}
        return JSONResponse(body, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(_, exc: Exception):
        log.error("unhandled error", exc_info=exc)
        return error_response(exc)


def _add_auth_and_counting(app: FastAPI, api_key: str | None, metrics: ServerMetrics) -> None:
    expected = f"Bearer {api_key}".encode() if api_key else None

    @app.middleware("http")
    async def guard(request: HttpRequest, call_next):
        path = request.url.path
        given = request.headers.get("authorization", "").encode()
        if expected and path != "/healthz" and not hmac.compare_digest(given, expected):
            response = error_response(
                AuthenticationError("send `Authorization: Bearer <key>`: the key was missing or wrong")
            )
        else:
            response = await call_next(request)
        metrics.requests.labels(path if path in ROUTES else "other", str(response.status_code)).inc()
        return response
