"""Create the worker's Kafka topics with explicit partition counts before the worker starts.

A topic that a broker auto-creates gets the broker's default partition count, and faust
then fails with PartitionsMismatch, so every topic is created here first.
"""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

log = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.2


class TopicSetupError(RuntimeError):
    """The topics could not be created or checked."""


class PartitionCountMismatch(TopicSetupError):
    """An existing topic has another partition count than the one configured."""


def ensure_topics(
    bootstrap: str,
    topics: dict[str, int],
    *,
    replication_factor: int = 1,
    timeout_s: float = 30.0,
) -> list[str]:
    """Create the missing topics of ``topics`` (name to partition count) and wait until they exist.

    Returns the names of the topics this call created. Raises PartitionCountMismatch when
    an existing topic has another partition count, and TopicSetupError when the broker
    cannot be reached or the topics do not appear within ``timeout_s``.
    """
    _check_request(topics, replication_factor)
    deadline = time.monotonic() + timeout_s
    # Without this setting, a metadata request for one named topic would auto-create it.
    admin = AdminClient({"bootstrap.servers": bootstrap, "allow.auto.create.topics": False})

    existing = _partition_counts(admin, bootstrap, deadline)
    _check_partition_counts(topics, existing)
    missing = {name: count for name, count in topics.items() if name not in existing}
    for name in topics.keys() & existing.keys():
        log.debug("topic exists: topic=%s partitions=%d", name, existing[name])

    created = _create(admin, missing, replication_factor, deadline)
    _wait_until_present(admin, bootstrap, topics, deadline)
    return created


def wait_for_broker(bootstrap: str, *, first_delay_s: float = 1.0, max_delay_s: float = 30.0) -> int:
    """Block until a broker at `bootstrap` responds to a metadata request; return how many brokers the cluster has.

    Each failed attempt logs a warning with the address and the next delay, which doubles up
    to `max_delay_s`. faust itself exits when its first connection fails, so a worker that
    starts before its broker (a new cluster, a broker restart) waits here instead.
    """
    delay_s = first_delay_s
    attempt = 1
    while True:
        admin = AdminClient({"bootstrap.servers": bootstrap, "allow.auto.create.topics": False})
        try:
            brokers = len(admin.list_topics(timeout=5).brokers)
        except KafkaException as exc:
            log.warning("broker unreachable at %s (attempt %d): %s; retrying in %.0f s", bootstrap, attempt, exc.args[0], delay_s)
            time.sleep(delay_s)
            delay_s = min(delay_s * 2, max_delay_s)
            attempt += 1
            continue
        if attempt > 1:
            log.info("broker reachable at %s after %d attempts", bootstrap, attempt)
        return brokers


def _check_request(topics: dict[str, int], replication_factor: int) -> None:
    bad = {name: count for name, count in topics.items() if not isinstance(count, int) or count < 1}
    if bad:
        raise ValueError(f"partition counts must be integers >= 1, got {bad}")
    if replication_factor < 1:
        raise ValueError(f"replication factor must be >= 1, got {replication_factor}")


def _partition_counts(admin: AdminClient, bootstrap: str, deadline: float) -> dict[str, int]:
    try:
        metadata = admin.list_topics(timeout=_remaining(deadline))
    except KafkaException as exc:
        raise TopicSetupError(
            f"could not read topic metadata from the broker at {bootstrap}: {exc.args[0]}. "
            "Check that the broker runs and that the bootstrap address is right."
        ) from exc
    return {name: len(topic.partitions) for name, topic in metadata.topics.items() if topic.error is None}


def _check_partition_counts(topics: dict[str, int], existing: dict[str, int]) -> None:
    problems = [
        f"topic {name!r} has {existing[name]} partitions but {count} are configured"
        for name, count in sorted(topics.items())
        if name in existing and existing[name] != count
    ]
    if problems:
        raise PartitionCountMismatch(
            "; ".join(problems) + ". Configure the existing partition count, or delete the topic so that "
            "it is created again with the configured count (this deletes its messages). Adding partitions to a "
            "keyed topic would move users to other partitions, away from their stored state."
        )


def _create(admin: AdminClient, missing: dict[str, int], replication_factor: int, deadline: float) -> list[str]:
    if not missing:
        return []
    new_topics = [NewTopic(name, num_partitions=count, replication_factor=replication_factor) for name, count in missing.items()]
    futures = admin.create_topics(new_topics, request_timeout=_remaining(deadline))

    created = []
    for name, future in futures.items():
        try:
            future.result(timeout=_remaining(deadline))
        except KafkaException as exc:
            error = exc.args[0]
            # Another worker created it between our metadata read and this request.
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                log.info("topic created by another client meanwhile: topic=%s", name)
                continue
            raise TopicSetupError(f"could not create topic {name!r} with {missing[name]} partitions: {error}") from exc
        except TimeoutError as exc:
            raise TopicSetupError(f"timed out creating topic {name!r}") from exc
        log.info("created topic: topic=%s partitions=%d replication_factor=%d", name, missing[name], replication_factor)
        created.append(name)
    return created


def _wait_until_present(admin: AdminClient, bootstrap: str, topics: dict[str, int], deadline: float) -> None:
    while True:
        existing = _partition_counts(admin, bootstrap, deadline)
        # A topic another client created meanwhile may have another count.
        _check_partition_counts(topics, existing)
        absent = sorted(name for name in topics if name not in existing)
        if not absent:
            return
        if time.monotonic() >= deadline:
            raise TopicSetupError(f"timed out waiting for topics to appear in the metadata of {bootstrap}: {', '.join(absent)}")
        time.sleep(_POLL_INTERVAL_S)


def _remaining(deadline: float) -> float:
    # A small floor gives the last request a chance to complete after the deadline passed.
    return max(deadline - time.monotonic(), 0.1)
