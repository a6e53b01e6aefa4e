"""The dead-letter envelope: a rejected input message, its original bytes and the reason.

The envelope follows ``schemas/dead_letter.schema.json``. The dead-letter message is
produced with the original key bytes as its Kafka key, so it lands in the partition of
the user it belongs to.
"""

from __future__ import annotations

import base64
import json
import time
from dataclasses import dataclass

# Reason codes, the enum of the dead-letter schema (a test checks that both list the same codes).
EMPTY_VALUE = "empty_value"
INVALID_UTF8 = "invalid_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
INVALID_FIELD = "invalid_field"
UNKNOWN_EVENT_TYPE = "unknown_event_type"
INVALID_TIMESTAMP = "invalid_timestamp"
OVERSIZED = "oversized"
KEY_MISMATCH = "key_mismatch"
# The event decoded, but a later step (such as the model step) failed on it.
PROCESSING_ERROR = "processing_error"

REASONS = frozenset(
    {
        EMPTY_VALUE,
        INVALID_UTF8,
        INVALID_JSON,
        NOT_AN_OBJECT,
        MISSING_FIELD,
        INVALID_FIELD,
        UNKNOWN_EVENT_TYPE,
        INVALID_TIMESTAMP,
        OVERSIZED,
        KEY_MISMATCH,
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
        "key_b64": _encode_bytes(key),
        "value_b64": _encode_bytes(value),
        "source": {"topic": topic, "partition": partition, "offset": offset, "timestamp_ms": timestamp_ms},
        "reason": reason,
        "detail": _fit_detail(detail),
        "rejected_at_ms": rejected_at_ms,
    }

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
