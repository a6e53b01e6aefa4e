"""The bad-input corpus without a broker: each input's reason code through the decoder and the processor."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from prometheus_client import CollectorRegistry

from bad_input_corpus import TWO_DAYS_MS, BadInput, bad_inputs, encode, event, interleave, valid_events
from schemas import load_validator
from worker.config import Settings
from worker.dead_letters import REASONS, parse_dead_letter
from worker.events import KNOWN_EVENT_TYPES, InvalidEvent, decode_event
from worker.metrics import WorkerMetrics
from worker.model import load_bundle
from worker.processor import DictStore, InputMessage, Processor

pytestmark = pytest.mark.reliability

CORPUS = bad_inputs()
TOPIC = "user-events"


@pytest.fixture(scope="module")
def processor(movielens_bundle, tmp_path_factory) -> Processor:
    settings = Settings.from_env({}, bundle_dir=movielens_bundle, state_dir=tmp_path_factory.mktemp("state"))
    return Processor(settings, load_bundle(movielens_bundle), WorkerMetrics(CollectorRegistry()))


def _messages(pairs: list[tuple[bytes | None, bytes | None]], partition: int = 0, first_offset: int = 0) -> list[InputMessage]:
    return [
        InputMessage(key=key, value=value, topic=TOPIC, partition=partition, offset=first_offset + index, timestamp_ms=1)  # type: ignore[arg-type]
        for index, (key, value) in enumerate(pairs)
    ]


def _run(processor: Processor, store: DictStore, messages: list[InputMessage], batch_size: int = 16):
    """Process `messages` in batches as the agent does; return the dead letters and recommendations."""
    letters, recommendations = [], []
    for start in range(0, len(messages), batch_size):
        result = processor.process(messages[start : start + batch_size], store)
        letters += [parse_dead_letter(output.value) for output in result.dead_letters]
        recommendations += [json.loads(output.value) for output in result.recommendations]
        result.write_states(store)
    return letters, recommendations


def test_corpus_has_a_distinct_reason_per_input() -> None:
    reasons = [entry.reason for entry in CORPUS]

    assert len(set(reasons)) == len(reasons), [reason for reason, count in Counter(reasons).items() if count > 1]
    assert len(reasons) >= 30
    # processing_error comes from a failing model step, not from a message.
    assert set(reasons) == REASONS - {"processing_error"}


@pytest.mark.parametrize("entry", [entry for entry in CORPUS if not entry.preceded_by], ids=lambda entry: entry.reason)
def test_decoder_reason_for_input(entry: BadInput) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(entry.key, entry.value, event_types=KNOWN_EVENT_TYPES)

    assert caught.value.reason == entry.reason
    assert entry.detail_part in caught.value.detail


def test_processor_dead_letters_whole_corpus(processor: Processor) -> None:
    messages, applied = interleave(valid_events(users=5, per_user=20), CORPUS)

    letters, recommendations = _run(processor, DictStore(), _messages(messages))

    assert Counter((letter.key, letter.value, letter.reason) for letter in letters) == Counter(
        (entry.key, entry.value, entry.reason) for entry in CORPUS
    )
    for letter in letters:
        entry = next(entry for entry in CORPUS if entry.reason == letter.reason)
        assert entry.detail_part in letter.detail, letter.reason
        assert letter.topic == TOPIC
    served = Counter(body["event_id"] for body in recommendations)
    assert sorted(served) == sorted(document["event_id"] for document in applied)
    assert max(served.values()) == 1


def test_processor_dead_letter_matches_schema(processor: Processor) -> None:
    original = event("schema-check", 0)

    result = processor.process(_messages([_pair(original), _pair(original)]), DictStore())

    (dead_letter,) = result.dead_letters
    assert dead_letter.key == b"schema-check"
    assert load_validator("dead_letter").is_valid(json.loads(dead_letter.value))


def _pair(document: dict) -> tuple[bytes, bytes]:
    return document["user_id"].encode(), encode(document)


def test_duplicate_in_one_batch_dead_lettered_once(processor: Processor) -> None:
    original = event("dup-batch", 0)
    letters, recommendations = _run(processor, DictStore(), _messages([_pair(original), _pair(original), _pair(event("dup-batch", 1))]))

    assert [letter.reason for letter in letters] == ["duplicate_event"]
    assert [letter.offset for letter in letters] == [1]
    assert [body["event_id"] for body in recommendations] == ["dup-batch:0", "dup-batch:1"]


def test_redelivered_offset_skipped_without_dead_letter(processor: Processor) -> None:
    store = DictStore()
    messages = _messages([_pair(event("redelivered", 0)), _pair(event("redelivered", 1))])
    _run(processor, store, messages)

    letters, recommendations = _run(processor, store, messages)

    assert letters == []
    assert recommendations == []


def test_late_event_within_tolerance_applied(processor: Processor) -> None:
    latest = event("late-ok", 10)
    late = event("late-ok", 11, timestamp=latest["timestamp"] - TWO_DAYS_MS // 4)

    letters, recommendations = _run(processor, DictStore(), _messages([_pair(latest), _pair(late)]))

    assert letters == []
    assert [body["event_id"] for body in recommendations] == ["late-ok:10", "late-ok:11"]


def test_out_of_order_across_batches_dead_lettered(processor: Processor) -> None:
    store = DictStore()
    latest = event("late-bad", 10)
    _run(processor, store, _messages([_pair(latest)]))
    late = event("late-bad", 11, timestamp=latest["timestamp"] - TWO_DAYS_MS)

    letters, recommendations = _run(processor, store, _messages([_pair(late), _pair(event("late-bad", 12))], first_offset=1))

    assert [letter.reason for letter in letters] == ["out_of_order"]
    assert "STREAMREC_OUT_OF_ORDER_TOLERANCE_MS" in letters[0].detail
    assert [body["event_id"] for body in recommendations] == ["late-bad:12"]
