"""Noticing that the client went away while the gateway waits on its behalf (in the window, or for an engine).

Plain ASGI: once a request's body has been read, the only message its ``receive`` can still deliver is
``http.disconnect``, so a watcher task waiting on it learns of the disconnect as soon as the server does.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

from gateway.errors import ClientDisconnected

T = TypeVar("T")


async def _wait_for_disconnect(request: Request) -> None:
    # the body has been read: the next ASGI message can only be the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``; if the client disconnects first, cancel it and raise :class:`ClientDisconnected`.

    Call it only once the request's body has been read. Cancelling an upstream call closes its connection, which
    makes the engine abort the request and free its KV cache; cancelling a wait in the window takes the request
    out of it.

    Raises:
        ClientDisconnected: the client went away before ``awaitable`` finished.
    """
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise ClientDisconnected
