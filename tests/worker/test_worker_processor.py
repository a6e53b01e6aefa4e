"""The processor without faust or Kafka: waves, emission policies and redelivery, on a real bundle."""

from __future__ import annotations

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from schemas import load_validator
from worker.config import Settings
from worker.metrics import WorkerMetrics
from worker.model import load_bundle
from worker.processor import DictStore, InputMessage, Processor
from worker.state import decode_state


def messages_for(events: list[tuple[str, str]], partition: int = 0, first_offset: int = 0) -> list[InputMessage]:
    """One message per (user id, item id), in order, with consecutive offsets."""
    messages = []
    for position, (user_id, item_id) in enumerate(events):
        body = {"event_id": f"e{first_offset + position}", "user_id": user_id, "item_id": item_id, "event_type": "view", "timestamp": 1_000 + position}
        messages.append(
            InputMessage(
                key=user_id.encode(),
                value=json.dumps(body).encode(),
                topic="events",
                partition=partition,
                offset=first_offset + position,
                timestamp_ms=1_000 + position,
            )
        )
    return messages


@pytest.fixture(scope="module")
def model(movielens_bundle):
    return load_bundle(movielens_bundle)


def processor(model, **settings) -> Processor:
    return Processor(Settings.from_env({}, **settings), model, WorkerMetrics(CollectorRegistry()))


EVENTS = [("u1", "1"), ("u2", "50"), ("u1", "2"), ("u1", "3"), ("u2", "51")]


def test_every_event_emits_each_users_events_in_order(model):
    store = DictStore()

    result = processor(model).process(messages_for(EVENTS), store)
    result.write_states(store)

    bodies = [json.loads(output.value) for output in result.recommendations]
    u1 = [(body["event_id"], body["events_absorbed"]) for body in bodies if body["user_id"] == "u1"]
    u2 = [(body["event_id"], body["events_absorbed"]) for body in bodies if body["user_id"] == "u2"]
    assert u1 == [("e0", 1), ("e2", 2), ("e3", 3)]
    assert u2 == [("e1", 1), ("e4", 2)]
    assert decode_state(store.values["u1"]).events_absorbed == 3


def test_recommendations_match_schema(model):
    validator = load_validator("recommendation")

    worker = processor(model)
    result = worker.process(messages_for(EVENTS), DictStore())

    for output in result.recommendations:
        body = json.loads(output.value)
        assert list(validator.iter_errors(body)) == []
        assert len(body["items"]) == worker.settings.top_k
        assert all(isinstance(item["score"], float) for item in body["items"])


def test_coalesce_emits_each_users_last_event(model):
    every_event = processor(model).process(messages_for(EVENTS), DictStore())
    coalesced = processor(model, emit="coalesce").process(messages_for(EVENTS), DictStore())

    bodies = {json.loads(output.value)["user_id"]: json.loads(output.value) for output in coalesced.recommendations}
    assert len(coalesced.recommendations) == 2
    assert (bodies["u1"]["event_id"], bodies["u1"]["events_absorbed"]) == ("e3", 3)
    assert (bodies["u2"]["event_id"], bodies["u2"]["events_absorbed"]) == ("e4", 2)
    # The coalesced message is the one every_event sends for the same event.
    last_of_u1 = next(json.loads(o.value) for o in every_event.recommendations if json.loads(o.value)["event_id"] == "e3")
    assert bodies["u1"]["items"] == last_of_u1["items"]


def test_batch_split_matches_one_batch(model):
    whole, split = DictStore(), DictStore()
    messages = messages_for(EVENTS)

    processor(model).process(messages, whole).write_states(whole)
    worker = processor(model)
    for part in (messages[:2], messages[2:]):
        worker.process(part, split).write_states(split)

    for user_id in ("u1", "u2"):
        assert np.array_equal(decode_state(whole.values[user_id]).hidden, decode_state(split.values[user_id]).hidden)


def test_redelivered_batch_changes_nothing(model):
    store = DictStore()
    worker = processor(model)
    worker.process(messages_for(EVENTS), store).write_states(store)
    before = dict(store.values)

    again = worker.process(messages_for(EVENTS), store)

    assert again.recommendations == []
    assert again.skipped == len(EVENTS)
    assert again.state_updates == [] or all(store.values[user] == value for user, value, _ in again.state_updates)
    assert store.values == before
