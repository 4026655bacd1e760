"""Noticing that the client went away while the gateway works on its behalf (in the window, waiting for an engine,
or relaying a stream).

Plain ASGI: once a request's body has been read, the only message its ``receive`` can still deliver is
``http.disconnect``, so one watcher task per request, waiting on it, learns of the disconnect as soon as the server
does, and cancels the task serving the request. The serving task runs everything else itself (no task per wait),
and tells the watcher's cancellation from any other by :meth:`DisconnectWatch.absorb`.
"""

from __future__ import annotations

import asyncio

from starlette.types import Receive


class DisconnectWatch:
    """Cancels the current task when the client of its request disconnects, until :meth:`close`.

    Start it only once the request's body has been read, in the task serving the request; :meth:`close` it
    before sending the answer's last message (uvicorn's ``receive`` answers ``http.disconnect`` once the answer is
    complete), and in any case when done. Cancelling the work in flight is the point: a wait in the window takes
    the request out of it, and an engine call closes its connection, which makes the engine abort the request and
    free its KV cache.

    Args:
        receive: the request's ASGI ``receive``.
    """

    __slots__ = ("_over", "_task", "_watcher", "gone")

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None, "DisconnectWatch runs inside the task serving the request"
        self._task = task
        self._over = False
        self.gone = False
        """Whether the client went away (and the serving task was cancelled for it)."""
        self._watcher = asyncio.get_running_loop().create_task(self._watch(receive))

    async def _watch(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not self._over:
            self.gone = True
            self._task.cancel()

    def close(self) -> None:
        """Stop watching (idempotent)."""
        if not self._over:
            self._over = True
            self._watcher.cancel()

    def absorb(self) -> bool:
        """Call in an ``except asyncio.CancelledError`` of the serving task: whether the cancellation was the
        client's disconnect, which is then withdrawn (``Task.uncancel``) so the task may answer it and clean up;
        ``False`` for any other cancellation (shutdown), which the caller re-raises."""
        if not self.gone:
            return False
        self.close()
        self._task.uncancel()
        return True
