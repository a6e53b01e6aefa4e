from __future__ import annotations

import csv
import hashlib
import json
from datetime import datetime

import numpy as np
import pytest
import torch

from export.bundle import (
    BundleError,
    compute_model_version,
    load_pytorch_model,
    read_item_ids,
    recommend_for_sequence,
    write_bundle,
)
from export.model import GRU4Rec, ModelConfig
from export.parity import make_session
from export.sequences import EVENT_TYPES, ItemVocabulary

K = 6
METRIC_KEYS = ["recall@10", "ndcg@10", "mrr@10", "recall@20", "ndcg@20", "mrr@20", "coverage@10", "coverage@20"]
MANIFEST_KEYS = {
    "format_version", "model_version", "cell", "num_layers", "hidden_size", "embedding_size", "num_items",
    "event_types", "k", "opset", "inputs", "outputs", "graph_file", "graph_sha256", "items_file",
    "training_data", "parity", "metrics", "created_at", "train_config", "tied_embeddings", "item_features",
    "event_value", "heads",
}


def fake_metrics(offset: float) -> dict[str, float]:
    return {key: offset + position / 100 for position, key in enumerate(METRIC_KEYS)}


METRICS = {
    "model": {"test": fake_metrics(0.1), "valid": fake_metrics(0.2)},
    "baselines": {
        "popularity": {"test": fake_metrics(0.3)},
        "last_item_cooccurrence": {"test": fake_metrics(0.4)},
    },
}
TRAINING_DATA = {"dataset": "ml-100k", "fingerprint": "f" * 64, "interactions": 1234, "users": 56}


def random_model(num_layers: int = 2) -> GRU4Rec:
    torch.manual_seed(7)
    model = GRU4Rec(ModelConfig(num_items=31, embedding_size=8, hidden_size=16, num_layers=num_layers)).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(std=0.3)
    return model


VOCABULARY = ItemVocabulary([f"m{number}" for number in range(1, 31)])
# Titles with a tab, a leading quote and non-ASCII letters must survive the TSV round trip.
TITLES = {"m1": "Tab\there", "m2": '"Quoted" start', "m3": "Café", "m30": "Last"}


def write(out_dir, model=None):
    return write_bundle(
        out_dir,
        model or random_model(),
        VOCABULARY,
        TITLES,
        METRICS,
        train_config={"model": {"hidden_size": 16}, "training": {"seed": 7}},
        training_data=TRAINING_DATA,
        k=K,
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return write(tmp_path_factory.mktemp("bundles") / "bundle")


def test_bundle_has_all_files(bundle):
    names = sorted(path.name for path in bundle.path.iterdir())

    assert names == ["checkpoint.pt", "items.tsv", "manifest.json", "metrics.json", "model.onnx"]


def test_manifest_keys_and_values(bundle):
    manifest = json.loads((bundle.path / "manifest.json").read_text())

    assert MANIFEST_KEYS <= set(manifest)
    assert manifest["format_version"] == 3
    assert manifest["cell"] == "gru"
    assert (manifest["num_layers"], manifest["hidden_size"], manifest["embedding_size"]) == (2, 16, 8)
    assert manifest["num_items"] == 31
    assert manifest["event_types"] == list(EVENT_TYPES)
    assert manifest["k"] == K
    assert manifest["opset"] == 18
    assert manifest["inputs"] == {"item": "item_index", "event_type": "event_type", "hidden": "hidden", "exclude": "exclude_items"}
    assert manifest["outputs"] == {"hidden": "hidden_out", "scores": "topk_scores", "items": "topk_items"}
    assert manifest["graph_file"] == "model.onnx"
    assert manifest["items_file"] == "items.tsv"
    assert manifest["training_data"] == TRAINING_DATA
    assert manifest["metrics"] == METRICS["model"]["test"]
    assert manifest["parity"]["passed"] is True
    assert manifest["parity"]["chained_steps"] == 200
    assert manifest["train_config"] == {"model": {"hidden_size": 16}, "training": {"seed": 7}}
    assert manifest["created_at"].endswith("Z")
    assert datetime.fromisoformat(manifest["created_at"].replace("Z", "+00:00")).utcoffset().total_seconds() == 0


def test_model_version_and_graph_hash_match_files(bundle):
    manifest = json.loads((bundle.path / "manifest.json").read_text())
    graph_bytes = (bundle.path / "model.onnx").read_bytes()
    items_bytes = (bundle.path / "items.tsv").read_bytes()

    assert manifest["graph_sha256"] == hashlib.sha256(graph_bytes).hexdigest()
    assert manifest["model_version"] == hashlib.sha256(graph_bytes + items_bytes).hexdigest()[:16]
    assert manifest["model_version"] == compute_model_version(graph_bytes, items_bytes) == bundle.model_version
    assert not list(bundle.path.glob("*.data"))


def test_model_version_is_stable_and_content_derived(bundle, tmp_path):
    again = write(tmp_path / "again")
    other_model = random_model()
    with torch.no_grad():
        other_model.output_bias[3] += 1.0
    other = write(tmp_path / "other", other_model)

    assert again.model_version == bundle.model_version
    assert other.model_version != bundle.model_version


def test_metrics_file_shape(bundle):
    metrics = json.loads((bundle.path / "metrics.json").read_text())

    assert metrics == METRICS
    assert list(metrics["model"]["test"]) == METRIC_KEYS


def test_items_file_round_trip(bundle):
    with (bundle.path / "items.tsv").open(encoding="utf-8", newline="") as file:
        rows = list(csv.reader(file, delimiter="\t"))

    assert rows[0] == ["index", "item_id", "title"]
    assert len(rows) == 31
    assert rows[1] == ["1", "m1", "Tab\there"]
    assert rows[2] == ["2", "m2", '"Quoted" start']
    assert rows[3] == ["3", "m3", "Café"]
    assert rows[4] == ["4", "m4", ""]
    assert read_item_ids(bundle.path / "items.tsv") == [""] + VOCABULARY.item_ids


def test_checkpoint_rebuilds_same_model(bundle):
    original = random_model()
    loaded = load_pytorch_model(bundle.path)
    items = torch.randint(0, 31, (2, 9))
    event_types = torch.randint(0, 5, (2, 9))

    with torch.no_grad():
        expected, _ = original(items, event_types)
        actual, _ = loaded.model(items, event_types)

    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert loaded.k == K
    assert loaded.item_ids[1] == "m1"
    assert loaded.event_types == list(EVENT_TYPES)


def onnx_recommend(bundle_path, item_ids, event_types, exclude_last):
    """Apply the sequence through the ONNX graph one step at a time, as the worker does."""
    manifest = json.loads((bundle_path / "manifest.json").read_text())
    ids = read_item_ids(bundle_path / "items.tsv")
    index = {item_id: position for position, item_id in enumerate(ids) if position}
    session = make_session((bundle_path / "model.onnx").read_bytes())

    items = [index.get(item_id, 0) for item_id in item_ids]
    hidden = np.zeros((manifest["num_layers"], 1, manifest["hidden_size"]), dtype=np.float32)
    for position, (item, event_type) in enumerate(zip(items, event_types)):
        recent = items[max(0, position + 1 - exclude_last) : position + 1] if exclude_last else []
        hidden, scores, top = session.run(
            None,
            {
                "item_index": np.array([item]),
                "event_type": np.array([manifest["event_types"].index(event_type)]),
                "hidden": hidden,
                "exclude_items": np.array([recent], dtype=np.int64).reshape(1, len(recent)),
            },
        )
    return [(ids[item], float(score)) for item, score in zip(top[0], scores[0])]


@pytest.mark.parametrize(
    ("item_ids", "exclude_last"),
    [
        (["m1"], 0),
        (["m1", "m5", "m9", "m5", "m30"], 3),
        (["m2", "not-in-catalogue", "m7"] * 5, 10),
    ],
)
def test_recommend_for_sequence_matches_onnx(bundle, item_ids, exclude_last):
    event_types = [EVENT_TYPES[position % len(EVENT_TYPES)] for position in range(len(item_ids))]

    expected = onnx_recommend(bundle.path, item_ids, event_types, exclude_last)
    actual = recommend_for_sequence(bundle.path, item_ids, event_types, exclude_last)

    assert len(actual) == K
    assert [item for item, _ in actual] == [item for item, _ in expected]
    np.testing.assert_allclose([score for _, score in actual], [score for _, score in expected], rtol=0, atol=1e-5)
    assert not {item for item, _ in actual} & set(item_ids[len(item_ids) - exclude_last :] if exclude_last else [])


def test_recommend_accepts_loaded_bundle(bundle):
    loaded = load_pytorch_model(bundle.path)

    from_model = recommend_for_sequence(loaded, ["m3", "m4"], ["view", "purchase"], exclude_last=2)
    from_path = recommend_for_sequence(bundle.path, ["m3", "m4"], ["view", "purchase"], exclude_last=2)

    assert from_model == from_path
    assert not {"m3", "m4"} & {item for item, _ in from_model}


def test_recommend_rejects_bad_input(bundle):
    with pytest.raises(ValueError, match="empty"):
        recommend_for_sequence(bundle.path, [], [], exclude_last=0)
    with pytest.raises(ValueError, match="pair up"):
        recommend_for_sequence(bundle.path, ["m1"], [], exclude_last=0)
    with pytest.raises(ValueError, match="Unknown event type 'like'"):
        recommend_for_sequence(bundle.path, ["m1"], ["like"], exclude_last=0)


def test_write_refuses_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("not a bundle")

    with pytest.raises(BundleError, match="not a bundle to replace"):
        write(tmp_path)
    assert (tmp_path / "notes.txt").exists()


def test_load_detects_items_mismatch(bundle, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in bundle.path.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    lines = (broken / "items.tsv").read_text(encoding="utf-8").splitlines()
    (broken / "items.tsv").write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")

    with pytest.raises(BundleError, match="lists 29 items"):
        load_pytorch_model(broken)
