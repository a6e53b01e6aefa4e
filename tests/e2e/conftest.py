"""A worker process on fresh topics of the session broker, with a collector of its output topics."""

from __future__ import annotations

import contextlib
import shutil
import time
import uuid
from dataclasses import dataclass

import pytest

from devkit.worker_process import TopicCollector, WorkerProcess, worker_env
from worker.config import Settings
from worker.state import decode_state
from worker.create_topics import create_worker_topics

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
