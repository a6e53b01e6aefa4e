"""A hand-built step graph with constant scores, written as a model bundle, so that ranking tests have exact inputs."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

EVENT_TYPES = ["view", "click", "add_to_cart", "purchase", "rating"]
HIDDEN_SIZE = 2


@dataclass
class ConstantBundle:
    """A bundle whose graph scores every user's candidates the same way.

    ``logits`` and ``conversion`` map item ids to the constant next-item logit and
    conversion probability. Excluded items get -inf like in a trained graph, and the
    hidden state passes through unchanged.
    """

    logits: dict[str, float]
    conversion: dict[str, float] | None = None
    categories: dict[str, list[str]] | None = None
    k: int | None = None  # default: every item
    format_version: int = 3
    model_version: str = "constant-1"
    manifest_changes: dict[str, Any] = field(default_factory=dict)

    @property
    def item_ids(self) -> list[str]:
        return list(self.logits)

    def write(self, out_dir: Path) -> Path:
        """Write manifest.json, model.onnx, items.tsv (and categories.tsv) into ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        k = self.k if self.k is not None else len(self.logits)
        graph = self._graph(k).SerializeToString()
        (out_dir / "model.onnx").write_bytes(graph)
        items = ["index\titem_id"] + [f"{index}\t{item_id}" for index, item_id in enumerate(self.item_ids, start=1)]
        (out_dir / "items.tsv").write_text("\n".join(items) + "\n")

        outputs = {"hidden": "hidden_out", "scores": "topk_scores", "items": "topk_items"}
        manifest: dict[str, Any] = {
            "format_version": self.format_version,
            "model_version": self.model_version,
            "cell": "gru",
            "num_layers": 1,
            "hidden_size": HIDDEN_SIZE,
            "num_items": len(self.logits) + 1,
            "event_types": EVENT_TYPES,
            "k": k,
            "inputs": {"item": "item_index", "event_type": "event_type", "hidden": "hidden", "exclude": "exclude_items"},
            "outputs": outputs,
            "graph_file": "model.onnx",
            "graph_sha256": hashlib.sha256(graph).hexdigest(),
            "items_file": "items.tsv",
        }
        if self.format_version >= 3:
            manifest["heads"] = {"preference": {"output": "scores", "description": "next-item logit"}}
        if self.conversion is not None:
            outputs["conversion"] = "topk_conversion"
            manifest["heads"]["conversion"] = {
                "output": "conversion",
                "description": "probability that an interaction with the item is strong",
                "strong_event_types": ["add_to_cart", "purchase"],
                "strong_min_rating": 4.0,
            }
        if self.categories is not None:
            rows = ["index\titem_id\tcategories"]
            for index, item_id in enumerate(self.item_ids, start=1):
                rows.append(f"{index}\t{item_id}\t{'|'.join(self.categories.get(item_id, []))}")
            (out_dir / "categories.tsv").write_text("\n".join(rows) + "\n")
            manifest["categories_file"] = "categories.tsv"
        manifest.update(self.manifest_changes)
        (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
        return out_dir

    def _graph(self, k: int) -> onnx.ModelProto:
        num_items = len(self.logits) + 1
        logits = np.array([-np.inf] + list(self.logits.values()), dtype=np.float32)[None, :]  # (1, num_items)
        conversion = np.array([0.0] + [(self.conversion or {}).get(item_id, 0.0) for item_id in self.item_ids], dtype=np.float32)
        constants = [
            helper.make_tensor("logits", TensorProto.FLOAT, logits.shape, logits.ravel()),
            helper.make_tensor("item_range", TensorProto.INT64, [1, 1, num_items], np.arange(num_items)),
            helper.make_tensor("k", TensorProto.INT64, [1], [k]),
            helper.make_tensor("one_axis", TensorProto.INT64, [1], [1]),
            helper.make_tensor("two_axis", TensorProto.INT64, [1], [2]),
            helper.make_tensor("minus_inf", TensorProto.FLOAT, [], [-np.inf]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ]
        nodes = [
            # The batch size comes from the item input: logits (1, N) expand to (batch, N).
            helper.make_node("Shape", ["item_index"], ["batch"]),
            helper.make_node("Shape", ["logits"], ["logits_shape"]),
            helper.make_node("Slice", ["logits_shape", "one_axis", "two_axis"], ["item_range_width"]),
            helper.make_node("Concat", ["batch", "item_range_width"], ["scores_shape"], axis=0),
            helper.make_node("Expand", ["logits", "scores_shape"], ["all_scores"]),
            # excluded[b, i] = any(exclude[b, :] == i)
            helper.make_node("Unsqueeze", ["exclude_items", "two_axis"], ["exclude_column"]),  # (batch, n, 1)
            helper.make_node("Equal", ["exclude_column", "item_range"], ["matches"]),  # (batch, n, N)
            helper.make_node("Cast", ["matches"], ["matches_float"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", ["matches_float", "one_axis"], ["excluded_float"], keepdims=0),  # (batch, N)
            helper.make_node("Greater", ["excluded_float", "zero"], ["excluded"]),
            helper.make_node("Where", ["excluded", "minus_inf", "all_scores"], ["masked_scores"]),
            helper.make_node("TopK", ["masked_scores", "k"], ["topk_scores", "topk_items"], axis=1),
            helper.make_node("Identity", ["hidden"], ["hidden_out"]),
        ]
        outputs = [
            helper.make_tensor_value_info("hidden_out", TensorProto.FLOAT, [1, "batch", HIDDEN_SIZE]),
            helper.make_tensor_value_info("topk_scores", TensorProto.FLOAT, ["batch", k]),
            helper.make_tensor_value_info("topk_items", TensorProto.INT64, ["batch", k]),
        ]
        if self.conversion is not None:
            constants.append(helper.make_tensor("item_conversion", TensorProto.FLOAT, [num_items], conversion))
            nodes.append(helper.make_node("Gather", ["item_conversion", "topk_items"], ["topk_conversion"], axis=0))
            outputs.append(helper.make_tensor_value_info("topk_conversion", TensorProto.FLOAT, ["batch", k]))
        inputs = [
            helper.make_tensor_value_info("item_index", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("event_type", TensorProto.INT64, ["batch"]),
            helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "batch", HIDDEN_SIZE]),
            helper.make_tensor_value_info("exclude_items", TensorProto.INT64, ["batch", "excluded"]),
        ]
        graph = helper.make_graph(nodes, "constant_step", inputs, outputs, initializer=constants)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
        onnx.checker.check_model(model)
        return model
