"""Model bundle loading and the single-step ONNX Runtime runner."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

log = logging.getLogger(__name__)

# Format 2 added the optional "value" input (the event value, NaN when absent) and the
# item_features and event_value manifest sections; format 1 bundles have neither.
# Format 3 added the "heads" section, the optional "conversion" output and the optional
# categories file.
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
SUPPORTED_CELLS = ("gru", "lstm")
_REQUIRED_KEYS = (
    "format_version", "model_version", "cell", "num_layers", "hidden_size", "num_items",
    "event_types", "k", "inputs", "outputs", "graph_file", "graph_sha256", "items_file",
)
# Graph input roles the worker can feed; "cell" is LSTM only and "value" optional.
_INPUT_ROLES = ("item", "event_type", "hidden", "exclude", "cell", "value")
_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


_CATEGORIES_HEADER = ["index", "item_id", "categories"]
_CATEGORIES_HEADER_TEXT = "\t".join(_CATEGORIES_HEADER)
_NO_CATEGORIES: frozenset[str] = frozenset()


class BundleError(ValueError):
    """A model bundle is missing, corrupt, or its manifest does not match its graph."""


@dataclass(frozen=True)
class StepOutput:
    hidden: np.ndarray  # (num_layers, batch, hidden_size)
    cell: np.ndarray | None  # (num_layers, batch, hidden_size), LSTM only
    scores: np.ndarray  # (batch, k)
    items: np.ndarray  # (batch, k) item indices
    # (batch, k) probability that an interaction with each item is strong; None without a conversion head
    conversion: np.ndarray | None = None


class StepModel:
    """One recurrent step of a bundle's ONNX graph plus its item and event-type vocabularies.

    Item index 0 is reserved for unknown items; the graph never ranks it.
    """

    def __init__(
        self,
        bundle_dir: Path,
        manifest: dict[str, Any],
        session: ort.InferenceSession,
        item_ids: list[str],
        categories: list[frozenset[str]] | None = None,
    ):
        self.bundle_dir = bundle_dir
        self.manifest = manifest
        self.session = session
        self.version: str = manifest["model_version"]
        self.cell_type: str = manifest["cell"]
        self.num_layers: int = manifest["num_layers"]
        self.hidden_size: int = manifest["hidden_size"]
        self.k: int = manifest["k"]
        self.event_types: tuple[str, ...] = tuple(manifest["event_types"])
        self.item_ids = item_ids  # index -> item id; index 0 is ""
        self.item_index = {item_id: index for index, item_id in enumerate(item_ids) if index > 0}
        self.event_type_index = {name: index for index, name in enumerate(self.event_types)}
        # Item index -> the item's categories; index 0 and items without a category have none.
        self.categories: list[frozenset[str]] = categories if categories is not None else [_NO_CATEGORIES] * len(item_ids)
        self.has_categories = any(self.categories)
        self._inputs: dict[str, str] = manifest["inputs"]
        self._outputs: dict[str, str] = manifest["outputs"]
        self._output_names = [self._outputs["hidden"], self._outputs["scores"], self._outputs["items"]]
        if self.has_cell_state:
            self._output_names.append(self._outputs["cell"])
        if self.has_conversion:
            self._output_names.append(self._outputs["conversion"])

    @property
    def uses_event_value(self) -> bool:
        """True when the graph takes each event's value as an input."""
        return "value" in self._inputs

    @property
    def has_cell_state(self) -> bool:
        return self.cell_type == "lstm"

    @property
    def has_conversion(self) -> bool:
        """True when the graph returns each candidate's probability of a strong interaction."""
        return "conversion" in self._outputs

    def initial_state(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Return the zero hidden (and cell) state of a new user, each (num_layers, hidden_size)."""
        zeros = np.zeros((self.num_layers, self.hidden_size), dtype=np.float32)
        return zeros, (zeros.copy() if self.has_cell_state else None)

    def step(
        self,
        items: np.ndarray,
        event_types: np.ndarray,
        hidden: np.ndarray,
        exclude: np.ndarray,
        cell: np.ndarray | None = None,
        values: np.ndarray | None = None,
    ) -> StepOutput:
        """Apply one step to a batch of users.

        items, event_types: (batch,) int64 indices; hidden and cell: (num_layers, batch, hidden_size);
        exclude: (batch, n) int64 item indices that must not be recommended, padded with 0;
        values: (batch,) float32 event values with NaN where an event has none, used only
        when the graph has a value input (None then means no event has a value).
        """
        feeds = {
            self._inputs["item"]: items,
            self._inputs["event_type"]: event_types,
            self._inputs["hidden"]: hidden,
            self._inputs["exclude"]: exclude,
        }
        if self.has_cell_state:
            feeds[self._inputs["cell"]] = cell
        if self.uses_event_value:
            if values is None:
                values = np.full(len(items), np.nan, dtype=np.float32)
            feeds[self._inputs["value"]] = values
        results = self.session.run(self._output_names, feeds)
        return StepOutput(
            hidden=results[0],
            scores=results[1],
            items=results[2],
            cell=results[3] if self.has_cell_state else None,
            conversion=results[-1] if self.has_conversion else None,
        )


def load_bundle(bundle_dir: Path | str, *, threads: int = 1, optimization: str = "all") -> StepModel:
    """Load and verify a model bundle; raise BundleError naming what is wrong."""
    bundle_dir = Path(bundle_dir)
    manifest = _read_manifest(bundle_dir)

    graph_path = bundle_dir / manifest["graph_file"]
    graph = _read_file(graph_path, "ONNX graph")
    digest = hashlib.sha256(graph).hexdigest()
    if digest != manifest["graph_sha256"]:
        raise BundleError(
            f"{graph_path}: sha256 {digest[:16]}… does not match the manifest's graph_sha256 "
            f"{str(manifest['graph_sha256'])[:16]}…; the bundle is corrupt or was edited, re-export it"
        )

    item_ids = _read_items(bundle_dir / manifest["items_file"], manifest["num_items"])
    categories = None
    if manifest.get("categories_file") is not None:
        categories = _read_categories(bundle_dir / manifest["categories_file"], item_ids)

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = _OPT_LEVELS[optimization]
    try:
        session = ort.InferenceSession(graph, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises several unrelated exception types
        raise BundleError(f"{graph_path}: ONNX Runtime cannot load the graph: {exc}") from exc

    _check_graph_matches_manifest(session, manifest, graph_path)
    model = StepModel(bundle_dir, manifest, session, item_ids, categories)
    log.info(
        "model bundle loaded: version=%s cell=%s layers=%d hidden=%d items=%d k=%d event_value=%s item_features=%d "
        "conversion=%s categories=%s path=%s",
        model.version, model.cell_type, model.num_layers, model.hidden_size, len(item_ids) - 1, model.k,
        model.uses_event_value, len(manifest.get("item_features") or []), model.has_conversion, model.has_categories,
        bundle_dir,
    )
    return model


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise BundleError(f"{what} not found: {path}; train a model with `python -m export train --out {path.parent}`") from None
    except OSError as exc:
        raise BundleError(f"cannot read {what} {path}: {exc}") from exc


def _read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = bundle_dir / "manifest.json"
    try:
        manifest = json.loads(_read_file(path, "model manifest"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: invalid JSON ({exc})") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(manifest).__name__}")

    missing = [key for key in _REQUIRED_KEYS if key not in manifest]
    if missing:
        raise BundleError(f"{path}: missing keys {', '.join(missing)}")
    if manifest["format_version"] not in SUPPORTED_FORMAT_VERSIONS:
        raise BundleError(
            f"{path}: format_version {manifest['format_version']!r} is not supported "
            f"(this worker reads {SUPPORTED_FORMAT_VERSIONS}); upgrade the worker or re-export the bundle"
        )
    if manifest["cell"] not in SUPPORTED_CELLS:
        raise BundleError(f"{path}: cell {manifest['cell']!r} is not one of {SUPPORTED_CELLS}")
    needed_inputs = ["item", "event_type", "hidden", "exclude"] + (["cell"] if manifest["cell"] == "lstm" else [])
    needed_outputs = ["hidden", "scores", "items"] + (["cell"] if manifest["cell"] == "lstm" else [])
    for section, needed in (("inputs", needed_inputs), ("outputs", needed_outputs)):
        absent = [role for role in needed if role not in manifest[section]]
        if absent:
            raise BundleError(f"{path}: {section} lacks the roles {', '.join(absent)}")
    if manifest["format_version"] >= 3:
        _check_heads(manifest, path)
    elif "conversion" in manifest["outputs"]:
        raise BundleError(
            f"{path}: outputs has a conversion role, which format_version {manifest['format_version']} does not "
            "support; re-export the bundle, because only format 3 carries the conversion head"
        )
    return manifest


def _check_heads(manifest: dict[str, Any], path: Path) -> None:
    """Check that the "heads" section names output roles that "outputs" lists, and that it matches them."""
    heads = manifest.get("heads")
    if not isinstance(heads, dict) or not isinstance(heads.get("preference"), dict):
        raise BundleError(f"{path}: format 3 needs a \"heads\" object with at least a \"preference\" head, got {heads!r}")
    for name, head in heads.items():
        role = head.get("output") if isinstance(head, dict) else None
        if role not in manifest["outputs"]:
            raise BundleError(
                f"{path}: head {name!r} names the output role {role!r}, which is not in outputs {sorted(manifest['outputs'])}"
            )
    has_head = "conversion" in heads
    has_output = "conversion" in manifest["outputs"]
    if has_head != has_output:
        raise BundleError(
            f"{path}: heads {'has' if has_head else 'lacks'} a conversion head but outputs "
            f"{'lacks' if has_head else 'has'} the conversion role; re-export the bundle"
        )


def _read_items(path: Path, num_items: int) -> list[str]:
    text = _read_file(path, "item vocabulary").decode("utf-8")
    rows = list(csv.reader(text.splitlines(), delimiter="\t"))
    if not rows or rows[0][:2] != ["index", "item_id"]:
        raise BundleError(f"{path}: expected a header starting with 'index\\titem_id', got {rows[:1]!r}")

    item_ids = [""]
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or row[0] != str(len(item_ids)):
            raise BundleError(f"{path}:{line_number}: expected index {len(item_ids)} in the first column, got {row[:2]!r}")
        item_ids.append(row[1])
    if len(item_ids) != num_items:
        raise BundleError(
            f"{path}: {len(item_ids) - 1} items plus the unknown-item index do not match the manifest's num_items={num_items}"
        )
    return item_ids


def _read_categories(path: Path, item_ids: list[str]) -> list[frozenset[str]]:
    """Read the item index -> categories table; rows must match items.tsv index by index."""
    text = _read_file(path, "item categories").decode("utf-8")
    rows = list(csv.reader(text.splitlines(), delimiter="\t"))
    if not rows or rows[0] != _CATEGORIES_HEADER:
        raise BundleError(f"{path}: expected the header {_CATEGORIES_HEADER_TEXT!r}, got {rows[:1]!r}")

    categories = [_NO_CATEGORIES]
    for line_number, row in enumerate(rows[1:], start=2):
        index = len(categories)
        if len(row) != 3:
            raise BundleError(f"{path}:{line_number}: expected 3 tab-separated columns, got {len(row)}")
        if index >= len(item_ids) or row[0] != str(index) or row[1] != item_ids[index]:
            expected = f"index {index} item {item_ids[index]!r}" if index < len(item_ids) else "no more rows"
            raise BundleError(f"{path}:{line_number}: expected {expected} as in items.tsv, got {row[:2]!r}")
        names = row[2].split("|") if row[2] else []
        if any(not name for name in names):
            raise BundleError(f"{path}:{line_number}: invalid categories {row[2]!r}: a category name is empty")
        categories.append(frozenset(names) if names else _NO_CATEGORIES)
    if len(categories) != len(item_ids):
        raise BundleError(f"{path}: {len(categories) - 1} rows, but items.tsv has {len(item_ids) - 1} items")
    return categories


def _check_graph_matches_manifest(session: ort.InferenceSession, manifest: dict[str, Any], graph_path: Path) -> None:
    inputs = {node.name: node for node in session.get_inputs()}
    outputs = {node.name: node for node in session.get_outputs()}
    problems = []

    for role, name in manifest["inputs"].items():
        if name not in inputs:
            problems.append(f"input {role}={name!r} not in graph inputs {sorted(inputs)}")
    # Every graph input must have a role this worker feeds, or the first step would fail.
    fed = set(manifest["inputs"].values())
    for name in inputs:
        if name not in fed:
            problems.append(f"graph input {name!r} has no role in the manifest's inputs")
    unknown_roles = sorted(set(manifest["inputs"]) - set(_INPUT_ROLES))
    if unknown_roles:
        problems.append(f"input roles {unknown_roles} are unknown to this worker (it feeds {list(_INPUT_ROLES)})")
    for role, name in manifest["outputs"].items():
        if name not in outputs:
            problems.append(f"output {role}={name!r} not in graph outputs {sorted(outputs)}")

    state_shape = [manifest["num_layers"], None, manifest["hidden_size"]]
    for section, table in (("inputs", inputs), ("outputs", outputs)):
        for role in ("hidden", "cell"):
            name = manifest[section].get(role)
            if name in table and not _shape_matches(table[name].shape, state_shape):
                problems.append(f"{section} {role}={name!r} has shape {table[name].shape}, manifest says {state_shape}")
    for role in ("scores", "items", "conversion"):
        name = manifest["outputs"].get(role)
        if name in outputs and not _shape_matches(outputs[name].shape, [None, manifest["k"]]):
            problems.append(f"output {role}={name!r} has shape {outputs[name].shape}, manifest says k={manifest['k']}")
    conversion = manifest["outputs"].get("conversion")
    if conversion in outputs and outputs[conversion].type != "tensor(float)":
        problems.append(f"output conversion={conversion!r} has type {outputs[conversion].type}, expected tensor(float)")

    if problems:
        raise BundleError(f"{graph_path}: the graph does not match manifest.json: " + "; ".join(problems))


def _shape_matches(actual: list, expected: list) -> bool:
    """Compare an ONNX shape with an expected one; None or a symbolic dimension matches anything."""
    if len(actual) != len(expected):
        return False
    return all(want is None or not isinstance(got, int) or got == want for got, want in zip(actual, expected))
