"""build_dead_letter writes envelopes that match the dead-letter schema and keep the original bytes."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import load_validator
from worker.dead_letters import MAX_DETAIL_CHARS, MAX_KEPT_BYTES, REASONS, build_dead_letter, parse_dead_letter

VALIDATOR = load_validator("dead_letter")


def _build(**overrides) -> bytes:
    arguments = {
        "key": b"u-1001",
        "value": b'{"event_id": "e1", "user_id": ',
        "topic": "user-events",
        "partition": 3,
        "offset": 1290,
        "timestamp_ms": 1714564800042,
        "reason": "invalid_json",
        "detail": "message value is not valid JSON",
    }
    arguments.update(overrides)
    return build_dead_letter(**arguments)


def _errors(envelope: bytes) -> list[str]:
    return [error.message for error in VALIDATOR.iter_errors(json.loads(envelope))]


@pytest.mark.parametrize("reason", sorted(REASONS))
def test_envelope_valid_for_every_reason(reason: str) -> None:
    envelope = _build(reason=reason)

    assert _errors(envelope) == []
    assert json.loads(envelope)["reason"] == reason


def test_envelope_fields() -> None:
    envelope = json.loads(_build(rejected_at_ms=1714564800060))

    assert base64.b64decode(envelope["key_b64"]) == b"u-1001"
    assert base64.b64decode(envelope["value_b64"]) == b'{"event_id": "e1", "user_id": '
    assert envelope["source"] == {"topic": "user-events", "partition": 3, "offset": 1290, "timestamp_ms": 1714564800042}
    assert envelope["detail"] == "message value is not valid JSON"
    assert envelope["rejected_at_ms"] == 1714564800060


def test_envelope_rejected_at_defaults_to_now() -> None:
    before = time.time_ns() // 1_000_000
    envelope = json.loads(_build())
    after = time.time_ns() // 1_000_000

    assert before <= envelope["rejected_at_ms"] <= after


def test_envelope_without_key_value_or_timestamp() -> None:
    envelope = _build(key=None, value=None, timestamp_ms=None, reason="empty_value")
    parsed = json.loads(envelope)

    assert _errors(envelope) == []
    assert parsed["key_b64"] is None
    assert parsed["value_b64"] is None
    assert parsed["source"]["timestamp_ms"] is None


def test_long_detail_cut_to_schema_limit() -> None:
    envelope = _build(detail="x" * 10_000)
    detail = json.loads(envelope)["detail"]

    assert _errors(envelope) == []
    assert len(detail) == MAX_DETAIL_CHARS
    assert detail.endswith("...")


def test_detail_with_lone_surrogate_stays_utf8() -> None:
    envelope = _build(detail="bad \ud800 id")

    envelope.decode("utf-8")
    assert json.loads(envelope)["detail"] == "bad \ud800 id"


def test_huge_value_kept_as_prefix() -> None:
    value = bytes(range(256)) * 3600  # 921,600 bytes: a 1 MiB message once base64-encoded in full

    data = build_dead_letter(b"u1", value, "user-events", 0, 7, 1, "oversized", "too large")

    envelope = json.loads(data)
    assert len(data) < 1024 * 1024 // 2
    assert list(load_validator("dead_letter").iter_errors(envelope)) == []
    assert envelope["value_truncated"] == {"size": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    assert parse_dead_letter(data).value == value[:MAX_KEPT_BYTES]
    assert "key_truncated" not in envelope


def test_unknown_reason_raises() -> None:
    with pytest.raises(ValueError, match="unknown dead-letter reason 'bad_vibes'"):
        _build(reason="bad_vibes")


def test_negative_offset_raises() -> None:
    with pytest.raises(ValueError, match="offset=-1"):
        _build(offset=-1)


@settings(max_examples=200, deadline=None)
@given(
    key=st.one_of(st.none(), st.binary(max_size=64)),
    value=st.one_of(st.none(), st.binary(max_size=512)),
    reason=st.sampled_from(sorted(REASONS)),
    detail=st.text(max_size=3000),
    partition=st.integers(min_value=0, max_value=2**31 - 1),
    offset=st.integers(min_value=0, max_value=2**63 - 1),
)
def test_envelope_round_trips_original_bytes(key, value, reason, detail, partition, offset) -> None:
    envelope = build_dead_letter(key, value, "user-events", partition, offset, 5, reason, detail, rejected_at_ms=9)
    parsed = parse_dead_letter(envelope)

    assert _errors(envelope) == []
    assert parsed.key == key
    assert parsed.value == value
    assert (parsed.partition, parsed.offset, parsed.timestamp_ms) == (partition, offset, 5)
    assert parsed.reason == reason
    if len(detail) <= MAX_DETAIL_CHARS:
        assert parsed.detail == detail
    else:
        assert parsed.detail == detail[: MAX_DETAIL_CHARS - 3] + "..."


def test_parse_malformed_envelope_raises() -> None:
    with pytest.raises(ValueError, match="invalid dead-letter envelope"):
        parse_dead_letter(b'{"key_b64": "!!", "value_b64": null}')
