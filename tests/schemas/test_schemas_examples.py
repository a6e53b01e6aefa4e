"""The schema files and their example messages, and the agreement between the event schema and the decoder."""

from __future__ import annotations

import json

import pytest
from jsonschema import Draft202012Validator

from schemas import DECODER_ONLY_PREFIX, SCHEMA_NAMES, example_files, load_schema, load_validator
from worker.dead_letters import REASONS
from worker.events import KNOWN_EVENT_TYPES, InvalidEvent, decode_event

MIN_EXAMPLES = {"event": (4, 6), "recommendation": (2, 3), "dead_letter": (2, 3)}
# The reason code the decoder gives each invalid event example.
EXPECTED_REASONS = {
    "invalid-boolean-user-id.json": "user_id_wrong_type",
    "invalid-control-char-in-user-id.json": "user_id_invalid_character",
    "invalid-decoder-only-february-30.json": "timestamp_nonexistent_date",
    "invalid-decoder-only-offset-before-epoch.json": "timestamp_before_1970",
    "invalid-decoder-only-unknown-event-type.json": "unknown_event_type",
    "invalid-empty-user-id.json": "empty_user_id",
    "invalid-empty.txt": "empty_value",
    "invalid-event-type-number.json": "event_type_wrong_type",
    "invalid-event-type-uppercase.json": "invalid_event_type",
    "invalid-fractional-item-id.json": "item_id_not_an_integer",
    "invalid-id-too-long.json": "event_id_too_long",
    "invalid-lone-surrogate-in-item-id.json": "item_id_invalid_character",
    "invalid-missing-item-id.json": "missing_item_id",
    "invalid-nan-literal.txt": "json_non_finite_number",
    "invalid-negative-item-id.json": "item_id_out_of_range",
    "invalid-not-an-object.json": "not_an_object",
    "invalid-timestamp-epoch-ms-year-3000.json": "timestamp_after_2999",
    "invalid-timestamp-leap-second.json": "timestamp_nonexistent_time",
    "invalid-timestamp-negative.json": "timestamp_before_1970",
    "invalid-timestamp-no-offset.json": "timestamp_unparseable",
    "invalid-timestamp-words.json": "timestamp_unparseable",
    "invalid-timestamp-year-3000.json": "timestamp_after_2999",
    "invalid-trailing-newline-in-event-type.json": "invalid_event_type",
    "invalid-truncated-json.txt": "invalid_json",
    "invalid-utf8.txt": "invalid_utf8",
    "invalid-value-overflow.json": "value_out_of_range",
    "invalid-value-string.json": "value_wrong_type",
}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def schema_accepts(name: str, data: bytes) -> bool:
    """Parse like a strict JSON reader (no NaN or Infinity), then validate against the schema."""
    try:
        document = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError included
        return False
    return load_validator(name).is_valid(document)


def decoder_accepts(data: bytes, event_types: frozenset[str] = KNOWN_EVENT_TYPES) -> bool:
    try:
        decode_event(None, data, event_types=event_types, require_key=False)
    except InvalidEvent:
        return False
    return True


def _examples(name: str) -> list:
    return [pytest.param(entry, id=entry.name) for entry in example_files(name)]


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_schema_conforms_to_draft_2020_12(name: str) -> None:
    schema = load_schema(name)

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("name", SCHEMA_NAMES)
def test_examples_minimum_counts(name: str) -> None:
    names = [entry.name for entry in example_files(name)]
    valid = [n for n in names if n.startswith("valid-")]
    invalid = [n for n in names if n.startswith("invalid-")]
    min_valid, min_invalid = MIN_EXAMPLES[name]

    assert len(valid) >= min_valid, names
    assert len(invalid) >= min_invalid, names
    assert len(valid) + len(invalid) == len(names), f"example names must start with valid- or invalid-: {names}"


@pytest.mark.parametrize("name", ["recommendation", "dead_letter"])
def test_examples_match_schema(name: str) -> None:
    for entry in example_files(name):
        accepted = schema_accepts(name, entry.read_bytes())

        assert accepted == entry.name.startswith("valid-"), f"{name}/{entry.name}: schema accepted={accepted}"


@pytest.mark.parametrize("entry", _examples("event"))
def test_event_example_schema_and_decoder_agree(entry) -> None:
    data = entry.read_bytes()
    schema_ok = schema_accepts("event", data)
    decoder_ok = decoder_accepts(data)

    if entry.name.startswith("valid-"):
        assert schema_ok, "schema rejected a valid- example"
        assert decoder_ok, "decoder rejected a valid- example"
    elif entry.name.startswith(DECODER_ONLY_PREFIX):
        assert schema_ok, "an invalid-decoder-only- example must pass the schema"
        assert not decoder_ok, "decoder accepted an invalid-decoder-only- example"
    else:
        assert not schema_ok, "schema accepted an invalid- example"
        assert not decoder_ok, "decoder accepted an invalid- example"


def test_decoder_only_examples_exist_for_each_gap() -> None:
    reasons = set()
    for entry in example_files("event"):
        if entry.name.startswith(DECODER_ONLY_PREFIX):
            with pytest.raises(InvalidEvent) as caught:
                decode_event(None, entry.read_bytes(), event_types=KNOWN_EVENT_TYPES, require_key=False)
            reasons.add(caught.value.reason)

    assert reasons == {"unknown_event_type", "timestamp_nonexistent_date", "timestamp_before_1970"}


def test_unknown_type_example_decodes_once_configured() -> None:
    entry = next(e for e in example_files("event") if e.name == f"{DECODER_ONLY_PREFIX}unknown-event-type.json")
    data = entry.read_bytes()
    event_type = json.loads(data)["event_type"]

    assert not decoder_accepts(data)
    assert decoder_accepts(data, KNOWN_EVENT_TYPES | {event_type})


@pytest.mark.parametrize("entry", [entry for entry in _examples("event") if not entry.id.startswith("valid-")])
def test_invalid_event_example_reason(entry) -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(None, entry.read_bytes(), event_types=KNOWN_EVENT_TYPES, require_key=False)

    assert caught.value.reason == EXPECTED_REASONS[entry.name]
    assert caught.value.reason in REASONS
    assert caught.value.detail


def test_expected_reasons_cover_every_invalid_example() -> None:
    invalid = {entry.name for entry in example_files("event") if not entry.name.startswith("valid-")}

    assert set(EXPECTED_REASONS) == invalid


def _schema_reasons() -> list[dict]:
    return load_schema("dead_letter")["properties"]["reason"]["oneOf"]


def test_dead_letter_reasons_match_code() -> None:
    codes = [option["const"] for option in _schema_reasons()]

    assert len(codes) == len(set(codes)), "a reason code is listed twice in the schema"
    assert set(codes) == REASONS


@pytest.mark.parametrize("option", _schema_reasons(), ids=lambda option: option["const"])
def test_dead_letter_reason_described(option: dict) -> None:
    assert set(option) == {"const", "description"}
    assert len(option["description"].split()) >= 4


def test_dead_letter_schema_rejects_unlisted_reason() -> None:
    example = json.loads(next(e for e in example_files("dead_letter") if e.name == "valid-invalid-json.json").read_bytes())

    assert load_validator("dead_letter").is_valid(example)
    assert not load_validator("dead_letter").is_valid({**example, "reason": "invalid_field"})


def test_event_schema_lists_known_types() -> None:
    schema = load_schema("event")

    assert set(schema["properties"]["event_type"]["examples"]) == KNOWN_EVENT_TYPES


def test_load_schema_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown schema 'events'"):
        load_schema("events")


def test_load_schema_returns_fresh_copies() -> None:
    first = load_schema("event")
    first["required"].clear()

    assert load_schema("event")["required"]
