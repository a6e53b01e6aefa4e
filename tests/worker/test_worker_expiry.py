"""Idle-user expiry against an in-memory store: event-time idleness, per-partition sweeps."""

from __future__ import annotations

import time

import numpy as np
from prometheus_client import CollectorRegistry

from worker.expiry import StateExpiry
from worker.metrics import WorkerMetrics
from worker.processor import InputMessage
from worker.state import UserState, encode_state

DAY_MS = 86_400_000
START_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z


class MemoryStore:
    def __init__(self) -> None:
        self.values: dict[bytes, bytes] = {}
        self.deleted: list[tuple[str, int]] = []  # (user id, partition of the context message)

    def add(self, user_id: str, partition: int, timestamp_ms: int) -> None:
        state = UserState(model_version="v1", hidden=np.zeros((1, 4), dtype=np.float32), last_partition=partition, last_offset=0, last_timestamp_ms=timestamp_ms)
        self.values[user_id.encode()] = encode_state(state)

    def items(self):
        return iter(list(self.values.items()))

    def delete(self, user_id: str, message: InputMessage) -> None:
        del self.values[user_id.encode()]
        self.deleted.append((user_id, message.partition))


def message(partition: int) -> InputMessage:
    return InputMessage(key=b"k", value=b"{}", topic="events", partition=partition, offset=0, timestamp_ms=0)


def expiry(ttl_days: float = 30, interval_s: float = 300) -> StateExpiry:
    return StateExpiry(ttl_days * 86_400, interval_s, WorkerMetrics(CollectorRegistry()))


def test_idle_measured_against_partition_stream_time():
    store = MemoryStore()
    store.add("old", partition=0, timestamp_ms=START_MS)
    store.add("recent", partition=0, timestamp_ms=START_MS + 40 * DAY_MS)
    store.add("newest", partition=0, timestamp_ms=START_MS + 60 * DAY_MS)
    sweeper = expiry(ttl_days=30)

    deleted = sweeper.sweep(store, sweeper.due([message(0)]))

    assert deleted == 1
    assert store.deleted == [("old", 0)]
    assert set(store.values) == {b"recent", b"newest"}


def test_sweep_touches_only_due_partitions():
    store = MemoryStore()
    store.add("p0-old", partition=0, timestamp_ms=START_MS)
    store.add("p0-new", partition=0, timestamp_ms=START_MS + 90 * DAY_MS)
    store.add("p1-old", partition=1, timestamp_ms=START_MS)
    store.add("p1-new", partition=1, timestamp_ms=START_MS + 90 * DAY_MS)
    sweeper = expiry()

    sweeper.sweep(store, sweeper.due([message(1)]))

    assert store.deleted == [("p1-old", 1)]


def test_partition_due_again_only_after_interval():
    sweeper = expiry(interval_s=3600)
    store = MemoryStore()

    assert set(sweeper.due([message(0), message(0), message(2)])) == {0, 2}
    sweeper.sweep(store, sweeper.due([message(0)]))
    assert sweeper.due([message(0)]) == {}
    assert set(sweeper.due([message(0), message(1)])) == {1}


def test_future_timestamps_capped_at_wall_clock():
    store = MemoryStore()
    store.add("bogus-future", partition=0, timestamp_ms=32_000_000_000_000)  # year 2984
    store.add("yesterday", partition=0, timestamp_ms=int(time.time() * 1000) - DAY_MS)
    sweeper = expiry(ttl_days=30)

    deleted = sweeper.sweep(store, sweeper.due([message(0)]))

    assert deleted == 0, "a timestamp in the future must not make yesterday's user look idle"
