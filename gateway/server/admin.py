"""The admin API of the engine set, under ``/admin/engines`` (admin key, :mod:`gateway.server.auth`): list, add,
drain, undrain and remove engines at runtime (:mod:`gateway.engine_set`).

Errors are OpenAI-style: 400 for an invalid engine (validated as an ``engines`` entry of the configuration file, and
against the engines there), 404 for an unknown name, 409 for a conflict (a name taken, an engine being removed, or a
front door of a scheduler service, whose engine set changes only by reloading the configuration so that every
front door and the service change together).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from gateway.config import EngineConfig
from gateway.engine_set import EngineSetError
from gateway.errors import error_body
from gateway.server.openapi import json_body
from gateway.server.state import GatewayState, State

router = APIRouter(prefix="/admin/engines", tags=["admin"])

_ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error"}

_ENGINE_SCHEMA: dict[str, Any] = EngineConfig.model_json_schema()
"""``POST /admin/engines`` body: one ``engines`` entry of the configuration file."""


def _error(exc: EngineSetError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, _ERROR_TYPES[exc.status], param=exc.param), exc.status)


def _refuse_under_service(state: GatewayState) -> JSONResponse | None:
    if state.settings.scheduler_service is None:
        return None
    return _error(
        EngineSetError(
            "this front door places through a scheduler service (gateway serve --workers N): change the engines in "
            "the configuration file and send SIGHUP to the gateway serve process, which reloads every front door "
            "and the service together",
            409,
        )
    )


@router.get("")
async def list_engines(state: State) -> dict[str, object]:
    """Every engine: name, URL, flavour, role, DP size, models, state (``ready``, ``draining`` or ``down``), whether
    it is being removed, and its requests in flight."""
    return {"object": "list", "data": [s.as_json() for s in state.engine_set.list()]}


@router.post("", status_code=201, response_model=None, openapi_extra=json_body(_ENGINE_SCHEMA))
async def add_engine(request: Request, state: State) -> JSONResponse:
    """Add an engine (the body is one ``engines`` entry of the configuration file). Answers once its first health
    probe did: state ``ready``, or ``down`` when the engine did not answer (it takes requests once it does)."""
    refused = _refuse_under_service(state)
    if refused is not None:
        return refused
    try:
        raw = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return JSONResponse(error_body("the body is not valid JSON", "invalid_request_error"), 400)
    try:
        config = state.engine_set.validate_new(raw)
        status = await state.engine_set.add(config, "admin")
    except EngineSetError as exc:
        return _error(exc)
    return JSONResponse(status.as_json(), 201)


@router.post("/{name}/drain", response_model=None)
async def drain_engine(name: str, state: State) -> JSONResponse:
    """Place no new request on the engine; its requests in flight finish. ``/ready`` is not affected."""
    refused = _refuse_under_service(state)
    if refused is not None:
        return refused
    try:
        return JSONResponse(state.engine_set.drain(name, "admin").as_json())
    except EngineSetError as exc:
        return _error(exc)


@router.post("/{name}/undrain", response_model=None)
async def undrain_engine(name: str, state: State) -> JSONResponse:
    """Let a drained engine take new requests again (409 while it is being removed)."""
    refused = _refuse_under_service(state)
    if refused is not None:
        return refused
    try:
        return JSONResponse(state.engine_set.undrain(name, "admin").as_json())
    except EngineSetError as exc:
        return _error(exc)


@router.delete("/{name}", response_model=None)
async def remove_engine(
    name: str,
    state: State,
    force: bool = Query(
        False,
        description="Fail the engine's requests in flight now instead of waiting for them: those whose answer has "
        "not begun are tried on another engine, streams already begun end with an error event and [DONE].",
    ),
) -> JSONResponse:
    """Remove the engine: it is drained, and removed once its requests in flight have ended (200 when it is gone,
    202 while it waits for them: it then shows as ``draining`` with ``removing`` true)."""
    refused = _refuse_under_service(state)
    if refused is not None:
        return refused
    try:
        gone = await state.engine_set.remove(name, "admin", force=force)
    except EngineSetError as exc:
        return _error(exc)
    if not gone:
        try:
            return JSONResponse({**state.engine_set.status(name).as_json(), "removed": False}, 202)
        except EngineSetError:  # its last request ended meanwhile
            pass
    return JSONResponse({"name": name, "removed": True})
