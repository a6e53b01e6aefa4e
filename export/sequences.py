"""Per-user sequences, the leave-one-out split and the item and event-type vocabularies.

Ordering rule: a user's interactions are sorted by the integer timestamp, and equal
timestamps keep file order (the line number). The last interaction is the test target,
the one before it the validation target, and the rest is training data.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from export.data import Interaction

# Fixed order: an event type's index in the model is its position here.
EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase", "rating")

# A strong interaction: one of these event types, or a rating of at least
# STRONG_MIN_RATING. A rating without a value, a view and a click are not strong.
STRONG_EVENT_TYPES: tuple[str, ...] = ("add_to_cart", "purchase")
STRONG_MIN_RATING = 4.0

# Item index 0 is the unknown item and the padding value. It is never recommended.
UNKNOWN_ITEM_INDEX = 0

# A split needs a training prefix of at least one item before validation and test.
MIN_INTERACTIONS_PER_USER = 3


def natural_id_key(identifier: str) -> tuple[int, int, str]:
    """Sort key that puts numeric ids first in numeric order, then other ids as strings."""
    if identifier.isdigit():
        return (0, int(identifier), identifier)
    return (1, 0, identifier)


class ItemVocabulary:
    """Mapping between item ids and model indices, with index 0 for unknown items."""

    def __init__(self, item_ids: Sequence[str]):
        if len(set(item_ids)) != len(item_ids):
            raise ValueError("Item ids in a vocabulary must be unique.")
        self._ids = [""] + list(item_ids)
        self._index = {item_id: index for index, item_id in enumerate(item_ids, start=1)}

    @classmethod
    def from_interactions(cls, interactions: Iterable[Interaction]) -> ItemVocabulary:
        """Build the vocabulary of every item in the log, numeric ids in numeric order.

        With MovieLens ids 1..1682 this makes each item's index equal to its id.
        """
        item_ids = {interaction.item_id for interaction in interactions}
        return cls(sorted(item_ids, key=natural_id_key))

    def __len__(self) -> int:
        """Number of indices, including the unknown index 0."""
        return len(self._ids)

    def index_of(self, item_id: str) -> int:
        return self._index.get(item_id, UNKNOWN_ITEM_INDEX)

    def id_of(self, index: int) -> str:
        if not 1 <= index < len(self._ids):
            raise IndexError(f"Item index {index} is outside 1..{len(self._ids) - 1}.")
        return self._ids[index]

    @property
    def item_ids(self) -> list[str]:
        """Known item ids in index order, starting at index 1."""
        return self._ids[1:]


def event_type_index(event_type: str) -> int:
    try:
        return EVENT_TYPES.index(event_type)
    except ValueError:
        raise ValueError(
            f"Unknown event type {event_type!r}; expected one of {', '.join(EVENT_TYPES)}."
        ) from None


def strong_labels(event_types: np.ndarray, values: np.ndarray | None) -> np.ndarray:
    """Return 1.0 where an event is a strong interaction, else 0.0, in the shape of ``event_types``.

    ``event_types`` contains indices into EVENT_TYPES and ``values`` the event values (NaN
    where absent), or None when no event has a value.
    """
    event_types = np.asarray(event_types)
    strong_types = [EVENT_TYPES.index(name) for name in STRONG_EVENT_TYPES]
    strong = np.isin(event_types, strong_types)
    if values is not None:
        values = np.asarray(values, dtype=np.float64)
        # NaN >= 4 is False, so a rating without a value is not strong.
        with np.errstate(invalid="ignore"):
            strong |= (event_types == EVENT_TYPES.index("rating")) & (values >= STRONG_MIN_RATING)
    return strong.astype(np.float32)


@dataclass(frozen=True)
class UserSplit:
    """One user's leave-one-out split, as item and event-type indices and event values."""

    user_id: str
    train_items: np.ndarray  # (train_length,) int64
    train_event_types: np.ndarray  # (train_length,) int64
    valid_item: int
    valid_event_type: int
    test_item: int
    test_event_type: int
    # Event values (ratings), NaN where an event has none; None when no event has one.
    train_values: np.ndarray | None = None  # (train_length,) float32
    valid_value: float = float("nan")
    test_value: float = float("nan")
    # Time of the test interaction in epoch milliseconds; None when the split was built without it.
    test_timestamp_ms: int | None = None

    def test_prefix(self) -> tuple[np.ndarray, np.ndarray]:
        """Return the test input: the training items followed by the validation item."""
        items = np.append(self.train_items, self.valid_item)
        event_types = np.append(self.train_event_types, self.valid_event_type)
        return items, event_types

    def train_value_array(self) -> np.ndarray:
        """Return the training values, all NaN when the log has none: (train_length,) float32."""
        if self.train_values is None:
            return np.full(len(self.train_items), np.nan, dtype=np.float32)
        return self.train_values

    def test_prefix_values(self) -> np.ndarray:
        """Return the values of the test input, aligned with test_prefix: (train_length + 1,) float32."""
        return np.append(self.train_value_array(), np.float32(self.valid_value)).astype(np.float32)

    def train_strong_labels(self) -> np.ndarray:
        """Return the strong label of each training event: (train_length,) float32 of 0/1."""
        return strong_labels(self.train_event_types, self.train_values)

    @property
    def valid_strong(self) -> float:
        return float(strong_labels(np.array([self.valid_event_type]), np.array([self.valid_value]))[0])

    @property
    def test_strong(self) -> float:
        return float(strong_labels(np.array([self.test_event_type]), np.array([self.test_value]))[0])


class ItemFeatures:
    """A 0/1 table of item side features (genres, release decade, categories) by item index.

    Row 0 (the unknown item) has no features. Column j is the feature ``names[j]``.
    """

    def __init__(self, names: Sequence[str], table: np.ndarray):
        if table.ndim != 2 or table.shape[1] != len(names):
            raise ValueError(f"Feature table of shape {table.shape} does not match {len(names)} feature names.")
        self.names = list(names)
        self.table = table.astype(np.float32)  # (num_items, num_features)

    @classmethod
    def from_item_tags(cls, vocabulary: ItemVocabulary, tags: dict[str, Sequence[str]]) -> ItemFeatures:
        """Build the table from {item id: feature names}; items without an entry get none."""
        names = sorted({name for item_tags in tags.values() for name in item_tags})
        column = {name: index for index, name in enumerate(names)}
        table = np.zeros((len(vocabulary), len(names)), dtype=np.float32)
        for item_id, item_tags in tags.items():
            index = vocabulary.index_of(item_id)
            if index == UNKNOWN_ITEM_INDEX:
                continue  # an item with features but no events is outside the vocabulary
            table[index, [column[name] for name in item_tags]] = 1.0
        return cls(names, table)

    @property
    def num_features(self) -> int:
        return len(self.names)


@dataclass(frozen=True)
class SplitDataset:
    """The split of every user, with the vocabulary it was indexed by."""

    vocabulary: ItemVocabulary
    users: list[UserSplit]
    # Users with fewer than MIN_INTERACTIONS_PER_USER interactions, left out of the split.
    skipped_users: list[str]
    num_interactions: int
    item_features: ItemFeatures | None = None

    @property
    def has_values(self) -> bool:
        """True when at least one training event has a value."""
        return any(user.train_values is not None for user in self.users)

    def value_scaling(self) -> tuple[float, float]:
        """Return (mean, standard deviation) of the training values, for standardising them."""
        present = [values[~np.isnan(values)] for user in self.users if (values := user.train_values) is not None]
        values = np.concatenate(present) if present else np.empty(0)
        if values.size == 0:
            return 0.0, 1.0
        return float(values.mean()), float(values.std()) or 1.0

    @property
    def num_items(self) -> int:
        """Size of the item index space, including index 0."""
        return len(self.vocabulary)


def sort_by_user(interactions: Iterable[Interaction]) -> dict[str, list[Interaction]]:
    """Group interactions by user, each list sorted by (timestamp_ms, line).

    Users come out in natural id order.
    """
    by_user: dict[str, list[Interaction]] = {}
    for interaction in interactions:
        by_user.setdefault(interaction.user_id, []).append(interaction)

    ordered = {}
    for user_id in sorted(by_user, key=natural_id_key):
        ordered[user_id] = sorted(by_user[user_id], key=lambda event: (event.timestamp_ms, event.line))
    return ordered


def split_leave_one_out(
    interactions: Sequence[Interaction],
    vocabulary: ItemVocabulary | None = None,
    item_tags: dict[str, Sequence[str]] | None = None,
) -> SplitDataset:
    """Split every user's sequence into training prefix, validation item and test item.

    The vocabulary defaults to every item in ``interactions``, so validation and test
    items have an index even when no training prefix contains them. ``item_tags`` maps
    item ids to side feature names and becomes the dataset's item feature table.
    """
    if vocabulary is None:
        vocabulary = ItemVocabulary.from_interactions(interactions)

    users = []
    skipped = []
    for user_id, events in sort_by_user(interactions).items():
        if len(events) < MIN_INTERACTIONS_PER_USER:
            skipped.append(user_id)
            continue

        items = np.array([vocabulary.index_of(event.item_id) for event in events], dtype=np.int64)
        event_types = np.array([event_type_index(event.event_type) for event in events], dtype=np.int64)
        values = None
        if any(event.value is not None for event in events):
            values = np.array([np.nan if event.value is None else event.value for event in events], dtype=np.float32)
        users.append(
            UserSplit(
                user_id=user_id,
                train_items=items[:-2],
                train_event_types=event_types[:-2],
                valid_item=int(items[-2]),
                valid_event_type=int(event_types[-2]),
                test_item=int(items[-1]),
                test_event_type=int(event_types[-1]),
                train_values=None if values is None else values[:-2],
                valid_value=float("nan") if values is None else float(values[-2]),
                test_value=float("nan") if values is None else float(values[-1]),
                test_timestamp_ms=events[-1].timestamp_ms,
            )
        )

    return SplitDataset(
        vocabulary=vocabulary,
        users=users,
        skipped_users=skipped,
        num_interactions=len(interactions),
        item_features=ItemFeatures.from_item_tags(vocabulary, item_tags) if item_tags else None,
    )
