"""Users idle for longer than STREAMREC_STATE_TTL_S leave the table and the changelog."""

from __future__ import annotations

import json
import time

import pytest

from devkit.replay import replay_events

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

DAY_MS = 86_400_000
START_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
TTL_S = 30 * 86_400


def events_for(user_ids, timestamp_ms, tag):
    return [
        {
            "event_id": f"{tag}-{user_id}",
            "user_id": user_id,
            "item_id": str(1 + index % 50),
            "event_type": "view",
            "timestamp": timestamp_ms,
        }
        for index, user_id in enumerate(user_ids)
    ]


def served(pipeline, event_id):
    for record in pipeline.collector.snapshot(pipeline.settings.recommendations_topic):
        body = json.loads(record.value)
        if body["event_id"] == event_id:
            return body
    return None


def test_idle_users_expire_with_tombstones(start_pipeline, movielens_bundle, broker):
    pipeline = start_pipeline(movielens_bundle, STREAMREC_STATE_TTL_S=str(TTL_S), STREAMREC_STATE_SWEEP_INTERVAL_S="1")
    settings = pipeline.settings
    idle_users = [f"idle-{n}" for n in range(20)]
    active_users = [f"active-{n}" for n in range(40)]  # their keys hash to all four partitions

    # Idle users act on day 0, active users on day 60; a second event of the active users,
    # sent after the sweep interval, makes every partition due for a sweep.
    waves = [
        events_for(idle_users, START_MS, "day0"),
        events_for(active_users, START_MS + 60 * DAY_MS, "day60"),
        events_for(active_users, START_MS + 61 * DAY_MS, "day61"),
    ]
    sent = 0
    for wave in waves:
        assert replay_events(broker.bootstrap, settings.events_topic, wave).ok
        sent += len(wave)
        assert pipeline.collector.wait_for(settings.recommendations_topic, sent, timeout_s=120) >= sent
        time.sleep(1.5)

    expired = pipeline.wait_for_metric("streamrec_states_expired_total", "", at_least=len(idle_users), timeout_s=60)
    pipeline.wait_until_quiet(settings.changelog_topic)

    tombstoned = {record.key.decode() for record in pipeline.collector.snapshot(settings.changelog_topic) if record.value is None}
    assert expired == len(idle_users)
    assert tombstoned == set(idle_users)

    # An expired user who comes back starts from a new state.
    assert replay_events(broker.bootstrap, settings.events_topic, events_for(["idle-0"], START_MS + 62 * DAY_MS, "day62")).ok
    deadline = time.monotonic() + 60
    while (body := served(pipeline, "day62-idle-0")) is None:
        assert time.monotonic() < deadline, pipeline.worker.log_tail()
        time.sleep(0.3)
    assert body["events_absorbed"] == 1
    assert served(pipeline, "day61-active-0")["events_absorbed"] == 2
