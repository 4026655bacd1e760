"""The HTTP front door: OpenAI-compatible routes plus health, readiness, metrics and admin state. Routes stay
thin; which key each needs is decided in :mod:`gateway.server.auth`.

The two completion routes document the API (OpenAPI) and serve a request that reaches FastAPI's router; the app
sends the requests for their paths straight to :func:`~gateway.server.proxy.serve_completion` before routing
(:class:`~gateway.server.app.GatewayApp`), so both ways run the same code.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from gateway.server.openapi import CHAT_REQUEST, COMPLETION_REQUEST, json_body
from gateway.server.proxy import serve_completion
from gateway.server.state import GatewayState, State
from gateway.server.validation import Route

router = APIRouter()


class CompletionAnswer(Response):
    """The answer to a completion request: :func:`~gateway.server.proxy.serve_completion` reads the request and
    answers it when Starlette calls the response."""

    def __init__(self, state: GatewayState, route: Route) -> None:
        super().__init__()
        self.state = state
        self.route: Route = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await serve_completion(self.state, self.route, scope, receive, send)


@router.post("/v1/chat/completions", response_model=None, openapi_extra=json_body(CHAT_REQUEST))
async def chat_completions(state: State) -> Response:
    """OpenAI chat completions, streaming or not, forwarded to the DP rank the scheduler picks."""
    return CompletionAnswer(state, "chat")


@router.post("/v1/completions", response_model=None, openapi_extra=json_body(COMPLETION_REQUEST))
async def completions(state: State) -> Response:
    """OpenAI (legacy) completions, streaming or not, forwarded to the DP rank the scheduler picks."""
    return CompletionAnswer(state, "completions")


@router.get("/v1/models")
async def list_models(state: State) -> dict[str, object]:
    """The models the configured engines serve."""
    return {
        "object": "list",
        "data": [{"id": m, "object": "model", "created": 0, "owned_by": "sbs-gateway"} for m in state.models],
    }


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/ready", response_model=None)
async def ready(state: State) -> JSONResponse:
    """Readiness: 200 while at least one engine's circuit breaker lets traffic through and the gateway is not
    draining, else 503. The body gives each engine's breaker state, its DP ranks whose own breaker is not closed,
    and whether its last metrics scrape succeeded."""
    now = state.clock()
    engines = state.health.describe(now)
    for name, entry in engines.items():
        entry["up"] = state.health.engine_up(name, now)
        entry["scrape_ok"] = state.view.engine_reachable(name)
    ok = not state.draining and any(state.health.engine_up(name, now) for name in engines)
    body = {"ready": ok, "draining": state.draining, "engines": engines}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    """The gateway's own Prometheus metrics."""
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/admin/state")
async def admin_state(state: State) -> dict[str, object]:
    """The scheduler's view (admin key): policy, window, requests in flight, and every DP rank's load as the
    allocator sees it now (requests, tokens; ``kv_usage`` a fraction 0–1 or ``null``)."""
    dispatcher = state.dispatcher
    window = dispatcher.scheduler.window
    return {
        "policy": state.settings.policy,
        "window": {"buffered_requests": len(window), "interval_s": window.interval_s},
        "inflight_requests": state.view.inflight_count(),
        "engines": {name: {"reachable": state.view.engine_reachable(name)} for name in state.engines},
        "ranks": [
            {
                "engine": load.key.engine,
                "rank": load.key.rank,
                "usable": load.usable,
                "running": load.running,
                "waiting": load.waiting,
                "queued_prefill_tokens": load.queued_prefill_tokens,
                "kv_tokens": load.kv_tokens,
                "kv_usage": load.kv_usage,
            }
            for load in state.view.snapshot(state.clock())
        ],
    }
