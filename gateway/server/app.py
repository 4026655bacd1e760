"""The app factory: ``create_app(settings)`` builds the FastAPI app; its lifespan owns every resource.

The completion requests, the gateway's hot path, skip FastAPI's own middleware, routing and dependency injection
(:class:`GatewayApp`): the request-context and API-key middlewares wrap :func:`~gateway.server.proxy.serve_completion`
directly. What that saves per request is measured in ``bench/results/dataplane.md``.

Run it with uvicorn (``gateway serve`` does), or in tests inside ``TestClient``/``app.router.lifespan_context``.
No module-level app, no globals: two apps in one process are independent.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway import __version__
from gateway.config import Settings
from gateway.discovery.kubernetes import KubernetesDiscovery
from gateway.engine_set import EngineSet
from gateway.engines import Engine
from gateway.engines.client import EngineClient
from gateway.errors import error_body
from gateway.load.health import HealthBook, RetryThrottle
from gateway.load.prober import HealthProber
from gateway.load.scraper import MetricsScraper
from gateway.load.view import EngineSpec, LoadView
from gateway.scheduler_service.remote import make_dispatcher
from gateway.server.admin import router as admin_router
from gateway.server.auth import ApiKeyMiddleware, KeyRing, key_rings
from gateway.server.proxy import ENGINE_PATHS, serve_completion
from gateway.server.request_context import RequestContextMiddleware
from gateway.server.responses import router as responses_router
from gateway.server.responses_store import ResponseHomes
from gateway.server.routes import router
from gateway.server.state import GatewayState
from gateway.server.tenants import TenantBook
from gateway.telemetry import GatewayMetrics
from gateway.tokenizer_file import build_prompt_counter
from gateway.tokens import Tokenizer
from gateway.types import RankKey

NONSTREAM_PREFILL_STEPS = 4
"""Engine steps (of ``window.initial_step_s``) a non-streamed request counts as queued for prefill per chunk of its
prompt, since its first token is not seen: a margin set when the load view was written, not a measurement."""


def build_state(settings: Settings, tokenizer: Tokenizer | None = None) -> GatewayState:
    """Build (but do not start) the gateway's resources. Must run inside an event loop (the engine client's
    connection pool).

    Raises:
        ConfigError: a model's tokenizer file cannot be read (the message names the field and the file).
    """
    prompt_counter = build_prompt_counter(settings.models, tokenizer)
    metrics = GatewayMetrics()
    metrics.watch_prompt_tokens(prompt_counter.corrections)
    metrics.describe_engines((e.name, e.flavor, e.role) for e in settings.engines)
    engines = {e.name: Engine.from_config(e) for e in settings.engines}
    specs = [
        EngineSpec(e.name, e.dp_size, frozenset(e.models), e.prefill_budget_tokens, e.role) for e in settings.engines
    ]
    health = HealthBook([RankKey(s.name, rank) for s in specs for rank in range(s.dp_size)], settings.health)
    view = LoadView(
        specs,
        stale_after_s=settings.scrape.stale_after_s,
        nonstream_prefill_s=settings.window.initial_step_s * NONSTREAM_PREFILL_STEPS,
        usable=health.usable,
        unsure=health.unsure,
        running_before_first_token=settings.scrape.running_before_first_token,
    )
    clock = time.monotonic
    dispatcher = make_dispatcher(settings, view, metrics, health, clock=clock)
    metrics.watch_load(
        lambda: view.snapshot(clock()), dispatcher.scheduler.drain_seconds, dispatcher.scheduler.step_models
    )
    metrics.watch_window(
        dispatcher.scheduler.closed_at_once,
        lambda: dispatcher.scheduler.prefill_aligned_engines,
        lambda: view.engine_names,
    )
    client = EngineClient(settings.upstream)
    prober = HealthProber(
        client,
        list(engines.values()),
        health,
        metrics,
        settings.health,
        on_change=dispatcher.notify_load_changed,
        on_alignment=dispatcher.scheduler.set_prefill_alignment,
        clock=clock,
    )
    scraper = MetricsScraper(
        client,
        list(engines.values()),
        dispatcher,
        metrics,
        settings.scrape,
        clock=clock,
    )
    models = settings.served_models()
    engine_set = EngineSet(
        settings,
        engines,
        models,
        view=view,
        health=health,
        dispatcher=dispatcher,
        scraper=scraper,
        prober=prober,
        client=client,
        metrics=metrics,
        clock=clock,
    )
    response_homes = ResponseHomes(settings.responses.max_remembered, settings.responses.ttl_s)
    engine_set.removed_listeners.append(response_homes.forget_engine)
    return GatewayState(
        settings=settings,
        metrics=metrics,
        client=client,
        engines=engines,
        models=models,
        view=view,
        dispatcher=dispatcher,
        scraper=scraper,
        health=health,
        prober=prober,
        retry_throttle=RetryThrottle(
            settings.upstream.retry_throttle_max_tokens, settings.upstream.retry_throttle_ratio
        ),
        prompt_counter=prompt_counter,
        clock=clock,
        response_homes=response_homes,
        engine_set=engine_set,
        discovery=None
        if settings.discovery is None
        else KubernetesDiscovery(settings.discovery, engine_set, client, settings.health),
    )


def begin_drain(app: FastAPI) -> None:
    """Put the gateway ``app`` in draining mode (``/ready`` answers 503); nothing to do before its lifespan has
    started or once it drains."""
    state = getattr(app.state, "gateway", None)
    if isinstance(state, GatewayState) and not state.draining:
        state.begin_drain()


RELAY_ROUTES = {path: route for route, path in ENGINE_PATHS.items()}
"""The completion paths :class:`GatewayApp` serves before routing, and their routes."""


class GatewayApp(FastAPI):
    """The gateway's FastAPI app: ``POST`` to a path of :data:`RELAY_ROUTES` goes straight to :attr:`relay` (the
    same request-context and API-key middlewares around :func:`~gateway.server.proxy.serve_completion`); every
    other request, and the OpenAPI description of those routes, is FastAPI's."""

    relay: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = self.relay
        relayed = scope["type"] == "http" and scope["path"] in RELAY_ROUTES and scope["method"] == "POST"
        if relay is not None and relayed:
            scope["app"] = self
            await relay(scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def _front_middlewares(
    app: ASGIApp, settings: Settings, api_keys: KeyRing, admin_keys: KeyRing, tenants: TenantBook | None = None
) -> ASGIApp:
    """``app`` inside the request-context middleware (outermost: id, access log) and the API-key check."""
    checked = ApiKeyMiddleware(
        app,
        api_keys=api_keys,
        admin_keys=admin_keys,
        protect_metrics=settings.security.metrics_auth == "admin",
        tenants=tenants,
    )
    return RequestContextMiddleware(checked, access_log_enabled=settings.log.access_log)


def create_app(settings: Settings, *, tokenizer: Tokenizer | None = None) -> FastAPI:
    """Build the gateway app for ``settings`` (its engines must be listed; see ``gateway serve`` for the
    embedded default).

    Args:
        settings: the gateway settings.
        tokenizer: counts the prompt tokens of models without a ``models.<name>.tokenizer`` setting; the
            4-characters-a-token heuristic of :class:`~gateway.tokens.CharTokenizer` when ``None``.

    Raises:
        OSError: an API key file cannot be read.
    """
    tenants = None if settings.tenants is None else TenantBook(settings.tenants)
    api_keys, admin_keys = key_rings(settings.security, tenants)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = build_state(settings, tokenizer)
        app.state.gateway = state
        try:
            await state.scraper.start()
            await state.prober.start()
            await state.dispatcher.start()
            if state.discovery is not None:
                await state.discovery.start()
            yield
        finally:
            if state.discovery is not None:
                await state.discovery.stop()
            await state.engine_set.aclose()
            await state.dispatcher.stop()
            await state.prober.stop()
            await state.scraper.stop()
            await state.client.aclose()

    app = GatewayApp(title="sbs-gateway", version=__version__, lifespan=lifespan)
    app.include_router(router)
    app.include_router(responses_router)
    app.include_router(admin_router)

    async def relay(scope: Scope, receive: Receive, send: Send) -> None:
        state = app.state.gateway
        assert isinstance(state, GatewayState)
        await serve_completion(state, RELAY_ROUTES[scope["path"]], scope, receive, send)

    app.relay = _front_middlewares(relay, settings, api_keys, admin_keys, tenants)
    # the last added runs first: request context (id, access log) wraps the key check, which wraps the routes
    app.add_middleware(
        ApiKeyMiddleware,
        api_keys=api_keys,
        admin_keys=admin_keys,
        protect_metrics=settings.security.metrics_auth == "admin",
        tenants=tenants,
    )
    app.add_middleware(RequestContextMiddleware, access_log_enabled=settings.log.access_log)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_, code=exc.status_code), exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = json.dumps(exc.errors(), default=str)[:1000]
        return JSONResponse(error_body(message, "invalid_request_error", param=param), 400)

    return app
