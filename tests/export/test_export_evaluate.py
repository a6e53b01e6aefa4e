from __future__ import annotations

import math

import numpy as np
import pytest
from export_helpers import make_interactions

from export.evaluate import (
    CooccurrenceCounts,
    RankingAccumulator,
    catalogue_coverage,
    evaluate_cooccurrence,
    evaluate_popularity,
    metrics_at_cutoff,
    popularity_counts,
    rank_targets,
    top_items,
)
from export.sequences import split_leave_one_out


def test_rank_counts_better_candidates_only():
    scores = np.array(
        [
            [9.0, 5.0, 4.0, 3.0, 2.0, 1.0],  # index 0 and excluded item 1 outscore the target
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],  # the target is excluded: a miss
        ]
    )
    targets = np.array([2, 3, 5])
    excluded = [np.array([1]), np.array([], dtype=np.int64), np.array([5, 4])]

    ranks = rank_targets(scores, targets, excluded)

    assert ranks.tolist() == [0.0, 2.0, math.inf]


def test_rank_counts_ties_against_target():
    scores = np.array([[0.0, 2.0, 2.0, 2.0, 1.0]])

    ranks = rank_targets(scores, np.array([2]), [np.array([], dtype=np.int64)])

    assert ranks.tolist() == [2.0]


def test_rank_of_unknown_target_is_miss():
    scores = np.array([[100.0, 1.0, 2.0]])

    assert rank_targets(scores, np.array([0]), [np.array([], dtype=np.int64)]).tolist() == [math.inf]


def test_metrics_at_cutoff_hand_computed():
    ranks = np.array([0.0, 1.0, 9.0, 10.0, math.inf])

    metrics = metrics_at_cutoff(ranks, 10)

    assert metrics["recall@10"] == pytest.approx(3 / 5)
    assert metrics["ndcg@10"] == pytest.approx((1.0 + 1.0 / math.log2(3) + 1.0 / math.log2(11)) / 5)
    assert metrics["mrr@10"] == pytest.approx((1.0 + 1.0 / 2 + 1.0 / 10) / 5)


def test_metrics_at_small_cutoff():
    ranks = np.array([0.0, 2.0, math.inf])

    at_one = metrics_at_cutoff(ranks, 1)
    at_three = metrics_at_cutoff(ranks, 3)

    assert at_one == pytest.approx({"recall@1": 1 / 3, "ndcg@1": 1 / 3, "mrr@1": 1 / 3})
    assert at_three == pytest.approx({"recall@3": 2 / 3, "ndcg@3": 0.5, "mrr@3": 4 / 9})


def test_coverage_counts_distinct_known_items():
    recommended = np.array([[1, 2], [2, 3], [3, 0]])

    assert catalogue_coverage(recommended, num_known_items=4) == pytest.approx(3 / 4)


def test_top_items_skip_excluded_and_pad_with_zero():
    scores = np.array([[5.0, 4.0, 3.0, 2.0]])

    top = top_items(scores, [np.array([1])], k=4)

    assert top.tolist() == [[2, 3, 0, 0]]


def test_accumulator_reports_expected_keys_in_order():
    accumulator = RankingAccumulator(num_items=4)
    accumulator.add(np.array([[0.0, 3.0, 2.0, 1.0]]), np.array([2]), [np.array([], dtype=np.int64)])

    result = accumulator.result()

    assert list(result) == [
        "recall@10", "ndcg@10", "mrr@10", "recall@20", "ndcg@20", "mrr@20", "coverage@10", "coverage@20",
    ]
    assert result["mrr@10"] == pytest.approx(0.5)
    assert result["coverage@10"] == pytest.approx(1.0)


def tiny_split():
    """Three users over items 1..6; item 1 is popular, and 6 was once followed by 5.

    u1: train 1 6 5, valid 2, test 3
    u2: train 1 2 3, valid 4, test 5
    u3: train 1 4 3, valid 6, test 5
    """
    rows = []
    for user, items in (("u1", "16523"), ("u2", "12345"), ("u3", "14365")):
        rows += [(user, item, position) for position, item in enumerate(items)]
    return split_leave_one_out(make_interactions(rows))


def test_popularity_counts_training_prefixes_only():
    counts = popularity_counts(tiny_split())

    assert counts.tolist() == [0, 3, 1, 2, 1, 1, 1]


def test_cooccurrence_counts_direct_successors():
    cooccurrence = CooccurrenceCounts(tiny_split())

    followers = {item: dict(zip(*map(np.ndarray.tolist, cooccurrence.followers(item)))) for item in range(7)}

    assert followers == {0: {}, 1: {6: 1, 2: 1, 4: 1}, 2: {3: 1}, 3: {}, 4: {3: 1}, 5: {}, 6: {5: 1}}


def test_popularity_baseline_hand_computed():
    # Test ranks: u1 target 3 beats 4 (rank 0); u2 target 5 ties 6 (rank 1); u3 target 5 ties 2 (rank 1).
    metrics = evaluate_popularity(tiny_split(), "test")

    assert metrics["recall@10"] == pytest.approx(1.0)
    assert metrics["ndcg@10"] == pytest.approx((1.0 + 2.0 / math.log2(3)) / 3)
    assert metrics["mrr@10"] == pytest.approx(2 / 3)
    assert metrics["coverage@10"] == pytest.approx(5 / 6)


def test_cooccurrence_baseline_hand_computed():
    # As popularity, except u3 (last item 6, once followed by 5) now ranks target 5 first.
    metrics = evaluate_cooccurrence(tiny_split(), "test")

    assert metrics["ndcg@10"] == pytest.approx((2.0 + 1.0 / math.log2(3)) / 3)
    assert metrics["mrr@10"] == pytest.approx(5 / 6)
    assert metrics["coverage@10"] == pytest.approx(5 / 6)


def test_cooccurrence_beats_popularity_on_movielens(movielens_path):
    from export.data import load_movielens

    dataset = split_leave_one_out(load_movielens(movielens_path))

    popularity = evaluate_popularity(dataset, "test")
    cooccurrence = evaluate_cooccurrence(dataset, "test")

    assert 0.02 < popularity["ndcg@10"] < cooccurrence["ndcg@10"]
