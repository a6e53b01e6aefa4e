"""Expiry of idle users: delete states that have not absorbed an event for longer than a TTL.

Idle time is measured in event time, against the partition's stream time: the newest
event timestamp among the states of that partition, capped at the wall clock. A replay of
last year's log then expires the users who went quiet during it, not every user at once.

Deleting a key writes a tombstone to the changelog, so compaction removes the user there
too and a restarted worker does not restore the state. faust routes a table write to the
partition of the current event, so a partition is swept only while the agent processes a
batch that contains an event of that partition.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable, Iterator, Protocol

from worker.metrics import WorkerMetrics
from worker.processor import InputMessage
from worker.state import StateCodecError, UserState, decode_state

log = logging.getLogger(__name__)


class ExpiringStore(Protocol):
    """The state table as the sweep needs it: every local state, and deletion in a partition's context."""

    def items(self) -> Iterator[tuple[bytes, bytes]]: ...

    def delete(self, user_id: str, message: InputMessage) -> None: ...


class StateExpiry:
    """Sweep each partition at most once per `interval_s`, deleting users idle for over `ttl_s`."""

    def __init__(self, ttl_s: float, interval_s: float, metrics: WorkerMetrics) -> None:
        self.ttl_ms = int(ttl_s * 1000)
        self.interval_s = interval_s
        self.metrics = metrics
        self._last_sweep: dict[int, float] = {}  # partition -> monotonic time of its last sweep

    def due(self, messages: Iterable[InputMessage]) -> dict[int, InputMessage]:
        """Return one message per partition of `messages` whose sweep is due."""
        now = time.monotonic()
        due: dict[int, InputMessage] = {}
        for message in messages:
            last = self._last_sweep.get(message.partition)
            if message.partition not in due and (last is None or now - last >= self.interval_s):
                due[message.partition] = message
        return due

    def sweep(self, store: ExpiringStore, due: dict[int, InputMessage]) -> int:
        """Delete the idle users of the partitions in `due`; return how many were deleted."""
        if not due:
            return 0
        started = time.monotonic()
        for partition in due:
            self._last_sweep[partition] = started

        # Two passes over the local states: the first finds each partition's stream time, the
        # second deletes, so memory stays constant however many users the table holds.
        newest: dict[int, int] = {}
        for _, state in self._states(store, due):
            newest[state.last_partition] = max(newest.get(state.last_partition, 0), state.last_timestamp_ms)
        now_ms = int(time.time() * 1000)
        cutoff = {partition: min(stream_time, now_ms) - self.ttl_ms for partition, stream_time in newest.items()}

        expired = [(key, state.last_partition) for key, state in self._states(store, due) if state.last_timestamp_ms < cutoff[state.last_partition]]
        for key, partition in expired:
            store.delete(key.decode("utf-8"), due[partition])
        self.metrics.states_expired.inc(len(expired))
        if expired:
            log.info(
                "expired %d users idle for over %.0f s of event time in partitions %s (%.2f s)",
                len(expired), self.ttl_ms / 1000, sorted(due), time.monotonic() - started,
            )
        return len(expired)

    @staticmethod
    def _states(store: ExpiringStore, due: dict[int, InputMessage]) -> Iterator[tuple[bytes, UserState]]:
        for key, value in store.items():
            try:
                state = decode_state(value)
            except StateCodecError:
                continue  # the processor resets an unreadable state at the user's next event
            if state.last_partition in due:
                yield key, state
