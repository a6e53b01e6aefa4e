from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from export.model import GRU4Rec, ModelConfig
from export.onnx_export import ExportError, export_step_graph
from export.parity import CHAINED_STEPS, RANDOM_BATCH_SHAPES, ParityError, check_parity, make_session

K = 5


def random_model(num_layers: int) -> GRU4Rec:
    torch.manual_seed(num_layers)
    model = GRU4Rec(ModelConfig(num_items=60, embedding_size=8, hidden_size=16, num_layers=num_layers)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.3)
    return model


@pytest.fixture(scope="module", params=[1, 2], ids=["1-layer", "2-layer"])
def exported(request):
    model = random_model(request.param)
    return model, export_step_graph(model, k=K)


def test_graph_has_contract_names_and_types(exported):
    model, graph_bytes = exported
    graph = onnx.load_from_string(graph_bytes).graph

    def describe(values):
        return {
            value.name: (
                value.type.tensor_type.elem_type,
                [dim.dim_value if dim.HasField("dim_value") else "dynamic" for dim in value.type.tensor_type.shape.dim],
            )
            for value in values
        }

    layers = model.config.num_layers
    int64, float32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    assert describe(graph.input) == {
        "item_index": (int64, ["dynamic"]),
        "event_type": (int64, ["dynamic"]),
        "hidden": (float32, [layers, "dynamic", 16]),
        "exclude_items": (int64, ["dynamic", "dynamic"]),
    }
    assert describe(graph.output) == {
        "hidden_out": (float32, [layers, "dynamic", 16]),
        "topk_scores": (float32, ["dynamic", K]),
        "topk_items": (int64, ["dynamic", K]),
    }


def test_graph_embeds_weights(exported, tmp_path):
    _, graph_bytes = exported
    proto = onnx.load_from_string(graph_bytes)

    assert all(tensor.data_location != onnx.TensorProto.EXTERNAL for tensor in proto.graph.initializer)
    # A session built from bytes alone would fail if weights lived in a side file.
    assert make_session(graph_bytes).get_inputs()[0].name == "item_index"


@pytest.mark.parametrize(("batch", "n_exclude"), [(1, 0), (1, 3), (9, 0), (9, 17)])
def test_dynamic_axes_match_pytorch(exported, batch, n_exclude):
    model, graph_bytes = exported
    rng = np.random.default_rng(batch * 100 + n_exclude)
    layers = model.config.num_layers
    feeds = {
        "item_index": rng.integers(0, 60, batch),
        "event_type": rng.integers(0, 5, batch),
        "hidden": rng.uniform(-1, 1, (layers, batch, 16)).astype(np.float32),
        "exclude_items": rng.integers(0, 60, (batch, n_exclude)),
    }

    hidden_out, topk_scores, topk_items = make_session(graph_bytes).run(None, feeds)
    with torch.no_grad():
        expected = model.step(*(torch.from_numpy(feeds[name]) for name in feeds), K)

    assert hidden_out.shape == (layers, batch, 16)
    assert topk_items.shape == (batch, K)
    np.testing.assert_allclose(hidden_out, expected[0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(topk_scores, expected[1].numpy(), rtol=0, atol=1e-5)
    for row in range(batch):
        assert not set(topk_items[row]) & (set(feeds["exclude_items"][row]) | {0})


def test_parity_passes_with_small_differences(exported):
    model, graph_bytes = exported

    result = check_parity(model, graph_bytes, K)

    assert result.passed
    assert result.hidden_max_abs_diff <= 1e-5
    assert result.scores_max_abs_diff <= 1e-5
    assert result.chained_steps == CHAINED_STEPS == 200
    assert result.random_batches == len(RANDOM_BATCH_SHAPES)
    expected_positions = K * (sum(batch for batch, _ in RANDOM_BATCH_SHAPES) + 4 * CHAINED_STEPS)
    assert result.topk_positions_compared == expected_positions
    assert result.to_dict()["passed"] is True


def test_parity_detects_changed_weights(exported):
    model, graph_bytes = exported
    changed = random_model(model.config.num_layers)
    changed.load_state_dict(model.state_dict())
    with torch.no_grad():
        changed.rnn.weight_hh_l0[0, 0] += 0.05

    with pytest.raises(ParityError) as raised:
        check_parity(changed, graph_bytes, K, chained_steps=5)

    assert "hidden_out differs" in str(raised.value)
    assert not raised.value.result.passed
    assert raised.value.result.hidden_max_abs_diff > 1e-5


def test_export_rejects_k_beyond_catalogue():
    model = random_model(1)

    with pytest.raises(ExportError, match="k=60 is invalid"):
        export_step_graph(model, k=60)


def test_parity_allows_swaps_only_between_tied_scores():
    from export.parity import _Comparison

    hidden = np.zeros((1, 1, 2), dtype=np.float32)
    full_scores = np.array([[-np.inf, 3.0, 2.0, 2.0 + 1e-7, 1.0]], dtype=np.float32)
    scores = np.array([[3.0, 2.0 + 1e-7, 2.0]], dtype=np.float32)
    torch_outputs = {"hidden": hidden, "scores": scores, "items": np.array([[1, 3, 2]])}
    tied_swap = {"hidden": hidden, "scores": scores, "items": np.array([[1, 2, 3]])}
    real_swap = {"hidden": hidden, "scores": scores, "items": np.array([[1, 4, 2]])}

    comparison = _Comparison(tolerance=1e-5)
    comparison.compare("tied", torch_outputs, tied_swap, full_scores)
    assert comparison.failures == []
    assert comparison.tie_swaps == 2

    comparison.compare("real", torch_outputs, real_swap, full_scores)
    assert len(comparison.failures) == 1
    assert "ONNX returned item 4" in comparison.failures[0]


def test_parity_scales_score_tolerance_with_magnitude():
    from export.parity import _scores_close

    assert _scores_close(np.array([1000.0]), np.array([1000.005]), tolerance=1e-5)
    assert not _scores_close(np.array([1.0]), np.array([1.0005]), tolerance=1e-5)
    assert _scores_close(np.array([-np.inf]), np.array([-np.inf]), tolerance=1e-5)
    assert not _scores_close(np.array([-np.inf]), np.array([0.0]), tolerance=1e-5)
