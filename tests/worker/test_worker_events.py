"""decode_event: normalisation, every rejection reason, and properties over arbitrary input."""

from __future__ import annotations

import json
import pickle
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from worker.dead_letters import REASONS
from worker.events import (
    KNOWN_EVENT_TYPES,
    MAX_TIMESTAMP_MS,
    Event,
    InvalidEvent,
    check_event_types,
    decode_event,
)

BASE = {"event_id": "e-1", "user_id": "u-1", "item_id": "i-1", "event_type": "view", "timestamp": 1714564800000}


def _encode(document) -> bytes:
    return json.dumps(document).encode("utf-8")


def _decode(document=None, *, key: bytes | None = None, raw: bytes | None = None, **kwargs) -> Event:
    """Decode an event built from BASE; without a key, the key check is left out."""
    data = raw if raw is not None else _encode({**BASE, **(document or {})})
    kwargs.setdefault("require_key", key is not None)
    return decode_event(key, data, event_types=kwargs.pop("event_types", KNOWN_EVENT_TYPES), **kwargs)


def _rejection(document=None, **kwargs) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as caught:
        _decode(document, **kwargs)
    return caught.value


def _epoch_ms(*args, tzinfo=timezone.utc) -> int:
    return int(datetime(*args, tzinfo=tzinfo).timestamp() * 1000)


# -- accepted events ----------------------------------------------------------------------


def test_decode_valid_event_fields() -> None:
    event = _decode({"value": 4.5})

    assert event == Event(
        event_id="e-1", user_id="u-1", item_id="i-1", event_type="view", timestamp_ms=1714564800000, value=4.5
    )


def test_event_is_frozen() -> None:
    event = _decode()

    with pytest.raises(AttributeError):
        event.user_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("raw_id", "normalised"),
    [(42, "42"), (0, "0"), (42.0, "42"), (2**63 - 1, "9223372036854775807"), ("0042", "0042")],
)
def test_integer_ids_become_decimal_strings(raw_id, normalised: str) -> None:
    event = _decode({"user_id": raw_id, "item_id": raw_id})

    assert event.user_id == normalised
    assert event.item_id == normalised


@pytest.mark.parametrize(
    ("text", "expected_ms"),
    [
        ("2024-05-01T12:00:00Z", _epoch_ms(2024, 5, 1, 12)),
        ("2024-05-01T14:00:00+02:00", _epoch_ms(2024, 5, 1, 12)),
        ("2024-05-01T07:30:00-04:30", _epoch_ms(2024, 5, 1, 12)),
        ("2024-05-01t12:00:00z", _epoch_ms(2024, 5, 1, 12)),
        ("2024-05-01T12:00:00.5Z", _epoch_ms(2024, 5, 1, 12) + 500),
        ("2024-05-01T12:00:00.123999999Z", _epoch_ms(2024, 5, 1, 12) + 123),
        ("1970-01-01T00:00:00Z", 0),
        ("1970-01-01T00:00:00-01:00", 3_600_000),
        ("2999-12-31T23:59:59.999Z", MAX_TIMESTAMP_MS),
        ("2024-02-29T00:00:00Z", _epoch_ms(2024, 2, 29)),
    ],
)
def test_rfc3339_timestamp_to_epoch_ms(text: str, expected_ms: int) -> None:
    assert _decode({"timestamp": text}).timestamp_ms == expected_ms


@pytest.mark.parametrize(("raw", "expected_ms"), [(0, 0), (1714564800000, 1714564800000), (1.7e12, 1_700_000_000_000)])
def test_epoch_ms_timestamp_kept(raw, expected_ms: int) -> None:
    assert _decode({"timestamp": raw}).timestamp_ms == expected_ms


@pytest.mark.parametrize(("raw", "expected"), [(None, None), (4, 4.0), (-2.5, -2.5), (0, 0.0)])
def test_value_number_or_null(raw, expected) -> None:
    event = _decode({"value": raw})

    assert event.value == expected
    assert event.value is None or isinstance(event.value, float)


def test_value_absent_is_none() -> None:
    assert _decode().value is None


def test_extra_fields_ignored() -> None:
    assert _decode({"session": {"id": [1, 2]}, "device": None}).event_id == "e-1"


def test_configured_event_type_accepted() -> None:
    event = _decode({"event_type": "wishlist"}, event_types=KNOWN_EVENT_TYPES | {"wishlist"})

    assert event.event_type == "wishlist"


@pytest.mark.parametrize(("key", "user_id"), [(b"u-1", "u-1"), (b"42", 42), ("\u00fc".encode(), "\u00fc")])
def test_key_equal_to_user_id_accepted(key: bytes, user_id) -> None:
    assert _decode({"user_id": user_id}, key=key).user_id == key.decode("utf-8")


def test_payload_at_size_limit_accepted() -> None:
    data = _encode({**BASE, "pad": ""})
    padded = _encode({**BASE, "pad": "x" * (1000 - len(data))})

    assert len(padded) == 1000
    assert _decode(raw=padded, max_bytes=1000).event_id == "e-1"


# -- rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason", "detail_part"),
    [
        (b"", "empty_value", "empty"),
        (b"\xff{}", "invalid_utf8", "byte 0"),
        (b'{"event_id": "\xed\xa0\x80"}', "invalid_utf8", "byte 14"),  # a UTF-8 encoded surrogate
        (b"{", "invalid_json", "not valid JSON"),
        (b'{"a": 1} {"b": 2}', "invalid_json", "Extra data"),
        (b"\xef\xbb\xbf{}", "invalid_json", "BOM"),
        (b'{"value": NaN}', "json_non_finite_number", "NaN"),
        (b'{"value": -Infinity}', "json_non_finite_number", "-Infinity"),
        (b'{"extra": [Infinity]}', "json_non_finite_number", "Infinity"),
        (b"[" * 50_000 + b"]" * 50_000, "json_too_deep", "nested too deeply"),
        (b'{"event_id": ' + b"9" * 5000 + b"}", "json_number_too_long", "digits"),
        (b'{"user_id": "a", "user_id": "b"}', "duplicate_json_key", '"user_id" twice'),
        (b'{"extra": {"k": 1, "k": 2}}', "duplicate_json_key", '"k" twice'),
        (b"[1, 2]", "not_an_object", "array"),
        (b'"text"', "not_an_object", "string"),
        (b"null", "not_an_object", "null"),
        (b"12", "not_an_object", "number"),
    ],
)
def test_malformed_value_rejected(raw: bytes, reason: str, detail_part: str) -> None:
    error = _rejection(raw=raw, max_bytes=200_000)

    assert error.reason == reason
    assert detail_part in error.detail


def test_null_value_rejected() -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(b"u-1", None, event_types=KNOWN_EVENT_TYPES)

    assert caught.value.reason == "null_value"
    assert "tombstone" in caught.value.detail


def test_payload_over_size_limit_rejected() -> None:
    error = _rejection({"pad": "x" * 2000}, max_bytes=1000)

    assert error.reason == "oversized"
    assert "the limit is 1000 bytes" in error.detail
    assert "STREAMREC_MAX_EVENT_BYTES" in error.detail


@pytest.mark.parametrize("name", ["event_id", "user_id", "item_id", "event_type", "timestamp"])
def test_missing_field_rejected(name: str) -> None:
    data = _encode({field: value for field, value in BASE.items() if field != name})
    error = _rejection(raw=data)

    assert error.reason == f"missing_{name}"
    assert repr(name) in error.detail


@pytest.mark.parametrize(
    ("document", "reason", "detail_part"),
    [
        ({"event_id": ""}, "empty_event_id", "'event_id' is \"\""),
        ({"event_id": 7}, "event_id_wrong_type", "'event_id' is 7 (number); expected a non-empty string"),
        ({"event_id": None}, "event_id_wrong_type", "null (null)"),
        ({"user_id": ""}, "empty_user_id", "'user_id'"),
        ({"user_id": True}, "user_id_wrong_type", "true (boolean)"),
        ({"user_id": None}, "user_id_wrong_type", "null (null)"),
        ({"user_id": -1}, "user_id_out_of_range", "integer in [0, 9223372036854775807]"),
        ({"user_id": 2**63}, "user_id_out_of_range", "9223372036854775808"),
        ({"user_id": 1.5}, "user_id_not_an_integer", "1.5"),
        ({"user_id": 1e300}, "user_id_out_of_range", "1e+300"),
        ({"item_id": ["i-1"]}, "item_id_wrong_type", "(array)"),
        ({"item_id": {"id": 1}}, "item_id_wrong_type", "(object)"),
        ({"item_id": -0.5}, "item_id_not_an_integer", "-0.5"),
        ({"item_id": -3}, "item_id_out_of_range", "-3"),
        ({"user_id": "u\x001"}, "user_id_invalid_character", "U+0000 at index 1"),
        ({"item_id": "i\n"}, "item_id_invalid_character", "U+000A"),
        ({"item_id": "i\x7f"}, "item_id_invalid_character", "U+007F"),
        ({"item_id": "i\x85"}, "item_id_invalid_character", "U+0085"),
        ({"event_id": "e\ud800"}, "event_id_invalid_character", "U+D800"),
        ({"event_id": "e\x1b"}, "event_id_invalid_character", "U+001B"),
        ({"event_id": "x" * 257}, "event_id_too_long", "257 characters"),
        ({"user_id": "u" * 300}, "user_id_too_long", "'user_id'"),
        ({"item_id": "i" * 257}, "item_id_too_long", "the limit is 256 characters"),
        ({"event_type": "teleport"}, "unknown_event_type", "add_to_cart, click, purchase, rating, view"),
        ({"event_type": "View"}, "invalid_event_type", "^[a-z][a-z0-9_]{0,63}$"),
        ({"event_type": "view\n"}, "invalid_event_type", "'event_type'"),
        ({"event_type": "a" * 65}, "invalid_event_type", "'event_type'"),
        ({"event_type": ""}, "empty_event_type", "'event_type' is \"\""),
        ({"event_type": 1}, "event_type_wrong_type", "'event_type'"),
        ({"event_type": None}, "event_type_wrong_type", "null (null)"),
        ({"value": "4"}, "value_wrong_type", "'value' is \"4\" (string); expected a finite number or null"),
        ({"value": True}, "value_wrong_type", "'value'"),
        ({"value": [1]}, "value_wrong_type", "'value'"),
        ({"value": 10**400}, "value_out_of_range", "'value'"),
    ],
)
def test_invalid_field_rejected(document: dict, reason: str, detail_part: str) -> None:
    error = _rejection(document)

    assert error.reason == reason
    assert detail_part in error.detail


def test_infinite_value_rejected() -> None:
    error = _rejection(raw=_encode(BASE)[:-1] + b', "value": 1e400}')

    assert error.reason == "value_out_of_range"
    assert "Infinity" in error.detail


@pytest.mark.parametrize(("name", "reason"), [("user_id", "user_id_out_of_range"), ("item_id", "item_id_out_of_range")])
def test_infinite_id_rejected(name: str, reason: str) -> None:
    error = _rejection(raw=_encode({k: v for k, v in BASE.items() if k != name})[:-1] + f', "{name}": -1e400}}'.encode())

    assert error.reason == reason
    assert "-Infinity" in error.detail


@pytest.mark.parametrize(
    ("timestamp", "reason", "detail_part"),
    [
        (-1, "timestamp_before_1970", "from 1970-01-01T00:00:00Z"),
        (MAX_TIMESTAMP_MS + 1, "timestamp_after_2999", "3000-01-01T00:00:00Z"),
        (1.5, "timestamp_not_an_integer", "whole epoch milliseconds"),
        (True, "timestamp_wrong_type", "epoch milliseconds"),
        (None, "timestamp_wrong_type", "epoch milliseconds"),
        ([1], "timestamp_wrong_type", "(array)"),
        ("", "timestamp_unparseable", "RFC 3339"),
        ("yesterday", "timestamp_unparseable", "RFC 3339"),
        ("2024-05-01 12:00:00Z", "timestamp_unparseable", "RFC 3339"),
        ("2024-05-01T12:00:00", "timestamp_unparseable", "RFC 3339"),
        ("2024-05-01T12:00Z", "timestamp_unparseable", "RFC 3339"),
        ("2024-05-01T12:00:00.Z", "timestamp_unparseable", "RFC 3339"),
        ("2024-05-01T12:00:00.1234567890Z", "timestamp_unparseable", "RFC 3339"),
        ("2024-05-01T12:00:00+0200", "timestamp_unparseable", "RFC 3339"),
        ("2024-05-01T12:00:00Z\n", "timestamp_unparseable", "RFC 3339"),
        ("\u0662024-05-01T12:00:00Z", "timestamp_unparseable", "RFC 3339"),  # a non-ASCII digit
        ("1969-12-31T23:59:59Z", "timestamp_before_1970", "a year from 1970 to 2999"),
        ("1969-12-31T23:30:00-01:00", "timestamp_before_1970", "a year from 1970 to 2999"),
        ("3000-01-01T00:00:00Z", "timestamp_after_2999", "a year from 1970 to 2999"),
        ("2999-12-31T23:30:00-01:00", "timestamp_after_2999", "3000-01-01T00:00:00Z"),
        ("1970-01-01T00:30:00+01:00", "timestamp_before_1970", "from 1970-01-01T00:00:00Z"),
        ("2023-02-29T00:00:00Z", "timestamp_nonexistent_date", "calendar date that exists"),
        ("2024-13-01T00:00:00Z", "timestamp_nonexistent_date", "calendar date that exists"),
        ("2024-04-31T00:00:00Z", "timestamp_nonexistent_date", "calendar date that exists"),
        ("2024-00-10T00:00:00Z", "timestamp_nonexistent_date", "calendar date that exists"),
        ("2024-05-01T24:00:00Z", "timestamp_nonexistent_time", "time of day"),
        ("2024-05-01T12:60:00Z", "timestamp_nonexistent_time", "time of day"),
        ("2016-12-31T23:59:60Z", "timestamp_nonexistent_time", "leap seconds"),
        ("2024-05-01T12:00:00+24:00", "timestamp_invalid_offset", "offset"),
        ("2024-05-01T12:00:00+01:60", "timestamp_invalid_offset", "offset"),
    ],
)
def test_invalid_timestamp_rejected(timestamp, reason: str, detail_part: str) -> None:
    error = _rejection({"timestamp": timestamp})

    assert error.reason == reason
    assert detail_part in error.detail


def test_infinite_timestamp_rejected() -> None:
    error = _rejection(raw=_encode({k: v for k, v in BASE.items() if k != "timestamp"})[:-1] + b', "timestamp": 1e400}')

    assert error.reason == "timestamp_after_2999"


@pytest.mark.parametrize(
    ("key", "user_id", "detail_part"),
    [
        (b"u-2", "u-1", "'u-2' differs from user_id \"u-1\""),
        (b"", "u-1", "''"),
        (b"042", 42, "'042'"),
        (b"\xff", "u-1", "\\xff"),
    ],
)
def test_key_mismatch_rejected(key: bytes, user_id, detail_part: str) -> None:
    error = _rejection({"user_id": user_id}, key=key)

    assert error.reason == "key_mismatch"
    assert detail_part in error.detail
    assert "key set to user_id" in error.detail


def test_null_key_rejected() -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(None, _encode(BASE), event_types=KNOWN_EVENT_TYPES)

    assert caught.value.reason == "missing_key"
    assert '"u-1"' in caught.value.detail
    assert "key set to user_id" in caught.value.detail


def test_null_key_accepted_when_not_required() -> None:
    assert decode_event(None, _encode(BASE), event_types=KNOWN_EVENT_TYPES, require_key=False).user_id == "u-1"


def test_value_defect_reported_before_null_key() -> None:
    with pytest.raises(InvalidEvent) as caught:
        decode_event(None, b"{", event_types=KNOWN_EVENT_TYPES)

    assert caught.value.reason == "invalid_json"


def test_detail_cuts_long_values() -> None:
    error = _rejection({"value": "v" * 5000})

    assert len(error.detail) < 300
    assert "(5002 characters)" in error.detail


def test_non_bytes_value_raises_type_error() -> None:
    with pytest.raises(TypeError, match="must be bytes or None, got str"):
        decode_event(None, json.dumps(BASE), event_types=KNOWN_EVENT_TYPES)  # type: ignore[arg-type]


def test_invalid_event_pickles() -> None:
    error = InvalidEvent("value_wrong_type", "field 'value' is \"4\"")
    copy = pickle.loads(pickle.dumps(error))

    assert (copy.reason, copy.detail, str(copy)) == (error.reason, error.detail, str(error))


def test_check_event_types_rejects_bad_names() -> None:
    assert check_event_types(["view", "add_to_cart"]) == frozenset({"view", "add_to_cart"})
    with pytest.raises(ValueError, match=r"\['Add-To-Cart', 'x y'\]"):
        check_event_types(["view", "Add-To-Cart", "x y"])


# -- properties ---------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["event_id", "user_id", "item_id", "event_type", "timestamp", "value"])


def _outcome(key: bytes | None, value: bytes) -> Event | InvalidEvent:
    """Decode, letting any exception other than InvalidEvent fail the test."""
    try:
        return decode_event(key, value, event_types=KNOWN_EVENT_TYPES, max_bytes=4096)
    except InvalidEvent as error:
        assert error.reason in REASONS
        assert error.detail
        return error


@settings(max_examples=500, deadline=None)
@given(key=st.one_of(st.none(), st.binary(max_size=16)), value=st.binary(max_size=8192))
def test_arbitrary_bytes_raise_only_invalid_event(key, value: bytes) -> None:
    _outcome(key, value)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=st.dictionaries(st.one_of(field_names, st.text(max_size=8)), json_values, max_size=8))
def test_arbitrary_json_objects_raise_only_invalid_event(document: dict) -> None:
    _outcome(None, json.dumps(document).encode("utf-8"))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    overrides=st.dictionaries(field_names, json_values, max_size=3),
    key=st.one_of(st.none(), st.binary(max_size=8), st.just(b"u-1")),
)
def test_mutated_events_raise_only_invalid_event(overrides: dict, key) -> None:
    _outcome(key, json.dumps({**BASE, **overrides}).encode("utf-8"))


@settings(max_examples=300, deadline=None)
@given(
    user_id=st.one_of(st.integers(min_value=0, max_value=2**63 - 1), st.text(st.characters(exclude_categories=("Cc", "Cs")), min_size=1, max_size=30)),
    item_id=st.integers(min_value=0, max_value=10**6),
    timestamp_ms=st.integers(min_value=0, max_value=MAX_TIMESTAMP_MS),
    value=st.one_of(st.none(), st.floats(allow_nan=False, allow_infinity=False)),
    event_type=st.sampled_from(sorted(KNOWN_EVENT_TYPES)),
)
def test_valid_events_decode_to_their_fields(user_id, item_id: int, timestamp_ms: int, value, event_type: str) -> None:
    document = {"event_id": "e", "user_id": user_id, "item_id": item_id, "event_type": event_type, "timestamp": timestamp_ms, "value": value}
    event = decode_event(str(user_id).encode("utf-8"), _encode(document), event_types=KNOWN_EVENT_TYPES)

    assert event.user_id == str(user_id)
    assert event.item_id == str(item_id)
    assert event.timestamp_ms == timestamp_ms
    assert event.value == value
    assert event.event_type == event_type


@settings(max_examples=300, deadline=None)
@given(moment=st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2999, 12, 30), timezones=st.timezones()))
def test_rfc3339_matches_datetime_arithmetic(moment: datetime) -> None:
    # isoformat() writes an RFC 3339 date-time for whole-minute offsets, which are what RFC 3339 can express.
    assume(moment.utcoffset().total_seconds() % 60 == 0)
    text = moment.isoformat(timespec="milliseconds")
    expected_ms = (moment - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)

    assert _decode({"timestamp": text}).timestamp_ms == expected_ms



@settings(max_examples=500, deadline=None)
@given(
    edits=st.lists(st.tuples(st.integers(min_value=0, max_value=200), st.binary(max_size=3), st.integers(min_value=0, max_value=3)), max_size=4),
    key=st.one_of(st.none(), st.just(b"u-1"), st.binary(max_size=4)),
)
def test_byte_edits_of_valid_event_raise_only_invalid_event(edits, key) -> None:
    data = bytearray(_encode({**BASE, "value": 4.5}))
    for position, inserted, deleted in edits:
        # Replace `deleted` bytes at `position` with `inserted`: flips, insertions and cuts.
        position = min(position, len(data))
        data[position : position + deleted] = inserted

    _outcome(key, bytes(data))


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_text_raises_only_invalid_event(text: str) -> None:
    _outcome(b"u-1", text.encode("utf-8", errors="surrogatepass"))
