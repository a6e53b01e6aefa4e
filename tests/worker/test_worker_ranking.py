"""Re-ranking in the processor: each objective and rule moves a constant graph's ranking the intended way."""

from __future__ import annotations

import asyncio
import json
import logging

import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from worker_bundle_helpers import ConstantBundle

from schemas import load_validator
from worker.config import Settings, SettingsError
from worker.metrics import WorkerMetrics
from worker.model import BundleError, load_bundle
from worker.processor import DictStore, InputMessage, Processor, check_model_settings

pytestmark = pytest.mark.multi_objective

# Preference order i1 > i2 > ... > i6. i3 converts best, i6 is the least preferred.
LOGITS = {"i1": 3.0, "i2": 2.5, "i3": 2.0, "i4": 1.0, "i5": 0.5, "i6": 0.0}
CONVERSION = {"i1": 0.05, "i2": 0.1, "i3": 0.9, "i4": 0.2, "i5": 0.1, "i6": 0.0}
CATEGORIES = {"i1": ["Drama"], "i2": ["Drama"], "i3": ["Drama", "War"], "i4": ["Comedy"], "i6": ["Comedy"]}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    bundle = ConstantBundle(LOGITS, conversion=CONVERSION, categories=CATEGORIES)
    return load_bundle(bundle.write(tmp_path_factory.mktemp("constant")))


@pytest.fixture(scope="module")
def model_without_extras(tmp_path_factory):
    """The same scores without the conversion head and the categories."""
    return load_bundle(ConstantBundle(LOGITS, model_version="constant-plain").write(tmp_path_factory.mktemp("plain")))


class FixedPopularity:
    """Popularity counts from a table of item ids; records each call."""

    def __init__(self, counts: dict[str, float] | None) -> None:
        self.table = counts
        self.calls: list[tuple[int, int]] = []

    def counts(self, model, item_indices: np.ndarray) -> np.ndarray | None:
        self.calls.append(item_indices.shape)
        if self.table is None:
            return None
        lookup = np.array([self.table.get(item_id, 0.0) for item_id in model.item_ids])
        return lookup[item_indices]


def event_messages(events: list[tuple[str, str, str]]) -> list[InputMessage]:
    """One message per (user id, item id, event type), in order."""
    messages = []
    for offset, (user_id, item_id, event_type) in enumerate(events):
        body = {"event_id": f"e{offset}", "user_id": user_id, "item_id": item_id, "event_type": event_type, "timestamp": 1_000 + offset}
        if event_type == "rating":
            body["value"] = 5
        messages.append(InputMessage(user_id.encode(), json.dumps(body).encode(), "events", 0, offset, 1_000 + offset))
    return messages


def make_processor(model, popularity=None, **settings) -> Processor:
    """Build a processor; top_k defaults to every candidate of the constant graph."""
    settings.setdefault("top_k", len(LOGITS))
    return Processor(Settings.from_env({}, **settings), model, WorkerMetrics(CollectorRegistry()), popularity=popularity)


def recommend(model, events=(("u1", "unknown", "view"),), popularity=None, **settings) -> list[dict]:
    """Return the messages that one batch of events publishes."""
    result = make_processor(model, popularity, **settings).process(event_messages(list(events)), DictStore())
    return [json.loads(output.value) for output in result.recommendations]


def ranked(model, **kwargs) -> list[str]:
    """Return the item ids of the last published message."""
    return [item["item_id"] for item in recommend(model, **kwargs)[-1]["items"]]


def test_preference_only_keeps_graph_order_and_logits(model):
    (body,) = recommend(model, top_k=3)

    assert [item["item_id"] for item in body["items"]] == ["i1", "i2", "i3"]
    assert [item["score"] for item in body["items"]] == [3.0, 2.5, 2.0]


def test_conversion_weight_raises_converting_item(model):
    before = ranked(model, top_k=3)
    after = ranked(model, top_k=3, blend_conversion=1.0)

    assert before.index("i3") == 2
    # i3: exp(2 - 3) + 0.9 = 1.268 beats i1: 1 + 0.05.
    assert after.index("i3") == 0
    assert after == ["i3", "i1", "i2"]


def test_blended_scores_published(model):
    (body,) = recommend(model, top_k=2, blend_conversion=1.0)

    scores = {item["item_id"]: item["score"] for item in body["items"]}
    assert scores["i3"] == pytest.approx(np.exp(-1.0) + 0.9, abs=1e-6)
    assert scores["i1"] == pytest.approx(1.0 + 0.05, abs=1e-6)


def test_popularity_weight_raises_popular_item(model):
    popularity = FixedPopularity({"i6": 50.0, "i2": 5.0})

    before = ranked(model, top_k=3, popularity=popularity)
    assert popularity.calls == [], "counts must not be read while the popularity weight is 0"
    after = ranked(model, top_k=3, blend_popularity=1.0, popularity=popularity)

    assert before == ["i1", "i2", "i3"]
    # i6: exp(0 - 3) + 50 / 50 = 1.05 beats i1: 1 + 0 and i2: exp(-0.5) + 5 / 50 = 0.71.
    assert after == ["i6", "i1", "i2"]
    assert popularity.calls == [(1, len(LOGITS))]


def test_popularity_without_counts_keeps_preference_order(model):
    order = ranked(model, top_k=3, blend_popularity=1.0, popularity=FixedPopularity(None))

    assert order == ["i1", "i2", "i3"]


def test_popularity_without_source_warns(model, caplog):
    with caplog.at_level(logging.WARNING, logger="worker.processor"):
        order = ranked(model, top_k=3, blend_popularity=1.0)

    assert order == ["i1", "i2", "i3"]
    assert any("no popularity source" in record.getMessage() for record in caplog.records)


STRONG_HISTORY = (("u1", "i1", "view"), ("u1", "i2", "purchase"), ("u1", "i3", "rating"), ("u1", "i4", "add_to_cart"))


def test_exclude_strong_keeps_viewed_item(model):
    order = ranked(model, events=STRONG_HISTORY, exclude="strong")

    assert "i1" in order
    assert not {"i2", "i3", "i4"} & set(order)


def test_exclude_seen_drops_every_recent_item(model):
    order = ranked(model, events=STRONG_HISTORY, exclude="seen")

    assert order == ["i5", "i6"]


def test_exclude_none_keeps_every_item(model):
    order = ranked(model, events=STRONG_HISTORY, exclude="none")

    assert order == list(LOGITS)


def test_deny_list_removes_items(model, tmp_path):
    deny = tmp_path / "deny.txt"
    deny.write_text("# out of stock\ni1\n\ni3  # recalled\nnot-in-model\n")

    order = ranked(model, top_k=3, deny_items_file=str(deny))

    assert order == ["i2", "i4", "i5"]


def test_allow_list_restricts_items(model, tmp_path):
    allow = tmp_path / "allow.txt"
    allow.write_text("i5\ni2\ni6\n")

    order = ranked(model, top_k=3, allow_items_file=str(allow))

    assert order == ["i2", "i5", "i6"]


def test_allow_and_deny_lists_combine(model, tmp_path):
    allow, deny = tmp_path / "allow.txt", tmp_path / "deny.txt"
    allow.write_text("i5\ni2\ni6\n")
    deny.write_text("i2\n")

    order = ranked(model, top_k=3, allow_items_file=str(allow), deny_items_file=str(deny))

    assert order == ["i5", "i6"]


def test_max_per_category_caps_items(model):
    order = ranked(model, top_k=4, max_per_category=1)

    # i2 and i3 share Drama with i1; i5 has no category and is never capped.
    assert order == ["i1", "i4", "i5"]


def test_max_per_category_after_blend(model):
    order = ranked(model, top_k=3, max_per_category=1, blend_conversion=1.0)

    # i3 (Drama, War) leads, so i1 and i2 (Drama) are capped.
    assert order == ["i3", "i4", "i5"]


def test_cap_without_categories_warns_and_keeps_order(model_without_extras, caplog):
    with caplog.at_level(logging.WARNING, logger="worker.processor"):
        order = ranked(model_without_extras, top_k=3, max_per_category=1)

    assert order == ["i1", "i2", "i3"]
    warnings = [record for record in caplog.records if "MAX_PER_CATEGORY" in record.getMessage()]
    assert len(warnings) == 1


def test_message_names_blend_and_matches_schema(model):
    validator = load_validator("recommendation")

    (body,) = recommend(model, top_k=3, blend_conversion=0.5, blend_popularity=0.25, blend_name="conversion-test")

    assert body["blend"] == {"name": "conversion-test", "weights": {"preference": 1.0, "conversion": 0.5, "popularity": 0.25}}
    assert list(validator.iter_errors(body)) == []


def test_default_message_names_default_blend(model):
    (body,) = recommend(model, top_k=3)

    assert body["blend"] == {"name": "default", "weights": {"preference": 1.0, "conversion": 0.0, "popularity": 0.0}}


def test_coalesced_message_equals_every_event_one(model):
    events = (("u1", "i1", "view"), ("u2", "i2", "view"), ("u1", "i3", "view"))
    options = {"top_k": 3, "blend_conversion": 1.0, "max_per_category": 1}

    every_event = recommend(model, events=events, **options)
    coalesced = recommend(model, events=events, emit="coalesce", **options)

    assert len(coalesced) == 2
    last_of_u1 = [body for body in every_event if body["event_id"] == "e2"][0]
    coalesced_u1 = [body for body in coalesced if body["user_id"] == "u1"][0]
    assert coalesced_u1["items"] == last_of_u1["items"]
    assert coalesced_u1["blend"] == last_of_u1["blend"]


def test_top_k_above_bundle_k_rejected(model):
    with pytest.raises(BundleError) as caught:
        make_processor(model, top_k=len(LOGITS) + 1)

    message = str(caught.value)
    assert "STREAMREC_TOP_K=7" in message
    assert f"k={len(LOGITS)}" in message
    assert "--candidates 7" in message


def test_conversion_weight_without_head_rejected(model_without_extras):
    settings = Settings.from_env({}, blend_conversion=0.5, top_k=3)

    with pytest.raises(BundleError) as caught:
        check_model_settings(settings, model_without_extras)

    assert "STREAMREC_BLEND_CONVERSION=0.5" in str(caught.value)
    assert "constant-plain has none" in str(caught.value)


def test_set_model_rejects_and_keeps_serving(model, model_without_extras):
    processor = make_processor(model, blend_conversion=1.0)

    with pytest.raises(BundleError, match="needs a conversion head"):
        processor.set_model(model_without_extras)

    assert processor.model is model


def test_reload_rejects_bundle_without_head(model, tmp_path, caplog):
    from worker.app import ModelReloader

    bundle_dir = ConstantBundle(LOGITS, model_version="constant-no-head").write(tmp_path / "bundle")
    settings = Settings.from_env({}, bundle_dir=bundle_dir, blend_conversion=1.0, top_k=3)
    metrics = WorkerMetrics(CollectorRegistry())
    processor = Processor(settings, model, metrics)

    with caplog.at_level(logging.ERROR, logger="worker.app"):
        asyncio.run(ModelReloader(settings, processor, metrics).check())

    assert processor.model is model
    assert any("needs a conversion head" in record.getMessage() for record in caplog.records)
    assert metrics.registry.get_sample_value("streamrec_model_reloads_total", {"result": "failed"}) == 1


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("STREAMREC_TOP_K", "0", "must be at least 1"),
        ("STREAMREC_BLEND_CONVERSION", "-0.5", "must be >= 0"),
        ("STREAMREC_BLEND_POPULARITY", "inf", "expected a finite number"),
        ("STREAMREC_BLEND_PREFERENCE", "0", "are all 0"),
        ("STREAMREC_BLEND_NAME", "a\tb", "printable characters"),
        ("STREAMREC_EXCLUDE", "bought", "expected one of seen, strong, none"),
        ("STREAMREC_MAX_PER_CATEGORY", "-1", "must be >= 0"),
        ("STREAMREC_POPULARITY_HALF_LIFE_S", "0", "must be > 0"),
        ("STREAMREC_POPULARITY_EVENT_WEIGHTS", "view=1,click", "is not TYPE=WEIGHT"),
        ("STREAMREC_POPULARITY_EVENT_WEIGHTS", "view=-1", "is not TYPE=WEIGHT"),
        ("STREAMREC_POPULARITY_EVENT_WEIGHTS", "view=1,view=2", "listed twice"),
        ("STREAMREC_ALLOW_ITEMS_FILE", "/nonexistent/allow.txt", "cannot read the item list"),
        ("STREAMREC_DENY_ITEMS_FILE", "/nonexistent/deny.txt", "cannot read the item list"),
    ],
)
def test_invalid_ranking_setting_names_variable(name, value, expected):
    with pytest.raises(SettingsError) as caught:
        Settings.from_env({name: value})

    assert name in str(caught.value)
    assert expected in str(caught.value)


def test_blend_all_zero_names_every_weight():
    env = {"STREAMREC_BLEND_PREFERENCE": "0", "STREAMREC_BLEND_CONVERSION": "0", "STREAMREC_BLEND_POPULARITY": "0"}

    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)

    for name in env:
        assert name in str(caught.value)


def test_popularity_event_weights_parsed():
    settings = Settings.from_env({"STREAMREC_POPULARITY_EVENT_WEIGHTS": " view=1 , purchase = 10.5 ,like=0"})

    assert settings.popularity_event_weight_map == {"view": 1.0, "purchase": 10.5, "like": 0.0}


def test_ranking_defaults():
    settings = Settings.from_env({})

    assert settings.top_k == 20
    assert settings.blend_weights.preference_only
    assert settings.exclude == "seen"
    assert settings.allow_items is None
    assert settings.deny_items is None
    assert settings.popularity_event_weight_map == {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0, "rating": 4.0}
