"""A worker started before its broker: it logs what it tries to reach, retries, and serves once the broker is up."""

from __future__ import annotations

import contextlib
import time

import pytest

from bad_input_corpus import encode, event
from devkit.broker import EmbeddedBroker, free_port
from devkit.replay import replay_messages
from devkit.worker_process import TopicCollector, WorkerProcess, worker_env
from worker.config import Settings
from worker.create_topics import create_worker_topics

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

# How long the worker must keep running, and retrying, with no broker listening.
UNREACHABLE_S = 15.0


def test_worker_waits_for_unreachable_broker(movielens_bundle, tmp_path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    settings = Settings.from_env(
        {},
        bundle_dir=movielens_bundle,
        broker=f"kafka://{bootstrap}",
        app_id="outage",
        events_topic="outage-events",
        recommendations_topic="outage-recommendations",
        dead_letter_topic="outage-dlq",
        partitions=2,
        state_dir=tmp_path / "state",
    )
    worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log")
    with contextlib.ExitStack() as stack:
        worker.start()
        stack.callback(worker.stop)

        # No broker listens on the port yet: the worker must stay up and log that it retries.
        deadline = time.monotonic() + UNREACHABLE_S
        while time.monotonic() < deadline and worker.process.poll() is None:
            time.sleep(0.5)
        assert worker.process.poll() is None, f"worker exited with {worker.process.returncode}:\n{worker.log_tail()}"
        retry_lines = [
            line for line in worker.log_path.read_text(errors="replace").splitlines()
            if bootstrap in line and "retr" in line.lower()
        ]
        assert retry_lines, f"no log line names {bootstrap} and a retry:\n{worker.log_tail()}"

        # Once a broker listens on that address, the worker joins and serves.
        broker = stack.enter_context(EmbeddedBroker(port=port, log_path=tmp_path / "broker.log"))
        create_worker_topics(settings)
        collector = TopicCollector(broker.bootstrap, [settings.recommendations_topic]).start()
        stack.callback(collector.stop)
        worker.wait_ready(timeout_s=120)

        events = [event("outage-user", sequence) for sequence in range(3)]
        assert replay_messages(broker.bootstrap, settings.events_topic, [(b"outage-user", encode(e)) for e in events]).ok
        assert collector.wait_for(settings.recommendations_topic, len(events), timeout_s=60) == len(events)
