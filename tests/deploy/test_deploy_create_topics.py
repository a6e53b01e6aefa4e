"""`python -m worker.create_topics`, the command of the topic-setup Job, run as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid

import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType
from deploy_helpers import REPO_ROOT

from devkit.broker import free_port
from worker.config import ENV_PREFIX, Settings
from worker.create_topics import planned_topics


def _environment(**settings: str) -> dict[str, str]:
    environment = {name: value for name, value in os.environ.items() if not name.startswith(ENV_PREFIX)}
    environment.update({ENV_PREFIX + name.upper(): value for name, value in settings.items()})
    return environment


def _run(*arguments: str, **settings: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.create_topics", *arguments],
        cwd=REPO_ROOT,
        env=_environment(**settings),
        capture_output=True,
        text=True,
        timeout=120,
    )


def _unique_topics() -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {
        "app_id": f"app-{suffix}",
        "events_topic": f"events-{suffix}",
        "recommendations_topic": f"recommendations-{suffix}",
        "dead_letter_topic": f"dlq-{suffix}",
    }


def _partition_counts(bootstrap: str) -> dict[str, int]:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    return {name: len(topic.partitions) for name, topic in admin.list_topics(timeout=10).topics.items()}


def _cleanup_policy(bootstrap: str, topic: str) -> str | None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    (future,) = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
    entry = future.result(timeout=10).get("cleanup.policy")
    return entry.value if entry is not None else None


def test_planned_topics_from_settings() -> None:
    settings = Settings.from_env({"STREAMREC_APP_ID": "recs", "STREAMREC_PARTITIONS": "12"})

    topics = planned_topics(settings)

    assert topics == {
        "user-events": 12,
        "recs-user-state-changelog": 12,
        "recommendations": 12,
        "user-events-dlq": 12,
        "recs-item-activity": 12,
        "recs-item-popularity-changelog": 12,
    }


@pytest.mark.e2e
def test_creates_topics_then_reports_existing(broker) -> None:
    names = _unique_topics()
    settings = {**names, "broker": f"kafka://{broker.bootstrap}", "partitions": "3", "replication_factor": "1"}
    expected = [
        names["events_topic"],
        f"{names['app_id']}-user-state-changelog",
        names["recommendations_topic"],
        names["dead_letter_topic"],
        f"{names['app_id']}-item-activity",
        f"{names['app_id']}-item-popularity-changelog",
    ]

    first = _run(**settings)
    second = _run(**settings)
    counts = _partition_counts(broker.bootstrap)

    assert first.returncode == 0, first.stderr
    for topic in expected:
        assert counts[topic] == 3, topic
        assert f"create_topics: created topic={topic} partitions=3" in first.stdout
        assert f"create_topics: exists topic={topic} partitions=3" in second.stdout
    assert "created=6 existing=0" in first.stdout
    assert second.returncode == 0, second.stderr
    assert "created=0 existing=6" in second.stdout


@pytest.mark.e2e
def test_changelog_compacted(broker) -> None:
    names = _unique_topics()
    changelog = f"{names['app_id']}-user-state-changelog"
    settings = {**names, "broker": f"kafka://{broker.bootstrap}", "partitions": "2"}

    first = _run(**settings)
    second = _run(**settings)

    assert first.returncode == 0, first.stderr
    popularity_changelog = f"{names['app_id']}-item-popularity-changelog"
    assert f"create_topics: set cleanup.policy=compact on topics={changelog},{popularity_changelog}" in first.stdout
    assert f"create_topics: already set cleanup.policy=compact on topics={changelog},{popularity_changelog}" in second.stdout
    assert _cleanup_policy(broker.bootstrap, changelog) == "compact"
    assert _cleanup_policy(broker.bootstrap, popularity_changelog) == "compact"
    assert _cleanup_policy(broker.bootstrap, names["events_topic"]) != "compact"


@pytest.mark.e2e
def test_existing_changelog_gets_compacted(broker) -> None:
    names = _unique_topics()
    changelog = f"{names['app_id']}-user-state-changelog"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(changelog, num_partitions=2, replication_factor=1)])[changelog].result(timeout=10)

    completed = _run(**names, broker=f"kafka://{broker.bootstrap}", partitions="2")

    assert completed.returncode == 0, completed.stderr
    assert f"create_topics: exists topic={changelog} partitions=2" in completed.stdout
    assert _cleanup_policy(broker.bootstrap, changelog) == "compact"


@pytest.mark.e2e
def test_partition_mismatch_exits_1(broker) -> None:
    names = _unique_topics()
    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(names["events_topic"], num_partitions=2, replication_factor=1)])[names["events_topic"]].result(timeout=10)

    completed = _run(**names, broker=f"kafka://{broker.bootstrap}", partitions="3")

    assert completed.returncode == 1
    assert f"topic '{names['events_topic']}' has 2 partitions but 3 are configured" in completed.stderr
    assert names["dead_letter_topic"] not in _partition_counts(broker.bootstrap), "no topic may be created when a count mismatches"


def test_unreachable_broker_exits_1() -> None:
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there

    completed = _run("--timeout-s", "2", broker=f"kafka://{bootstrap}")

    assert completed.returncode == 1
    assert f"create_topics: failed: could not read topic metadata from the broker at {bootstrap}" in completed.stderr


def test_invalid_setting_exits_2() -> None:
    completed = _run(partitions="0")

    assert completed.returncode == 2
    assert "invalid STREAMREC_PARTITIONS=0: must be at least 1" in completed.stderr


def test_invalid_timeout_exits_2() -> None:
    completed = _run("--timeout-s", "0")

    assert completed.returncode == 2
    assert "--timeout-s must be > 0, got 0.0" in completed.stderr


@pytest.mark.e2e
def test_check_waits_until_topics_exist(broker) -> None:
    names = _unique_topics()
    settings = {**names, "broker": f"kafka://{broker.bootstrap}", "partitions": "2"}
    waiting = subprocess.Popen(
        [sys.executable, "-m", "worker.create_topics", "--check", "--timeout-s", "60"],
        cwd=REPO_ROOT,
        env=_environment(**settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        time.sleep(3)  # the check has started polling and found the topics missing
        assert waiting.poll() is None, "--check returned before the topics existed"

        created = _run(**settings)
        stdout, stderr = waiting.communicate(timeout=60)
    finally:
        waiting.kill()

    assert created.returncode == 0, created.stderr
    assert waiting.returncode == 0, stderr
    assert "create_topics: all 6 topics exist with 2 partitions" in stdout
    assert "waiting for topics: missing " in stderr
    assert names["dead_letter_topic"] in stderr


@pytest.mark.e2e
def test_check_times_out_naming_missing_topics(broker) -> None:
    names = _unique_topics()

    completed = _run("--check", "--timeout-s", "1", **names, broker=f"kafka://{broker.bootstrap}")

    assert completed.returncode == 1
    assert "timed out after 1 s waiting for topics" in completed.stderr
    for topic in (names["events_topic"], names["dead_letter_topic"], f"{names['app_id']}-user-state-changelog"):
        assert topic in completed.stderr
    assert names["events_topic"] not in _partition_counts(broker.bootstrap), "--check must create nothing"


@pytest.mark.e2e
def test_check_fails_fast_on_partition_mismatch(broker) -> None:
    names = _unique_topics()
    settings = {**names, "broker": f"kafka://{broker.bootstrap}"}
    assert _run(**settings, partitions="2").returncode == 0

    started = time.monotonic()
    completed = _run("--check", "--timeout-s", "60", **settings, partitions="3")

    assert completed.returncode == 1
    assert time.monotonic() - started < 30, "a mismatch cannot resolve itself, so --check must not wait"
    assert f"topic '{names['events_topic']}' has 2 partitions but 3 are configured" in completed.stderr
    assert "Set STREAMREC_PARTITIONS to the topics' partition count" in completed.stderr
