"""Export one recurrent step of the model to an ONNX graph.

The graph takes a batch of (item, event type, hidden state, items to exclude), plus the
cell state for an LSTM and the event value for a model that uses it, and returns the new
hidden state with the top-k scores and items, then the new cell state for an LSTM, then
the top-k items' conversion probabilities for a model with a conversion head. Batch
size and the number of excluded items are dynamic axes. Weights and the item feature
table are stored inside the .onnx file.
"""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import onnx
import torch
from torch import nn

from export.model import GRU4Rec, ModelConfig

# Candidates the step graph returns per event; the worker re-ranks them and publishes fewer.
DEFAULT_K = 100
DEFAULT_OPSET = 18

# Graph names by role, the roles the manifest lists. Optional roles exist only in
# graphs whose model needs them.
INPUT_ROLES = {
    "item": "item_index",
    "event_type": "event_type",
    "hidden": "hidden",
    "exclude": "exclude_items",
    "cell": "cell",
    "value": "event_value",
}
OUTPUT_ROLES = {
    "hidden": "hidden_out",
    "scores": "topk_scores",
    "items": "topk_items",
    "cell": "cell_out",
    "conversion": "topk_conversion",
}

# Example sizes for tracing. torch.export specialises dimensions of size 0 or 1, so both
# dynamic axes are traced at sizes above 1.
EXAMPLE_BATCH = 3
EXAMPLE_EXCLUDE = 4


def input_roles(config: ModelConfig) -> dict[str, str]:
    """Return the graph's inputs as {role: name}, in graph order."""
    roles = ["item", "event_type", "hidden", "exclude"]
    if config.has_cell_state:
        roles.append("cell")
    if config.use_event_value:
        roles.append("value")
    return {role: INPUT_ROLES[role] for role in roles}


def output_roles(config: ModelConfig) -> dict[str, str]:
    """Return the graph's outputs as {role: name}, in graph order."""
    roles = ["hidden", "scores", "items"]
    if config.has_cell_state:
        roles.append("cell")
    if config.conversion_head:
        roles.append("conversion")
    return {role: OUTPUT_ROLES[role] for role in roles}


class ExportError(Exception):
    """The step graph failed to export or to pass its structural checks."""


class StepGraph(nn.Module):
    """The model's ``step`` with k fixed, as the module that torch exports.

    Inputs arrive positionally in the order of ``input_roles``, because the set of
    inputs depends on the model configuration.
    """

    def __init__(self, model: GRU4Rec, k: int):
        super().__init__()
        self.model = model
        self.k = k
        self.roles = list(input_roles(model.config))

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        by_role = dict(zip(self.roles, inputs))
        return self.model.step(
            by_role["item"],
            by_role["event_type"],
            by_role["hidden"],
            by_role["exclude"],
            self.k,
            cell=by_role.get("cell"),
            value=by_role.get("value"),
        )


def check_k(model: GRU4Rec, k: int) -> None:
    known_items = model.config.num_items - 1
    if not 1 <= k <= known_items:
        raise ExportError(f"k={k} is invalid: it must be between 1 and the {known_items} known items.")


def example_inputs(model: GRU4Rec) -> tuple[torch.Tensor, ...]:
    """Return example inputs in the order of ``input_roles``."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    state_shape = (config.num_layers, EXAMPLE_BATCH, config.hidden_size)  # (layers, batch, hidden)
    examples = {
        "item": torch.randint(0, config.num_items, (EXAMPLE_BATCH,), generator=generator),
        "event_type": torch.randint(0, config.num_event_types, (EXAMPLE_BATCH,), generator=generator),
        "hidden": torch.zeros(state_shape),
        "exclude": torch.randint(0, config.num_items, (EXAMPLE_BATCH, EXAMPLE_EXCLUDE), generator=generator),
        "cell": torch.zeros(state_shape),
        # One absent value (NaN) among present ones.
        "value": torch.tensor([4.0, float("nan"), 1.0]),
    }
    return tuple(examples[role] for role in input_roles(config))


def dynamic_shapes(config: ModelConfig) -> dict[str, tuple[dict[int, torch.export.Dim], ...]]:
    batch = torch.export.Dim("batch")
    n_exclude = torch.export.Dim("n_exclude")
    axes = {
        "item": {0: batch},
        "event_type": {0: batch},
        "hidden": {1: batch},
        "exclude": {0: batch, 1: n_exclude},
        "cell": {1: batch},
        "value": {0: batch},
    }
    # StepGraph takes *inputs, so torch.export expects the shapes under that name.
    return {"inputs": tuple(axes[role] for role in input_roles(config))}


def export_step_graph(model: GRU4Rec, k: int = DEFAULT_K, opset: int = DEFAULT_OPSET) -> bytes:
    """Export the step graph and return the serialised ONNX model."""
    check_k(model, k)
    was_training = model.training
    model.eval()

    # torch 2.13's exporter logs a warning per torchvision operator it cannot register
    # when torchvision is absent, but the step graph uses none of them.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # The exporter also warns about its own internals on every call.
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                StepGraph(model, k),
                example_inputs(model),
                dynamo=True,
                external_data=False,
                opset_version=opset,
                input_names=list(input_roles(model.config).values()),
                output_names=list(output_roles(model.config).values()),
                dynamic_shapes=dynamic_shapes(model.config),
                verbose=False,
            )
    except Exception as error:
        raise ExportError(f"torch.onnx.export failed for the step graph (opset {opset}): {error}") from error
    finally:
        model.train(was_training)

    buffer = io.BytesIO()
    onnx.save_model(program.model_proto, buffer)
    graph_bytes = buffer.getvalue()
    check_graph(graph_bytes, model, k)
    return graph_bytes


def check_graph(graph_bytes: bytes, model: GRU4Rec, k: int) -> None:
    """Check input and output names, types and ranks; raise ExportError on a mismatch."""
    proto = onnx.load_from_string(graph_bytes)
    onnx.checker.check_model(proto)

    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"Initializer {tensor.name} refers to external data; weights must be embedded.")

    config = model.config
    element_types = {
        "item": (onnx.TensorProto.INT64, 1),
        "event_type": (onnx.TensorProto.INT64, 1),
        "hidden": (onnx.TensorProto.FLOAT, 3),
        "exclude": (onnx.TensorProto.INT64, 2),
        "cell": (onnx.TensorProto.FLOAT, 3),
        "value": (onnx.TensorProto.FLOAT, 1),
        "scores": (onnx.TensorProto.FLOAT, 2),
        "items": (onnx.TensorProto.INT64, 2),
        "conversion": (onnx.TensorProto.FLOAT, 2),
    }
    expected_inputs = {name: element_types[role] for role, name in input_roles(config).items()}
    expected_outputs = {name: element_types[role] for role, name in output_roles(config).items()}
    _check_values("input", proto.graph.input, expected_inputs)
    _check_values("output", proto.graph.output, expected_outputs)

    hidden_dims = _dims(proto.graph.input, "hidden")
    if hidden_dims[0] != config.num_layers or hidden_dims[2] != config.hidden_size:
        raise ExportError(
            f"Input hidden has shape {hidden_dims}, expected [{config.num_layers}, batch, {config.hidden_size}]."
        )
    for role in ("scores", "items", "conversion"):
        name = output_roles(config).get(role)
        if name is None:
            continue
        dims = _dims(proto.graph.output, name)
        if dims[1] != k:
            raise ExportError(f"Output {name} has shape {dims}, expected [batch, {k}].")


def _check_values(kind: str, values, expected: dict[str, tuple[int, int]]) -> None:
    found = {value.name: value for value in values}
    if list(found) != list(expected):
        raise ExportError(f"Graph {kind}s are {list(found)}, expected {list(expected)}.")
    for name, (element_type, rank) in expected.items():
        tensor_type = found[name].type.tensor_type
        if tensor_type.elem_type != element_type or len(tensor_type.shape.dim) != rank:
            raise ExportError(
                f"Graph {kind} {name} has element type {tensor_type.elem_type} and rank "
                f"{len(tensor_type.shape.dim)}, expected {element_type} and {rank}."
            )


def _dims(values, name: str) -> list[int | str]:
    """Return a value's shape, with symbolic dimensions as their names."""
    value = next(value for value in values if value.name == name)
    return [dim.dim_value if dim.HasField("dim_value") else dim.dim_param for dim in value.type.tensor_type.shape.dim]


def write_step_graph(model: GRU4Rec, path: Path, k: int = DEFAULT_K, opset: int = DEFAULT_OPSET) -> bytes:
    graph_bytes = export_step_graph(model, k, opset)
    Path(path).write_bytes(graph_bytes)
    return graph_bytes
