"""Create the worker's Kafka topics: `python -m worker.create_topics`.

Reads the same STREAMREC_* settings as the worker and creates the events, state
changelog, recommendations, dead-letter, item-activity and item-popularity changelog
topics with STREAMREC_PARTITIONS partitions and STREAMREC_REPLICATION_FACTOR replicas.
Topics that already exist with that partition count are left alone, so running it again
is safe. Both changelog topics also get
cleanup.policy=compact: faust restores the tables from them, and under the broker's
default policy (delete) states older than the retention time would be lost on the next
recovery. On Kubernetes this runs as a Job before the worker starts
(deploy/k8s/base/job-create-topics.yaml).

With --check it creates and changes nothing: it waits until every topic exists with the
configured partition count. The worker pods run it as an initContainer, so that they start
consuming only after the Job has created the topics, never against a topic the broker
auto-created with its own partition count.

Exit status:
  0  every topic exists (and, without --check, the changelogs are compacted);
  1  the broker is unreachable, a topic has another partition count, a topic is still
     missing after --timeout-s (--check), or a changelog's cleanup policy cannot be set;
  2  a setting or an option is invalid.
"""

from __future__ import annotations

import argparse
import logging
import logging.config
import sys
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from worker.config import ENV_PREFIX, Settings, SettingsError
from worker.logs import logging_config
from worker.topics import PartitionCountMismatch, TopicSetupError, ensure_topics

log = logging.getLogger(__name__)

COMPACT = "compact"
_CHECK_INTERVAL_S = 2.0


def planned_topics(settings: Settings) -> dict[str, int]:
    """Return each topic the worker reads or writes, mapped to its partition count."""
    names = (
        settings.events_topic,
        settings.changelog_topic,
        settings.recommendations_topic,
        settings.dead_letter_topic,
        settings.item_activity_topic,
        settings.popularity_changelog_topic,
    )
    return {name: settings.partitions for name in names}


def create_worker_topics(settings: Settings, timeout_s: float = 60.0) -> tuple[list[str], bool]:
    """Create the worker's missing topics and compact the changelogs.

    Returns the names of the topics created and whether a changelog's cleanup policy was
    changed. Raises TopicSetupError (PartitionCountMismatch for a wrong partition count).
    """
    created = ensure_topics(
        settings.bootstrap_servers,
        planned_topics(settings),
        replication_factor=settings.replication_factor,
        timeout_s=timeout_s,
    )
    changed = False
    for changelog in (settings.changelog_topic, settings.popularity_changelog_topic):
        changed = ensure_compacted(settings.bootstrap_servers, changelog, timeout_s) or changed
    return created, changed


def ensure_compacted(bootstrap: str, topic: str, timeout_s: float) -> bool:
    """Set cleanup.policy=compact on `topic` unless its policy already includes compaction.

    Returns True when this call changed the policy. Uses IncrementalAlterConfigs (Kafka 2.3
    and later), which changes only this one setting of the topic.
    """
    admin = AdminClient({"bootstrap.servers": bootstrap})
    resource = ConfigResource(ResourceType.TOPIC, topic)
    try:
        (future,) = admin.describe_configs([resource], request_timeout=timeout_s).values()
        entries = future.result(timeout=timeout_s)
    except KafkaException as exc:
        raise TopicSetupError(f"could not read the configuration of topic {topic!r}: {exc.args[0]}") from exc

    policy = entries.get("cleanup.policy")
    if policy is not None and COMPACT in policy.value.split(","):
        return False

    entry = ConfigEntry("cleanup.policy", COMPACT, incremental_operation=AlterConfigOpType.SET)
    change = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[entry])
    try:
        (future,) = admin.incremental_alter_configs([change], request_timeout=timeout_s).values()
        future.result(timeout=timeout_s)
    except KafkaException as exc:
        raise TopicSetupError(
            f"could not set cleanup.policy=compact on topic {topic!r}: {exc.args[0]}. Set it with the broker's tools, "
            f"for example kafka-configs.sh --alter --entity-type topics --entity-name {topic} --add-config cleanup.policy=compact"
        ) from exc
    return True


def wait_for_topics(bootstrap: str, topics: dict[str, int], timeout_s: float) -> None:
    """Wait until every topic exists with its partition count, creating nothing.

    Raises PartitionCountMismatch at once when a topic has another count, because waiting
    cannot fix that, and TopicSetupError when topics are still missing after `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    # Without this setting, a metadata request for one named topic could auto-create it.
    admin = AdminClient({"bootstrap.servers": bootstrap, "allow.auto.create.topics": False})
    reported = None
    while True:
        problem = _missing_topics(admin, topics)
        if problem is None:
            return
        if problem != reported:
            log.info("waiting for topics: %s", problem)
            reported = problem
        if time.monotonic() >= deadline:
            raise TopicSetupError(
                f"timed out after {timeout_s:g} s waiting for topics at {bootstrap}: {problem}. "
                "The topic-setup Job (python -m worker.create_topics) creates them; check that it ran and succeeded."
            )
        time.sleep(_CHECK_INTERVAL_S)


def _missing_topics(admin: AdminClient, topics: dict[str, int]) -> str | None:
    """Describe the topics still missing, or return None when all exist with their count.

    Raises PartitionCountMismatch when an existing topic has another count.
    """
    try:
        metadata = admin.list_topics(timeout=_CHECK_INTERVAL_S * 5)
    except KafkaException as exc:
        return f"broker not reachable ({exc.args[0]})"
    existing = {name: len(topic.partitions) for name, topic in metadata.topics.items() if topic.error is None}

    mismatched = [
        f"topic {name!r} has {existing[name]} partitions but {count} are configured"
        for name, count in sorted(topics.items())
        if name in existing and existing[name] != count
    ]
    if mismatched:
        raise PartitionCountMismatch("; ".join(mismatched) + f". Set {ENV_PREFIX}PARTITIONS to the topics' partition count.")
    missing = sorted(name for name in topics if name not in existing)
    return f"missing {', '.join(missing)}" if missing else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.create_topics",
        description="Create the worker's topics with the configured partition count and replication factor.",
        epilog=f"Settings come from the worker's {ENV_PREFIX}* environment variables; see python -m worker --settings.",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="wait until every topic exists with the configured partition count, and create nothing",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=60.0,
        help="seconds to wait for the broker and for the topics to appear (default 60)",
    )
    args = parser.parse_args(argv)
    if args.timeout_s <= 0:
        parser.error(f"--timeout-s must be > 0, got {args.timeout_s}")

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"create_topics: {exc}", file=sys.stderr)
        return 2
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))

    topics = planned_topics(settings)
    if args.check:
        return _check(settings, topics, args.timeout_s)
    print(
        f"create_topics: broker={settings.bootstrap_servers} topics={len(topics)} "
        f"partitions={settings.partitions} replication_factor={settings.replication_factor}",
        flush=True,
    )
    try:
        created, changed = create_worker_topics(settings, args.timeout_s)
    except TopicSetupError as exc:
        print(f"create_topics: failed: {exc}", file=sys.stderr)
        return 1
    for name in topics:
        action = "created" if name in created else "exists"
        print(f"create_topics: {action} topic={name} partitions={topics[name]}")

    action = "set" if changed else "already set"
    changelogs = f"{settings.changelog_topic},{settings.popularity_changelog_topic}"
    print(f"create_topics: {action} cleanup.policy=compact on topics={changelogs}")
    print(f"create_topics: done, created={len(created)} existing={len(topics) - len(created)}")
    return 0


def _check(settings: Settings, topics: dict[str, int], timeout_s: float) -> int:
    print(f"create_topics: waiting up to {timeout_s:g} s for {len(topics)} topics at {settings.bootstrap_servers}", flush=True)
    try:
        wait_for_topics(settings.bootstrap_servers, topics, timeout_s)
    except TopicSetupError as exc:
        print(f"create_topics: failed: {exc}", file=sys.stderr)
        return 1
    print(f"create_topics: all {len(topics)} topics exist with {settings.partitions} partitions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
