"""/metrics of a running worker moves as events flow; /healthz and /readyz respond."""

from __future__ import annotations

import json
import time
import urllib.request

import pytest

from devkit.replay import first_users, interaction_events, malformed_messages, replay_events
from export.data import load_movielens

pytestmark = pytest.mark.e2e


def test_metrics_move_with_events(start_pipeline, broker, movielens_bundle, dataset_dir):
    pipeline = start_pipeline(movielens_bundle)
    worker, settings = pipeline.worker, pipeline.settings
    model_version = json.loads((movielens_bundle / "manifest.json").read_text())["model_version"]

    with urllib.request.urlopen(worker.url("/healthz"), timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen(worker.url("/readyz"), timeout=5) as response:
        assert json.load(response) == {"ready": True, "recovered": True, "rebalancing": False, "model_version": model_version}
    assert worker.metric("streamrec_events_consumed_total") == 0
    info = [line for line in worker.metrics_text().splitlines() if line.startswith("streamrec_model_info{")]
    assert len(info) == 1
    assert f'version="{model_version}"' in info[0]
    assert 'cell="gru"' in info[0]

    events = first_users(interaction_events(load_movielens(dataset_dir), "ml-100k"), 10)
    malformed = malformed_messages(3)
    assert replay_events(broker.bootstrap, settings.events_topic, events, malformed=malformed).ok
    total = len(events) + len(malformed)
    pipeline.wait_for_metric("streamrec_events_consumed_total", "", total)
    pipeline.wait_for_metric("streamrec_recommendations_published_total", "", len(events))

    assert worker.metric("streamrec_events_consumed_total") == total
    assert worker.metric("streamrec_events_applied_total") == len(events)
    assert worker.metric("streamrec_unknown_items_total") == 0
    for _, _, reason in malformed:
        assert worker.metric("streamrec_events_rejected_total", f'reason="{reason}"') >= 1, reason
    assert worker.metric("streamrec_event_to_recommendation_seconds_count") == len(events)
    assert worker.metric("streamrec_batch_size_events_sum") == total
    assert 0 < worker.metric("streamrec_step_seconds_count") <= len(events)
    assert worker.metric("streamrec_table_users") == 10

    # The lag gauge is refreshed every 5 s and reaches 0 on every partition once caught up.
    deadline = time.monotonic() + 30
    while True:
        lags = [
            float(line.rsplit(" ", 1)[1])
            for line in worker.metrics_text().splitlines()
            if line.startswith("streamrec_consumer_lag_messages{") and f'topic="{settings.events_topic}"' in line
        ]
        if lags and all(lag == 0 for lag in lags):
            break
        assert time.monotonic() < deadline, f"consumer lag never reached 0: {lags}"
        time.sleep(1)
