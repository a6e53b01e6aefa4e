"""Live popularity through the broker: events of many users make an item rank first for a new user."""

from __future__ import annotations

import json
import time

import pytest

from devkit.replay import replay_events
from devkit.worker_process import TopicCollector
from worker.popularity import decode_count

pytestmark = [pytest.mark.e2e, pytest.mark.multi_objective]

START_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
HOUR_MS = 3_600_000
FANS = 30
PURCHASE_WEIGHT = 8.0  # the default weight of a purchase in live popularity


def probe_event(name: str, timestamp_ms: int) -> dict:
    return {"event_id": f"{name}-e1", "user_id": name, "item_id": "50", "event_type": "view", "timestamp": timestamp_ms}


def recommendation_for(pipeline, event_id: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        for record in pipeline.collector.snapshot(pipeline.settings.recommendations_topic):
            body = json.loads(record.value)
            if body["event_id"] == event_id:
                return body
        assert time.monotonic() < deadline, f"no recommendation for {event_id}:\n{pipeline.worker.log_tail()}"
        time.sleep(0.2)


def test_popular_item_rises_to_first(start_pipeline, movielens_bundle, broker):
    pipeline = start_pipeline(
        movielens_bundle,
        STREAMREC_BLEND_PREFERENCE="0",
        STREAMREC_BLEND_POPULARITY="1",
        STREAMREC_BLEND_NAME="popular",
    )
    settings = pipeline.settings
    popularity_log = TopicCollector(broker.bootstrap, [settings.popularity_changelog_topic]).start()
    try:
        # Before any popularity is known, a new user gets the model's own order.
        assert replay_events(broker.bootstrap, settings.events_topic, [probe_event("probe-0", START_MS)]).ok
        before = recommendation_for(pipeline, "probe-0-e1")
        target = before["items"][-1]["item_id"]

        fans = [
            {"event_id": f"fan-{n}-e1", "user_id": f"fan-{n}", "item_id": target, "event_type": "purchase", "timestamp": START_MS + HOUR_MS}
            for n in range(FANS)
        ]
        assert replay_events(broker.bootstrap, settings.events_topic, fans).ok

        # The count travels through the item-activity topic, the table and its changelog.
        # Each new probe user has the same history, so only popularity can change its ranking.
        deadline = time.monotonic() + 60
        attempt = 0
        while True:
            attempt += 1
            name = f"probe-{attempt}"
            assert replay_events(broker.bootstrap, settings.events_topic, [probe_event(name, START_MS + 2 * HOUR_MS)]).ok
            after = recommendation_for(pipeline, f"{name}-e1")
            if after["items"][0]["item_id"] == target or time.monotonic() > deadline:
                break
            time.sleep(1.0)

        pipeline.wait_until_quiet(settings.recommendations_topic)
        records = [record for record in popularity_log.snapshot(settings.popularity_changelog_topic) if record.key == target.encode()]
    finally:
        popularity_log.stop()

    assert after["items"][0]["item_id"] == target, f"{target} never ranked first: {after['items'][:3]}"
    assert after["items"][0]["score"] > after["items"][1]["score"]
    assert {item["item_id"] for item in after["items"]} == {item["item_id"] for item in before["items"]}
    assert after["blend"] == {"name": "popular", "weights": {"preference": 0.0, "conversion": 0.0, "popularity": 1.0}}
    assert before["blend"]["name"] == "popular"
    # Counts are sharded by item, so every count of the item is in one partition.
    assert len({record.partition for record in records}) == 1
    assert decode_count(records[-1].value) == (FANS * PURCHASE_WEIGHT, START_MS + HOUR_MS)
