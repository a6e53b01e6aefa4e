"""Write and read model bundle directories.

A bundle contains the ONNX step graph (``model.onnx``), the PyTorch checkpoint it came from
(``checkpoint.pt``), the item vocabulary (``items.tsv``), the offline metrics
(``metrics.json``), ``manifest.json``, which describes the graph for the worker, and,
when any item has one, the item categories (``categories.tsv``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import onnx
import torch

from export.model import GRU4Rec, ModelConfig
from export.onnx_export import DEFAULT_K, DEFAULT_OPSET, export_step_graph, input_roles, output_roles
from export.parity import ParityResult, check_parity
from export.sequences import EVENT_TYPES, STRONG_EVENT_TYPES, STRONG_MIN_RATING, ItemVocabulary

# Format 2 added the optional graph inputs "cell" (LSTM) and "value" (event value), and
# the manifest's item_features and event_value sections. Format 3 added the optional
# output "conversion", the "heads" section and the optional categories file.
FORMAT_VERSION = 3
READABLE_FORMAT_VERSIONS = (1, 2, 3)
GRAPH_FILE = "model.onnx"
CHECKPOINT_FILE = "checkpoint.pt"
ITEMS_FILE = "items.tsv"
METRICS_FILE = "metrics.json"
MANIFEST_FILE = "manifest.json"
ITEMS_HEADER = ("index", "item_id", "title")
CATEGORIES_FILE = "categories.tsv"
CATEGORIES_HEADER = ("index", "item_id", "categories")
# Item tags with these prefixes name a category: MovieLens genres and the categories column of a table log.
CATEGORY_TAG_PREFIXES = ("genre=", "category=")


class BundleError(Exception):
    """A bundle directory that is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class WrittenBundle:
    path: Path
    model_version: str
    parity: ParityResult
    manifest: dict[str, Any]


@dataclass(frozen=True)
class PytorchBundle:
    """A bundle's PyTorch model with the vocabularies needed to run it."""

    model: GRU4Rec  # in eval mode
    item_ids: list[str]  # index -> item id; index 0 is "" (unknown)
    event_types: list[str]
    k: int
    manifest: dict[str, Any]
    # Category names by item index (index 0 has none); None when the bundle has no categories file.
    categories: list[frozenset[str]] | None = None


def compute_model_version(graph_bytes: bytes, items_bytes: bytes) -> str:
    """Return the first 16 hex digits of sha256 over the graph bytes then the items bytes."""
    return hashlib.sha256(graph_bytes + items_bytes).hexdigest()[:16]


def render_items(vocabulary: ItemVocabulary, titles: dict[str, str]) -> bytes:
    """Render items.tsv: a header, then one row per known index with its title or ''."""
    buffer = io.StringIO()
    # csv quoting keeps a title with a tab, newline or leading quote on its own row.
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(ITEMS_HEADER)
    for index, item_id in enumerate(vocabulary.item_ids, start=1):
        writer.writerow((index, item_id, titles.get(item_id, "")))
    return buffer.getvalue().encode("utf-8")


def _read_tsv(path: Path, header: tuple[str, ...], missing: str) -> list[list[str]]:
    """Read a tab-separated bundle file whose first row must be ``header``; raise BundleError otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(missing) from None

    rows = list(csv.reader(io.StringIO(text), delimiter="\t"))
    if not rows or tuple(rows[0]) != header:
        raise BundleError(f"{path}: header is {rows[:1]!r}, expected {list(header)!r}.")
    return rows


def read_item_ids(path: Path) -> list[str]:
    """Read items.tsv into a list indexed by item index, with "" at index 0."""
    rows = _read_tsv(path, ITEMS_HEADER, f"{path} not found; the bundle is incomplete, write it again.")

    item_ids = [""]
    for line_number, row in enumerate(rows[1:], start=2):
        if len(row) != len(ITEMS_HEADER) or row[0] != str(len(item_ids)):
            raise BundleError(f"{path}, line {line_number}: expected index {len(item_ids)} and 3 columns, got {row!r}.")
        item_ids.append(row[1])
    return item_ids


def categories_from_tags(item_tags: dict[str, Any] | None) -> dict[str, list[str]]:
    """Return {item id: category names} from item tags such as "genre=Comedy" or "category=shoes"."""
    categories = {}
    for item_id, tags in (item_tags or {}).items():
        names = [tag.split("=", 1)[1] for tag in tags if tag.startswith(CATEGORY_TAG_PREFIXES)]
        if names:
            categories[item_id] = names
    return categories


def render_categories(vocabulary: ItemVocabulary, categories: dict[str, list[str]]) -> bytes | None:
    """Render categories.tsv: a header, then one row per known index with its categories joined by "|".

    Returns None when no item of the vocabulary has a category, because then the bundle
    has no categories file.
    """
    if not any(categories.get(item_id) for item_id in vocabulary.item_ids):
        return None
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
    writer.writerow(CATEGORIES_HEADER)
    for index, item_id in enumerate(vocabulary.item_ids, start=1):
        names = categories.get(item_id, [])
        for name in names:
            if "|" in name or not name.strip():
                raise BundleError(f"Item {item_id!r} has category {name!r}; a category name must be non-empty and contain no '|'.")
        writer.writerow((index, item_id, "|".join(names)))
    return buffer.getvalue().encode("utf-8")


def read_categories(path: Path, item_ids: list[str]) -> list[frozenset[str]]:
    """Read categories.tsv into a list of category sets indexed by item index (index 0 empty)."""
    rows = _read_tsv(
        path, CATEGORIES_HEADER, f"{path} not found, but the manifest names it; the bundle is incomplete, write it again."
    )
    categories = [frozenset()]
    for line_number, row in enumerate(rows[1:], start=2):
        index = len(categories)
        if len(row) != len(CATEGORIES_HEADER) or row[0] != str(index) or index >= len(item_ids) or row[1] != item_ids[index]:
            raise BundleError(f"{path}, line {line_number}: expected index {index}, its item id and 3 columns, got {row!r}.")
        categories.append(frozenset(name for name in row[2].split("|") if name))
    if len(categories) != len(item_ids):
        raise BundleError(f"{path} lists {len(categories) - 1} items but items.tsv lists {len(item_ids) - 1}.")
    return categories


def heads_section(config: ModelConfig) -> dict[str, Any]:
    """Describe the model's heads; each "output" value is an output role of the manifest."""
    heads: dict[str, Any] = {"preference": {"output": "scores", "description": "next-item logit"}}
    if config.conversion_head:
        heads["conversion"] = {
            "output": "conversion",
            "description": "probability that an interaction with the item is strong",
            "strong_event_types": list(STRONG_EVENT_TYPES),
            "strong_min_rating": STRONG_MIN_RATING,
        }
    return heads


def write_bundle(
    out_dir: Path,
    model: GRU4Rec,
    vocabulary: ItemVocabulary,
    titles: dict[str, str],
    metrics: dict[str, Any],
    train_config: dict[str, Any],
    training_data: dict[str, Any],
    k: int = DEFAULT_K,
    opset: int = DEFAULT_OPSET,
    extra_manifest: dict[str, Any] | None = None,
    item_feature_names: list[str] | None = None,
    item_categories: dict[str, list[str]] | None = None,
) -> WrittenBundle:
    """Export, check parity and write every bundle file into ``out_dir``.

    ``item_categories`` maps item ids to category names for categories.tsv (see
    categories_from_tags). ``metrics`` has the metrics.json shape; its model test metrics are copied into the
    manifest. The files are written to a temporary sibling folder that then replaces
    ``out_dir``, so a reader never sees half a bundle. An existing ``out_dir`` is replaced
    only when it is empty or contains a manifest.json.
    """
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    if len(vocabulary) != model.config.num_items:
        raise BundleError(
            f"Vocabulary has {len(vocabulary)} indices but the model scores {model.config.num_items} items."
        )
    feature_names = list(item_feature_names or [])
    if len(feature_names) != model.config.num_item_features:
        raise BundleError(
            f"{len(feature_names)} item feature names given, but the model has {model.config.num_item_features} feature columns."
        )
    model.eval()

    graph_bytes = export_step_graph(model, k, opset)
    parity = check_parity(model, graph_bytes, k)
    items_bytes = render_items(vocabulary, titles)
    categories_bytes = render_categories(vocabulary, item_categories or {})
    model_version = compute_model_version(graph_bytes, items_bytes)

    manifest = {
        "format_version": FORMAT_VERSION,
        "model_version": model_version,
        "cell": model.config.cell,
        "num_layers": model.config.num_layers,
        "hidden_size": model.config.hidden_size,
        "embedding_size": model.config.embedding_size,
        "num_items": model.config.num_items,
        "event_types": list(EVENT_TYPES),
        "k": k,
        "opset": graph_opset(graph_bytes),
        "tied_embeddings": model.config.tied_embeddings,
        "inputs": input_roles(model.config),
        "outputs": output_roles(model.config),
        "heads": heads_section(model.config),
        # The feature table is a constant inside the graph; the names document its columns.
        "item_features": feature_names,
        "event_value": _event_value_section(model),
        "graph_file": GRAPH_FILE,
        "graph_sha256": hashlib.sha256(graph_bytes).hexdigest(),
        "items_file": ITEMS_FILE,
        **({"categories_file": CATEGORIES_FILE} if categories_bytes is not None else {}),
        "training_data": training_data,
        "parity": parity.to_dict(),
        "metrics": metrics["model"]["test"],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "train_config": train_config,
        **(extra_manifest or {}),
    }

    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (staging / GRAPH_FILE).write_bytes(graph_bytes)
        (staging / ITEMS_FILE).write_bytes(items_bytes)
        if categories_bytes is not None:
            (staging / CATEGORIES_FILE).write_bytes(categories_bytes)
        save_checkpoint(staging / CHECKPOINT_FILE, model)
        _write_json(staging / METRICS_FILE, metrics)
        _write_json(staging / MANIFEST_FILE, manifest)
        _replace_dir(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return WrittenBundle(path=out_dir, model_version=model_version, parity=parity, manifest=manifest)


def _event_value_section(model: GRU4Rec) -> dict[str, Any] | None:
    """Describe the "value" input: how an absent value is fed and how values are scaled."""
    if not model.config.use_event_value:
        return None
    center, scale = (float(number) for number in model.value_scaling)
    return {"input": input_roles(model.config)["value"], "dtype": "float32", "absent": "NaN", "center": center, "scale": scale}


def graph_opset(graph_bytes: bytes) -> int:
    proto = onnx.load_from_string(graph_bytes)
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        return
    if not out_dir.is_dir():
        raise BundleError(f"{out_dir} exists and is not a directory; choose another --out.")
    if any(out_dir.iterdir()) and not (out_dir / MANIFEST_FILE).exists():
        raise BundleError(
            f"{out_dir} is not empty and contains no {MANIFEST_FILE}, so it is not a bundle to replace; "
            "choose an empty or new --out directory."
        )


def _replace_dir(staging: Path, out_dir: Path) -> None:
    os.chmod(staging, 0o755)
    if not out_dir.exists():
        staging.rename(out_dir)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
    retired.rmdir()
    out_dir.rename(retired)
    staging.rename(out_dir)
    shutil.rmtree(retired)


def _write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False) + "\n", encoding="utf-8")


def save_checkpoint(path: Path, model: GRU4Rec) -> None:
    torch.save({"model_config": model.config.to_dict(), "state_dict": model.state_dict()}, path)


def load_checkpoint(path: Path) -> GRU4Rec:
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise BundleError(f"{path} not found; the bundle is incomplete, write it again.") from None

    model = GRU4Rec(ModelConfig(**checkpoint["model_config"]))
    # Checkpoints written before LSTM support named the recurrent module "gru".
    state_dict = {_renamed_key(key): value for key, value in checkpoint["state_dict"].items()}
    model.load_state_dict(state_dict)
    return model.eval()


def _renamed_key(key: str) -> str:
    return "rnn." + key.removeprefix("gru.") if key.startswith("gru.") else key


def read_manifest(bundle_dir: Path) -> dict[str, Any]:
    path = Path(bundle_dir) / MANIFEST_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} not found; is {bundle_dir} a bundle written by `python -m export train`?") from None
    except json.JSONDecodeError as error:
        raise BundleError(f"{path} is not valid JSON: {error}.") from None


def load_pytorch_model(bundle_dir: Path | str) -> PytorchBundle:
    """Rebuild a bundle's PyTorch model and check it against the manifest and items.tsv."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    if manifest.get("format_version") not in READABLE_FORMAT_VERSIONS:
        raise BundleError(
            f"{bundle_dir}: manifest format_version {manifest.get('format_version')!r} is not one of "
            f"{READABLE_FORMAT_VERSIONS}; write the bundle again with this version of `python -m export train`."
        )
    model = load_checkpoint(bundle_dir / CHECKPOINT_FILE)
    item_ids = read_item_ids(bundle_dir / manifest["items_file"])

    expected = {
        "num_items": model.config.num_items,
        "hidden_size": model.config.hidden_size,
        "num_layers": model.config.num_layers,
        "embedding_size": model.config.embedding_size,
    }
    for key, value in expected.items():
        if manifest.get(key) != value:
            raise BundleError(f"{bundle_dir}: manifest {key}={manifest.get(key)} but the checkpoint has {value}.")
    if len(item_ids) != model.config.num_items:
        raise BundleError(
            f"{bundle_dir}: items.tsv lists {len(item_ids) - 1} items but the model scores "
            f"{model.config.num_items - 1}."
        )
    categories = None
    if manifest.get("categories_file"):
        categories = read_categories(bundle_dir / manifest["categories_file"], item_ids)
    return PytorchBundle(
        model=model,
        item_ids=item_ids,
        event_types=list(manifest["event_types"]),
        k=manifest["k"],
        manifest=manifest,
        categories=categories,
    )


def recommend_for_sequence(
    bundle_dir_or_model: Path | str | PytorchBundle,
    item_ids: list[str],
    event_types: list[str],
    exclude_last: int,
    values: list[float | None] | None = None,
) -> list[tuple[str, float]]:
    """Run the PyTorch model one step per event from a zero hidden state and return the top-k.

    Unknown item ids enter as index 0, and a value of None enters as absent (NaN). The last ``exclude_last`` item indices of the
    sequence are excluded from the final ranking, as the worker excludes a user's most
    recent items. Entries whose score is -inf (possible only when fewer than k items
    remain after exclusion) are left out of the result.
    """
    bundle = bundle_dir_or_model
    if not isinstance(bundle, PytorchBundle):
        bundle = load_pytorch_model(bundle)
    if not item_ids:
        raise ValueError("The sequence is empty; at least one event is needed for a recommendation.")
    if len(item_ids) != len(event_types):
        raise ValueError(f"Got {len(item_ids)} item ids but {len(event_types)} event types; they must pair up.")
    values = list(values) if values is not None else [None] * len(item_ids)
    if len(values) != len(item_ids):
        raise ValueError(f"Got {len(item_ids)} item ids but {len(values)} values; they must pair up.")
    if exclude_last < 0:
        raise ValueError(f"exclude_last={exclude_last} must not be negative.")

    item_index = {item_id: index for index, item_id in enumerate(bundle.item_ids) if index > 0}
    items = [item_index.get(item_id, 0) for item_id in item_ids]
    types = [_event_type_index(bundle.event_types, event_type) for event_type in event_types]
    excluded = items[max(0, len(items) - exclude_last) :] if exclude_last else []

    model = bundle.model.eval()
    hidden = model.initial_hidden(batch_size=1)  # (layers, 1, hidden)
    cell = model.initial_hidden(batch_size=1) if model.config.has_cell_state else None  # (layers, 1, hidden)
    exclude = torch.tensor([excluded], dtype=torch.int64).reshape(1, len(excluded))  # (1, n_exclude)
    with torch.no_grad():
        for item, event_type, value in zip(items, types, values):
            event_value = torch.tensor([float("nan") if value is None else float(value)])  # (1,)
            outputs = model.step(
                torch.tensor([item]), torch.tensor([event_type]), hidden, exclude, bundle.k, cell=cell, value=event_value
            )  # (layers, 1, hidden), (1, k), (1, k) and, for an LSTM, the cell state
            hidden, scores, top = outputs[:3]
            cell = outputs[3] if model.config.has_cell_state else None

    return [
        (bundle.item_ids[index], score)
        for index, score in zip(top[0].tolist(), scores[0].tolist())
        if score != float("-inf")
    ]


def _event_type_index(event_types: list[str], event_type: str) -> int:
    try:
        return event_types.index(event_type)
    except ValueError:
        raise ValueError(f"Unknown event type {event_type!r}; the bundle's event types are {', '.join(event_types)}.") from None
