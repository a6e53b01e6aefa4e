"""Decode and validate the user events read from the user-events topic.

decode_event applies the rules of ``schemas/event.schema.json`` with hand-written checks,
because it runs once per event on the worker's hot path and jsonschema is far slower. A
test runs every example file of the schema through both and checks that they agree. The
decoder also checks what the schema cannot express: membership of the configured event
types, calendar dates that exist, the time zone offset's effect on the range, the payload
size and the match between the message key and user_id.

Each kind of defect has its own reason code (worker/dead_letters.py), so the dead-letter
topic and the rejection metric tell a missing user_id from an empty one or from a
timestamp in the year 3000.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import Any

from worker import dead_letters as reasons

KNOWN_EVENT_TYPES = frozenset({"view", "click", "add_to_cart", "purchase", "rating"})
DEFAULT_MAX_BYTES = 65536
MAX_ID_CHARS = 256
# Integer ids must fit a signed 64-bit integer, the id type of most upstream services.
MAX_INTEGER_ID = 2**63 - 1
# Accepted timestamps lie in [1970-01-01T00:00:00Z, 3000-01-01T00:00:00Z), in epoch ms.
MIN_TIMESTAMP_MS = 0
MAX_TIMESTAMP_MS = 32_503_680_000_000 - 1
_RANGE_TEXT = "1970-01-01T00:00:00Z up to, not including, 3000-01-01T00:00:00Z"

_REQUIRED_FIELDS = ("event_id", "user_id", "item_id", "event_type", "timestamp")
_MISSING = {
    "event_id": reasons.MISSING_EVENT_ID,
    "user_id": reasons.MISSING_USER_ID,
    "item_id": reasons.MISSING_ITEM_ID,
    "event_type": reasons.MISSING_EVENT_TYPE,
    "timestamp": reasons.MISSING_TIMESTAMP,
}
_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# C0 and C1 control characters (NUL included) and lone surrogates, which UTF-8 cannot encode.
_FORBIDDEN_ID_CHARS = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
_RFC3339 = re.compile(
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})-(?P<day>[0-9]{2})"
    r"[Tt](?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})(?:\.(?P<fraction>[0-9]{1,9}))?"
    r"(?:[Zz]|(?P<sign>[+-])(?P<offset_hour>[0-9]{2}):(?P<offset_minute>[0-9]{2}))"
)
_MIN_YEAR, _MAX_YEAR = 1970, 2999
# Values shown in a detail message are cut to this many characters.
_SHOWN_CHARS = 80


@dataclass(frozen=True, slots=True)
class _IdReasons:
    """The reason codes of one id field; event_id accepts strings only, so it has no integer codes."""

    wrong_type: str
    empty: str
    too_long: str
    invalid_character: str
    not_an_integer: str | None = None
    out_of_range: str | None = None


_ID_REASONS = {
    "event_id": _IdReasons(
        reasons.EVENT_ID_WRONG_TYPE, reasons.EMPTY_EVENT_ID, reasons.EVENT_ID_TOO_LONG, reasons.EVENT_ID_INVALID_CHARACTER
    ),
    "user_id": _IdReasons(
        reasons.USER_ID_WRONG_TYPE, reasons.EMPTY_USER_ID, reasons.USER_ID_TOO_LONG, reasons.USER_ID_INVALID_CHARACTER,
        reasons.USER_ID_NOT_AN_INTEGER, reasons.USER_ID_OUT_OF_RANGE,
    ),
    "item_id": _IdReasons(
        reasons.ITEM_ID_WRONG_TYPE, reasons.EMPTY_ITEM_ID, reasons.ITEM_ID_TOO_LONG, reasons.ITEM_ID_INVALID_CHARACTER,
        reasons.ITEM_ID_NOT_AN_INTEGER, reasons.ITEM_ID_OUT_OF_RANGE,
    ),
}


@dataclass(frozen=True, slots=True)
class Event:
    """A validated event with its ids normalised to strings and its timestamp in epoch ms."""

    event_id: str
    user_id: str
    item_id: str
    event_type: str
    timestamp_ms: int
    value: float | None


class InvalidEvent(ValueError):
    """A message that is not a valid event.

    ``reason`` is one of the dead-letter reason codes and ``detail`` names the field, the
    value seen (cut to a short length) and what was expected.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self) -> tuple[type[InvalidEvent], tuple[str, str]]:
        return type(self), (self.reason, self.detail)


def decode_event(
    key: bytes | None,
    value: bytes | None,
    *,
    event_types: frozenset[str],
    max_bytes: int = DEFAULT_MAX_BYTES,
    require_key: bool = True,
) -> Event:
    """Decode one user-events message into an Event.

    ``key`` is the Kafka message key and must equal user_id as UTF-8. A null key is
    rejected unless ``require_key`` is False, which suits callers that decode values
    without a Kafka message. Raises InvalidEvent, with a reason code per kind of defect,
    for every malformed key or value, whatever its bytes. Raises TypeError only when
    ``value`` is neither None nor bytes-like, because that is a bug in the caller.
    """
    document = _parse_object(value, max_bytes)

    for name in _REQUIRED_FIELDS:
        if name not in document:
            raise InvalidEvent(
                _MISSING[name],
                f"field {name!r} is missing; required fields: {', '.join(_REQUIRED_FIELDS)}",
            )

    event = Event(
        event_id=_text_id("event_id", document["event_id"]),
        user_id=_id("user_id", document["user_id"]),
        item_id=_id("item_id", document["item_id"]),
        event_type=_event_type(document["event_type"], event_types),
        timestamp_ms=_timestamp_ms(document["timestamp"]),
        value=_number_or_none(document.get("value")),
    )

    if key is not None:
        _check_key(key, event.user_id)
    elif require_key:
        raise InvalidEvent(
            reasons.MISSING_KEY,
            f"message key is null for user_id {_show(event.user_id)}; produce the message with the key set to "
            "user_id as UTF-8, so that all events of a user reach the partition that stores their state",
        )
    return event


def check_event_types(names: Iterable[str]) -> frozenset[str]:
    """Return ``names`` as a frozenset; raises ValueError if one could never pass the schema.

    Call it when a model manifest is loaded: decode_event rejects every event type that
    does not match ``^[a-z][a-z0-9_]{0,63}$``, configured or not.
    """
    types = frozenset(names)
    bad = sorted((name for name in types if not isinstance(name, str) or not _EVENT_TYPE.fullmatch(name)), key=repr)
    if bad:
        raise ValueError(
            f"invalid event type names {bad!r}: each must match ^[a-z][a-z0-9_]{{0,63}}$ "
            "(lower-case letter, then up to 63 lower-case letters, digits or underscores)"
        )
    return types


# -- the message value ------------------------------------------------------------------


def _parse_object(value: bytes | None, max_bytes: int) -> dict[str, Any]:
    if value is None:
        raise InvalidEvent(reasons.NULL_VALUE, "message value is null (a tombstone); expected a JSON event object")
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"message value must be bytes or None, got {type(value).__name__}")
    if len(value) == 0:
        raise InvalidEvent(reasons.EMPTY_VALUE, "message value is empty (0 bytes); expected a JSON event object")
    if len(value) > max_bytes:
        raise InvalidEvent(
            reasons.OVERSIZED,
            f"message value is {len(value)} bytes; the limit is {max_bytes} bytes. Send a smaller event, "
            "or raise STREAMREC_MAX_EVENT_BYTES on the worker",
        )

    try:
        text = bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        surrounding = _cut(repr(bytes(value[max(exc.start - 8, 0) : exc.end + 8])))
        raise InvalidEvent(
            reasons.INVALID_UTF8,
            f"message value is not valid UTF-8: {exc.reason} at byte {exc.start} (bytes around it: {surrounding}); "
            "encode the JSON text as UTF-8",
        ) from None

    return _parse_json_object(text)


def _parse_json_object(text: str) -> dict[str, Any]:
    try:
        document = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise InvalidEvent(reasons.JSON_TOO_DEEP, "message value is JSON nested too deeply to parse; send a flat event object") from None
    except _NonFiniteNumber as exc:
        raise InvalidEvent(
            reasons.JSON_NON_FINITE_NUMBER,
            f"message value contains {exc.args[0]}, which is not a JSON number (JSON has no NaN or Infinity); "
            "send a finite number or null",
        ) from None
    except _DuplicateKey as exc:
        raise InvalidEvent(
            reasons.DUPLICATE_JSON_KEY,
            f"message value has the key {_show(exc.args[0])} twice in one object; send each key once",
        ) from None
    except ValueError as exc:
        # Python 3.11+ raises a plain ValueError for integers beyond its digit limit
        # (sys.get_int_max_str_digits), and json.JSONDecodeError for every syntax error.
        if not isinstance(exc, json.JSONDecodeError):
            raise InvalidEvent(
                reasons.JSON_NUMBER_TOO_LONG,
                f"message value has an integer of more than {sys.get_int_max_str_digits()} digits, which the JSON "
                "parser rejects; send ids as strings and numbers within the 64-bit range",
            ) from None
        raise InvalidEvent(reasons.INVALID_JSON, f"message value is not valid JSON: {exc}; send one JSON object") from None

    if not isinstance(document, dict):
        raise InvalidEvent(
            reasons.NOT_AN_OBJECT,
            f"message value is a JSON {_json_type(document)} ({_show(document)}); expected a JSON object",
        )
    return document


class _NonFiniteNumber(ValueError):
    pass


class _DuplicateKey(ValueError):
    pass


def _reject_constant(name: str) -> None:
    raise _NonFiniteNumber(name)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal keys, and other JSON readers may keep the first.
    # Two readers of one message could then see different user ids, so it is rejected.
    document = dict(pairs)
    if len(document) != len(pairs):
        seen: set[str] = set()
        for name, _ in pairs:
            if name in seen:
                raise _DuplicateKey(name)
            seen.add(name)
    return document


# -- fields -----------------------------------------------------------------------------


def _text_id(name: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise _invalid_field(_ID_REASONS[name].wrong_type, name, raw, "a non-empty string")
    return _check_text_id(name, raw)


def _id(name: str, raw: Any) -> str:
    if isinstance(raw, str):
        return _check_text_id(name, raw)

    codes = _ID_REASONS[name]
    expected = f"a non-empty string or an integer in [0, {MAX_INTEGER_ID}]"
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise _invalid_field(codes.wrong_type, name, raw, expected)
    if isinstance(raw, float) and math.isfinite(raw) and not raw.is_integer():
        raise _invalid_field(codes.not_an_integer, name, raw, expected)

    # A JSON number without a fractional part (42 or 42.0) is an integer in JSON Schema.
    if isinstance(raw, float) and raw.is_integer():
        raw_integer = int(raw)
    elif isinstance(raw, int):
        raw_integer = raw
    else:
        raw_integer = None  # an infinite float: 1e400 parses to inf
    if raw_integer is None or not 0 <= raw_integer <= MAX_INTEGER_ID:
        raise _invalid_field(codes.out_of_range, name, raw, expected)
    return str(raw_integer)


def _check_text_id(name: str, text: str) -> str:
    codes = _ID_REASONS[name]
    if not text:
        raise _invalid_field(codes.empty, name, text, "a non-empty string")
    if len(text) > MAX_ID_CHARS:
        raise InvalidEvent(
            codes.too_long,
            f"field {name!r} is {_show(text)}, {len(text)} characters long; the limit is {MAX_ID_CHARS} characters",
        )

    forbidden = _FORBIDDEN_ID_CHARS.search(text)
    if forbidden is not None:
        character = f"U+{ord(forbidden.group()):04X}"
        raise _invalid_field(
            codes.invalid_character, name, text,
            f"no control characters or lone surrogates (found {character} at index {forbidden.start()})",
        )
    return text


def _event_type(raw: Any, event_types: frozenset[str]) -> str:
    expected = "a string matching ^[a-z][a-z0-9_]{0,63}$"
    if not isinstance(raw, str):
        raise _invalid_field(reasons.EVENT_TYPE_WRONG_TYPE, "event_type", raw, expected)
    if not raw:
        raise _invalid_field(reasons.EMPTY_EVENT_TYPE, "event_type", raw, expected)
    if not _EVENT_TYPE.fullmatch(raw):
        raise _invalid_field(reasons.INVALID_EVENT_TYPE, "event_type", raw, expected)
    if raw not in event_types:
        known = ", ".join(sorted(event_types)) or "none"
        raise InvalidEvent(
            reasons.UNKNOWN_EVENT_TYPE,
            f"field 'event_type' is {_show(raw)}; the model accepts: {known}. Send one of those, "
            "or serve a model whose manifest lists this type",
        )
    return raw


def _number_or_none(raw: Any) -> float | None:
    if raw is None:
        return None

    expected = "a finite number or null"
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise _invalid_field(reasons.VALUE_WRONG_TYPE, "value", raw, expected)
    # Compared before float(): an int beyond the float range would raise OverflowError there.
    if isinstance(raw, int) and -sys.float_info.max <= raw <= sys.float_info.max:
        return float(raw)
    if isinstance(raw, float) and math.isfinite(raw):
        return raw
    # json.loads turns a literal beyond the float range, such as 1e400, into inf.
    raise _invalid_field(reasons.VALUE_OUT_OF_RANGE, "value", raw, f"{expected} within +-{sys.float_info.max:.17g}")


# -- timestamps -------------------------------------------------------------------------


def _timestamp_ms(raw: Any) -> int:
    epoch_expected = "epoch milliseconds as an integer, or an RFC 3339 date-time string"
    if isinstance(raw, str):
        timestamp_ms = _parse_rfc3339_ms(raw)
    elif isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise _invalid_timestamp(reasons.TIMESTAMP_WRONG_TYPE, raw, epoch_expected)
    elif isinstance(raw, float) and math.isfinite(raw) and not raw.is_integer():
        raise _invalid_timestamp(reasons.TIMESTAMP_NOT_AN_INTEGER, raw, "whole epoch milliseconds, without a fraction")
    elif isinstance(raw, float) and not math.isfinite(raw):
        # json.loads turns a literal beyond the float range, such as 1e400, into inf.
        timestamp_ms = MAX_TIMESTAMP_MS + 1 if raw > 0 else MIN_TIMESTAMP_MS - 1
    else:
        timestamp_ms = int(raw)

    if timestamp_ms < MIN_TIMESTAMP_MS:
        raise _invalid_timestamp(reasons.TIMESTAMP_BEFORE_1970, raw, f"an instant from {_RANGE_TEXT}")
    if timestamp_ms > MAX_TIMESTAMP_MS:
        raise _invalid_timestamp(reasons.TIMESTAMP_AFTER_2999, raw, f"an instant from {_RANGE_TEXT}")
    return timestamp_ms


def _parse_rfc3339_ms(text: str) -> int:
    """Convert an RFC 3339 date-time to epoch ms, cutting sub-millisecond digits."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        raise _invalid_timestamp(
            reasons.TIMESTAMP_UNPARSEABLE, text, "an RFC 3339 date-time with a time zone, such as 2024-05-01T12:00:00.250+02:00"
        )
    parts = match.groupdict()

    year = int(parts["year"])
    if year < _MIN_YEAR:
        raise _invalid_timestamp(reasons.TIMESTAMP_BEFORE_1970, text, f"a year from {_MIN_YEAR} to {_MAX_YEAR}")
    if year > _MAX_YEAR:
        raise _invalid_timestamp(reasons.TIMESTAMP_AFTER_2999, text, f"a year from {_MIN_YEAR} to {_MAX_YEAR}")
    try:
        day = date(year, int(parts["month"]), int(parts["day"]))
    except ValueError as exc:
        raise _invalid_timestamp(reasons.TIMESTAMP_NONEXISTENT_DATE, text, f"a calendar date that exists ({exc})") from None

    hour, minute, second = int(parts["hour"]), int(parts["minute"]), int(parts["second"])
    # Leap seconds (second 60) are rejected too: epoch milliseconds cannot represent them.
    if hour > 23 or minute > 59 or second > 59:
        raise _invalid_timestamp(
            reasons.TIMESTAMP_NONEXISTENT_TIME, text, "a time of day from 00:00:00 to 23:59:59, without leap seconds"
        )

    offset_minutes = 0
    if parts["sign"] is not None:
        offset_hour, offset_minute = int(parts["offset_hour"]), int(parts["offset_minute"])
        if offset_hour > 23 or offset_minute > 59:
            raise _invalid_timestamp(reasons.TIMESTAMP_INVALID_OFFSET, text, "a time zone offset from -23:59 to +23:59")
        offset_minutes = (offset_hour * 60 + offset_minute) * (1 if parts["sign"] == "+" else -1)

    moment = datetime(day.year, day.month, day.day, hour, minute, second, tzinfo=timezone.utc)
    millisecond = int((parts["fraction"] or "0")[:3].ljust(3, "0"))
    local_ms = int(moment.timestamp()) * 1000 + millisecond
    # A local time at offset +02:00 is two hours ahead of UTC.
    return local_ms - offset_minutes * 60_000


# -- key --------------------------------------------------------------------------------


def _check_key(key: bytes, user_id: str) -> None:
    if bytes(key) == user_id.encode("utf-8"):
        return
    shown_key = _cut(bytes(key).decode("utf-8", errors="backslashreplace"))
    raise InvalidEvent(
        reasons.KEY_MISMATCH,
        f"message key {shown_key!r} differs from user_id {_show(user_id)}; produce the message with the key set to "
        "user_id as UTF-8",
    )


# -- detail messages --------------------------------------------------------------------


def _invalid_field(reason: str, name: str, raw: Any, expected: str) -> InvalidEvent:
    return InvalidEvent(reason, f"field {name!r} is {_show(raw)} ({_json_type(raw)}); expected {expected}")


def _invalid_timestamp(reason: str, raw: Any, expected: str) -> InvalidEvent:
    return InvalidEvent(reason, f"field 'timestamp' is {_show(raw)} ({_json_type(raw)}); expected {expected}")


def _show(raw: Any) -> str:
    """Render a JSON value for a detail message: ASCII only, so control characters show as escapes."""
    try:
        text = json.dumps(raw, ensure_ascii=True)
    except (ValueError, RecursionError):
        text = f"<{_json_type(raw)}>"
    return _cut(text)


def _cut(text: str) -> str:
    if len(text) <= _SHOWN_CHARS:
        return text
    return f"{text[:_SHOWN_CHARS]}... ({len(text)} characters)"


def _json_type(raw: Any) -> str:
    if raw is None:
        return "null"
    if isinstance(raw, bool):
        return "boolean"
    if isinstance(raw, (int, float)):
        return "number"
    if isinstance(raw, str):
        return "string"
    if isinstance(raw, list):
        return "array"
    if isinstance(raw, dict):
        return "object"
    return type(raw).__name__
