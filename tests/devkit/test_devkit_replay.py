"""devkit.replay: event building, malformed messages, and producing to the embedded broker."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import types
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from devkit import replay
from devkit.broker import EmbeddedBroker, free_port
from devkit.replay import (
    ReplayError,
    event_message,
    first_users,
    interaction_events,
    interleave,
    malformed_messages,
    replay_events,
)
from schemas import load_validator
from worker.events import KNOWN_EVENT_TYPES, InvalidEvent, decode_event
from worker.topics import ensure_topics

REPO_ROOT = Path(__file__).resolve().parents[2]
EVENT_SCHEMA = load_validator("event")


@dataclass(frozen=True)
class FakeInteraction:
    """The fields of export.data.Interaction that the replay reads."""

    user_id: str
    item_id: str
    timestamp_ms: int
    event_type: str
    value: float | None
    line: int


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (seed 0x9747b28c) as a signed 32-bit int, like Utils.murmur2 in the Java client."""
    mask = 0xFFFFFFFF
    m, r = 0x5BD1E995, 24
    length = len(data)
    h = (0x9747B28C ^ length) & mask

    whole = length - length % 4
    for start in range(0, whole, 4):
        k = int.from_bytes(data[start : start + 4], "little")
        k = (k * m) & mask
        k ^= k >> r
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k

    tail = data[whole:]
    if len(tail) == 3:
        h ^= tail[2] << 16
    if len(tail) >= 2:
        h ^= tail[1] << 8
    if len(tail) >= 1:
        h ^= tail[0]
        h = (h * m) & mask

    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def java_partition(key: bytes, partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as running:
        yield running


def _topic(broker: EmbeddedBroker, partitions: int) -> str:
    name = f"replay-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker.bootstrap, {name: partitions})
    return name


def _consume(bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float = 30.0) -> list:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, partition, 0) for partition in range(partitions)])
    messages, deadline = [], time.monotonic() + timeout_s
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                messages.append(message)
        # Anything beyond `expected` would be a duplicate or a stray message.
        extra = consumer.poll(1.0)
        if extra is not None and extra.error() is None:
            messages.append(extra)
    finally:
        consumer.close()
    return messages


def _synthetic_events(users: int, per_user: int) -> list[dict]:
    return [
        {
            "event_id": f"synthetic:{n}",
            "user_id": str(n % users),
            "item_id": str(n % 7),
            "event_type": "view",
            "timestamp": 1_700_000_000_000 + n,
            "value": None,
        }
        for n in range(users * per_user)
    ]


# -- pure functions -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    # Values of org.apache.kafka.common.utils.Utils.murmur2, as recorded in Akka's Murmur2Spec.
    [("1", -1993445489), ("12", 126087238), ("123", -267702483), ("1234", -1614185708), ("12345", -1188365604)],
)
def test_murmur2_matches_java_client(text: str, expected: int) -> None:
    assert murmur2(text.encode()) == expected


def test_malformed_messages_have_distinct_reasons() -> None:
    messages = malformed_messages(10)

    assert len({reason for _, _, reason in messages}) == 10
    for key, value, reason in messages:
        with pytest.raises(InvalidEvent) as caught:
            decode_event(key, value, event_types=KNOWN_EVENT_TYPES)
        assert caught.value.reason == reason


def test_malformed_messages_repeat_kinds_with_new_ids() -> None:
    messages = malformed_messages(13)

    assert [reason for _, _, reason in messages[10:]] == [reason for _, _, reason in messages[:3]]
    assert len({key for key, _, _ in messages}) == 13
    assert malformed_messages(0) == []


def test_malformed_messages_deterministic() -> None:
    assert malformed_messages(10) == malformed_messages(10)


def test_interaction_events_sorted_with_line_ties() -> None:
    interactions = [
        FakeInteraction("2", "20", 2000, "rating", 3.0, line=1),
        FakeInteraction("1", "10", 1000, "rating", 5.0, line=3),
        FakeInteraction("1", "11", 1000, "rating", 4.0, line=2),
    ]

    events = interaction_events(interactions, dataset="ml-100k")

    assert [event["event_id"] for event in events] == ["ml-100k:2", "ml-100k:3", "ml-100k:1"]
    assert events[0] == {
        "event_id": "ml-100k:2", "user_id": "1", "item_id": "11", "event_type": "rating", "timestamp": 1000, "value": 4.0,
    }


def test_interaction_events_pass_schema_and_decoder() -> None:
    events = interaction_events([FakeInteraction("7", "301", 874965758000, "rating", 4.0, line=12)], dataset="ml-100k")
    key, value = event_message(events[0])

    assert EVENT_SCHEMA.is_valid(json.loads(value))
    assert decode_event(key, value, event_types=KNOWN_EVENT_TYPES).event_id == "ml-100k:12"
    assert key == b"7"


def test_first_users_numeric_order() -> None:
    events = [{"user_id": user_id} for user_id in ["10", "9", "b", "2", "a", "10", "100"]]

    assert first_users(events, 2) == [{"user_id": "9"}, {"user_id": "2"}]
    assert [e["user_id"] for e in first_users(events, 3)] == ["10", "9", "2", "10"]
    assert [e["user_id"] for e in first_users(events, 5)] == ["10", "9", "2", "a", "10", "100"]


def test_interleave_spreads_extra_messages() -> None:
    merged = list(interleave([(b"k", b"%d" % n) for n in range(6)], [(None, b"x"), (None, b"y"), (None, b"z")], every=2))

    assert [value for _, value in merged] == [b"0", b"1", b"x", b"2", b"3", b"y", b"4", b"5", b"z"]


def test_interleave_leftovers_sent_last() -> None:
    merged = list(interleave([(b"k", b"0")], [(None, b"x"), (None, b"y")], every=5))

    assert [value for _, value in merged] == [b"0", b"x", b"y"]


# -- producing ----------------------------------------------------------------------------


@pytest.mark.e2e
def test_replay_keys_partitions_and_order(broker: EmbeddedBroker) -> None:
    topic = _topic(broker, 4)
    events = _synthetic_events(users=20, per_user=10)

    stats = replay_events(broker.bootstrap, topic, events)
    received = _consume(broker.bootstrap, topic, 4, len(events))

    assert stats.ok
    assert (stats.sent, stats.delivered, stats.failed) == (200, 200, 0)
    assert len(received) == 200
    for message in received:
        document = json.loads(message.value())
        assert EVENT_SCHEMA.is_valid(document)
        assert message.key() == document["user_id"].encode()
        assert message.partition() == java_partition(message.key(), 4)
    for user in range(20):
        sent_ids = [e["event_id"] for e in events if e["user_id"] == str(user)]
        received_ids = [json.loads(m.value())["event_id"] for m in received if m.key() == str(user).encode()]
        assert received_ids == sent_ids, f"user {user}"


@pytest.mark.e2e
def test_replay_rate_paces_messages(broker: EmbeddedBroker) -> None:
    topic = _topic(broker, 1)

    stats = replay_events(broker.bootstrap, topic, _synthetic_events(users=2, per_user=10), rate=50)

    # 20 messages at 50/s: the last one is due 19/50 s = 0.38 s after the first.
    assert stats.ok
    assert 0.38 <= stats.elapsed_s < 5.0


@pytest.mark.e2e
def test_replay_mixes_in_malformed(broker: EmbeddedBroker) -> None:
    topic = _topic(broker, 2)
    malformed = malformed_messages(10)

    stats = replay_events(broker.bootstrap, topic, _synthetic_events(users=3, per_user=10), malformed=malformed, malformed_every=3)
    received = _consume(broker.bootstrap, topic, 2, 40)
    received_malformed = sorted((m.key(), m.value()) for m in received if m.key().startswith(b"malformed"))

    assert stats.sent == 40
    assert stats.ok
    assert len(received) == 40
    assert received_malformed == sorted((key, value) for key, value, _ in malformed)


@pytest.mark.e2e
def test_replay_missing_topic_raises_without_creating(broker: EmbeddedBroker) -> None:
    topic = f"absent-{uuid.uuid4().hex[:8]}"

    with pytest.raises(ReplayError, match=f"topic '{topic}' does not exist"):
        replay_events(broker.bootstrap, topic, _synthetic_events(users=1, per_user=1))

    assert topic not in AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(timeout=10).topics


def test_replay_unreachable_broker_raises() -> None:
    with pytest.raises(ReplayError, match="could not reach the broker"):
        replay.check_topic(f"127.0.0.1:{free_port()}", "user-events", timeout_s=1.0)


def test_replay_rejects_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="rate must be > 0"):
        replay_events("127.0.0.1:1", "user-events", [], rate=0)


# -- command line -----------------------------------------------------------------------


@pytest.fixture
def fake_dataset(monkeypatch: pytest.MonkeyPatch) -> list[FakeInteraction]:
    """Stand in export.data with a small synthetic dataset named "fake-set"."""
    interactions = [
        FakeInteraction(user_id=str(user), item_id=str(item), timestamp_ms=1000 * (item % 5), event_type="rating", value=float(item % 5 + 1), line=line)
        for line, (user, item) in enumerate(((u, i) for u in (12, 3, 7, 100) for i in range(6)), start=1)
    ]
    module = types.ModuleType("export.data")
    module.DatasetError = type("DatasetError", (Exception,), {})
    module.load_movielens = lambda dataset_dir: list(interactions)
    module.resolve_dataset_dir = lambda arg: Path(arg or "/nowhere/fake-set")
    monkeypatch.setitem(sys.modules, "export.data", module)
    return interactions


@pytest.mark.e2e
def test_cli_users_limit_and_malformed(broker: EmbeddedBroker, fake_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    topic = f"cli-{uuid.uuid4().hex[:8]}"

    exit_code = replay.main(
        ["--bootstrap", broker.bootstrap, "--topic", topic, "--users", "2", "--limit", "10", "--malformed", "2", "--partitions", "1"]
    )
    received = _consume(broker.bootstrap, topic, 1, 12)
    documents = [json.loads(m.value()) for m in received if not m.key().startswith(b"malformed")]

    assert exit_code == 0
    assert "replayed 10 events and 2 malformed messages" in capsys.readouterr().out
    assert len(received) == 12
    assert {d["user_id"] for d in documents} == {"3", "7"}
    assert [d["timestamp"] for d in documents] == sorted(d["timestamp"] for d in documents)
    assert all(d["event_id"].startswith("fake-set:") for d in documents)


def test_cli_missing_topic_fails(fake_dataset, capsys: pytest.CaptureFixture[str]) -> None:
    bootstrap = f"127.0.0.1:{free_port()}"

    exit_code = replay.main(["--bootstrap", bootstrap, "--metadata-timeout", "1"])

    assert exit_code == 1
    assert "could not reach the broker" in capsys.readouterr().err


def test_cli_rejects_zero_rate() -> None:
    with pytest.raises(SystemExit) as caught:
        replay.main(["--bootstrap", "127.0.0.1:1", "--rate", "0"])

    assert caught.value.code == 2


@pytest.mark.e2e
def test_cli_replays_movielens(broker: EmbeddedBroker) -> None:
    # Uses export.data and the MovieLens-100K copy that resolve_dataset_dir finds.
    topic = f"ml-{uuid.uuid4().hex[:8]}"
    result = subprocess.run(
        [sys.executable, "-m", "devkit.replay", "--bootstrap", broker.bootstrap, "--topic", topic,
         "--users", "3", "--limit", "40", "--partitions", "2"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    received = _consume(broker.bootstrap, topic, 2, 40)
    documents = [json.loads(m.value()) for m in received]

    assert result.returncode == 0, result.stderr
    assert "replayed 40 events and 0 malformed messages" in result.stdout
    assert len(documents) == 40
    assert {d["user_id"] for d in documents} <= {"1", "2", "3"}
    assert all(d["event_id"].startswith("ml-100k:") for d in documents)
    assert {d["event_type"] for d in documents} == {"rating"}
    for message in received:
        decode_event(message.key(), message.value(), event_types=KNOWN_EVENT_TYPES)  # raises InvalidEvent if invalid
    for partition in (0, 1):
        stamps = [json.loads(m.value())["timestamp"] for m in received if m.partition() == partition]
        assert stamps == sorted(stamps), f"partition {partition}"
