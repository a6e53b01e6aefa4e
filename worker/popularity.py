"""Live item popularity: time-decayed, type-weighted event counts per item.

Events arrive keyed by user, so a worker receives only its users' events, but an item's count
must add up the events of every user. The counts are therefore sharded by item:

1. The events agent sends, per batch, one activity record per item it applied events to,
   keyed by item id, to the item-activity topic (one partition per item).
2. The popularity agent consumes that topic and adds each record into the item-popularity
   table, a RocksDB table keyed by item id whose changelog makes it durable.
3. Every worker follows the whole changelog of that table into a PopularityView, the
   in-memory copy the ranking reads, because the candidates of a user can be any items.

A count is a pair (weight, as of): the weight is the sum of weight(type) * 2 ** (-age /
half-life) over the item's events, aged to the as-of time, which is the event time of the
newest event counted. Counts are aged to the newest event time the view has seen, not to
the wall clock, so a replay of old events ranks as it would have live.

Delivery is at least once: after a crash, the activity of the batches that were redone is
counted again, so a count can be too high by the events of a few batches.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from worker.ranking import decay_factor

log = logging.getLogger(__name__)

# A count on the wire and in the table: the weight (float64) and its as-of time in epoch ms.
_COUNT = struct.Struct("<dq")

Count = tuple[float, int]  # (weight, as of in epoch ms)


class CountCodecError(ValueError):
    """A popularity record that is not a count written by encode_count."""


def encode_count(count: Count) -> bytes:
    return _COUNT.pack(float(count[0]), int(count[1]))


def decode_count(data: bytes) -> Count:
    if len(data) != _COUNT.size:
        raise CountCodecError(f"popularity record has {len(data)} bytes, expected {_COUNT.size}")
    weight, as_of_ms = _COUNT.unpack(data)
    if not (np.isfinite(weight) and weight >= 0):
        raise CountCodecError(f"popularity record has an invalid weight {weight}")
    return weight, as_of_ms


def merge_counts(first: Count | None, second: Count, half_life_s: float) -> Count:
    """Return the sum of two counts, aged to the later of their as-of times."""
    if first is None:
        return second
    as_of_ms = max(first[1], second[1])
    weight = first[0] * decay_factor(as_of_ms - first[1], half_life_s) + second[0] * decay_factor(as_of_ms - second[1], half_life_s)
    return float(weight), as_of_ms


def activity_records(
    events: Iterable[tuple[str, str, int]],
    event_weights: Mapping[str, float],
    half_life_s: float,
) -> dict[str, Count]:
    """Fold applied events (item id, event type, event time ms) into one count per item.

    An event type missing from ``event_weights`` counts as a view.
    """
    default = event_weights.get("view", 1.0)
    counts: dict[str, Count] = {}
    for item_id, event_type, timestamp_ms in events:
        weight = event_weights.get(event_type, default)
        if weight > 0:
            counts[item_id] = merge_counts(counts.get(item_id), (weight, timestamp_ms), half_life_s)
    return counts


class PopularityView:
    """Every item's count, read from the item-popularity changelog, for the ranking to look up.

    Counts are kept by item id, plus arrays indexed by the serving model's item index so a
    lookup of a batch of candidates is two array gathers.
    """

    def __init__(self, half_life_s: float) -> None:
        self.half_life_s = half_life_s
        self._counts: dict[str, Count] = {}
        self.stream_time_ms = 0  # newest as-of time seen
        self._model_version: str | None = None
        self._index: Mapping[str, int] = {}
        self._weights = np.zeros(0)
        self._as_of_ms = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._counts)

    def update(self, item_id: str, value: bytes | None) -> None:
        """Apply one changelog record. A None value (a tombstone) removes the item."""
        if value is None:
            self._counts.pop(item_id, None)
            count: Count = (0.0, 0)
        else:
            count = decode_count(value)
            self._counts[item_id] = count
            self.stream_time_ms = max(self.stream_time_ms, count[1])
        index = self._index.get(item_id)
        if index is not None:
            self._weights[index], self._as_of_ms[index] = count

    def count(self, item_id: str) -> float:
        """Return the item's weight aged to the view's stream time (0 for an item without events)."""
        weight, as_of_ms = self._counts.get(item_id, (0.0, self.stream_time_ms))
        return float(weight * decay_factor(self.stream_time_ms - as_of_ms, self.half_life_s))

    def counts(self, model: Any, item_indices: np.ndarray) -> np.ndarray | None:
        """Return the aged weights of ``item_indices`` (indices of ``model``'s items), or None before any count arrived."""
        if not self._counts:
            return None
        if model.version != self._model_version:
            self._index_for(model)
        ages_ms = self.stream_time_ms - self._as_of_ms[item_indices]
        return self._weights[item_indices] * decay_factor(ages_ms, self.half_life_s)

    def _index_for(self, model: Any) -> None:
        self._model_version = model.version
        self._index = model.item_index
        size = len(model.item_ids)
        self._weights = np.zeros(size)
        self._as_of_ms = np.zeros(size, dtype=np.int64)
        for item_id, (weight, as_of_ms) in self._counts.items():
            index = self._index.get(item_id)
            if index is not None:
                self._weights[index], self._as_of_ms[index] = weight, as_of_ms


async def follow_changelog(
    view: PopularityView, bootstrap: str, topic: str, on_invalid: Callable[[], None] = lambda: None, retry_s: float = 5.0
) -> None:
    """Read every partition of ``topic`` from its start into ``view``, and keep reading until cancelled.

    The consumer has no group: each worker needs the whole table, whatever partitions it owns.
    """
    import aiokafka

    while True:
        consumer = aiokafka.AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=100,
        )
        try:
            await consumer.start()
            partitions = await _partitions_of(bootstrap, topic)
            consumer.assign([aiokafka.TopicPartition(topic, partition) for partition in partitions])
            await consumer.seek_to_beginning()
            log.info("following item popularity: topic=%s partitions=%d", topic, len(partitions))
            while True:
                batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
                for records in batches.values():
                    for record in records:
                        _apply_record(view, record, on_invalid)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the broker went away or the topic is missing: read it again from the start
            log.error("reading item popularity from %s failed, retrying in %.0f s: %s", topic, retry_s, exc)
            await asyncio.sleep(retry_s)
        finally:
            await consumer.stop()


async def _partitions_of(bootstrap: str, topic: str) -> list[int]:
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "allow.auto.create.topics": False})
    metadata = await asyncio.to_thread(admin.list_topics, topic, 10)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise LookupError(f"topic {topic!r} not found; create the worker's topics with python -m worker.create_topics")
    return sorted(found.partitions)


def _apply_record(view: PopularityView, record: Any, on_invalid: Callable[[], None]) -> None:
    if record.key is None:
        return
    item_id = record.key.decode("utf-8", errors="replace")
    try:
        view.update(item_id, record.value)
    except CountCodecError as exc:
        on_invalid()
        log.error("skipped an invalid popularity record: item=%s partition=%d offset=%d: %s", item_id, record.partition, record.offset, exc)
