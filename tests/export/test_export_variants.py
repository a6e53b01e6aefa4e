"""Model variants (cell, layers, tied embeddings, item features, event value) from PyTorch to the worker."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from export.bundle import load_pytorch_model, recommend_for_sequence, write_bundle
from export.model import GRU4Rec, ModelConfig
from export.onnx_export import export_step_graph, input_roles
from export.parity import check_parity
from export.sequences import ItemVocabulary
from worker.config import Settings
from worker.metrics import WorkerMetrics
from worker.model import BundleError, load_bundle
from worker.processor import InputMessage, Processor

NUM_ITEMS = 40
NUM_FEATURES = 5
VARIANTS = {
    "gru": {},
    "lstm": {"cell": "lstm"},
    "gru-tied": {"tied_embeddings": True},
    "gru-2-layers": {"num_layers": 2},
    "lstm-2-layers-tied-features-value": {
        "cell": "lstm", "num_layers": 2, "tied_embeddings": True, "num_item_features": NUM_FEATURES, "use_event_value": True,
    },
    "gru-features-value": {"num_item_features": NUM_FEATURES, "use_event_value": True},
}

# Candidates per step in the variant bundles; the worker publishes all of them.
K = 5


def tiny_model(seed: int = 0, **options) -> GRU4Rec:
    torch.manual_seed(seed)
    model = GRU4Rec(ModelConfig(num_items=NUM_ITEMS, embedding_size=8, hidden_size=12, **options))
    # Larger weights than the default init make the recurrence non-trivial.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.5)
    if model.config.num_item_features:
        table = (np.random.default_rng(seed).random((NUM_ITEMS, NUM_FEATURES)) < 0.4).astype(np.float32)
        table[0] = 0.0
        model.set_item_features(table)
    if model.config.use_event_value:
        model.set_value_scaling(3.0, 1.2)
    return model.eval()


def random_values(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    values = torch.randint(1, 6, shape, generator=generator).float()
    values[torch.rand(shape, generator=generator) < 0.3] = float("nan")  # absent values
    return values


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_chain_equals_forward(variant):
    model = tiny_model(**VARIANTS[variant])
    generator = torch.Generator().manual_seed(1)
    items = torch.randint(1, NUM_ITEMS, (3, 12), generator=generator)  # (batch, time)
    event_types = torch.randint(0, 5, (3, 12), generator=generator)  # (batch, time)
    values = random_values(generator, (3, 12))  # (batch, time)

    with torch.no_grad():
        outputs, _ = model(items, event_types, values=values)  # (batch, time, hidden)
        hidden = model.initial_hidden(3)
        cell = model.initial_hidden(3) if model.config.has_cell_state else None
        no_exclusion = torch.zeros(3, 0, dtype=torch.int64)
        for t in range(12):
            step = model.step(items[:, t], event_types[:, t], hidden, no_exclusion, 5, cell=cell, value=values[:, t])
            hidden = step[0]
            cell = step[3] if model.config.has_cell_state else None
            torch.testing.assert_close(hidden[-1], outputs[:, t], rtol=0, atol=1e-5)
            expected_scores, _ = torch.topk(model.score(outputs[:, t]), 5, dim=1)
            torch.testing.assert_close(step[1], expected_scores, rtol=0, atol=1e-4)


def test_lstm_step_without_cell_state_is_rejected():
    model = tiny_model(cell="lstm")

    with pytest.raises(ValueError, match="cell state"):
        model.step(torch.tensor([1]), torch.tensor([0]), model.initial_hidden(1), torch.zeros(1, 0, dtype=torch.int64), 3)


def test_event_value_nan_means_absent():
    model = tiny_model(use_event_value=True)
    items, event_types = torch.tensor([3, 3, 3]), torch.tensor([4, 4, 4])

    with torch.no_grad():
        embedded = model.embed(items, event_types, torch.tensor([1.0, 5.0, float("nan")]))
        absent = model.embed(items[:1], event_types[:1], None)

    assert not torch.allclose(embedded[0], embedded[1])
    assert torch.isfinite(embedded).all()
    torch.testing.assert_close(embedded[2], absent[0])


def test_item_features_table_rows_are_means():
    model = tiny_model(num_item_features=NUM_FEATURES)
    table = np.zeros((NUM_ITEMS, NUM_FEATURES), dtype=np.float32)
    table[1, [0, 2]] = 1.0

    model.set_item_features(table)

    assert model.item_feature_table[1].tolist() == [0.5, 0.0, 0.5, 0.0, 0.0]
    assert model.item_feature_table[2].sum() == 0.0


def test_item_feature_table_of_wrong_shape_is_rejected():
    model = tiny_model(num_item_features=NUM_FEATURES)

    with pytest.raises(ValueError, match=r"shape \(40, 3\), expected \(40, 5\)"):
        model.set_item_features(np.zeros((NUM_ITEMS, 3), dtype=np.float32))


@pytest.mark.parametrize("variant", ["gru", "lstm", "gru-tied", "gru-2-layers", "gru-features-value"])
def test_onnx_parity_per_variant(variant):
    model = tiny_model(**VARIANTS[variant])

    graph_bytes = export_step_graph(model, k=K)
    result = check_parity(model, graph_bytes, k=K, chained_steps=30)

    assert result.passed
    assert result.hidden_max_abs_diff < 1e-5
    assert result.topk_positions_compared > 0


def test_parity_covers_lstm_cell_state():
    model = tiny_model(cell="lstm", num_layers=2)
    graph_bytes = export_step_graph(model, k=K)
    changed = tiny_model(cell="lstm", num_layers=2)
    with torch.no_grad():
        # The forget gate acts only through the cell state.
        changed.rnn.bias_hh_l1[12] += 0.5

    with pytest.raises(Exception, match="differs"):
        check_parity(changed, graph_bytes, k=K, chained_steps=5)


def test_graph_inputs_follow_the_configuration():
    assert list(input_roles(ModelConfig(num_items=5))) == ["item", "event_type", "hidden", "exclude"]
    assert list(input_roles(ModelConfig(num_items=5, cell="lstm", use_event_value=True))) == [
        "item", "event_type", "hidden", "exclude", "cell", "value",
    ]


# -- the worker serves every variant from its manifest -----------------------------------------


@pytest.fixture(scope="module")
def variant_bundles(tmp_path_factory):
    """Bundles of the richest variant and of a plain GRU over the same vocabulary."""
    vocabulary = ItemVocabulary([str(100 + index) for index in range(1, NUM_ITEMS)])
    metrics = {"model": {"test": {}}, "baselines": {}}
    names = [f"genre=g{index}" for index in range(NUM_FEATURES)]
    bundles = {}
    for name, seed, feature_names in (
        ("lstm-2-layers-tied-features-value", 3, names),
        ("gru", 4, None),
    ):
        out_dir = tmp_path_factory.mktemp("bundles") / name
        model = tiny_model(seed=seed, **VARIANTS[name])
        write_bundle(
            out_dir, model, vocabulary, {}, metrics, train_config={}, training_data={"dataset": "synthetic"}, k=K,
            item_feature_names=feature_names,
        )
        bundles[name] = out_dir
    return bundles


class DictStore:
    def __init__(self):
        self.values: dict[str, bytes] = {}

    def get(self, user_id, message):
        return self.values.get(user_id)

    def put(self, user_id, value, message):
        self.values[user_id] = value


def event_messages(events: list[tuple[str, str, float | None]], first_offset: int = 0) -> list[InputMessage]:
    messages = []
    for offset, (user, item, value) in enumerate(events, start=first_offset):
        body = {
            "event_id": f"e{offset}", "user_id": user, "item_id": item, "event_type": "rating",
            "timestamp": 1_700_000_000_000 + offset,
        }
        if value is not None:
            body["value"] = value
        messages.append(InputMessage(user.encode(), json.dumps(body).encode(), "user-events", 0, offset, 1_700_000_000_000))
    return messages


def recommended(result, user: str) -> list[str]:
    last = [json.loads(message.value) for message in result.recommendations if message.key == user.encode()][-1]
    return [entry["item_id"] for entry in last["items"]]


def test_manifest_describes_optional_inputs(variant_bundles):
    manifest = json.loads((variant_bundles["lstm-2-layers-tied-features-value"] / "manifest.json").read_text())

    assert manifest["cell"] == "lstm"
    assert manifest["num_layers"] == 2
    assert manifest["tied_embeddings"] is True
    assert manifest["inputs"]["cell"] == "cell"
    assert manifest["inputs"]["value"] == "event_value"
    assert manifest["outputs"]["cell"] == "cell_out"
    assert manifest["item_features"] == [f"genre=g{index}" for index in range(NUM_FEATURES)]
    assert manifest["event_value"]["absent"] == "NaN"
    assert manifest["parity"]["passed"] is True


def test_worker_serves_variant_like_pytorch(variant_bundles):
    bundle_dir = variant_bundles["lstm-2-layers-tied-features-value"]
    processor = Processor(Settings(top_k=K), load_bundle(bundle_dir), WorkerMetrics())
    events = [("u1", "101", 5.0), ("u2", "117", None), ("u1", "123", 1.0), ("u1", "999", 3.0), ("u2", "102", 4.0)]

    result = processor.process(event_messages(events), DictStore())

    reference = load_pytorch_model(bundle_dir)
    for user in ("u1", "u2"):
        own = [event for event in events if event[0] == user]
        expected = recommend_for_sequence(
            reference, [item for _, item, _ in own], ["rating"] * len(own), exclude_last=50,
            values=[value for _, _, value in own],
        )
        assert recommended(result, user) == [item for item, _ in expected]


def test_worker_rebuild_after_model_change_replays_values(variant_bundles):
    plain = load_bundle(variant_bundles["gru"])
    rich_dir = variant_bundles["lstm-2-layers-tied-features-value"]
    processor = Processor(Settings(top_k=K), plain, WorkerMetrics())
    store = DictStore()
    history = [("u1", "101", 5.0), ("u1", "105", 2.0), ("u1", "130", None)]
    processor.process(event_messages(history), store).write_states(store)

    processor.set_model(load_bundle(rich_dir))
    latest = [("u1", "111", 4.0)]
    result = processor.process(event_messages(latest, first_offset=len(history)), store)

    whole = history + latest
    expected = recommend_for_sequence(
        load_pytorch_model(rich_dir), [item for _, item, _ in whole], ["rating"] * len(whole), exclude_last=50,
        values=[value for _, _, value in whole],
    )
    assert recommended(result, "u1") == [item for item, _ in expected]


def test_worker_rejects_unnamed_graph_input(variant_bundles, tmp_path):
    import shutil

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(variant_bundles["lstm-2-layers-tied-features-value"], bundle_dir)
    manifest_path = bundle_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["inputs"]["value"]
    manifest_path.write_text(json.dumps(manifest))

    with pytest.raises(BundleError, match="'event_value' has no role"):
        load_bundle(bundle_dir)
