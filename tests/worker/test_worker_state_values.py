"""Event values in the state codec (format 2), and reading format 1 records."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from worker.state import RecentEvent, StateCodecError, UserState, decode_state, encode_state


def state_with(recent: list[RecentEvent]) -> UserState:
    return UserState(model_version="v1", hidden=np.arange(6, dtype=np.float32).reshape(2, 3), recent=recent)


def test_values_round_trip_with_absent_ones():
    recent = [RecentEvent("10", "rating", "e1", 4.0), RecentEvent("11", "view", "e2", None), RecentEvent("12", "purchase", "e3", 19.5)]

    decoded = decode_state(encode_state(state_with(recent)))

    assert decoded.recent == recent


def test_state_without_values_stores_no_value_bytes():
    plain = [RecentEvent("10", "rating", "e1"), RecentEvent("11", "view", "e2")]
    valued = [RecentEvent("10", "rating", "e1", 1.0), RecentEvent("11", "view", "e2", 2.0)]

    plain_size = len(encode_state(state_with(plain)))

    assert len(encode_state(state_with(valued))) == plain_size + 2 * 4


def test_value_is_stored_as_float32():
    decoded = decode_state(encode_state(state_with([RecentEvent("10", "purchase", "e1", 0.1)])))

    assert decoded.recent[0].value == pytest.approx(float(np.float32(0.1)), abs=0)


def encode_format_1(state: UserState) -> bytes:
    """Write a record as a format 1 worker did: no value bit, no per-entry values."""
    def text(value: str) -> bytes:
        data = value.encode()
        return struct.pack("<H", len(data)) + data

    parts = [
        struct.pack("<2sBB", b"US", 1, 0), text(state.model_version),
        struct.pack("<QiqQ", state.events_absorbed, state.last_partition, state.last_offset, state.last_timestamp_ms),
        text(state.last_event_id), struct.pack("<HH", *state.hidden.shape), state.hidden.astype("<f4").tobytes(),
        struct.pack("<H", len(state.recent)),
    ]
    for entry in state.recent:
        parts += [text(entry.item_id), text(entry.event_type), text(entry.event_id)]
    return b"".join(parts)


def test_format_1_record_is_still_read():
    original = state_with([RecentEvent("10", "rating", "e1"), RecentEvent("11", "rating", "e2")])
    original.events_absorbed, original.last_offset = 2, 41

    decoded = decode_state(encode_format_1(original))

    assert decoded.recent == original.recent
    assert decoded.events_absorbed == 2
    assert decoded.last_offset == 41
    np.testing.assert_array_equal(decoded.hidden, original.hidden)


def test_unknown_format_is_rejected():
    record = bytearray(encode_state(state_with([])))
    record[2] = 9

    with pytest.raises(StateCodecError, match=r"format \(1, 2\)"):
        decode_state(bytes(record))
