"""Live popularity counts: the codec, how counts add up and age, and the view the ranking reads."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from worker.popularity import CountCodecError, PopularityView, activity_records, decode_count, encode_count, merge_counts

DAY_MS = 86_400_000
DAY_S = 86_400.0


def _model(item_ids: list[str], version: str = "v1") -> SimpleNamespace:
    return SimpleNamespace(version=version, item_ids=item_ids, item_index={item: index for index, item in enumerate(item_ids) if index})


def test_count_codec_round_trip() -> None:
    assert decode_count(encode_count((2.5, 1_700_000_000_000))) == (2.5, 1_700_000_000_000)


@pytest.mark.parametrize("data", [b"", b"\x00" * 15, encode_count((1.0, 5)) + b"\x00"])
def test_count_codec_rejects_wrong_size(data: bytes) -> None:
    with pytest.raises(CountCodecError, match="expected 16"):
        decode_count(data)


def test_count_codec_rejects_negative_weight() -> None:
    with pytest.raises(CountCodecError, match="invalid weight"):
        decode_count(encode_count((-1.0, 5)))


def test_merge_ages_older_count() -> None:
    merged = merge_counts((4.0, 0), (1.0, DAY_MS), half_life_s=DAY_S)

    assert merged == (3.0, DAY_MS)  # 4 halves over one half-life, then 1 is added


def test_merge_is_order_independent() -> None:
    first, second = (4.0, 0), (1.0, 2 * DAY_MS)

    assert merge_counts(first, second, DAY_S) == merge_counts(second, first, DAY_S)


def test_activity_folds_events_per_item() -> None:
    weights = {"view": 1.0, "purchase": 8.0}
    events = [("a", "view", 0), ("b", "purchase", 0), ("a", "purchase", DAY_MS), ("c", "custom", 0)]

    counts = activity_records(events, weights, DAY_S)

    assert counts["a"] == (8.5, DAY_MS)
    assert counts["b"] == (8.0, 0)
    assert counts["c"] == (1.0, 0)  # an unlisted type weighs as a view


def test_activity_skips_zero_weight_types() -> None:
    assert activity_records([("a", "view", 0)], {"view": 0.0}, DAY_S) == {}


def test_view_ages_counts_to_stream_time() -> None:
    view = PopularityView(half_life_s=DAY_S)
    view.update("old", encode_count((8.0, 0)))
    view.update("new", encode_count((3.0, 2 * DAY_MS)))

    assert view.count("old") == pytest.approx(2.0)
    assert view.count("new") == pytest.approx(3.0)
    assert view.count("unseen") == 0.0


def test_view_counts_by_model_index() -> None:
    view = PopularityView(half_life_s=DAY_S)
    model = _model(["", "a", "b", "c"])
    view.update("a", encode_count((2.0, DAY_MS)))
    assert view.counts(model, np.array([[1, 2, 3]])) == pytest.approx(np.array([[2.0, 0.0, 0.0]]))

    view.update("c", encode_count((5.0, DAY_MS)))  # arrives after the arrays were built
    view.update("a", None)  # a tombstone

    np.testing.assert_allclose(view.counts(model, np.array([[1, 2, 3]])), [[0.0, 0.0, 5.0]])
    assert len(view) == 1


def test_view_empty_returns_none() -> None:
    assert PopularityView(half_life_s=DAY_S).counts(_model(["", "a"]), np.array([[1]])) is None


def test_view_rebuilds_index_for_new_model() -> None:
    view = PopularityView(half_life_s=DAY_S)
    view.update("b", encode_count((2.0, 0)))
    view.counts(_model(["", "a", "b"]), np.array([[1]]))

    counts = view.counts(_model(["", "b"], version="v2"), np.array([[1]]))

    np.testing.assert_allclose(counts, [[2.0]])
