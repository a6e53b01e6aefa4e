"""Create the worker's Kafka topics: `python -m worker.create_topics`.

Reads the same STREAMREC_* settings as the worker and creates the events, state
changelog, recommendations and dead-letter topics with STREAMREC_PARTITIONS partitions and
STREAMREC_REPLICATION_FACTOR replicas. Topics that already exist with that partition count
are left alone, so running it again is safe. On Kubernetes it runs as a Job before the
worker starts (deploy/k8s/base/job-create-topics.yaml).

Exit status: 0 when every topic exists, 1 when the broker cannot be reached or a topic
has another partition count, 2 when a setting is invalid.
"""

from __future__ import annotations

import argparse
import logging.config
import sys

from worker.config import ENV_PREFIX, Settings, SettingsError
from worker.logs import logging_config
from worker.topics import TopicSetupError, ensure_topics


def planned_topics(settings: Settings) -> dict[str, int]:
    """Return each topic the worker reads or writes, mapped to its partition count."""
    names = (
        settings.events_topic,
        settings.changelog_topic,
        settings.recommendations_topic,
        settings.dead_letter_topic,
    )
    return {name: settings.partitions for name in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.create_topics",
        description="Create the worker's topics with the configured partition count and replication factor.",
        epilog=f"Settings come from the worker's {ENV_PREFIX}* environment variables; see python -m worker --settings.",
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
    print(
        f"create_topics: broker={settings.bootstrap_servers} topics={len(topics)} "
        f"partitions={settings.partitions} replication_factor={settings.replication_factor}",
        flush=True,
    )
    try:
        created = ensure_topics(
            settings.bootstrap_servers,
            topics,
            replication_factor=settings.replication_factor,
            timeout_s=args.timeout_s,
        )
    except TopicSetupError as exc:
        print(f"create_topics: failed: {exc}", file=sys.stderr)
        return 1

    for name in topics:
        action = "created" if name in created else "exists"
        print(f"create_topics: {action} topic={name} partitions={topics[name]}")
    print(f"create_topics: done, created={len(created)} existing={len(topics) - len(created)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
