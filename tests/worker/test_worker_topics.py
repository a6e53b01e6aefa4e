"""ensure_topics against the embedded broker."""

from __future__ import annotations

import logging
import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from devkit.broker import EmbeddedBroker, free_port
from worker.topics import PartitionCountMismatch, TopicSetupError, ensure_topics


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as running:
        yield running


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _partition_counts(bootstrap: str) -> dict[str, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return {name: len(topic.partitions) for name, topic in admin.list_topics(timeout=10).topics.items()}


@pytest.mark.e2e
def test_missing_topics_created_with_counts(broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture) -> None:
    requested = {_name("events"): 8, _name("changelog"): 8, _name("dlq"): 2}

    with caplog.at_level(logging.INFO, logger="worker.topics"):
        created = ensure_topics(broker.bootstrap, requested)
    counts = _partition_counts(broker.bootstrap)

    assert sorted(created) == sorted(requested)
    for name, partitions in requested.items():
        assert counts[name] == partitions, name
        assert f"topic={name} partitions={partitions}" in caplog.text


@pytest.mark.e2e
def test_existing_topics_left_alone(broker: EmbeddedBroker) -> None:
    first, second = _name("first"), _name("second")
    ensure_topics(broker.bootstrap, {first: 3})

    created = ensure_topics(broker.bootstrap, {first: 3, second: 1})

    assert created == [second]
    assert _partition_counts(broker.bootstrap)[first] == 3


@pytest.mark.e2e
def test_partition_mismatch_names_topic_counts_and_fix(broker: EmbeddedBroker) -> None:
    name, untouched = _name("events"), _name("untouched")
    ensure_topics(broker.bootstrap, {name: 4})

    with pytest.raises(PartitionCountMismatch) as caught:
        ensure_topics(broker.bootstrap, {name: 8, untouched: 1})
    message = str(caught.value)

    assert f"topic '{name}' has 4 partitions but 8 are configured" in message
    assert "delete the topic" in message
    assert "Configure the existing partition count" in message
    assert untouched not in _partition_counts(broker.bootstrap), "no topic may be created when a count mismatches"


@pytest.mark.e2e
def test_topic_created_meanwhile_accepted(broker: EmbeddedBroker) -> None:
    # Simulates another worker that created the topic after our metadata read.
    name = _name("race")
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(name, num_partitions=2, replication_factor=1)])[name].result(timeout=10)

    created = ensure_topics(broker.bootstrap, {name: 2})

    assert created == []


def test_unreachable_broker_raises_within_timeout() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there

    started = time.monotonic()
    with pytest.raises(TopicSetupError, match=f"could not read topic metadata from the broker at {bootstrap}"):
        ensure_topics(bootstrap, {"user-events": 1}, timeout_s=2.0)

    assert time.monotonic() - started < 10


@pytest.mark.parametrize("topics", [{"t": 0}, {"t": -1}, {"t": 1.5}])
def test_invalid_partition_count_raises(topics: dict) -> None:
    with pytest.raises(ValueError, match="partition counts must be integers >= 1"):
        ensure_topics("127.0.0.1:1", topics)


def test_invalid_replication_factor_raises() -> None:
    with pytest.raises(ValueError, match="replication factor must be >= 1, got 0"):
        ensure_topics("127.0.0.1:1", {"t": 1}, replication_factor=0)
