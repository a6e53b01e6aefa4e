"""SIGTERM mid-replay: the worker finishes its batch, writes the table, commits and exits 0 in time."""

from __future__ import annotations

import json
import time

import pytest
from confluent_kafka import Consumer, TopicPartition

from devkit.replay import first_users, interaction_events, replay_events
from devkit.worker_process import WorkerProcess
from export.data import load_movielens

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

USERS = 200
SHUTDOWN_DEADLINE_S = 20


def committed_offsets(bootstrap: str, group: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        committed = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in committed}
    finally:
        consumer.close()


def served_event_ids(pipeline) -> list[str]:
    records = pipeline.collector.snapshot(pipeline.settings.recommendations_topic)
    return [json.loads(record.value)["event_id"] for record in records]


def test_sigterm_commits_applied_events(start_pipeline, movielens_bundle, dataset_dir, broker):
    events = first_users(interaction_events(load_movielens(dataset_dir), "ml-100k"), USERS)
    pipeline = start_pipeline(movielens_bundle, STREAMREC_SHUTDOWN_TIMEOUT_S=str(SHUTDOWN_DEADLINE_S))
    settings = pipeline.settings
    # The worker fetches far ahead and finishes whatever it fetched, so the second half is
    # produced only once it has stopped: some events then always remain for the restart.
    first_half, second_half = events[: len(events) // 2], events[len(events) // 2 :]
    assert replay_events(broker.bootstrap, settings.events_topic, first_half).ok
    assert pipeline.collector.wait_for(settings.recommendations_topic, len(events) // 6, timeout_s=300) >= len(events) // 6

    old = pipeline.worker
    started = time.monotonic()
    exit_code = old.stop(timeout_s=SHUTDOWN_DEADLINE_S + 30)
    took_s = time.monotonic() - started
    assert exit_code == 0, f"exit code {exit_code} after SIGTERM:\n{old.log_tail()}"
    assert took_s < SHUTDOWN_DEADLINE_S, f"shutdown took {took_s:.1f} s, deadline {SHUTDOWN_DEADLINE_S} s:\n{old.log_tail()}"

    # What the stopped worker left behind must agree: every applied event's state is on the
    # changelog, and the committed offset of each partition is just past its last applied event.
    pipeline.wait_until_quiet(settings.changelog_topic)
    served_before = served_event_ids(pipeline)
    states = pipeline.latest_states()
    last_applied: dict[int, int] = {}
    for state in states.values():
        last_applied[state.last_partition] = max(state.last_offset, last_applied.get(state.last_partition, -1))
    committed = committed_offsets(broker.bootstrap, settings.app_id, settings.events_topic, settings.partitions)
    for partition in range(settings.partitions):
        assert committed[partition] == last_applied.get(partition, -1) + 1, (
            f"partition {partition}: committed {committed[partition]}, last applied offset {last_applied.get(partition)}"
        )
    assert len(set(served_before)) == len(served_before), "an event was served twice before SIGTERM"

    # A restarted worker picks up exactly where the first stopped: each event is served once.
    assert replay_events(broker.bootstrap, settings.events_topic, second_half).ok
    pipeline.worker = WorkerProcess(old.env, old.log_path.with_name(old.log_path.stem + "-restarted.log"), web_port=old.web_port).start()
    pipeline.worker.wait_ready()
    assert pipeline.collector.wait_for(settings.recommendations_topic, len(events), timeout_s=300, idle_timeout_s=60) >= len(events)
    time.sleep(3)
    served = served_event_ids(pipeline)
    assert sorted(served) == sorted(event["event_id"] for event in events)
