"""EmbeddedBroker and its command line, against the real Tansu binary."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from devkit.broker import LOOPBACK, BrokerError, EmbeddedBroker, find_broker_binary, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def broker():
    with EmbeddedBroker() as running:
        yield running


def _topic(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "allow.auto.create.topics": False})


def _create(bootstrap: str, partitions: dict[str, int]) -> None:
    # The admin client must outlive its futures: destroying it fails them with _DESTROY.
    admin = _admin(bootstrap)
    futures = admin.create_topics([NewTopic(name, num_partitions=n, replication_factor=1) for name, n in partitions.items()])
    for future in futures.values():
        future.result(timeout=10)


def _partition_counts(bootstrap: str) -> dict[str, int]:
    return {name: len(topic.partitions) for name, topic in _admin(bootstrap).list_topics(timeout=10).topics.items()}


def _consume_assigned(bootstrap: str, topic: str, partitions: int, expected: int, timeout_s: float = 30.0) -> list:
    """Read ``expected`` messages from offset 0 of every partition, without joining a group."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": _topic("reader"), "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, partition, 0) for partition in range(partitions)])
    messages = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                messages.append(message)
    finally:
        consumer.close()
    return messages


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 and IPv6 addresses in LISTEN state on ``port``, read from /proc/net."""
    addresses = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as handle:
            next(handle)
            for row in handle:
                local, state = row.split()[1], row.split()[3]
                address, port_hex = local.split(":")
                if state == "0A" and int(port_hex, 16) == port:
                    addresses.add(address)
    return addresses


# -- the real broker ----------------------------------------------------------------------


@pytest.mark.e2e
def test_broker_listens_on_loopback_only(broker: EmbeddedBroker) -> None:
    metadata = _admin(broker.bootstrap).list_topics(timeout=10)

    assert broker.bootstrap == f"127.0.0.1:{broker.port}"
    assert _listening_addresses(broker.port) == {"0100007F"}  # 127.0.0.1, little-endian hex
    assert [(b.host, b.port) for b in metadata.brokers.values()] == [("127.0.0.1", broker.port)]


@pytest.mark.e2e
def test_topics_created_with_partition_counts(broker: EmbeddedBroker) -> None:
    requested = {_topic("one"): 1, _topic("three"): 3, _topic("eight"): 8}
    _create(broker.bootstrap, requested)

    counts = _partition_counts(broker.bootstrap)

    for name, partitions in requested.items():
        assert counts[name] == partitions, name


@pytest.mark.e2e
def test_produce_consume_round_trip(broker: EmbeddedBroker) -> None:
    topic = _topic("round-trip")
    _create(broker.bootstrap, {topic: 4})
    sent = {f"user-{i}".encode(): f'{{"n": {i}}}'.encode() for i in range(60)}
    producer = Producer({"bootstrap.servers": broker.bootstrap, "partitioner": "murmur2_random"})
    for key, value in sent.items():
        producer.produce(topic, key=key, value=value)
    assert producer.flush(15) == 0
    producer.close()

    received = _consume_assigned(broker.bootstrap, topic, 4, len(sent))

    assert {m.key(): m.value() for m in received} == sent
    assert len({m.partition() for m in received}) > 1
    for partition in range(4):
        offsets = [m.offset() for m in received if m.partition() == partition]
        assert offsets == list(range(len(offsets))), f"partition {partition}"


@pytest.mark.e2e
def test_consumer_group_commit_is_stored(broker: EmbeddedBroker) -> None:
    topic, group = _topic("group"), _topic("group")
    _create(broker.bootstrap, {topic: 2})
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(10):
        producer.produce(topic, key=str(i).encode(), value=b"v")
    assert producer.flush(15) == 0
    producer.close()

    consumer = Consumer(
        {"bootstrap.servers": broker.bootstrap, "group.id": group, "auto.offset.reset": "earliest", "enable.auto.commit": False}
    )
    consumer.subscribe([topic])
    received, started = [], time.monotonic()
    # The first group join takes about 20 s on Tansu 0.6.0.
    while len(received) < 10 and time.monotonic() - started < 90:
        message = consumer.poll(1.0)
        if message is not None and message.error() is None:
            received.append(message)
    consumer.commit(asynchronous=False)
    consumer.close()

    reader = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": group, "enable.auto.commit": False})
    committed = reader.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=10)
    reader.close()

    assert len(received) == 10
    ends = {p: 1 + max(m.offset() for m in received if m.partition() == p) for p in {m.partition() for m in received}}
    assert {tp.partition: tp.offset for tp in committed if tp.partition in ends} == ends


@pytest.mark.e2e
def test_named_metadata_request_auto_creates_topic(broker: EmbeddedBroker) -> None:
    # Why worker.topics and devkit.replay set allow.auto.create.topics to false.
    guarded, unguarded = _topic("guarded"), _topic("unguarded")

    _admin(broker.bootstrap).list_topics(topic=guarded, timeout=10)
    AdminClient({"bootstrap.servers": broker.bootstrap}).list_topics(topic=unguarded, timeout=10)
    counts = _partition_counts(broker.bootstrap)

    assert guarded not in counts
    assert unguarded in counts


@pytest.mark.e2e
def test_create_partitions_unsupported(broker: EmbeddedBroker) -> None:
    topic = _topic("grow")
    _create(broker.bootstrap, {topic: 2})

    admin = _admin(broker.bootstrap)
    future = admin.create_partitions([NewPartitions(topic, 4)])[topic]

    with pytest.raises(KafkaException, match="not supported"):
        future.result(timeout=10)
    assert _partition_counts(broker.bootstrap)[topic] == 2


@pytest.mark.e2e
def test_aborted_transaction_visible_to_read_committed(broker: EmbeddedBroker) -> None:
    # Tansu 0.6.0 accepts transactional producers but does not hide aborted messages,
    # so exactly-once processing cannot be tested against it.
    topic = _topic("transactions")
    _create(broker.bootstrap, {topic: 1})
    producer = Producer({"bootstrap.servers": broker.bootstrap, "transactional.id": _topic("tx")})
    producer.init_transactions(15)
    producer.begin_transaction()
    producer.produce(topic, value=b"aborted")
    producer.flush(10)
    producer.abort_transaction(15)
    producer.close()

    consumer = Consumer(
        {"bootstrap.servers": broker.bootstrap, "group.id": _topic("g"), "isolation.level": "read_committed", "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    deadline, values = time.monotonic() + 10, []
    while not values and time.monotonic() < deadline:
        message = consumer.poll(0.5)
        if message is not None and message.error() is None:
            values.append(message.value())
    consumer.close()

    assert values == [b"aborted"]


@pytest.mark.e2e
def test_restart_loses_topics() -> None:
    port = free_port()
    topic = _topic("memory")
    with EmbeddedBroker(port) as first:
        _create(first.bootstrap, {topic: 1})
        assert topic in _partition_counts(first.bootstrap)

    with EmbeddedBroker(port) as second:
        assert topic not in _partition_counts(second.bootstrap)


@pytest.mark.e2e
def test_stop_ends_process_and_frees_port() -> None:
    broker = EmbeddedBroker().start()
    process, log_path = broker._process, broker.log_path

    broker.stop()
    broker.stop()

    assert process is not None
    assert process.returncode == 0
    assert not broker.running
    assert log_path is not None
    assert not log_path.exists()
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, broker.port), timeout=1).close()


@pytest.mark.e2e
def test_stop_kills_broker_held_open_by_client() -> None:
    broker = EmbeddedBroker(stop_grace_s=1.0).start()
    _create(broker.bootstrap, {"held-open": 1})
    producer = Producer({"bootstrap.servers": broker.bootstrap})
    # A producer that has sent a message keeps a connection that Tansu waits for on SIGTERM.
    producer.produce("held-open", value=b"v")
    assert producer.flush(10) == 0
    process = broker._process

    started = time.monotonic()
    broker.stop()

    assert process is not None
    assert process.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10
    producer.close()


@pytest.mark.e2e
def test_log_path_kept_and_written(tmp_path: Path) -> None:
    log_path = tmp_path / "tansu.log"
    with EmbeddedBroker(log_path=log_path) as broker:
        assert f"listening on: tcp://{broker.bootstrap}" in broker.log_tail()

    assert log_path.exists()


@pytest.mark.e2e
def test_fixed_port_in_use_raises() -> None:
    with socket.socket() as squatter:
        squatter.bind((LOOPBACK, 0))
        squatter.listen()
        port = squatter.getsockname()[1]

        with pytest.raises(BrokerError, match=f"port {port} on 127.0.0.1 is already in use"):
            EmbeddedBroker(port).start()


# -- failures, with stand-in binaries ------------------------------------------------------


def _script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-tansu"
    path.write_text(f"#!/bin/sh\n{body}\n", encoding="utf-8")
    path.chmod(0o755)
    return str(path)


def test_start_failure_reports_exit_code_and_log(tmp_path: Path) -> None:
    binary = _script(tmp_path, "echo 'fatal: storage engine unavailable'\nexit 3")

    with pytest.raises(BrokerError) as caught:
        EmbeddedBroker(binary=binary, startup_timeout_s=10).start()

    assert "exited with code 3" in str(caught.value)
    assert "fatal: storage engine unavailable" in str(caught.value)


def test_start_timeout_reports_and_stops_process(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    binary = _script(tmp_path, f"echo $$ > {pid_file}\necho 'still warming up'\nexec sleep 60")

    started = time.monotonic()
    with pytest.raises(BrokerError) as caught:
        EmbeddedBroker(binary=binary, startup_timeout_s=1.0).start()

    assert time.monotonic() - started < 10
    assert "did not respond to metadata requests within 1 s" in str(caught.value)
    assert "still warming up" in str(caught.value)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


def test_start_passes_loopback_listener_flags(tmp_path: Path) -> None:
    arguments = tmp_path / "arguments"
    binary = _script(tmp_path, f'printf "%s\\n" "$@" > {arguments}\nexit 1')

    with pytest.raises(BrokerError):
        EmbeddedBroker(port=free_port(), binary=binary).start()
    flags = arguments.read_text().split()

    assert flags[0] == "broker"
    assert flags[flags.index("--listener-url") + 1].startswith("tcp://127.0.0.1:")
    assert flags[flags.index("--advertised-listener-url") + 1] == flags[flags.index("--listener-url") + 1]
    assert flags[flags.index("--storage-engine") + 1] == "memory://tansu/"


def test_invalid_port_raises() -> None:
    with pytest.raises(ValueError, match="port must be in 1..65535, got 70000"):
        EmbeddedBroker(70000)


# -- command line -----------------------------------------------------------------------


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "devkit.broker", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )


def test_check_prints_binary_path() -> None:
    result = _cli("--check")

    assert result.returncode == 0, result.stderr
    assert find_broker_binary() in result.stdout
    assert "tansu" in result.stdout


def test_check_missing_binary_fails_clearly(tmp_path: Path) -> None:
    result = _cli("--check", env={**os.environ, "CALF_TANSU_BIN": str(tmp_path / "missing")})

    assert result.returncode == 1
    assert "broker check failed" in result.stderr
    assert "does not point at an executable file" in result.stderr


@pytest.mark.e2e
def test_foreground_cli_serves_until_interrupted() -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "devkit.broker", "--port", str(port)],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        first_line = process.stdout.readline()  # type: ignore[union-attr]
        metadata = _admin(f"127.0.0.1:{port}").list_topics(timeout=10)
        process.send_signal(signal.SIGINT)
        exit_code = process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert first_line.startswith(f"broker ready: bootstrap=127.0.0.1:{port}")
    assert metadata.brokers
    assert exit_code == 0
    with pytest.raises(OSError):
        socket.create_connection((LOOPBACK, port), timeout=1).close()
