"""The conversion head, the format 3 bundle and the trade-off sweep, on tiny generated data."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from export_helpers import make_interactions

from export.__main__ import build_configs, build_parser, main
from export.bundle import (
    CATEGORIES_FILE,
    categories_from_tags,
    load_pytorch_model,
    recommend_for_sequence,
    write_bundle,
)
from export.data import Interaction
from export.evaluate import evaluate_model, final_outputs, roc_auc
from export.model import GRU4Rec, ModelConfig
from export.onnx_export import export_step_graph, output_roles
from export.parity import make_session
from export.sequences import EVENT_TYPES, ItemVocabulary, split_leave_one_out, strong_labels
from export.tradeoff import TradeoffError, parse_grid
from export.train import TrainConfig, train_model
from worker.ranking import BlendWeights

COLUMNS = "user=user,item=item,time=time,type=type,value=value"
EMPTY_METRICS = {"model": {"test": {}}, "baselines": {}}


def event(user: str, item: int, seconds: int, event_type: str, value: float | None, line: int) -> Interaction:
    return Interaction(user, str(item), seconds * 1000, event_type, value, line)


def write_event_csv(path, interactions: list[Interaction]):
    with path.open("w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["user", "item", "time", "type", "value"])
        for row in interactions:
            writer.writerow([row.user_id, row.item_id, row.timestamp_ms // 1000, row.event_type, "" if row.value is None else row.value])
    return path


def type_index(name: str) -> int:
    return EVENT_TYPES.index(name)


# -- strong labels ----------------------------------------------------------------------------


def test_strong_labels_follow_the_definition():
    types = np.array([type_index(name) for name in ("purchase", "add_to_cart", "view", "click", "rating", "rating", "rating", "rating")])
    values = np.array([np.nan, np.nan, 5.0, 5.0, 4.0, 3.5, np.nan, 5.0])

    labels = strong_labels(types, values)

    assert labels.tolist() == [1, 1, 0, 0, 1, 0, 0, 1]
    assert strong_labels(types[:4], None).tolist() == [1, 1, 0, 0]


def test_roc_auc_counts_ties_as_half():
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5
    assert roc_auc(np.array([0.2, 0.3]), np.array([1, 1])) is None


# -- the head learns --------------------------------------------------------------------------


def strong_and_weak_log(users: int = 40, events: int = 20) -> list[Interaction]:
    """Users walk items 1..20; items 1..10 are always purchased, items 11..20 only viewed."""
    rows = []
    for user in range(users):
        for step in range(events):
            item = (user * 3 + step * 7) % 20 + 1
            event_type = "purchase" if item <= 10 else "view"
            rows.append(event(str(user + 1), item, 1_000 + step, event_type, None, len(rows) + 1))
    return rows


@pytest.mark.parametrize("method", ["sequence", "session_parallel"])
def test_conversion_head_separates_strong_items(method):
    dataset = split_leave_one_out(strong_and_weak_log())
    config = ModelConfig(num_items=dataset.num_items, embedding_size=8, hidden_size=16, conversion_head=True)
    train_config = TrainConfig(max_epochs=8, batch_size=8, learning_rate=2e-2, patience=8, method=method)

    model = train_model(dataset, config, train_config, show_progress=False).model
    outputs = final_outputs(model, [(user.train_items, user.train_event_types) for user in dataset.users])
    with torch.no_grad():
        items = torch.arange(1, 21).expand(len(dataset.users), 20)  # (users, 20)
        probabilities = torch.sigmoid(model.conversion_logits(outputs, items))  # (users, 20)

    # The head trains on the cell outputs alone, so its probabilities separate the items
    # without reaching 0 or 1 within the epochs that next-item early stopping keeps.
    assert probabilities[:, :10].mean() > probabilities[:, 10:].mean() + 0.1
    test = evaluate_model(model, dataset, "test")
    assert test["conversion_auc"] > 0.95
    assert 0.0 < test["strong_rate"] < 1.0


def test_conversion_weight_zero_leaves_head_untrained():
    dataset = split_leave_one_out(strong_and_weak_log(users=10, events=8))
    config = ModelConfig(num_items=dataset.num_items, embedding_size=4, hidden_size=8, conversion_head=True)
    untrained = GRU4Rec(config).conversion_bias.detach().clone()

    model = train_model(dataset, config, TrainConfig(max_epochs=1, conversion_weight=0.0), show_progress=False).model

    assert torch.equal(model.conversion_bias.detach(), untrained)


def test_head_leaves_next_item_training_unchanged():
    dataset = split_leave_one_out(strong_and_weak_log(users=12, events=8))
    train_config = TrainConfig(max_epochs=2, batch_size=4, patience=2)
    trained = {}
    for head in (False, True):
        torch.manual_seed(5)
        config = ModelConfig(num_items=dataset.num_items, embedding_size=4, hidden_size=8, conversion_head=head)
        trained[head] = train_model(dataset, config, train_config, show_progress=False).model.state_dict()

    for name, tensor in trained[False].items():
        assert torch.equal(tensor, trained[True][name]), name


def test_head_off_draws_same_initial_weights():
    torch.manual_seed(3)
    plain = GRU4Rec(ModelConfig(num_items=12, embedding_size=4, hidden_size=8))
    torch.manual_seed(3)
    headed = GRU4Rec(ModelConfig(num_items=12, embedding_size=4, hidden_size=8, conversion_head=True))

    headed_state = headed.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, headed_state[name]), name


# -- ONNX output ------------------------------------------------------------------------------


def random_headed_model(cell: str = "gru") -> GRU4Rec:
    torch.manual_seed(5)
    model = GRU4Rec(ModelConfig(num_items=31, embedding_size=8, hidden_size=16, cell=cell, conversion_head=True)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.3)
    return model


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_onnx_conversion_output_matches_pytorch(cell):
    model = random_headed_model(cell)
    session = make_session(export_step_graph(model, k=6))
    rng = np.random.default_rng(1)
    state = rng.uniform(-1, 1, size=(1, 5, 16)).astype(np.float32)
    feeds = {
        "item_index": rng.integers(1, 31, size=5),
        "event_type": rng.integers(0, len(EVENT_TYPES), size=5),
        "hidden": state,
        "exclude_items": rng.integers(0, 31, size=(5, 3)),
    }
    if cell == "lstm":
        feeds["cell"] = state.copy()

    names = [output.name for output in session.get_outputs()]
    onnx_outputs = dict(zip(names, session.run(None, feeds)))
    with torch.no_grad():
        cell_state = torch.from_numpy(feeds["cell"]) if cell == "lstm" else None
        expected = model.step(*(torch.from_numpy(feeds[name]) for name in list(feeds)[:4]), 6, cell=cell_state)

    assert names == list(output_roles(model.config).values())
    assert names[-1] == "topk_conversion"
    assert np.array_equal(onnx_outputs["topk_items"], expected[2].numpy())
    assert np.abs(onnx_outputs["topk_conversion"] - expected[-1].numpy()).max() < 1e-5
    assert ((onnx_outputs["topk_conversion"] > 0) & (onnx_outputs["topk_conversion"] < 1)).all()


# -- the bundle -------------------------------------------------------------------------------

VOCABULARY = ItemVocabulary([f"m{number}" for number in range(1, 31)])
CATEGORIES = {"m1": ["Comedy", "Drama"], "m3": ["Horror"]}


def write_small_bundle(out_dir, model, categories=None, k=6):
    return write_bundle(
        out_dir, model, VOCABULARY, {}, EMPTY_METRICS, train_config={}, training_data={"dataset": "synthetic"},
        k=k, item_categories=categories,
    )


def test_bundle_manifest_describes_heads_and_categories(tmp_path):
    written = write_small_bundle(tmp_path / "bundle", random_headed_model(), CATEGORIES)
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())

    assert manifest["format_version"] == 3
    assert manifest["outputs"]["conversion"] == "topk_conversion"
    assert manifest["heads"]["preference"] == {"output": "scores", "description": "next-item logit"}
    assert manifest["heads"]["conversion"]["output"] == "conversion"
    assert manifest["heads"]["conversion"]["strong_event_types"] == ["add_to_cart", "purchase"]
    assert manifest["heads"]["conversion"]["strong_min_rating"] == 4.0
    assert set(head["output"] for head in manifest["heads"].values()) <= set(manifest["outputs"])
    assert manifest["categories_file"] == CATEGORIES_FILE
    assert written.parity.conversion_max_abs_diff < 1e-5


def test_bundle_categories_file_lists_every_item(tmp_path):
    write_small_bundle(tmp_path / "bundle", random_headed_model(), CATEGORIES)
    lines = (tmp_path / "bundle" / CATEGORIES_FILE).read_text(encoding="utf-8").splitlines()

    assert lines[0] == "index\titem_id\tcategories"
    assert lines[1] == "1\tm1\tComedy|Drama"
    assert lines[2] == "2\tm2\t"
    assert lines[3] == "3\tm3\tHorror"
    assert len(lines) == 31
    loaded = load_pytorch_model(tmp_path / "bundle")
    assert loaded.categories[1] == frozenset({"Comedy", "Drama"})
    assert loaded.categories[2] == frozenset()
    assert len(loaded.categories) == 31


def test_bundle_without_head_or_categories(tmp_path):
    model = GRU4Rec(ModelConfig(num_items=31, embedding_size=8, hidden_size=16))
    write_small_bundle(tmp_path / "bundle", model, categories={"m1": []})
    manifest = json.loads((tmp_path / "bundle" / "manifest.json").read_text())

    assert list(manifest["heads"]) == ["preference"]
    assert "conversion" not in manifest["outputs"]
    assert "categories_file" not in manifest
    assert not (tmp_path / "bundle" / CATEGORIES_FILE).exists()


def test_format_2_bundle_still_loads(tmp_path):
    model = GRU4Rec(ModelConfig(num_items=31, embedding_size=8, hidden_size=16))
    write_small_bundle(tmp_path / "bundle", model)
    manifest_path = tmp_path / "bundle" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["format_version"] = 2
    del manifest["heads"]
    manifest_path.write_text(json.dumps(manifest))

    loaded = load_pytorch_model(tmp_path / "bundle")

    assert loaded.k == 6
    assert loaded.categories is None
    assert len(recommend_for_sequence(loaded, ["m1", "m2"], ["view", "click"], exclude_last=2)) == 6


def test_unknown_format_version_is_rejected(tmp_path):
    from export.bundle import BundleError

    write_small_bundle(tmp_path / "bundle", GRU4Rec(ModelConfig(num_items=31, embedding_size=8, hidden_size=16)))
    manifest_path = tmp_path / "bundle" / "manifest.json"
    manifest_path.write_text(manifest_path.read_text().replace('"format_version": 3', '"format_version": 9'))

    with pytest.raises(BundleError, match="format_version 9"):
        load_pytorch_model(tmp_path / "bundle")


def test_categories_from_tags_keeps_genres_and_categories():
    tags = {"1": ["genre=Comedy", "release=1995", "genre=Drama"], "2": ["category=shoes"], "3": ["release=1990"]}

    assert categories_from_tags(tags) == {"1": ["Comedy", "Drama"], "2": ["shoes"]}
    assert categories_from_tags(None) == {}


# -- the train command ------------------------------------------------------------------------


def test_train_cli_reports_conversion_head(tmp_path, capsys):
    data = write_event_csv(tmp_path / "events.csv", strong_and_weak_log(users=20, events=10))
    out_dir = tmp_path / "bundle"

    status = main([
        "train", "--data", str(data), "--columns", COLUMNS, "--out", str(out_dir), "--epochs", "2",
        "--hidden-size", "8", "--embedding-size", "4", "--candidates", "5", "--quiet", "--no-report",
    ])
    printed = capsys.readouterr().out

    assert status == 0
    assert "conversion head at the test item: AUC" in printed
    assert "parity: conversion max abs diff" in printed
    metrics = json.loads((out_dir / "metrics.json").read_text())["model"]["test"]
    assert {"conversion_auc", "conversion_log_loss", "strong_rate"} <= set(metrics)
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["k"] == 5
    assert manifest["metrics"]["strong_rate"] == metrics["strong_rate"]


def test_train_options_for_the_head():
    parser = build_parser()
    dataset = split_leave_one_out(make_interactions([("1", "a", 1), ("1", "b", 2), ("1", "c", 3)]))

    default_model, default_training = build_configs(parser.parse_args(["train", "--out", "x"]), dataset)
    off_model, off_training = build_configs(
        parser.parse_args(["train", "--out", "x", "--no-conversion-head", "--conversion-weight", "0"]), dataset
    )

    assert default_model.conversion_head is True
    assert default_training.conversion_weight == 1.0
    assert off_model.conversion_head is False
    assert off_training.conversion_weight == 0.0
    assert parser.parse_args(["train", "--out", "x", "--k", "7"]).candidates == 7
    assert parser.parse_args(["train", "--out", "x"]).candidates is None


# -- the trade-off sweep ----------------------------------------------------------------------

# Items 1..10 are liked but weak, 11..20 neutral, 21..30 strong, 31..40 popular.
WEAK, NEUTRAL, STRONG, POPULAR = range(1, 11), range(11, 21), range(21, 31), range(31, 41)


def tradeoff_log() -> list[Interaction]:
    """Group A users consumed the popular items; group B users one neutral item each.

    Every user's validation item is neutral. Even users end with a weak rating (2) of a
    weak item, odd users with a strong rating (5) of a strong item, after all other events.
    """
    rows: list[Interaction] = []

    def add(user, item, seconds, value):
        rows.append(event(user, item, seconds, "rating", value, len(rows) + 1))

    for number in range(20):
        group_a, group_b = f"a{number}", f"b{number}"
        for offset, item in enumerate(POPULAR):
            add(group_a, item, 100 + number * 20 + offset, 3.0)
        add(group_b, NEUTRAL[number % 10], 100 + number * 20, 3.0)
        add(group_a, NEUTRAL[(number + 3) % 10], 600 + number, 3.0)
        add(group_b, NEUTRAL[(number + 5) % 10], 600 + number, 3.0)
    for number in range(20):
        for group in ("a", "b"):
            item, value = (WEAK[number % 10], 2.0) if number % 2 == 0 else (STRONG[number % 10], 5.0)
            add(f"{group}{number}", item, 5_000 + number * 2 + (group == "b"), value)
    return rows


def handmade_bundle(out_dir, conversion_head: bool = True):
    """A bundle whose preference favours weak items and whose head favours strong ones, whatever the history."""
    config = ModelConfig(
        num_items=41, embedding_size=4, hidden_size=4, embedding_dropout=0.0, hidden_dropout=0.0,
        conversion_head=conversion_head,
    )
    model = GRU4Rec(config).eval()
    preference = np.zeros(41)
    preference[list(WEAK)] = 3.0 - 0.01 * np.arange(10)
    preference[list(NEUTRAL)] = 2.9 - 0.01 * np.arange(10)
    preference[list(STRONG)] = 0.0 - 0.01 * np.arange(10)
    preference[list(POPULAR)] = 1.0 - 0.01 * np.arange(10)
    with torch.no_grad():
        model.output_item_embedding.weight.zero_()
        model.output_bias.copy_(torch.from_numpy(preference))
        if conversion_head:
            model.conversion_item_embedding.weight.zero_()
            conversion = np.full(41, -4.0)
            conversion[list(STRONG)] = 4.0
            model.conversion_bias.copy_(torch.from_numpy(conversion))
    vocabulary = ItemVocabulary([str(item) for item in range(1, 41)])
    write_bundle(out_dir, model, vocabulary, {}, EMPTY_METRICS, train_config={}, training_data={"dataset": "synthetic"}, k=40)
    return out_dir


@pytest.fixture(scope="module")
def tradeoff_inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tradeoff")
    data = write_event_csv(folder / "events.csv", tradeoff_log())
    return handmade_bundle(folder / "bundle"), data


def run_sweep(bundle, data, out_dir, grid: list[str]) -> list[dict]:
    status = main([
        "tradeoff", "--bundle", str(bundle), "--data", str(data), "--columns", COLUMNS, "--half-life-s", "1e9",
        "--grid", *grid, "--json", str(out_dir / "rows.json"), "--png", str(out_dir / "tradeoff.png"),
    ])
    assert status == 0
    return json.loads((out_dir / "rows.json").read_text())


def metrics_for(rows: list[dict], conversion: float, popularity: float) -> dict:
    return next(
        row["metrics"] for row in rows
        if row["weights"] == {"preference": 1.0, "conversion": conversion, "popularity": popularity}
    )


@pytest.mark.multi_objective
def test_tradeoff_writes_json_rows_and_png(tradeoff_inputs, tmp_path, capsys):
    bundle, data = tradeoff_inputs

    rows = run_sweep(bundle, data, tmp_path, ["conversion=0,2", "popularity=0,2"])
    captured = capsys.readouterr()

    assert isinstance(rows, list)
    assert len(rows) == 4
    for row in rows:
        assert set(row) == {"weights", "metrics"}
        for metric in ("recall", "ndcg", "strong_precision", "coverage", "popularity_bias"):
            assert f"{metric}@10" in row["metrics"]
            assert f"{metric}@20" in row["metrics"]
    assert (tmp_path / "tradeoff.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "popularity_bias@10" in captured.out
    assert "blend 4 of 4" in captured.err


@pytest.mark.multi_objective
@pytest.mark.parametrize(
    "grid, weights, metric",
    [
        (["conversion=0,2"], (2.0, 0.0), "strong_precision@10"),
        (["popularity=0,2"], (0.0, 2.0), "popularity_bias@10"),
    ],
    ids=["conversion-raises-strong-precision", "popularity-raises-popularity-bias"],
)
def test_tradeoff_weight_moves_its_metric(tradeoff_inputs, tmp_path, grid, weights, metric):
    bundle, data = tradeoff_inputs

    rows = run_sweep(bundle, data, tmp_path, grid)

    preference_only = metrics_for(rows, 0.0, 0.0)
    weighted = metrics_for(rows, *weights)
    assert weighted[metric] > preference_only[metric]


@pytest.mark.multi_objective
def test_tradeoff_preference_only_matches_graph_order(tradeoff_inputs, tmp_path):
    bundle, data = tradeoff_inputs

    rows = run_sweep(bundle, data, tmp_path, ["popularity=0"])

    # Preference alone ranks the weak items first, so exactly the users ending on a weak item hit.
    assert rows[0]["metrics"]["recall@10"] == 0.5
    assert rows[0]["metrics"]["strong_precision@10"] == 0.0


@pytest.mark.multi_objective
def test_tradeoff_rejects_conversion_without_head(tmp_path, capsys):
    bundle = handmade_bundle(tmp_path / "bundle", conversion_head=False)
    data = write_event_csv(tmp_path / "events.csv", tradeoff_log())

    status = main(["tradeoff", "--bundle", str(bundle), "--data", str(data), "--columns", COLUMNS])
    error = capsys.readouterr().err

    assert status == 1
    assert "has no conversion head" in error
    assert "--grid conversion=0" in error


@pytest.mark.multi_objective
def test_tradeoff_without_head_runs_popularity_grid(tmp_path):
    bundle = handmade_bundle(tmp_path / "bundle", conversion_head=False)
    data = write_event_csv(tmp_path / "events.csv", tradeoff_log())

    rows = run_sweep(bundle, data, tmp_path, ["conversion=0", "popularity=0,1"])

    assert len(rows) == 2


@pytest.mark.multi_objective
def test_tradeoff_missing_bundle_is_an_error(tmp_path, capsys):
    status = main(["tradeoff", "--bundle", str(tmp_path / "absent"), "--data", str(tmp_path / "events.csv")])

    assert status == 1
    assert "manifest.json not found" in capsys.readouterr().err


@pytest.mark.multi_objective
@pytest.mark.parametrize(
    ("grid", "message"),
    [
        (["speed=1"], "OBJECTIVE one of preference, conversion, popularity"),
        (["conversion=abc"], "'abc' is not a number"),
        (["conversion=-1"], "must be a finite number >= 0"),
        (["conversion=1", "conversion=2"], "conversion is given twice"),
        (["preference=0"], "every blend has all weights 0"),
    ],
)
def test_parse_grid_rejects_bad_grid(grid, message):
    with pytest.raises(TradeoffError, match=message):
        parse_grid(grid)


@pytest.mark.multi_objective
def test_parse_grid_default_and_omitted_objectives():
    default = parse_grid(None)
    partial = parse_grid(["popularity=0,1"])

    assert len(default) == 25
    assert BlendWeights(1.0, 2.0, 2.0) in default
    assert partial == [BlendWeights(1.0, 0.0, 0.0), BlendWeights(1.0, 0.0, 1.0)]
    # The all-zero blend is left out of a grid that would contain it.
    assert parse_grid(["preference=0,1", "popularity=0,1"]) == [
        BlendWeights(0.0, 0.0, 1.0), BlendWeights(1.0, 0.0, 0.0), BlendWeights(1.0, 0.0, 1.0)
    ]
