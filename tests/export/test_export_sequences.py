from __future__ import annotations

import csv

import numpy as np
import pytest
from export_helpers import make_interactions

from export.data import Interaction, load_movielens
from export.sequences import EVENT_TYPES, ItemVocabulary, event_type_index, sort_by_user, split_leave_one_out


def test_split_matches_reference_for_every_user(movielens_path):
    dataset = split_leave_one_out(load_movielens(movielens_path))
    with (movielens_path / "reference_split.tsv").open(newline="") as file:
        reference = {row["user_id"]: row for row in csv.DictReader(file, delimiter="\t")}

    ours = {user.user_id: user for user in dataset.users}
    assert len(reference) == 943
    assert set(ours) == set(reference)
    assert dataset.skipped_users == []

    mismatches = []
    for user_id, row in reference.items():
        user = ours[user_id]
        test_item = dataset.vocabulary.id_of(user.test_item)
        valid_item = dataset.vocabulary.id_of(user.valid_item)
        if (test_item, valid_item) != (row["test_item"], row["valid_item"]):
            mismatches.append((user_id, test_item, valid_item, row["test_item"], row["valid_item"]))
    assert mismatches == []


def test_split_sizes_add_up(movielens_path):
    dataset = split_leave_one_out(load_movielens(movielens_path))

    train_events = sum(len(user.train_items) for user in dataset.users)
    assert train_events + 2 * len(dataset.users) == 100_000
    assert dataset.num_interactions == 100_000


def test_sort_uses_integer_timestamp_then_line():
    # Two timestamps that collide as float32 must still sort apart.
    late, early = 1_000_000_001, 1_000_000_000
    assert np.float32(late * 1000) == np.float32(early * 1000)
    interactions = make_interactions(
        [("u", "a", late), ("u", "b", early), ("u", "c", 5), ("u", "d", 5), ("v", "a", 1), ("v", "b", 1), ("v", "c", 1)]
    )

    ordered = sort_by_user(interactions)

    assert [event.item_id for event in ordered["u"]] == ["c", "d", "b", "a"]
    assert [event.item_id for event in ordered["v"]] == ["a", "b", "c"]


def test_split_last_is_test_and_previous_is_valid():
    interactions = make_interactions([("u", "3", 30), ("u", "1", 10), ("u", "2", 20), ("u", "4", 40)])

    dataset = split_leave_one_out(interactions)

    user = dataset.users[0]
    vocabulary = dataset.vocabulary
    assert [vocabulary.id_of(index) for index in user.train_items] == ["1", "2"]
    assert vocabulary.id_of(user.valid_item) == "3"
    assert vocabulary.id_of(user.test_item) == "4"
    assert list(user.train_event_types) == [EVENT_TYPES.index("rating")] * 2
    items, _ = user.test_prefix()
    assert [vocabulary.id_of(index) for index in items] == ["1", "2", "3"]


def test_short_users_are_reported_not_split():
    interactions = make_interactions([("u", "1", 1), ("u", "2", 2), ("v", "1", 1), ("v", "2", 2), ("v", "3", 3)])

    dataset = split_leave_one_out(interactions)

    assert [user.user_id for user in dataset.users] == ["v"]
    assert dataset.skipped_users == ["u"]


def test_vocabulary_reserves_zero_and_orders_numeric_ids():
    vocabulary = ItemVocabulary.from_interactions(make_interactions([("u", "10", 1), ("u", "x", 2), ("u", "2", 3)]))

    assert len(vocabulary) == 4
    assert vocabulary.item_ids == ["2", "10", "x"]
    assert vocabulary.index_of("2") == 1
    assert vocabulary.index_of("x") == 3
    assert vocabulary.index_of("never seen") == 0
    with pytest.raises(IndexError):
        vocabulary.id_of(0)


def test_movielens_item_index_equals_item_id(movielens_path):
    vocabulary = ItemVocabulary.from_interactions(load_movielens(movielens_path))

    assert len(vocabulary) == 1683
    assert all(vocabulary.index_of(str(item)) == item for item in range(1, 1683))


def test_event_types_are_fixed():
    assert EVENT_TYPES == ("view", "click", "add_to_cart", "purchase", "rating")
    assert event_type_index("purchase") == 3
    with pytest.raises(ValueError, match="Unknown event type 'like'"):
        event_type_index("like")


def test_split_uses_event_types():
    interactions = [
        Interaction("u", "1", 1, "view", None, 1),
        Interaction("u", "2", 2, "click", None, 2),
        Interaction("u", "3", 3, "purchase", 9.5, 3),
    ]

    user = split_leave_one_out(interactions).users[0]

    assert list(user.train_event_types) == [0]
    assert user.valid_event_type == 1
    assert user.test_event_type == 3
