"""TcpProxy against a loopback echo server, and the embedded broker behind it."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from devkit.broker import EmbeddedBroker, free_port
from devkit.tcp_proxy import ProxyError, TcpProxy


class EchoServer:
    """Send back every byte received, on 127.0.0.1, one thread per connection."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._echo, args=(connection,), daemon=True).start()

    @staticmethod
    def _echo(connection: socket.socket) -> None:
        with connection:
            try:
                while data := connection.recv(4096):
                    connection.sendall(data)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def echo() -> Iterator[EchoServer]:
    server = EchoServer()
    yield server
    server.close()


@pytest.fixture
def proxy(echo: EchoServer) -> Iterator[TcpProxy]:
    with TcpProxy(echo.port) as running:
        yield running


def _round_trip(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
        client.sendall(payload)
        return _receive(client, len(payload))


def _receive(client: socket.socket, size: int) -> bytes:
    received = b""
    while len(received) < size:
        chunk = client.recv(size - len(received))
        if not chunk:
            break
        received += chunk
    return received


def _wait_for(condition, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_proxy_forwards_both_ways(proxy: TcpProxy) -> None:
    payload = bytes(range(256)) * 1000  # larger than one socket buffer

    assert _round_trip(proxy.port, payload) == payload
    assert proxy.accepted == 1


def test_proxy_listens_on_loopback(proxy: TcpProxy) -> None:
    assert proxy.address == f"127.0.0.1:{proxy.port}"
    assert proxy.port != 0


def test_cut_resets_open_connections(proxy: TcpProxy) -> None:
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    client.sendall(b"ping")
    assert _receive(client, 4) == b"ping"
    assert proxy.open_connections() == 1

    reset = proxy.cut()

    assert reset == 1
    assert proxy.open_connections() == 0
    with pytest.raises(ConnectionResetError):
        client.sendall(b"lost")
        client.recv(4)
    client.close()


def test_cut_rejects_new_connections(proxy: TcpProxy, echo: EchoServer) -> None:
    proxy.cut()

    for _ in range(3):
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            _round_trip(proxy.port, b"ping")

    assert proxy.rejected == 3
    assert echo.connections == 0


def test_restore_forwards_again(proxy: TcpProxy) -> None:
    proxy.cut()
    proxy.restore()

    assert not proxy.is_cut
    assert _round_trip(proxy.port, b"after restore") == b"after restore"


def test_unreachable_target_resets_client() -> None:
    with TcpProxy(free_port()) as proxy:
        with pytest.raises((ConnectionResetError, BrokenPipeError)):
            _round_trip(proxy.port, b"ping")

        assert proxy.open_connections() == 0


def test_stop_closes_connections_and_port(echo: EchoServer) -> None:
    proxy = TcpProxy(echo.port).start()
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    client.sendall(b"ping")
    assert _receive(client, 4) == b"ping"

    proxy.stop()
    proxy.stop()

    assert _wait_for(lambda: client.recv(4) == b"")
    client.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=1).close()


def test_port_in_use_raises(echo: EchoServer) -> None:
    with pytest.raises(ProxyError, match=f"could not listen on 127.0.0.1:{echo.port}"):
        TcpProxy(echo.port, port=echo.port).start()


@pytest.mark.parametrize(("target_port", "port", "message"), [(0, None, "target_port must be in 1..65535, got 0"), (9092, 70000, "port must be in 1..65535, got 70000")])
def test_invalid_port_raises(target_port: int, port: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TcpProxy(target_port, port=port)


# -- the embedded broker behind the proxy ---------------------------------------------------


@pytest.mark.e2e
def test_broker_behind_proxy_advertises_proxy_port() -> None:
    proxy_port = free_port()
    broker = EmbeddedBroker(advertised_port=proxy_port)
    with TcpProxy(broker.port, port=proxy_port) as proxy, broker:
        proxy.target_port = broker.port  # start() picks another port when the first is taken
        admin = AdminClient({"bootstrap.servers": proxy.address, "allow.auto.create.topics": False})
        metadata = admin.list_topics(timeout=10)
        topic = f"proxied-{uuid.uuid4().hex[:8]}"
        admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=10)
        producer = Producer({"bootstrap.servers": proxy.address})
        producer.produce(topic, value=b"through the proxy")
        unsent = producer.flush(15)
        producer.close()
        # Tansu stops only once its clients have disconnected, the proxy's among them.
        del admin
        proxy.stop()

        assert broker.advertised_bootstrap == proxy.address
        assert [(b.host, b.port) for b in metadata.brokers.values()] == [("127.0.0.1", proxy_port)]
        assert unsent == 0
        assert proxy.accepted >= 2
