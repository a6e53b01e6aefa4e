"""Per-user state record and its compact binary codec (the RocksDB table value).

Layout (little endian), format 2:

    magic  b"US" | format u8 | flags u8 (bit 0: cell state present, bit 1: recent values present)
    model_version    str16          (u16 length + UTF-8 bytes)
    events_absorbed  u64
    last_partition   i32
    last_offset      i64            (-1 when unknown)
    last_timestamp   i64            (epoch ms of the last applied event)
    last_event_id    str16
    num_layers u16 | hidden_size u16
    hidden           float32[num_layers * hidden_size]
    cell             float32[num_layers * hidden_size]   (LSTM only)
    recent count u16, then per entry: item_id str16 | event_type str16 | event_id str16
                                      [| value f32, when flags bit 1 is set]

Values are written only when at least one recent event has one; an entry without a
value then stores NaN. They are float32 because the step graph takes float32 values.
Format 1 is the same without bit 1; it is still read. Floats are stored as raw bytes,
so a round trip of float32 values is exact.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numpy as np

MAGIC = b"US"
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)
_FLAG_CELL = 1
_FLAG_VALUES = 2
_HEADER = struct.Struct("<2sBB")
_COUNTERS = struct.Struct("<QiqQ")
_SHAPE = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_F32 = struct.Struct("<f")


class StateCodecError(ValueError):
    """A stored state record cannot be decoded."""


@dataclass(frozen=True)
class RecentEvent:
    """One applied event as remembered in the state: enough to rebuild and deduplicate."""

    item_id: str
    event_type: str
    event_id: str
    # The event's value (a rating, a price), which a model with a value input needs to rebuild the state.
    value: float | None = None


@dataclass
class UserState:
    """The recurrent state of one user and the bookkeeping that makes replays idempotent."""

    model_version: str
    hidden: np.ndarray  # (num_layers, hidden_size) float32
    cell: np.ndarray | None = None  # (num_layers, hidden_size) float32, LSTM only
    events_absorbed: int = 0
    last_partition: int = -1
    last_offset: int = -1
    last_timestamp_ms: int = 0
    last_event_id: str = ""
    recent: list[RecentEvent] = field(default_factory=list)

    def has_applied(self, partition: int, offset: int, event_id: str) -> bool:
        """Tell whether an event was already applied: by offset within the same partition, or by id."""
        if partition == self.last_partition and offset <= self.last_offset:
            return True
        return any(entry.event_id == event_id for entry in self.recent)

    def remember(self, entry: RecentEvent, max_recent: int) -> None:
        self.recent.append(entry)
        if len(self.recent) > max_recent:
            del self.recent[: len(self.recent) - max_recent]


def _pack_str(text: str) -> bytes:
    data = text.encode("utf-8")
    if len(data) > 0xFFFF:
        raise StateCodecError(f"string of {len(data)} bytes does not fit the state record (max 65535)")
    return _U16.pack(len(data)) + data


def encode_state(state: UserState) -> bytes:
    """Serialise a UserState to bytes."""
    hidden = np.ascontiguousarray(state.hidden, dtype="<f4")
    if hidden.ndim != 2:
        raise StateCodecError(f"hidden state must be (num_layers, hidden_size), got shape {hidden.shape}")
    with_values = any(entry.value is not None for entry in state.recent)
    flags = 0
    if state.cell is not None:
        flags |= _FLAG_CELL
    if with_values:
        flags |= _FLAG_VALUES

    parts = [
        _HEADER.pack(MAGIC, FORMAT_VERSION, flags),
        _pack_str(state.model_version),
        _COUNTERS.pack(state.events_absorbed, state.last_partition, state.last_offset, state.last_timestamp_ms),
        _pack_str(state.last_event_id),
        _SHAPE.pack(*hidden.shape),
        hidden.tobytes(),
    ]
    if state.cell is not None:
        cell = np.ascontiguousarray(state.cell, dtype="<f4")
        if cell.shape != hidden.shape:
            raise StateCodecError(f"cell state shape {cell.shape} differs from hidden state shape {hidden.shape}")
        parts.append(cell.tobytes())

    parts.append(_U16.pack(len(state.recent)))
    for entry in state.recent:
        parts += [_pack_str(entry.item_id), _pack_str(entry.event_type), _pack_str(entry.event_id)]
        if with_values:
            parts.append(_F32.pack(float("nan") if entry.value is None else entry.value))
    return b"".join(parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.view = memoryview(data)
        self.pos = 0

    def take(self, size: int) -> memoryview:
        end = self.pos + size
        if end > len(self.view):
            raise StateCodecError(f"state record truncated: needed {end} bytes, have {len(self.view)}")
        chunk = self.view[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: struct.Struct) -> tuple:
        return fmt.unpack(self.take(fmt.size))

    def string(self) -> str:
        (length,) = self.unpack(_U16)
        try:
            return str(self.take(length), "utf-8")
        except UnicodeDecodeError as exc:
            raise StateCodecError(f"state record has an invalid UTF-8 string at byte {self.pos - length}") from exc

    def floats(self, count: int) -> np.ndarray:
        return np.frombuffer(self.take(4 * count), dtype="<f4").astype(np.float32)


def _read_recent_event(reader: _Reader, with_value: bool) -> RecentEvent:
    item_id, event_type, event_id = reader.string(), reader.string(), reader.string()
    if not with_value:
        return RecentEvent(item_id, event_type, event_id)
    (value,) = reader.unpack(_F32)
    return RecentEvent(item_id, event_type, event_id, None if value != value else value)


def decode_state(data: bytes) -> UserState:
    """Parse bytes written by encode_state; raise StateCodecError on anything else."""
    reader = _Reader(data)
    magic, version, flags = reader.unpack(_HEADER)
    if magic != MAGIC or version not in READABLE_FORMAT_VERSIONS:
        raise StateCodecError(f"not a state record of format {READABLE_FORMAT_VERSIONS}: header {bytes(data[:4])!r}")

    model_version = reader.string()
    events_absorbed, last_partition, last_offset, last_timestamp_ms = reader.unpack(_COUNTERS)
    last_event_id = reader.string()
    num_layers, hidden_size = reader.unpack(_SHAPE)
    hidden = reader.floats(num_layers * hidden_size).reshape(num_layers, hidden_size)
    cell = None
    if flags & _FLAG_CELL:
        cell = reader.floats(num_layers * hidden_size).reshape(num_layers, hidden_size)

    (count,) = reader.unpack(_U16)
    recent = [_read_recent_event(reader, bool(flags & _FLAG_VALUES)) for _ in range(count)]
    if reader.pos != len(data):
        raise StateCodecError(f"state record has {len(data) - reader.pos} trailing bytes")

    return UserState(
        model_version=model_version,
        hidden=hidden,
        cell=cell,
        events_absorbed=events_absorbed,
        last_partition=last_partition,
        last_offset=last_offset,
        last_timestamp_ms=last_timestamp_ms,
        last_event_id=last_event_id,
        recent=recent,
    )
