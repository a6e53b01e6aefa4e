import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from worker.state import RecentEvent, StateCodecError, UserState, decode_state, encode_state

text = st.text(max_size=40)
floats32 = st.floats(width=32, allow_nan=False)


@st.composite
def user_states(draw):
    layers = draw(st.integers(1, 3))
    size = draw(st.integers(1, 16))
    values = draw(st.lists(floats32, min_size=layers * size, max_size=layers * size))
    hidden = np.array(values, dtype=np.float32).reshape(layers, size)
    cell = hidden[::-1].copy() if draw(st.booleans()) else None
    recent = draw(st.lists(st.builds(RecentEvent, text, text, text), max_size=8))
    return UserState(
        model_version=draw(text),
        hidden=hidden,
        cell=cell,
        events_absorbed=draw(st.integers(0, 2**63)),
        last_partition=draw(st.integers(-1, 2**31 - 1)),
        last_offset=draw(st.integers(-1, 2**62)),
        last_timestamp_ms=draw(st.integers(0, 2**62)),
        last_event_id=draw(text),
        recent=recent,
    )


@given(user_states())
@settings(max_examples=200, deadline=None)
def test_state_round_trip_is_exact(state):
    decoded = decode_state(encode_state(state))

    assert decoded.model_version == state.model_version
    assert decoded.hidden.dtype == np.float32
    assert np.array_equal(decoded.hidden, state.hidden)
    assert (decoded.cell is None) == (state.cell is None)
    if state.cell is not None:
        assert np.array_equal(decoded.cell, state.cell)
    assert decoded.events_absorbed == state.events_absorbed
    assert (decoded.last_partition, decoded.last_offset) == (state.last_partition, state.last_offset)
    assert decoded.last_timestamp_ms == state.last_timestamp_ms
    assert decoded.last_event_id == state.last_event_id
    assert decoded.recent == state.recent


@given(st.binary(max_size=200))
@settings(max_examples=300, deadline=None)
def test_decode_arbitrary_bytes_raises_only_codec_error(data):
    try:
        decode_state(data)
    except StateCodecError:
        pass


def test_decode_truncated_record_raises():
    state = UserState(model_version="v1", hidden=np.ones((1, 4), dtype=np.float32), recent=[RecentEvent("i", "view", "e")])
    data = encode_state(state)

    for cut in (3, len(data) // 2, len(data) - 1):
        with pytest.raises(StateCodecError):
            decode_state(data[:cut])


def test_gru_state_of_128_fits_in_under_1kib_with_50_recent():
    recent = [RecentEvent(str(1000 + i), "rating", f"ml-100k:{90000 + i}") for i in range(50)]
    state = UserState(model_version="0123456789abcdef", hidden=np.zeros((1, 128), dtype=np.float32), recent=recent)

    size = len(encode_state(state))

    assert 512 < size < 2048


def test_has_applied_by_offset_and_by_event_id():
    state = UserState(model_version="v", hidden=np.zeros((1, 2), dtype=np.float32), last_partition=3, last_offset=10)
    state.remember(RecentEvent("i1", "view", "evt-1"), max_recent=2)

    assert state.has_applied(3, 10, "new")
    assert state.has_applied(3, 9, "new")
    assert not state.has_applied(3, 11, "new")
    assert not state.has_applied(4, 5, "new")
    assert state.has_applied(4, 5, "evt-1")


def test_remember_keeps_only_most_recent():
    state = UserState(model_version="v", hidden=np.zeros((1, 2), dtype=np.float32))
    for i in range(5):
        state.remember(RecentEvent(f"i{i}", "view", f"e{i}"), max_recent=3)

    assert [entry.item_id for entry in state.recent] == ["i2", "i3", "i4"]
