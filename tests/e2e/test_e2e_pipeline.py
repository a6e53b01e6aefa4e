"""The whole pipeline through a real broker: replay MovieLens, check every output of the worker."""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from devkit.replay import first_users, interaction_events, malformed_messages, replay_events
from export.bundle import load_pytorch_model, recommend_for_sequence
from export.data import load_movielens
from worker.dead_letters import parse_dead_letter

pytestmark = pytest.mark.e2e

USERS = 120
RECENT_ITEMS = 50  # the worker setting STREAMREC_RECENT_ITEMS used by start_pipeline
SCORE_TOLERANCE = 1e-4


def assert_same_top_k_ties_aside(user_id, served, offline):
    """Served and offline top-K must agree item by item, except where scores tie."""
    assert len(served) == len(offline), f"user {user_id}: {len(served)} items served, {len(offline)} offline"
    offline_scores = dict(offline)
    boundary = offline[-1][1]
    for rank, ((served_item, served_score), (offline_item, offline_score)) in enumerate(zip(served, offline), start=1):
        assert abs(served_score - offline_score) <= SCORE_TOLERANCE, (
            f"user {user_id} rank {rank}: served score {served_score} vs offline {offline_score}"
        )
        if served_item == offline_item:
            continue
        tied_inside = served_item in offline_scores and abs(offline_scores[served_item] - served_score) <= SCORE_TOLERANCE
        tied_at_boundary = served_item not in offline_scores and abs(served_score - boundary) <= SCORE_TOLERANCE
        assert tied_inside or tied_at_boundary, (
            f"user {user_id} rank {rank}: served {served_item} ({served_score}) but offline {offline_item} ({offline_score})"
        )


@pytest.fixture
def pipeline(start_pipeline, movielens_bundle):
    return start_pipeline(movielens_bundle)


def test_movielens_replay_serves_offline_model_and_dead_letters(pipeline, broker, movielens_bundle, dataset_dir):
    settings, worker, collector = pipeline.settings, pipeline.worker, pipeline.collector
    events = first_users(interaction_events(load_movielens(dataset_dir), "ml-100k"), USERS)
    malformed = malformed_messages(12)

    stats = replay_events(
        broker.bootstrap, settings.events_topic, events, malformed=malformed, malformed_every=len(events) // len(malformed)
    )
    assert stats.ok, f"replay failed: {stats}"
    received = collector.wait_for(settings.recommendations_topic, len(events), timeout_s=600, idle_timeout_s=90)
    if received != len(events):
        served_ids = {json.loads(record.value)["event_id"] for record in collector.snapshot(settings.recommendations_topic)}
        missing = [event for event in events if event["event_id"] not in served_ids]
        pytest.fail(f"{received} recommendations for {len(events)} events; missing {missing[:10]}:\n{worker.log_tail()}")
    dead = collector.wait_for(settings.dead_letter_topic, len(malformed), timeout_s=60)
    assert dead == len(malformed)

    # Every valid event produced exactly one recommendation.
    recommendations = [json.loads(record.value) for record in collector.snapshot(settings.recommendations_topic)]
    per_event = Counter(body["event_id"] for body in recommendations)
    assert set(per_event) == {event["event_id"] for event in events}
    assert max(per_event.values()) == 1

    # Every malformed message produced exactly one dead letter holding its original bytes.
    letters = [parse_dead_letter(record.value) for record in collector.snapshot(settings.dead_letter_topic)]
    assert Counter(letter.value for letter in letters) == Counter(value for _, value, _ in malformed)
    expected_reason = {value: reason for _, value, reason in malformed}
    for letter in letters:
        assert letter.reason == expected_reason[letter.value], f"{letter.value[:60]!r}: {letter.detail}"
        assert letter.topic == settings.events_topic

    # Each user's last recommendation equals the offline PyTorch model on the same sequence.
    sequences = defaultdict(list)
    for event in events:
        sequences[event["user_id"]].append(event)
    last = {}
    for body in recommendations:
        if body["events_absorbed"] >= last.get(body["user_id"], {}).get("events_absorbed", 0):
            last[body["user_id"]] = body
    assert len(last) == USERS
    pytorch_bundle = load_pytorch_model(movielens_bundle)
    for user_id, sequence in sequences.items():
        served = [(item["item_id"], item["score"]) for item in last[user_id]["items"]]
        offline = recommend_for_sequence(
            pytorch_bundle,
            [event["item_id"] for event in sequence],
            [event["event_type"] for event in sequence],
            exclude_last=RECENT_ITEMS,
        )
        assert last[user_id]["events_absorbed"] == len(sequence)
        assert_same_top_k_ties_aside(user_id, served, offline)


def test_redelivered_events_change_no_state(pipeline, broker, dataset_dir):
    settings, collector = pipeline.settings, pipeline.collector
    events = first_users(interaction_events(load_movielens(dataset_dir), "ml-100k"), 30)
    assert replay_events(broker.bootstrap, settings.events_topic, events).ok
    assert collector.wait_for(settings.recommendations_topic, len(events), timeout_s=300, idle_timeout_s=60) == len(events)
    pipeline.wait_until_quiet(settings.changelog_topic)
    before = pipeline.latest_states()
    changelog_before = collector.count(settings.changelog_topic)

    # Send the last five events of every user again: same event ids, new offsets.
    by_user = defaultdict(list)
    for event in events:
        by_user[event["user_id"]].append(event)
    redelivered = [event for user_events in by_user.values() for event in user_events[-5:]]
    assert replay_events(broker.bootstrap, settings.events_topic, redelivered).ok

    pipeline.wait_for_metric("streamrec_events_skipped_total", 'reason="event_id"', len(redelivered))
    pipeline.wait_until_quiet(settings.changelog_topic)

    after = pipeline.latest_states()
    assert collector.count(settings.changelog_topic) == changelog_before
    assert collector.count(settings.recommendations_topic) == len(events)
    assert after.keys() == before.keys()
    for user_id, state in after.items():
        assert state.events_absorbed == before[user_id].events_absorbed
        assert state.last_offset == before[user_id].last_offset
        assert (state.hidden == before[user_id].hidden).all()
