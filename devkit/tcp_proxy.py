"""A TCP proxy on 127.0.0.1 that can be cut and restored, to simulate a broker outage in tests.

The embedded broker keeps its topics in memory, so stopping it loses them. Routing every
client through this proxy, with the broker advertising the proxy's port
(``EmbeddedBroker(advertised_port=...)``), lets a test drop all broker connections and
bring them back while the broker and its data stay up.

While cut, the proxy keeps its listening socket, so no other process can take the port,
and resets every new connection as soon as it is accepted. Clients see a reset much like
the one from a closed broker port, without the self-connect that a client retrying an
unbound loopback port in the ephemeral range can hit.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from types import TracebackType

log = logging.getLogger(__name__)

# The proxy never binds or forwards to any other address.
LOOPBACK = "127.0.0.1"
_BUFFER_BYTES = 65536
_ACCEPT_POLL_S = 0.2
_CONNECT_TIMEOUT_S = 5.0
# SO_LINGER on with a zero timeout: close() sends RST instead of FIN.
_LINGER_RESET = struct.pack("ii", 1, 0)


class ProxyError(RuntimeError):
    """The proxy could not start listening."""


class _Link:
    """One client connection and its connection to the target, pumped by two threads."""

    def __init__(self, client: socket.socket, upstream: socket.socket) -> None:
        self.client = client
        self.upstream = upstream
        self._closed = threading.Event()

    def pump(self, source: socket.socket, destination: socket.socket) -> None:
        try:
            while chunk := source.recv(_BUFFER_BYTES):
                destination.sendall(chunk)
        except OSError:
            pass  # the other pump or cut() closed a socket
        self.close()

    def close(self, reset: bool = False) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        # shutdown() wakes the pump blocked in recv(). SHUT_RD sends nothing, so that the
        # close() of a socket set to reset sends RST without a FIN before it.
        how = socket.SHUT_RD if reset else socket.SHUT_RDWR
        for sock in (self.client, self.upstream):
            if reset:
                _set_reset_on_close(sock)
            try:
                sock.shutdown(how)
            except OSError:
                pass  # already disconnected
            sock.close()

    @property
    def closed(self) -> bool:
        return self._closed.is_set()


class TcpProxy:
    """Forward TCP connections from 127.0.0.1:``port`` to 127.0.0.1:``target_port``.

    ``cut()`` resets every open connection and every new one until ``restore()``. Usable
    as a context manager; ``stop()`` closes the listening socket and every connection.
    """

    def __init__(self, target_port: int, port: int | None = None) -> None:
        for name, value in (("target_port", target_port), ("port", port)):
            if value is not None and not 1 <= value <= 65535:
                raise ValueError(f"{name} must be in 1..65535, got {value}")
        self.target_port = target_port
        self.port = port or 0
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._links: set[_Link] = set()
        self._lock = threading.Lock()
        self._cut = threading.Event()
        self._stopping = threading.Event()
        self.accepted = 0
        self.rejected = 0

    @property
    def address(self) -> str:
        """The address clients connect to, ``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return self._cut.is_set()

    def open_connections(self) -> int:
        """Return the number of client connections being forwarded now."""
        with self._lock:
            self._links = {link for link in self._links if not link.closed}
            return len(self._links)

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop()

    def start(self) -> TcpProxy:
        """Listen on 127.0.0.1 and forward connections in background threads; raises ProxyError if the port is taken."""
        if self._listener is not None:
            raise ProxyError(f"proxy already listening on {self.address}")
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((LOOPBACK, self.port))
        except OSError as exc:
            listener.close()
            raise ProxyError(f"could not listen on {LOOPBACK}:{self.port}: {exc}; pass another port or none to get a free one") from exc
        listener.listen(64)
        listener.settimeout(_ACCEPT_POLL_S)
        self._listener, self.port = listener, listener.getsockname()[1]

        self._stopping.clear()
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"tcp-proxy-{self.port}", daemon=True)
        self._accept_thread.start()
        log.info("proxy listening: address=%s target=%s:%d", self.address, LOOPBACK, self.target_port)
        return self

    def cut(self) -> int:
        """Reset every open connection and reject new ones until restore(); return how many were reset."""
        self._cut.set()
        with self._lock:
            links, self._links = self._links, set()
        open_links = [link for link in links if not link.closed]
        for link in open_links:
            link.close(reset=True)
        log.info("proxy cut: address=%s connections_reset=%d", self.address, len(open_links))
        return len(open_links)

    def restore(self) -> None:
        """Forward new connections again."""
        self._cut.clear()
        log.info("proxy restored: address=%s rejected_while_cut=%d", self.address, self.rejected)

    def stop(self) -> None:
        """Close the listening socket and every connection. Safe to call twice."""
        self._stopping.set()
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
            self._accept_thread = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        with self._lock:
            links, self._links = self._links, set()
        for link in links:
            link.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                client, _ = self._listener.accept()  # type: ignore[union-attr]
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                raise
            client.settimeout(None)
            if self._cut.is_set():
                self.rejected += 1
                _set_reset_on_close(client)
                client.close()
                continue
            self._forward(client)

    def _forward(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection((LOOPBACK, self.target_port), timeout=_CONNECT_TIMEOUT_S)
        except OSError as exc:
            log.warning("proxy could not reach its target, resetting the client: target=%s:%d error=%s", LOOPBACK, self.target_port, exc)
            _set_reset_on_close(client)
            client.close()
            return
        upstream.settimeout(None)

        link = _Link(client, upstream)
        # cut() sets the flag before it takes the lock, so a link added here is either
        # reset by that cut() or, when the flag is already set, reset at once.
        with self._lock:
            forwarding = not self._cut.is_set()
            if forwarding:
                self._links.add(link)
        if not forwarding:
            self.rejected += 1
            link.close(reset=True)
            return
        self.accepted += 1
        for source, destination, direction in ((client, upstream, "up"), (upstream, client, "down")):
            threading.Thread(
                target=link.pump, args=(source, destination), name=f"tcp-proxy-{self.port}-{direction}", daemon=True
            ).start()


def _set_reset_on_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass  # the socket is already closed
