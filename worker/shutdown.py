"""Graceful shutdown: on SIGTERM or SIGINT, finish the fetched events, commit, and exit within a deadline.

GracefulWorker drains before faust stops: it pauses fetching and waits until the agent has
processed every event already fetched. The offsets faust commits when it stops then cover
exactly the applied events, so a restarted worker serves each remaining event once. A
deadline bounds the whole shutdown: a worker still running STREAMREC_SHUTDOWN_TIMEOUT_S
after the signal logs an error and exits with status 1, before an orchestrator's SIGKILL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
from typing import Any

import faust

log = logging.getLogger(__name__)

# Exit status when the shutdown deadline passes: the process did not stop cleanly.
EXIT_DEADLINE_PASSED = 1


class BatchTracker:
    """Tracker of whether a batch is being processed and when the last one ended."""

    def __init__(self, quiet_s: float) -> None:
        self.quiet_s = quiet_s  # no batch for this long after fetching stops means every fetched event is done
        self._in_flight = 0
        self._last_activity = time.monotonic()

    def started(self) -> None:
        self._in_flight += 1
        self._last_activity = time.monotonic()

    def finished(self) -> None:
        self._in_flight -= 1
        self._last_activity = time.monotonic()

    def idle(self) -> bool:
        return self._in_flight == 0 and time.monotonic() - self._last_activity >= self.quiet_s

    async def drain(self, app: faust.App) -> None:
        """Stop fetching, then wait until the events already fetched are processed."""
        assignment = app.consumer.assignment()
        app.consumer.pause_partitions(assignment)
        log.info("shutdown: fetching paused on %d partitions; finishing the events already fetched", len(assignment))
        self._last_activity = time.monotonic()
        while not self.idle():
            await asyncio.sleep(0.05)


class GracefulWorker(faust.Worker):
    """A faust worker that drains its agent before stopping and exits within `deadline_s` of a signal."""

    def __init__(self, app: faust.App, tracker: BatchTracker, deadline_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.tracker = tracker
        self.deadline_s = deadline_s

    async def _stop_on_signal(self, signum: signal.Signals) -> None:
        log.info("shutdown: %s received; stopping within %.0f s", signum.name, self.deadline_s)
        started = time.monotonic()
        exit_after(self.deadline_s)
        if self.app.consumer is not None and self.app.consumer.started:
            try:
                # Half the deadline for draining; the rest is for faust's flush and commit.
                await asyncio.wait_for(self.tracker.drain(self.app), timeout=self.deadline_s / 2)
                log.info("shutdown: every fetched event is processed (%.1f s); committing", time.monotonic() - started)
            except asyncio.TimeoutError:
                log.warning(
                    "shutdown: events still in progress after %.1f s; stopping anyway, they are redelivered after a restart",
                    self.deadline_s / 2,
                )
        await super()._stop_on_signal(signum)


def exit_after(deadline_s: float) -> None:
    """End the process with EXIT_DEADLINE_PASSED if it is still running after deadline_s."""

    def expire() -> None:
        log.error("shutdown: not finished within %.1f s (STREAMREC_SHUTDOWN_TIMEOUT_S); exiting with status %d", deadline_s, EXIT_DEADLINE_PASSED)
        logging.shutdown()
        os._exit(EXIT_DEADLINE_PASSED)

    timer = threading.Timer(deadline_s, expire)
    timer.daemon = True
    timer.start()
