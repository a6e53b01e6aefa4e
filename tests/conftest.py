"""Fixtures shared across test folders: MovieLens location, the embedded broker, a model bundle, a worker pipeline."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from devkit.worker_process import TopicCollector, WorkerProcess, worker_env
from worker.config import Settings
from worker.create_topics import create_worker_topics
from worker.state import decode_state

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


SERVED_K = 20


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
    # k equals the worker's default STREAMREC_TOP_K, so a served top-K can be compared whole with the offline one.
    write_bundle(
        out_dir, model, vocabulary, {}, metrics, train_config={"seed": seed}, training_data={"dataset": "ml-100k"}, k=SERVED_K
    )
    return out_dir


@pytest.fixture(scope="session")
def movielens_bundle(dataset_dir, tmp_path_factory) -> Path:
    """A random-weight GRU bundle over the MovieLens vocabulary (see write_random_bundle)."""
    return write_random_bundle(dataset_dir, tmp_path_factory.mktemp("bundles") / "random-gru", seed=7)


@pytest.fixture(scope="session")
def second_movielens_bundle(dataset_dir, tmp_path_factory) -> Path:
    """Another model version over the same vocabulary, for model-change tests."""
    return write_random_bundle(dataset_dir, tmp_path_factory.mktemp("bundles") / "random-gru-2", seed=8)


# -- a worker process on fresh topics of the session broker -------------------------------

RECENT_ITEMS = 50


@dataclass
class Pipeline:
    settings: Settings
    worker: WorkerProcess
    collector: TopicCollector

    def wait_for_metric(self, name: str, labels: str, at_least: float, timeout_s: float = 120.0) -> float:
        deadline = time.monotonic() + timeout_s
        while (value := self.worker.metric(name, labels)) < at_least:
            assert time.monotonic() < deadline, f"{name}{{{labels}}} stayed at {value} < {at_least}:\n{self.worker.log_tail()}"
            time.sleep(0.5)
        return value

    def wait_until_quiet(self, topic: str, quiet_s: float = 3.0, timeout_s: float = 60.0) -> None:
        """Wait until `topic` has had no new record for quiet_s (faust flushes the changelog at each commit)."""
        deadline = time.monotonic() + timeout_s
        last_count, last_change = self.collector.count(topic), time.monotonic()
        while time.monotonic() - last_change < quiet_s:
            assert time.monotonic() < deadline, f"{topic} never went quiet"
            time.sleep(0.3)
            count = self.collector.count(topic)
            if count != last_count:
                last_count, last_change = count, time.monotonic()

    def kill_and_restart(self, wipe_state: bool = False) -> None:
        """SIGKILL the worker, optionally delete its RocksDB directory, and start it again."""
        old = self.worker
        old.process.kill()
        old.process.wait()
        if wipe_state:
            shutil.rmtree(self.settings.state_dir, ignore_errors=True)
        restart_log = old.log_path.with_name(old.log_path.stem + "-restarted.log")
        self.worker = WorkerProcess(old.env, restart_log, web_port=old.web_port).start()
        self.worker.wait_ready()

    def latest_states(self) -> dict:
        """Return the newest state record of each user on the changelog topic."""
        states = {}
        for record in self.collector.snapshot(self.settings.changelog_topic):
            states[record.key.decode()] = decode_state(record.value)
        return states


@pytest.fixture
def start_pipeline(broker, tmp_path):
    """Return a function that starts a worker for a bundle; every worker is stopped after the test."""
    stack = contextlib.ExitStack()

    def start(bundle_dir, **extra_env: str) -> Pipeline:
        suffix = uuid.uuid4().hex[:8]
        settings = Settings.from_env(
            {},
            bundle_dir=bundle_dir,
            broker=f"kafka://{broker.bootstrap}",
            app_id=f"e2e-{suffix}",
            events_topic=f"events-{suffix}",
            recommendations_topic=f"recommendations-{suffix}",
            dead_letter_topic=f"dlq-{suffix}",
            partitions=4,
            state_dir=tmp_path / f"state-{suffix}",
            recent_items=RECENT_ITEMS,
        )
        create_worker_topics(settings)
        env = {**worker_env(settings), **extra_env}
        worker = WorkerProcess(env, tmp_path / f"worker-{suffix}.log").start()
        collector = TopicCollector(
            broker.bootstrap, [settings.recommendations_topic, settings.dead_letter_topic, settings.changelog_topic]
        ).start()
        pipeline = Pipeline(settings, worker, collector)
        stack.callback(lambda: _stop_and_check(pipeline.worker))
        stack.callback(collector.stop)
        worker.wait_ready()
        return pipeline

    with stack:
        yield start


def _stop_and_check(worker: WorkerProcess) -> None:
    exit_code = worker.stop()
    assert exit_code == 0, f"worker exited with {exit_code} after SIGTERM:\n{worker.log_tail()}"
