"""Bad input through the real broker and worker: every malformed message is dead-lettered, the rest is served."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter

import pytest

from bad_input_corpus import bad_inputs, encode, event, interleave, valid_events
from devkit.replay import replay_messages
from schemas import load_validator
from worker.dead_letters import parse_dead_letter

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]


def test_bad_input_corpus_dead_lettered_while_serving(start_pipeline, broker, movielens_bundle) -> None:
    pipeline = start_pipeline(movielens_bundle)
    settings, worker, collector = pipeline.settings, pipeline.worker, pipeline.collector
    corpus = bad_inputs()
    messages, applied = interleave(valid_events(users=12, per_user=8), corpus)

    stats = replay_messages(broker.bootstrap, settings.events_topic, messages)
    assert stats.ok, f"replay failed: {stats}"
    dead = collector.wait_for(settings.dead_letter_topic, len(corpus), timeout_s=90, idle_timeout_s=45)
    served = collector.wait_for(settings.recommendations_topic, len(applied), timeout_s=90, idle_timeout_s=45)
    assert dead == len(corpus), f"{dead} dead letters for {len(corpus)} bad inputs:\n{worker.log_tail()}"
    assert served == len(applied), f"{served} recommendations for {len(applied)} valid events:\n{worker.log_tail()}"

    # Every bad input is in the dead-letter topic once, with its original key and value bytes
    # and the reason code of its kind.
    records = collector.snapshot(settings.dead_letter_topic)
    letters = [parse_dead_letter(record.value) for record in records]
    assert Counter((letter.key, letter.value, letter.reason) for letter in letters) == Counter(
        (entry.key, entry.value, entry.reason) for entry in corpus
    )
    reasons = [entry.reason for entry in corpus]
    assert len(set(reasons)) == len(reasons) >= 30

    # Each dead letter explains itself and matches the dead-letter schema; its Kafka key is the original key.
    validator = load_validator("dead_letter")
    expected_detail = {entry.reason: entry.detail_part for entry in corpus}
    for record, letter in zip(records, letters):
        assert expected_detail[letter.reason] in letter.detail, f"{letter.reason}: {letter.detail}"
        assert validator.is_valid(json.loads(record.value)), letter.reason
        assert record.key == letter.key, letter.reason
        assert letter.topic == settings.events_topic

    # Every valid event, and no bad input, got exactly one recommendation.
    bodies = [json.loads(record.value) for record in collector.snapshot(settings.recommendations_topic)]
    per_event = Counter(body["event_id"] for body in bodies)
    assert set(per_event) == {document["event_id"] for document in applied}
    assert max(per_event.values()) == 1

    # Each reason code was counted once on /metrics.
    for reason in reasons:
        assert worker.metric("streamrec_events_rejected_total", f'reason="{reason}"') == 1, reason

    # The worker is alive and still serves new events.
    assert worker.process.poll() is None, worker.log_tail()
    with urllib.request.urlopen(worker.url("/healthz"), timeout=5) as response:
        assert response.status == 200
    after = [event("after-corpus", sequence) for sequence in range(3)]
    assert replay_messages(broker.bootstrap, settings.events_topic, [(b"after-corpus", encode(document)) for document in after]).ok
    total = len(applied) + len(after)
    assert collector.wait_for(settings.recommendations_topic, total, timeout_s=60, idle_timeout_s=30) == total
