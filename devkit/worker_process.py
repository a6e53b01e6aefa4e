"""Run the worker as a child process and read its output topics: shared by the demo and the tests."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from confluent_kafka import Consumer, KafkaError, TopicPartition

if TYPE_CHECKING:
    from worker.config import Settings

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# Settings every worker needs against the embedded broker (Tansu 0.6). Its ListOffsets
# returns a partition's end offset as the base offset of the last record batch plus one, so
# after a multi-record batch faust's changelog recovery stops early and, with local state
# kept, fails its consistency check. One record per producer batch keeps the end offset right.
EMBEDDED_BROKER_WORKER_ENV = {"STREAMREC_PRODUCER_MAX_BATCH_BYTES": "1"}


def worker_env(settings: "Settings") -> dict[str, str]:
    """Return the STREAMREC_* variables that make a worker process use `settings`.

    Topic creation is turned off because the caller creates the topics first.
    """
    return {
        "STREAMREC_BUNDLE_DIR": str(settings.bundle_dir),
        "STREAMREC_BROKER": settings.broker,
        "STREAMREC_APP_ID": settings.app_id,
        "STREAMREC_EVENTS_TOPIC": settings.events_topic,
        "STREAMREC_RECOMMENDATIONS_TOPIC": settings.recommendations_topic,
        "STREAMREC_DEAD_LETTER_TOPIC": settings.dead_letter_topic,
        "STREAMREC_PARTITIONS": str(settings.partitions),
        "STREAMREC_STATE_DIR": str(settings.state_dir),
        "STREAMREC_RECENT_ITEMS": str(settings.recent_items),
        "STREAMREC_CREATE_TOPICS": "false",
    }


class WorkerProcess:
    """`python -m worker` in a child process, configured through STREAMREC_* variables."""

    def __init__(self, env: dict[str, str], log_path: Path, web_port: int | None = None) -> None:
        self.web_port = web_port or free_port()
        self.env = {
            **os.environ,
            **EMBEDDED_BROKER_WORKER_ENV,
            **env,
            "STREAMREC_WEB_HOST": "127.0.0.1",
            "STREAMREC_WEB_PORT": str(self.web_port),
        }
        self.log_path = log_path
        self.process: subprocess.Popen | None = None

    def start(self) -> "WorkerProcess":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker"], env=self.env, stdout=log_file, stderr=subprocess.STDOUT
        )
        log_file.close()
        return self

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.web_port}{path}"

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Poll /readyz until the worker has joined its group and recovered its table.

        The embedded broker takes about 20 s for a group's first join, so this waits, not sleeps.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"worker exited with code {self.process.returncode} before it was ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url("/readyz"), timeout=2) as response:
                    if response.status == 200 and json.load(response).get("ready"):
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"worker not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def metrics_text(self) -> str:
        with urllib.request.urlopen(self.url("/metrics"), timeout=5) as response:
            return response.read().decode("utf-8")

    def metric(self, name: str, labels: str = "") -> float:
        """Return the value of one sample from /metrics (0 when the sample is absent)."""
        wanted = f"{name}{{{labels}}}" if labels else name
        for line in self.metrics_text().splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM, then SIGKILL if the worker has not exited within timeout_s; return its exit code."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("worker did not stop within %.0f s of SIGTERM; killing it", timeout_s)
            self.process.kill()
            return self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no worker log)"


@dataclass
class ConsumedRecord:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes
    timestamp_ms: int


@dataclass
class TopicCollector:
    """Read topics from the beginning in a background thread and keep every record."""

    bootstrap: str
    topics: list[str]
    records: dict[str, list[ConsumedRecord]] = field(default_factory=dict)
    on_record: Callable[[ConsumedRecord], None] | None = None

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="topic-collector", daemon=True)
        self.records = {topic: [] for topic in self.topics}

    def start(self) -> "TopicCollector":
        self._thread.start()
        return self

    def count(self, topic: str) -> int:
        with self._lock:
            return len(self.records[topic])

    def snapshot(self, topic: str) -> list[ConsumedRecord]:
        with self._lock:
            return list(self.records[topic])

    def wait_for(self, topic: str, count: int, timeout_s: float, idle_timeout_s: float | None = None) -> int:
        """Wait until `topic` has at least `count` records; return how many it has.

        Stops early after idle_timeout_s without a new record, so a stalled worker ends the wait.
        """
        deadline = time.monotonic() + timeout_s
        last_count, last_change = -1, time.monotonic()
        while time.monotonic() < deadline:
            current = self.count(topic)
            if current >= count:
                return current
            if current != last_count:
                last_count, last_change = current, time.monotonic()
            elif idle_timeout_s is not None and time.monotonic() - last_change > idle_timeout_s:
                break
            time.sleep(0.2)
        return self.count(topic)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap,
                "group.id": f"collector-{os.getpid()}-{id(self)}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        try:
            metadata = consumer.list_topics(timeout=10)
            assignment = [
                TopicPartition(topic, partition, 0)
                for topic in self.topics
                for partition in metadata.topics[topic].partitions
            ]
            consumer.assign(assignment)
            while not self._stop.is_set():
                message = consumer.poll(0.2)
                if message is None:
                    continue
                if message.error():
                    if message.error().code() != KafkaError._PARTITION_EOF:
                        log.warning("collector read error: %s", message.error())
                    continue
                record = ConsumedRecord(
                    topic=message.topic(),
                    partition=message.partition(),
                    offset=message.offset(),
                    key=message.key(),
                    value=message.value(),
                    timestamp_ms=message.timestamp()[1],
                )
                with self._lock:
                    self.records[record.topic].append(record)
                if self.on_record is not None:
                    self.on_record(record)
        finally:
            consumer.close()
