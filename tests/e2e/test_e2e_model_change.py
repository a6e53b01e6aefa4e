"""A new model bundle is picked up without a restart; a broken one is rejected while the old one serves."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict

import pytest

from devkit.replay import first_users, interaction_events, replay_events
from export.bundle import load_pytorch_model, recommend_for_sequence
from export.data import load_movielens

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

USERS = 20
FIRST_PART = 15  # events per user before the model changes; below RECENT_ITEMS, so a rebuild replays them all
RECENT_ITEMS = 50


def replace_bundle(source, target):
    """Swap a bundle directory the way a deployment would: copy beside it, then rename over it."""
    staging = target.with_name(target.name + ".staging")
    shutil.copytree(source, staging)
    retired = target.with_name(target.name + ".retired")
    target.rename(retired)
    staging.rename(target)
    shutil.rmtree(retired)


def test_new_bundle_rebuilds_states_and_broken_bundle_is_rejected(
    start_pipeline, broker, movielens_bundle, second_movielens_bundle, dataset_dir, tmp_path
):
    served_dir = tmp_path / "served-bundle"
    shutil.copytree(movielens_bundle, served_dir)
    pipeline = start_pipeline(served_dir, STREAMREC_MODEL_POLL_S="0.5")
    settings, collector = pipeline.settings, pipeline.collector
    old_version = json.loads((movielens_bundle / "manifest.json").read_text())["model_version"]
    new_version = json.loads((second_movielens_bundle / "manifest.json").read_text())["model_version"]

    events = first_users(interaction_events(load_movielens(dataset_dir), "ml-100k"), USERS)
    by_user = defaultdict(list)
    for event in events:
        by_user[event["user_id"]].append(event)
    first = [event for event in events if by_user[event["user_id"]].index(event) < FIRST_PART]
    rest = [event for event in events if by_user[event["user_id"]].index(event) >= FIRST_PART]

    assert replay_events(broker.bootstrap, settings.events_topic, first).ok
    assert collector.wait_for(settings.recommendations_topic, len(first), timeout_s=300, idle_timeout_s=60) == len(first)

    replace_bundle(second_movielens_bundle, served_dir)
    pipeline.wait_for_metric("streamrec_model_reloads_total", 'result="ok"', 1)

    assert replay_events(broker.bootstrap, settings.events_topic, rest).ok
    total = len(first) + len(rest)
    assert collector.wait_for(settings.recommendations_topic, total, timeout_s=300, idle_timeout_s=60) == total

    bodies = [json.loads(record.value) for record in collector.snapshot(settings.recommendations_topic)]
    assert {body["model_version"] for body in bodies[: len(first)]} == {old_version}
    after_switch = {body["event_id"]: body for body in bodies[len(first) :]}
    assert {body["model_version"] for body in after_switch.values()} == {new_version}
    assert pipeline.worker.metric("streamrec_states_rebuilt_total", 'action="rebuild"') == USERS

    # Every state was rebuilt from its full history, so the new model's offline result must match.
    new_model = load_pytorch_model(second_movielens_bundle)
    for user_id, sequence in by_user.items():
        last = after_switch[sequence[-1]["event_id"]]
        offline = recommend_for_sequence(
            new_model, [e["item_id"] for e in sequence], [e["event_type"] for e in sequence], exclude_last=RECENT_ITEMS
        )
        assert [item["item_id"] for item in last["items"]][:5] == [item_id for item_id, _ in offline][:5], user_id
        assert last["events_absorbed"] == len(sequence)

    # A bundle whose graph does not match its manifest is rejected; the current model keeps serving.
    manifest_path = served_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["model_version"] = "broken-version"
    manifest["graph_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    pipeline.wait_for_metric("streamrec_model_reloads_total", 'result="failed"', 1)

    # Later than every replayed event, so that none is rejected as out of order.
    after_ms = max(event["timestamp"] for event in rest) + 1000
    extra = [dict(event, event_id=event["event_id"] + ":again", timestamp=after_ms + index) for index, event in enumerate(rest[-5:])]
    assert replay_events(broker.bootstrap, settings.events_topic, extra).ok
    assert collector.wait_for(settings.recommendations_topic, total + len(extra), timeout_s=120) == total + len(extra)
    latest = [json.loads(record.value) for record in collector.snapshot(settings.recommendations_topic)[total:]]
    assert {body["model_version"] for body in latest} == {new_version}
    assert "new model bundle rejected" in pipeline.worker.log_tail(200)
    assert "sha256" in pipeline.worker.log_tail(200)
