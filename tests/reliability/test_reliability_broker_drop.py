"""A broker that drops mid-run: the worker logs the lost connection, keeps running and recovers.

The embedded broker keeps its topics in memory, so the outage is made on the network path.
The broker advertises the port of a TcpProxy, and every client (worker, producer, collector)
goes through it. The test cuts the proxy while the worker still has a backlog to apply.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator

import pytest

from devkit.broker import EmbeddedBroker, free_port
from devkit.replay import first_users, interaction_events, replay_events
from devkit.tcp_proxy import TcpProxy
from devkit.worker_process import TopicCollector, WorkerProcess, worker_env
from export.data import load_movielens
from worker.config import Settings
from worker.create_topics import create_worker_topics
from worker.state import decode_state

pytestmark = [pytest.mark.e2e, pytest.mark.reliability]

log = logging.getLogger(__name__)

USERS = 30
# Share of the events produced before the cut, so that the worker is still applying them when the cut starts.
BACKLOG_SHARE = 0.7
# Number of recommendations read before the proxy is cut.
CUT_AFTER = 150
OUTAGE_S = 20.0
SERVE_TIMEOUT_S = 120.0
LOG_LEVELS = re.compile(r" (WARNING|ERROR|CRITICAL) ")


@pytest.fixture
def proxied_broker(tmp_path) -> Iterator[tuple[EmbeddedBroker, TcpProxy]]:
    """An embedded broker that advertises the port of a TcpProxy in front of it."""
    proxy_port = free_port()
    broker = EmbeddedBroker(advertised_port=proxy_port, log_path=tmp_path / "broker.log")
    proxy = TcpProxy(broker.port, port=proxy_port).start()
    try:
        broker.start()
        proxy.target_port = broker.port  # start() picks another port when the first is taken
        yield broker, proxy
    finally:
        # Tansu stops only once its clients have disconnected, the proxy's among them.
        proxy.stop()
        broker.stop()


def _served(collector: TopicCollector, topic: str) -> dict[tuple[int, int], dict]:
    """Return the recommendations read so far by (partition, offset), so a record read twice counts once."""
    return {(record.partition, record.offset): json.loads(record.value) for record in collector.snapshot(topic)}


def _log_lines_since(worker: WorkerProcess, offset: int) -> list[str]:
    with worker.log_path.open("rb") as handle:
        handle.seek(offset)
        return handle.read().decode("utf-8", errors="replace").splitlines()


def _wait_for_served(collector: TopicCollector, topic: str, event_ids: set[str], worker: WorkerProcess) -> None:
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while True:
        missing = event_ids - {recommendation["event_id"] for recommendation in _served(collector, topic).values()}
        if not missing:
            return
        assert worker.process.poll() is None, f"worker exited with {worker.process.returncode}:\n{worker.log_tail()}"
        assert time.monotonic() < deadline, (
            f"{len(missing)} of {len(event_ids)} events not served {SERVE_TIMEOUT_S:.0f} s after the broker came back, "
            f"e.g. {sorted(missing)[:5]}:\n{worker.log_tail()}"
        )
        time.sleep(0.5)


def _wait_for_last_states(collector: TopicCollector, settings: Settings, last_event_ids: dict[str, str]) -> dict:
    """Wait until every user's newest changelog state is of their last event; return the states by user."""
    deadline = time.monotonic() + SERVE_TIMEOUT_S
    while True:
        states = {record.key.decode(): decode_state(record.value) for record in collector.snapshot(settings.changelog_topic)}
        pending = [user for user, event_id in last_event_ids.items() if user not in states or states[user].last_event_id != event_id]
        if not pending:
            return states
        assert time.monotonic() < deadline, f"{len(pending)} users' changelog states never reached their last event, e.g. {pending[:5]}"
        time.sleep(0.5)


def test_worker_recovers_from_broker_drop(proxied_broker, movielens_bundle, dataset_dir, tmp_path) -> None:
    _, proxy = proxied_broker
    events = first_users(interaction_events(load_movielens(dataset_dir), dataset_dir.name), USERS)
    split = int(len(events) * BACKLOG_SHARE)
    backlog, after_restore = events[:split], events[split:]
    settings = Settings.from_env(
        {},
        bundle_dir=movielens_bundle,
        broker=f"kafka://{proxy.address}",
        app_id="broker-drop",
        events_topic="drop-events",
        recommendations_topic="drop-recommendations",
        dead_letter_topic="drop-dlq",
        partitions=4,
        state_dir=tmp_path / "state",
    )
    create_worker_topics(settings)
    worker = WorkerProcess(worker_env(settings), tmp_path / "worker.log")
    collector = TopicCollector(proxy.address, [settings.recommendations_topic, settings.changelog_topic])

    with contextlib.ExitStack() as stack:
        worker.start()
        stack.callback(worker.stop)
        collector.start()
        stack.callback(collector.stop)
        worker.wait_ready()

        # A backlog, and the cut while the worker is applying it.
        assert replay_events(proxy.address, settings.events_topic, backlog).ok
        assert collector.wait_for(settings.recommendations_topic, CUT_AFTER, timeout_s=60) >= CUT_AFTER
        log_offset = worker.log_path.stat().st_size
        connections_reset = proxy.cut()
        _stay_alive(worker, OUTAGE_S)
        outage_lines = _log_lines_since(worker, log_offset)
        proxy.restore()
        restored_at_ms = time.time() * 1000

        # The rest of the events, produced once the broker is reachable again.
        assert replay_events(proxy.address, settings.events_topic, after_restore).ok
        _wait_for_served(collector, settings.recommendations_topic, {event["event_id"] for event in events}, worker)
        last_event_ids = {str(event["user_id"]): event["event_id"] for event in events}
        states = _wait_for_last_states(collector, settings, last_event_ids)
        served = _served(collector, settings.recommendations_topic)
        still_running = worker.process.poll() is None
        batch_failures = worker.metric("streamrec_batch_failures_total")
        collector.stop()
        exit_code = worker.stop()

    warning_lines = [line for line in outage_lines if LOG_LEVELS.search(line)]
    backlog_ids = {event["event_id"] for event in backlog}
    served_late = {r["event_id"] for r in served.values() if r["produced_at_ms"] > restored_at_ms} & backlog_ids
    log.info(
        "outage: connections_reset=%d connections_rejected=%d warning_or_error_lines=%d batch_failures=%d "
        "backlog_served_after_restore=%d of %d recommendations=%d events=%d",
        connections_reset, proxy.rejected, len(warning_lines), batch_failures, len(served_late), len(backlog), len(served), len(events),
    )

    # Clear log lines: the worker names the broker address it lost.
    broker_address = (proxy.address, f"('127.0.0.1', {proxy.port})")
    assert any(address in line for line in warning_lines for address in broker_address), (
        f"no warning or error during the outage names {proxy.address}:\n" + "\n".join(outage_lines[-40:])
    )
    # Readable, too: repeated client errors are rate-limited (worker.logs.RepeatFilter).
    assert len(warning_lines) < 100, f"{len(warning_lines)} warning or error lines in a {OUTAGE_S} s outage"
    assert connections_reset > 0
    assert served_late, "the worker had applied the whole backlog before the cut, so the cut was not mid-run"
    assert still_running
    assert exit_code == 0, f"worker exited with {exit_code} after SIGTERM:\n{worker.log_tail()}"

    # No event lost or applied twice: a user's n-th event is applied after exactly n-1 others,
    # so every recommendation for it, repeated or not, carries events_absorbed == n.
    event_counts = Counter(str(event["user_id"]) for event in events)
    assert {user: state.events_absorbed for user, state in states.items()} == dict(event_counts)
    position = _position_in_user_sequence(events)
    wrong = {r["event_id"]: r["events_absorbed"] for r in served.values() if r["events_absorbed"] != position[r["event_id"]]}
    assert not wrong, f"recommendations with events_absorbed other than the event's position, event_id: absorbed {wrong}"


def _stay_alive(worker: WorkerProcess, seconds: float) -> None:
    """Check for `seconds` that the worker process keeps running and its liveness endpoint returns 200."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert worker.process.poll() is None, f"worker exited during the outage with {worker.process.returncode}:\n{worker.log_tail()}"
        with urllib.request.urlopen(worker.url("/healthz"), timeout=5) as response:
            assert response.status == 200
        time.sleep(1.0)


def _position_in_user_sequence(events: list[dict]) -> dict[str, int]:
    """Return each event's 1-based position among its user's events."""
    seen: Counter = Counter()
    position = {}
    for event in events:
        seen[str(event["user_id"])] += 1
        position[event["event_id"]] = seen[str(event["user_id"])]
    return position
