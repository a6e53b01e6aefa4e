"""Replay a dataset's events into the user-events topic, in timestamp order.

    python -m devkit.replay --bootstrap 127.0.0.1:9092 [--topic user-events] [--data DIR]
        [--users N] [--limit N] [--rate EVENTS_PER_S] [--malformed N] [--partitions N]
        (--help lists every option)

Each rating becomes one event keyed by user id. Messages are partitioned with murmur2,
as the Java client and faust's producer partition them, so a user's events land in the
partition whose state the worker keeps.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from confluent_kafka.admin import AdminClient

from worker.topics import TopicSetupError, ensure_topics

if TYPE_CHECKING:
    from export.data import Interaction

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "user-events"
# NOTE: the value is 2x the decoder's default max_bytes (65536); a worker configured with
# a larger limit accepts the "oversized" malformed message.
OVERSIZED_BYTES = 131_072
_MAX_ERRORS_KEPT = 10
_NUMERIC_ID = re.compile(r"[0-9]+")

# A Kafka message key and value. A malformed message also carries the reason code that
# the worker should reject it with.
KafkaMessage = tuple[bytes | None, bytes]
MalformedMessage = tuple[bytes | None, bytes, str]


class ReplayError(RuntimeError):
    """The replay could not start: the broker is unreachable or the topic is missing."""


@dataclass
class ReplayStats:
    """Counts and timing of one replay."""

    sent: int = 0
    delivered: int = 0
    failed: int = 0
    # Messages still queued in the producer when the final flush timed out.
    undelivered: int = 0
    elapsed_s: float = 0.0
    # The first few delivery errors, as "key=... error=..." lines.
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.undelivered == 0 and self.delivered == self.sent

    @property
    def rate_per_s(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


# -- events -----------------------------------------------------------------------------


def event_message(event: dict[str, Any]) -> KafkaMessage:
    """Encode one event as (key, value): the key is user_id as UTF-8, the value compact JSON."""
    key = str(event["user_id"]).encode("utf-8")
    value = json.dumps(event, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    return key, value


def interaction_events(interactions: Iterable[Interaction], dataset: str) -> list[dict[str, Any]]:
    """Turn interactions into event dicts sorted by timestamp, ties kept in file-line order.

    The event id is ``<dataset>:<line>``, so replaying the same data twice yields the same ids.
    """
    ordered = sorted(interactions, key=lambda interaction: (interaction.timestamp_ms, interaction.line))
    return [
        {
            "event_id": f"{dataset}:{interaction.line}",
            "user_id": interaction.user_id,
            "item_id": interaction.item_id,
            "event_type": interaction.event_type,
            "timestamp": interaction.timestamp_ms,
            "value": interaction.value,
        }
        for interaction in ordered
    ]


def first_users(events: Iterable[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """Keep the events of the first ``count`` user ids, numeric ids in numeric order, others after them."""
    events = list(events)
    user_ids = sorted({str(event["user_id"]) for event in events}, key=_user_order)
    kept_ids = set(user_ids[:count])
    return [event for event in events if str(event["user_id"]) in kept_ids]


def _user_order(user_id: str) -> tuple[int, int, str]:
    if _NUMERIC_ID.fullmatch(user_id):
        return 0, int(user_id), user_id
    return 1, 0, user_id


def malformed_messages(count: int) -> list[MalformedMessage]:
    """Build ``count`` malformed messages, each with the reason code the decoder rejects it with.

    The first ten are of distinct kinds; beyond ten the kinds repeat with new ids. The
    "oversized" message assumes the decoder's default limit (see OVERSIZED_BYTES), and the
    "unknown_event_type" one assumes that no model lists the type "teleport".
    """
    return [_MALFORMED_KINDS[index % len(_MALFORMED_KINDS)](index) for index in range(count)]


def _valid_event(index: int, **changes: Any) -> dict[str, Any]:
    event = {
        "event_id": f"malformed:{index}",
        "user_id": f"malformed-{index}",
        "item_id": "1",
        "event_type": "view",
        "timestamp": 1_700_000_000_000,
    }
    event.update(changes)
    return event


def _key(index: int) -> bytes:
    return f"malformed-{index}".encode()


def _json(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode("utf-8")


_MALFORMED_KINDS: list[Callable[[int], MalformedMessage]] = [
    lambda i: (_key(i), _json(_valid_event(i))[:-9], "invalid_json"),
    lambda i: (_key(i), _json(_valid_event(i)).replace(b'"item_id": "1"', b'"item_id": "\xff"'), "invalid_utf8"),
    lambda i: (_key(i), _json([_valid_event(i)]), "not_an_object"),
    lambda i: (_key(i), _json({k: v for k, v in _valid_event(i).items() if k != "item_id"}), "missing_item_id"),
    lambda i: (_key(i), _json(_valid_event(i, value="five stars")), "value_wrong_type"),
    lambda i: (_key(i), _json(_valid_event(i, event_type="teleport")), "unknown_event_type"),
    lambda i: (_key(i), _json(_valid_event(i, timestamp="yesterday")), "timestamp_unparseable"),
    lambda i: (f"malformed-{i}-other".encode(), _json(_valid_event(i)), "key_mismatch"),
    lambda i: (_key(i), _json(_valid_event(i, padding="x" * OVERSIZED_BYTES)), "oversized"),
    lambda i: (_key(i), b"", "empty_value"),
]


def interleave(messages: Iterable[KafkaMessage], extra: Sequence[KafkaMessage], every: int) -> Iterator[KafkaMessage]:
    """Yield ``messages`` with one of ``extra`` after every ``every`` of them; leftovers go last."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    pending = list(extra)
    for position, message in enumerate(messages, start=1):
        yield message
        if pending and position % every == 0:
            yield pending.pop(0)
    yield from pending


# -- producing --------------------------------------------------------------------------


def replay_events(
    bootstrap: str,
    topic: str,
    events: Iterable[dict[str, Any]],
    rate: float | None = None,
    *,
    malformed: Sequence[MalformedMessage] = (),
    malformed_every: int = 1000,
    producer_config: dict[str, Any] | None = None,
    progress_interval_s: float = 5.0,
    flush_timeout_s: float = 90.0,
    metadata_timeout_s: float = 10.0,
) -> ReplayStats:
    """Produce ``events`` (dicts in the event schema) to ``topic``, keyed by user_id.

    One malformed message follows every ``malformed_every`` events; those left when the
    events run out are sent last. See replay_messages for pacing, errors and the result.
    """
    messages: Iterable[KafkaMessage] = (event_message(event) for event in events)
    if malformed:
        messages = interleave(messages, [(key, value) for key, value, _ in malformed], malformed_every)
    return replay_messages(
        bootstrap, topic, messages, rate,
        producer_config=producer_config, progress_interval_s=progress_interval_s, flush_timeout_s=flush_timeout_s,
        metadata_timeout_s=metadata_timeout_s,
    )


def replay_messages(
    bootstrap: str,
    topic: str,
    messages: Iterable[KafkaMessage],
    rate: float | None = None,
    *,
    producer_config: dict[str, Any] | None = None,
    progress_interval_s: float = 5.0,
    flush_timeout_s: float = 90.0,
    metadata_timeout_s: float = 10.0,
) -> ReplayStats:
    """Produce key/value pairs to ``topic`` at full speed, or at ``rate`` messages per second.

    Waits until every message is delivered or ``flush_timeout_s`` passes, and logs progress
    every ``progress_interval_s``. Delivery errors are counted in the returned stats, not
    raised. Raises ReplayError before sending anything when the broker is unreachable or
    the topic does not exist, because producing would auto-create it with the broker's
    default partition count.
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 messages per second, got {rate}")
    check_topic(bootstrap, topic, metadata_timeout_s)

    stats = ReplayStats()
    producer = Producer(_producer_config(bootstrap, producer_config))
    on_delivery = _delivery_counter(stats)
    started = last_report = time.monotonic()

    for key, value in messages:
        if rate is not None:
            _wait_for_slot(producer, started + stats.sent / rate)
        _produce(producer, topic, key, value, on_delivery)
        stats.sent += 1
        producer.poll(0)

        now = time.monotonic()
        if now - last_report >= progress_interval_s:
            _log_progress(stats, now - started)
            last_report = now

    stats.undelivered = producer.flush(flush_timeout_s)
    stats.elapsed_s = time.monotonic() - started
    _log_progress(stats, stats.elapsed_s)
    return stats


def check_topic(bootstrap: str, topic: str, timeout_s: float = 10.0) -> int:
    """Return the partition count of ``topic``; raises ReplayError if it is missing or the broker is unreachable."""
    admin = AdminClient({"bootstrap.servers": bootstrap, "allow.auto.create.topics": False})
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise ReplayError(f"could not reach the broker at {bootstrap}: {exc.args[0]}; check --bootstrap") from exc

    found = metadata.topics.get(topic)
    if found is None or found.error is not None:
        raise ReplayError(
            f"topic {topic!r} does not exist at {bootstrap}. Start the worker first (it creates its topics) "
            "or pass --partitions N to create it here with the worker's partition count."
        )
    return len(found.partitions)


def _producer_config(bootstrap: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    config = {
        "bootstrap.servers": bootstrap,
        # The Java client's hash, which faust's producer also uses, so keys map to the same partitions.
        "partitioner": "murmur2_random",
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": 60_000,
        "allow.auto.create.topics": False,
        "client.id": "devkit-replay",
    }
    config.update(overrides or {})
    return config


def _delivery_counter(stats: ReplayStats) -> Callable[[KafkaError | None, Message], None]:
    def on_delivery(error: KafkaError | None, message: Message) -> None:
        if error is None:
            stats.delivered += 1
            return
        stats.failed += 1
        if len(stats.errors) < _MAX_ERRORS_KEPT:
            stats.errors.append(f"key={message.key()!r} error={error}")
        if stats.failed == 1 or stats.failed % 1000 == 0:
            log.error("delivery failed: topic=%s failed=%d error=%s", message.topic(), stats.failed, error)

    return on_delivery


def _produce(producer: Producer, topic: str, key: bytes | None, value: bytes, on_delivery: Callable) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
            return
        except BufferError:
            # The local queue is full: serve delivery reports until there is room.
            producer.poll(0.1)


def _wait_for_slot(producer: Producer, send_at: float) -> None:
    while (remaining := send_at - time.monotonic()) > 0:
        producer.poll(remaining)


def _log_progress(stats: ReplayStats, elapsed_s: float) -> None:
    rate = stats.sent / elapsed_s if elapsed_s > 0 else 0.0
    log.info(
        "replay progress: sent=%d delivered=%d failed=%d elapsed=%.1fs rate=%.0f messages/s",
        stats.sent, stats.delivered, stats.failed, elapsed_s, rate,
    )


# -- command line -----------------------------------------------------------------------


def load_dataset_events(data: str | None) -> list[dict[str, Any]]:
    """Load MovieLens ratings as event dicts in timestamp order, via export.data."""
    # Imported here: export is another package of this project and the library functions above do not need it.
    from export.data import load_movielens, resolve_dataset_dir

    dataset_dir = resolve_dataset_dir(data)
    return interaction_events(load_movielens(dataset_dir), dataset=dataset_dir.name)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    try:
        from export.data import DatasetError
    except ImportError as exc:
        print(f"replay: the dataset loader export.data is not available: {exc}", file=sys.stderr)
        return 2
    try:
        events = _select_events(args)
    except (DatasetError, OSError) as exc:
        print(f"replay: could not load the dataset: {exc}", file=sys.stderr)
        return 2
    malformed = malformed_messages(args.malformed)

    try:
        if args.partitions is not None:
            ensure_topics(args.bootstrap, {args.topic: args.partitions})
        every = max(1, len(events) // (len(malformed) + 1))
        stats = replay_events(
            args.bootstrap, args.topic, events, args.rate,
            malformed=malformed, malformed_every=every, progress_interval_s=args.progress_interval,
            metadata_timeout_s=args.metadata_timeout,
        )
    except (ReplayError, TopicSetupError) as exc:
        print(f"replay: {exc}", file=sys.stderr)
        return 1

    _print_summary(args, stats, len(events), len(malformed))
    return 0 if stats.ok else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devkit.replay",
        description="Produce a MovieLens dataset's ratings as user events, in timestamp order.",
    )
    parser.add_argument("--bootstrap", required=True, metavar="HOST:PORT", help="Kafka bootstrap address")
    parser.add_argument("--topic", default=DEFAULT_TOPIC, help=f"topic to produce to (default: {DEFAULT_TOPIC})")
    parser.add_argument(
        "--data", default=None, metavar="DIR",
        help="dataset folder, or a folder containing ml-100k/ (default: the search of export.data.resolve_dataset_dir)",
    )
    parser.add_argument("--users", type=_positive_int, default=None, metavar="N", help="keep only the events of the first N user ids")
    parser.add_argument("--limit", type=_positive_int, default=None, metavar="N", help="send at most N events")
    parser.add_argument("--rate", type=_positive_float, default=None, metavar="EVENTS_PER_S", help="messages per second (default: full speed)")
    parser.add_argument("--malformed", type=_non_negative_int, default=0, metavar="N", help="also send N malformed messages, spread evenly")
    parser.add_argument("--partitions", type=_positive_int, default=None, metavar="N", help="create the topic with N partitions if it is missing")
    parser.add_argument(
        "--metadata-timeout", type=_positive_float, default=10.0, metavar="SECONDS",
        help="how long to wait for the broker's topic metadata (default: 10)",
    )
    parser.add_argument("--progress-interval", type=float, default=5.0, metavar="SECONDS", help="time between progress lines (default: 5)")
    return parser


def _select_events(args: argparse.Namespace) -> list[dict[str, Any]]:
    events = load_dataset_events(args.data)
    if args.users is not None:
        events = first_users(events, args.users)
    if args.limit is not None:
        events = events[: args.limit]
    return events


def _print_summary(args: argparse.Namespace, stats: ReplayStats, event_count: int, malformed_count: int) -> None:
    print(
        f"replayed {event_count} events and {malformed_count} malformed messages to {args.topic} at {args.bootstrap} "
        f"in {stats.elapsed_s:.1f} s ({stats.rate_per_s:.0f} messages/s): "
        f"delivered {stats.delivered} of {stats.sent}, failed {stats.failed}, undelivered {stats.undelivered}"
    )
    if stats.errors:
        print("first delivery errors:\n  " + "\n  ".join(stats.errors), file=sys.stderr)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text}")
    return value


if __name__ == "__main__":
    sys.exit(main())
