"""Malformed user-events messages, one per dead-letter reason code, and valid events to mix them with.

Each BadInput is the exact key and value bytes to produce, the reason code the worker must
give it and a fragment of the detail it must write. Inputs that are only wrong given what
the user's state already contains (a repeated event id, an event far older than the last one)
name the valid events that must be applied before them, under the same key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Valid timestamps of the corpus: 2023-11-14T22:13:20Z, then one minute per event.
BASE_TIMESTAMP_MS = 1_700_000_000_000
# Further back than the worker's default out-of-order tolerance of 24 hours.
TWO_DAYS_MS = 2 * 86_400_000
# Above the decoder's default limit of 65536 bytes, far below the broker's message limit.
OVERSIZED_PADDING = 70_000


@dataclass(frozen=True)
class BadInput:
    reason: str
    key: bytes | None
    value: bytes | None
    detail_part: str
    # Valid events produced just before this input, with the same key, and applied.
    preceded_by: tuple[dict[str, Any], ...] = field(default=())


def event(user: str, sequence: int, **changes: Any) -> dict[str, Any]:
    """Return a valid event of the user id `user`; `sequence` orders the user's events in time."""
    document = {
        "event_id": f"{user}:{sequence}",
        "user_id": user,
        "item_id": str(1 + sequence % 1682),  # a MovieLens-100K item id
        "event_type": "rating",
        "timestamp": BASE_TIMESTAMP_MS + sequence * 60_000,
        "value": 4.0,
    }
    document.update(changes)
    return document


def encode(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":")).encode("utf-8")


def valid_events(users: int, per_user: int) -> list[dict[str, Any]]:
    """Return `per_user` valid events for each of `users` users, in time order per user."""
    return [event(f"valid-{user}", sequence) for sequence in range(per_user) for user in range(users)]


def _without(document: dict[str, Any], name: str) -> dict[str, Any]:
    return {key: value for key, value in document.items() if key != name}


_USER_KEY = object()


def _bad(reason: str, detail_part: str, value: bytes | None, *, key: Any = _USER_KEY, **kwargs: Any) -> BadInput:
    """A BadInput keyed by the user id bad-<reason>, unless `key` is given (None included)."""
    if key is _USER_KEY:
        key = f"bad-{reason}".encode()
    return BadInput(reason, key, value, detail_part, **kwargs)


def _field(reason: str, detail_part: str, **changes: Any) -> BadInput:
    """A valid event of the user bad-<reason> with `changes` applied to its fields."""
    return _bad(reason, detail_part, encode(event(f"bad-{reason}", 0, **changes)))


def bad_inputs() -> list[BadInput]:
    """Return one BadInput per reason code that a message can cause (all but processing_error)."""
    user = "bad-duplicate_event"
    original = event(user, 0)
    late_user = "bad-out_of_order"
    latest = event(late_user, 10)
    late = event(late_user, 11, timestamp=latest["timestamp"] - TWO_DAYS_MS)
    plain = event("bad-plain", 0)

    return [
        # The message value as a whole.
        _bad("empty_value", "empty", b""),
        _bad("null_value", "tombstone", None),
        _bad("oversized", "the limit is 65536 bytes", encode(event("bad-oversized", 0, padding="x" * OVERSIZED_PADDING))),
        _bad("invalid_utf8", "not valid UTF-8", encode(plain).replace(b'"bad-plain:0"', b'"bad-\xff:0"')),
        _bad("invalid_json", "not valid JSON", encode(event("bad-invalid_json", 0))[:-5]),
        _bad("json_too_deep", "nested too deeply", b"[" * 20_000 + b"]" * 20_000),
        _bad("json_number_too_long", "digits", b'{"event_id":' + b"7" * 5_000 + b"}"),
        _bad("json_non_finite_number", "NaN", encode(event("bad-json_non_finite_number", 0))[:-1] + b',"score":NaN}'),
        _bad("duplicate_json_key", '"user_id" twice', b'{"user_id":"bad-duplicate_json_key",' + encode(event("x", 0))[1:]),
        _bad("not_an_object", "JSON array", encode([event("bad-not_an_object", 0)])),
        # The message key.
        _bad("missing_key", "message key is null", encode(event("bad-missing_key", 0)), key=None),
        _bad("key_mismatch", "differs from user_id", encode(event("bad-key_mismatch", 0)), key=b"bad-someone-else"),
        # Required fields.
        _bad("missing_event_id", "'event_id' is missing", encode(_without(event("bad-missing_event_id", 0), "event_id"))),
        _bad("missing_user_id", "'user_id' is missing", encode(_without(event("bad-missing_user_id", 0), "user_id"))),
        _bad("missing_item_id", "'item_id' is missing", encode(_without(event("bad-missing_item_id", 0), "item_id"))),
        _bad("missing_event_type", "'event_type' is missing", encode(_without(event("bad-missing_event_type", 0), "event_type"))),
        _bad("missing_timestamp", "'timestamp' is missing", encode(_without(event("bad-missing_timestamp", 0), "timestamp"))),
        # event_id
        _field("event_id_wrong_type", "'event_id' is 7 (number)", event_id=7),
        _field("empty_event_id", "'event_id' is \"\" (string)", event_id=""),
        _field("event_id_too_long", "300 characters long", event_id="e" * 300),
        _field("event_id_invalid_character", "U+0000", event_id="e\x00"),
        # user_id; the key stays bad-<reason>, so only the field is wrong.
        _field("user_id_wrong_type", "'user_id' is true (boolean)", user_id=True),
        _field("empty_user_id", "'user_id' is \"\" (string)", user_id=""),
        _field("user_id_too_long", "257 characters long", user_id="u" * 257),
        _field("user_id_invalid_character", "U+0001", user_id="u\x01"),
        _field("user_id_not_an_integer", "'user_id' is 1.5 (number)", user_id=1.5),
        _field("user_id_out_of_range", "'user_id' is -1 (number)", user_id=-1),
        # item_id
        _field("item_id_wrong_type", "'item_id' is null (null)", item_id=None),
        _field("empty_item_id", "'item_id' is \"\" (string)", item_id=""),
        _field("item_id_too_long", "1000 characters long", item_id="i" * 1000),
        _field("item_id_invalid_character", "U+D800", item_id="i\ud800"),
        _field("item_id_not_an_integer", "'item_id' is 2.5 (number)", item_id=2.5),
        _field("item_id_out_of_range", "9223372036854775808", item_id=2**63),
        # event_type
        _field("event_type_wrong_type", "'event_type' is 1 (number)", event_type=1),
        _field("empty_event_type", "'event_type' is \"\" (string)", event_type=""),
        _field("invalid_event_type", "^[a-z][a-z0-9_]{0,63}$", event_type="View"),
        _field("unknown_event_type", "the model accepts", event_type="teleport"),
        # timestamp
        _field("timestamp_wrong_type", "'timestamp' is true (boolean)", timestamp=True),
        _field("timestamp_not_an_integer", "without a fraction", timestamp=1_700_000_000_000.5),
        _field("timestamp_unparseable", "RFC 3339", timestamp="yesterday"),
        _field("timestamp_nonexistent_date", "calendar date that exists", timestamp="2023-02-30T10:00:00Z"),
        _field("timestamp_nonexistent_time", "leap seconds", timestamp="2016-12-31T23:59:60Z"),
        _field("timestamp_invalid_offset", "-23:59 to +23:59", timestamp="2024-05-01T12:00:00+24:00"),
        _field("timestamp_before_1970", "from 1970-01-01T00:00:00Z", timestamp=-1),
        _field("timestamp_after_2999", "a year from 1970 to 2999", timestamp="3000-01-01T00:00:00Z"),
        # value
        _field("value_wrong_type", "'value' is \"five stars\" (string)", value="five stars"),
        _bad("value_out_of_range", "'value' is Infinity", encode(_without(event("bad-value_out_of_range", 0), "value"))[:-1] + b',"value":1e400}'),
        # Valid events that the user's state rejects.
        _bad("duplicate_event", "was already applied", encode(original), preceded_by=(original,)),
        _bad("out_of_order", f"is {TWO_DAYS_MS} ms before", encode(late), preceded_by=(latest,)),
    ]


def interleave(valid: list[dict[str, Any]], corpus: list[BadInput]) -> tuple[list[tuple[bytes | None, bytes | None]], list[dict[str, Any]]]:
    """Mix the corpus into the valid events, evenly, keeping the order of each.

    Returns the (key, value) messages to produce and every event that must be applied: the
    valid events and the events each input names in preceded_by.
    """
    messages: list[tuple[bytes | None, bytes | None]] = []
    applied: list[dict[str, Any]] = []
    per_input = max(1, len(valid) // max(1, len(corpus)))
    remaining = list(valid)
    for entry in corpus:
        for document in remaining[:per_input] + list(entry.preceded_by):
            messages.append((document["user_id"].encode(), encode(document)))
            applied.append(document)
        del remaining[:per_input]
        messages.append((entry.key, entry.value))
    for document in remaining:
        messages.append((document["user_id"].encode(), encode(document)))
        applied.append(document)
    return messages, applied
