"""A ``--workers`` child that gets SIGHUP while it starts (:mod:`gateway.scheduler_service.supervisor`): the signal
waits, blocked, until the child's :func:`~gateway.server.reload.defer_sighup` takes it, instead of ending the child by
SIGHUP's default action before any Python handler is in place."""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
import time

import pytest

from gateway.scheduler_service.supervisor import _start_with_sighup_held

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

NOTED_EXIT = 7
"""The child's exit status when it found the SIGHUP noted."""


def starting_child(ready_path: str) -> None:
    """A child that is still starting (no handler yet) when the SIGHUP comes, then takes it as a front door does."""
    from gateway.server.reload import defer_sighup, take_noted_sighup

    deadline = time.monotonic() + 30
    while not os.path.exists(ready_path) and time.monotonic() < deadline:  # the parent has sent its SIGHUP
        time.sleep(0.01)
    defer_sighup()
    time.sleep(0.05)
    sys.exit(NOTED_EXIT if take_noted_sighup() else 0)


def test_a_sighup_sent_while_a_child_starts_is_kept_for_it_not_its_end(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ready = tmp_path / "sent"
    process = multiprocessing.get_context("spawn").Process(target=starting_child, args=(str(ready),))
    _start_with_sighup_held(process)
    assert process.pid is not None
    os.kill(process.pid, signal.SIGHUP)
    ready.touch()
    process.join(60)
    assert process.exitcode == NOTED_EXIT, f"exit code {process.exitcode} (-1: ended by the SIGHUP)"
    assert signal.SIGHUP not in signal.pthread_sigmask(signal.SIG_BLOCK, set()), "the parent's mask is restored"
