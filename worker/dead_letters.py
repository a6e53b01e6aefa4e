"""The dead-letter envelope: a rejected input message, its original bytes and the reason.

The envelope follows ``schemas/dead_letter.schema.json``. The dead-letter message is
produced with the original key bytes as its Kafka key, so it lands in the partition of
the user it belongs to.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from dataclasses import dataclass

# A dead letter must fit in one Kafka message (1 MiB by default), and base64 makes bytes a
# third longer. A key or value above this size keeps only its first MAX_KEPT_BYTES, and the
# envelope records its full size and SHA-256. Without the cap, the send of the dead letter
# would fail, and the worker would retry the batch forever.
MAX_KEPT_BYTES = 256 * 1024

# Reason codes, one per kind of rejection. The dead-letter schema lists the same codes with
# a description of each, and a test checks that both lists agree.

# The message value as a whole.
EMPTY_VALUE = "empty_value"
NULL_VALUE = "null_value"
OVERSIZED = "oversized"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
JSON_TOO_DEEP = "json_too_deep"
JSON_NUMBER_TOO_LONG = "json_number_too_long"
JSON_NON_FINITE_NUMBER = "json_non_finite_number"
DUPLICATE_JSON_KEY = "duplicate_json_key"
NOT_AN_OBJECT = "not_an_object"

# The message key.
MISSING_KEY = "missing_key"
KEY_MISMATCH = "key_mismatch"

# event_id
MISSING_EVENT_ID = "missing_event_id"
EVENT_ID_WRONG_TYPE = "event_id_wrong_type"
EMPTY_EVENT_ID = "empty_event_id"
EVENT_ID_TOO_LONG = "event_id_too_long"
EVENT_ID_INVALID_CHARACTER = "event_id_invalid_character"

# user_id
MISSING_USER_ID = "missing_user_id"
USER_ID_WRONG_TYPE = "user_id_wrong_type"
EMPTY_USER_ID = "empty_user_id"
USER_ID_TOO_LONG = "user_id_too_long"
USER_ID_INVALID_CHARACTER = "user_id_invalid_character"
USER_ID_NOT_AN_INTEGER = "user_id_not_an_integer"
USER_ID_OUT_OF_RANGE = "user_id_out_of_range"

# item_id
MISSING_ITEM_ID = "missing_item_id"
ITEM_ID_WRONG_TYPE = "item_id_wrong_type"
EMPTY_ITEM_ID = "empty_item_id"
ITEM_ID_TOO_LONG = "item_id_too_long"
ITEM_ID_INVALID_CHARACTER = "item_id_invalid_character"
ITEM_ID_NOT_AN_INTEGER = "item_id_not_an_integer"
ITEM_ID_OUT_OF_RANGE = "item_id_out_of_range"

# event_type
MISSING_EVENT_TYPE = "missing_event_type"
EVENT_TYPE_WRONG_TYPE = "event_type_wrong_type"
EMPTY_EVENT_TYPE = "empty_event_type"
INVALID_EVENT_TYPE = "invalid_event_type"
UNKNOWN_EVENT_TYPE = "unknown_event_type"

# timestamp
MISSING_TIMESTAMP = "missing_timestamp"
TIMESTAMP_WRONG_TYPE = "timestamp_wrong_type"
TIMESTAMP_NOT_AN_INTEGER = "timestamp_not_an_integer"
TIMESTAMP_UNPARSEABLE = "timestamp_unparseable"
TIMESTAMP_NONEXISTENT_DATE = "timestamp_nonexistent_date"
TIMESTAMP_NONEXISTENT_TIME = "timestamp_nonexistent_time"
TIMESTAMP_INVALID_OFFSET = "timestamp_invalid_offset"
TIMESTAMP_BEFORE_1970 = "timestamp_before_1970"
TIMESTAMP_AFTER_2999 = "timestamp_after_2999"

# value
VALUE_WRONG_TYPE = "value_wrong_type"
VALUE_OUT_OF_RANGE = "value_out_of_range"

# A valid event that the user's state rejects, or a later step that failed on it.
DUPLICATE_EVENT = "duplicate_event"
OUT_OF_ORDER = "out_of_order"
PROCESSING_ERROR = "processing_error"

REASONS = frozenset(
    {
        EMPTY_VALUE,
        NULL_VALUE,
        OVERSIZED,
        INVALID_UTF8,
        INVALID_JSON,
        JSON_TOO_DEEP,
        JSON_NUMBER_TOO_LONG,
        JSON_NON_FINITE_NUMBER,
        DUPLICATE_JSON_KEY,
        NOT_AN_OBJECT,
        MISSING_KEY,
        KEY_MISMATCH,
        MISSING_EVENT_ID,
        EVENT_ID_WRONG_TYPE,
        EMPTY_EVENT_ID,
        EVENT_ID_TOO_LONG,
        EVENT_ID_INVALID_CHARACTER,
        MISSING_USER_ID,
        USER_ID_WRONG_TYPE,
        EMPTY_USER_ID,
        USER_ID_TOO_LONG,
        USER_ID_INVALID_CHARACTER,
        USER_ID_NOT_AN_INTEGER,
        USER_ID_OUT_OF_RANGE,
        MISSING_ITEM_ID,
        ITEM_ID_WRONG_TYPE,
        EMPTY_ITEM_ID,
        ITEM_ID_TOO_LONG,
        ITEM_ID_INVALID_CHARACTER,
        ITEM_ID_NOT_AN_INTEGER,
        ITEM_ID_OUT_OF_RANGE,
        MISSING_EVENT_TYPE,
        EVENT_TYPE_WRONG_TYPE,
        EMPTY_EVENT_TYPE,
        INVALID_EVENT_TYPE,
        UNKNOWN_EVENT_TYPE,
        MISSING_TIMESTAMP,
        TIMESTAMP_WRONG_TYPE,
        TIMESTAMP_NOT_AN_INTEGER,
        TIMESTAMP_UNPARSEABLE,
        TIMESTAMP_NONEXISTENT_DATE,
        TIMESTAMP_NONEXISTENT_TIME,
        TIMESTAMP_INVALID_OFFSET,
        TIMESTAMP_BEFORE_1970,
        TIMESTAMP_AFTER_2999,
        VALUE_WRONG_TYPE,
        VALUE_OUT_OF_RANGE,
        DUPLICATE_EVENT,
        OUT_OF_ORDER,
        PROCESSING_ERROR,
    }
)

# The schema's maxLength for detail; longer details are cut to fit.
MAX_DETAIL_CHARS = 2048
_ELLIPSIS = "..."


@dataclass(frozen=True)
class DeadLetter:
    """A parsed dead-letter envelope with the original key and value restored to bytes."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    reason: str
    detail: str
    rejected_at_ms: int


def build_dead_letter(
    key: bytes | None,
    value: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    timestamp_ms: int | None,
    reason: str,
    detail: str,
    *,
    rejected_at_ms: int | None = None,
) -> bytes:
    """Encode the dead-letter envelope of one rejected message as UTF-8 JSON.

    ``timestamp_ms`` is the original Kafka timestamp (None when it had none) and
    ``rejected_at_ms`` defaults to now. Raises ValueError for a reason code outside
    REASONS or a negative partition or offset, because those are bugs in the caller.
    """
    if reason not in REASONS:
        raise ValueError(f"unknown dead-letter reason {reason!r}; expected one of {', '.join(sorted(REASONS))}")
    if partition < 0 or offset < 0:
        raise ValueError(f"invalid source position {topic}[{partition}] offset={offset}; both must be >= 0")

    if rejected_at_ms is None:
        rejected_at_ms = time.time_ns() // 1_000_000
    envelope = {
        "key_b64": _encode_bytes(_kept(key)),
        "value_b64": _encode_bytes(_kept(value)),
        "source": {"topic": topic, "partition": partition, "offset": offset, "timestamp_ms": timestamp_ms},
        "reason": reason,
        "detail": _fit_detail(detail),
        "rejected_at_ms": rejected_at_ms,
    }
    for field, data in (("key_truncated", key), ("value_truncated", value)):
        if data is not None and len(data) > MAX_KEPT_BYTES:
            envelope[field] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    # ensure_ascii keeps the output valid UTF-8 even when detail contains a lone surrogate.
    return json.dumps(envelope, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def parse_dead_letter(data: bytes) -> DeadLetter:
    """Decode an envelope written by build_dead_letter; raises ValueError when it is malformed."""
    try:
        envelope = json.loads(data)
        source = envelope["source"]
        return DeadLetter(
            key=_decode_bytes(envelope["key_b64"]),
            value=_decode_bytes(envelope["value_b64"]),
            topic=source["topic"],
            partition=source["partition"],
            offset=source["offset"],
            timestamp_ms=source["timestamp_ms"],
            reason=envelope["reason"],
            detail=envelope["detail"],
            rejected_at_ms=envelope["rejected_at_ms"],
        )
    except (ValueError, KeyError, TypeError) as exc:  # binascii.Error is a ValueError
        raise ValueError(f"invalid dead-letter envelope: {exc!r}") from exc


def _kept(data: bytes | None) -> bytes | None:
    return data[:MAX_KEPT_BYTES] if data is not None else None


def _encode_bytes(data: bytes | None) -> str | None:
    if data is None:
        return None
    return base64.b64encode(data).decode("ascii")


def _decode_bytes(text: str | None) -> bytes | None:
    if text is None:
        return None
    return base64.b64decode(text, validate=True)


def _fit_detail(detail: str) -> str:
    if len(detail) <= MAX_DETAIL_CHARS:
        return detail
    return detail[: MAX_DETAIL_CHARS - len(_ELLIPSIS)] + _ELLIPSIS
