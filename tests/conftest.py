"""Fixtures shared across test folders: MovieLens location, the embedded broker, a model bundle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def dataset_dir() -> Path:
    """The ml-100k folder: $STREAMREC_DATA_DIR/ml-100k, else ../shared/data/ml-100k beside the repo."""
    root = Path(os.environ.get("STREAMREC_DATA_DIR") or REPO_ROOT.parent / "shared" / "data")
    path = root / "ml-100k"
    if not (path / "u.data").is_file():
        raise FileNotFoundError(f"MovieLens-100K not found at {path}; set STREAMREC_DATA_DIR to a folder containing ml-100k/")
    return path


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    """One embedded Kafka-protocol broker on 127.0.0.1 for the whole session; tests use their own topics."""
    from devkit.broker import EmbeddedBroker

    log_path = tmp_path_factory.mktemp("broker") / "broker.log"
    with EmbeddedBroker(log_path=log_path) as running:
        yield running


def write_random_bundle(dataset_dir: Path, out_dir: Path, seed: int) -> Path:
    """Write a bundle over the MovieLens item vocabulary with seeded random weights.

    Training is tested in tests/export. The serving tests need the real vocabulary and a
    model whose scores differ per user, not a good model, so they skip the minutes of training.
    """
    import torch

    from export.bundle import write_bundle
    from export.data import load_movielens
    from export.model import GRU4Rec, ModelConfig
    from export.sequences import ItemVocabulary

    torch.manual_seed(seed)
    vocabulary = ItemVocabulary.from_interactions(load_movielens(dataset_dir))
    model = GRU4Rec(ModelConfig(num_items=len(vocabulary), embedding_size=32, hidden_size=64))
    metrics = {"model": {"test": {}}, "baselines": {}}
    write_bundle(out_dir, model, vocabulary, {}, metrics, train_config={"seed": seed}, training_data={"dataset": "ml-100k"})
    return out_dir


@pytest.fixture(scope="session")
def movielens_bundle(dataset_dir, tmp_path_factory) -> Path:
    """A random-weight GRU bundle over the MovieLens vocabulary (see write_random_bundle)."""
    return write_random_bundle(dataset_dir, tmp_path_factory.mktemp("bundles") / "random-gru", seed=7)


@pytest.fixture(scope="session")
def second_movielens_bundle(dataset_dir, tmp_path_factory) -> Path:
    """Another model version over the same vocabulary, for model-change tests."""
    return write_random_bundle(dataset_dir, tmp_path_factory.mktemp("bundles") / "random-gru-2", seed=8)
