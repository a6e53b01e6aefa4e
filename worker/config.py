"""Worker settings: one frozen, typed object read from STREAMREC_* environment variables."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

ENV_PREFIX = "STREAMREC_"

EMIT_EVERY_EVENT = "every_event"
EMIT_COALESCE = "coalesce"
ON_MODEL_CHANGE_REBUILD = "rebuild"
ON_MODEL_CHANGE_RESET = "reset"
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")


class SettingsError(ValueError):
    """A setting is missing or has an invalid value."""


def _setting(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    metadata = {"help": help, "choices": choices}
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Settings:
    """Everything the worker can be configured with.

    Each field `name` is read from the environment variable `STREAMREC_NAME`
    (upper case); `describe()` lists them with their defaults.
    """

    bundle_dir: Path = _setting(Path("artifacts/bundle"), "Model bundle directory (manifest.json, model.onnx, items.tsv).")
    broker: str = _setting("kafka://127.0.0.1:9092", "Kafka bootstrap servers as faust URLs, comma separated.")
    app_id: str = _setting("streamrec", "Consumer group id; also the prefix of the state changelog topic.")
    events_topic: str = _setting("user-events", "Input topic of user behaviour events, keyed by user id.")
    recommendations_topic: str = _setting("recommendations", "Output topic of top-K recommendations, keyed by user id.")
    dead_letter_topic: str = _setting("user-events-dlq", "Topic that receives rejected events with their original bytes.")
    partitions: int = _setting(8, "Partition count of the events topic and the state changelog; topics are created with it.")
    replication_factor: int = _setting(1, "Replication factor used when the worker creates missing topics.")
    create_topics: bool = _setting(True, "Create missing topics with the partition count above before the worker starts.")
    state_dir: Path = _setting(Path("var/worker"), "Directory of the RocksDB state table (one database per partition).")
    web_host: str = _setting("127.0.0.1", "Address of the HTTP server for /metrics and health; 0.0.0.0 in a pod.")
    web_port: int = _setting(6066, "Port of the HTTP server for /metrics and health.")
    batch_max_events: int = _setting(256, "Largest number of events applied in one ONNX Runtime call.")
    batch_max_ms: float = _setting(10.0, "Longest time in milliseconds to wait while filling a batch.")
    emit: str = _setting(
        EMIT_EVERY_EVENT,
        "every_event publishes one recommendation per applied event; coalesce publishes only each user's latest per batch.",
        (EMIT_EVERY_EVENT, EMIT_COALESCE),
    )
    recent_items: int = _setting(50, "Most recent items kept per user: excluded from recommendations and replayed on a model change.")
    on_model_change: str = _setting(
        ON_MODEL_CHANGE_REBUILD,
        "What happens to a state of another model version: rebuild it from the recent items, or reset it.",
        (ON_MODEL_CHANGE_REBUILD, ON_MODEL_CHANGE_RESET),
    )
    model_poll_s: float = _setting(10.0, "Seconds between checks of the bundle directory for a new model; 0 turns reloading off.")
    ort_threads: int = _setting(1, "ONNX Runtime intra-op threads; 1 is the most stable on a shared node.")
    ort_optimization: str = _setting("all", "ONNX Runtime graph optimisation level.", ORT_OPT_LEVELS)
    max_event_bytes: int = _setting(65536, "Largest accepted event value in bytes; larger ones go to the dead-letter topic.")
    fetch_max_wait_ms: int = _setting(
        100,
        "Longest time a consumer fetch waits on the broker for data. Brokers that hold a fetch this long even when data arrives add this much latency.",
    )
    producer_max_batch_bytes: int = _setting(
        16384,
        "Largest record batch the producer sends per partition, in bytes; 1 sends one record per batch.",
    )
    producer_linger_ms: float = _setting(
        0.0,
        "Milliseconds the producer waits to gather more outputs into one request; 0 sends at once.",
    )
    out_of_order_tolerance_ms: int = _setting(
        86_400_000,
        "An event older than its user's last applied event by more than this goes to the dead-letter topic (reason out_of_order).",
    )
    state_ttl_s: float = _setting(
        0.0,
        "Seconds of event time after which an idle user's state is deleted, with a changelog tombstone; 0 keeps every state.",
    )
    state_sweep_interval_s: float = _setting(300.0, "Seconds between two sweeps of a partition for idle users.")
    shutdown_timeout_s: float = _setting(
        30.0,
        "Seconds from SIGTERM to exit: finish the fetched events, write the table, commit. Past it the worker exits with status 1.",
    )
    commit_interval_s: float = _setting(1.0, "Seconds between consumer offset commits.")
    log_level: str = _setting("info", "Log level: debug, info, warning or error.", ("debug", "info", "warning", "error"))
    log_format: str = _setting("text", "text for people, json for one JSON object per line.", ("text", "json"))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build settings from `environ` (default: os.environ), then apply `overrides`."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            env_name = ENV_PREFIX + f.name.upper()
            if env_name in environ:
                values[f.name] = _parse(f, environ[env_name], env_name)
        values.update(overrides)
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Raise SettingsError naming the first invalid setting and its environment variable."""
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise SettingsError(
                    f"invalid {ENV_PREFIX}{f.name.upper()}={value!r}: expected one of {', '.join(choices)}"
                )
        positive = (
            "partitions", "replication_factor", "batch_max_events", "recent_items", "ort_threads", "max_event_bytes", "fetch_max_wait_ms",
            "producer_max_batch_bytes",
        )
        if self.out_of_order_tolerance_ms < 0:
            raise SettingsError(f"invalid {ENV_PREFIX}OUT_OF_ORDER_TOLERANCE_MS={self.out_of_order_tolerance_ms}: must be >= 0")
        for name in positive:
            if getattr(self, name) < 1:
                raise SettingsError(f"invalid {ENV_PREFIX}{name.upper()}={getattr(self, name)}: must be at least 1")
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise SettingsError(f"invalid {ENV_PREFIX}{f.name.upper()}={value}: expected a finite number")
        if self.producer_linger_ms < 0:
            raise SettingsError(f"invalid {ENV_PREFIX}PRODUCER_LINGER_MS={self.producer_linger_ms}: must be >= 0")
        for url in self.broker.split(","):
            host_port = url.strip().removeprefix("kafka://")
            if not url.strip().startswith("kafka://") or ":" not in host_port or not host_port.rpartition(":")[2].isdigit():
                raise SettingsError(
                    f"invalid {ENV_PREFIX}BROKER={self.broker!r}: expected kafka://HOST:PORT, several separated by commas"
                )
        if self.model_poll_s < 0:
            raise SettingsError(f"invalid {ENV_PREFIX}MODEL_POLL_S={self.model_poll_s}: must be >= 0 (0 turns reloading off)")
        if self.state_ttl_s < 0 or self.state_sweep_interval_s <= 0:
            raise SettingsError(
                f"invalid expiry: {ENV_PREFIX}STATE_TTL_S={self.state_ttl_s} must be >= 0 (0 keeps every state) and "
                f"{ENV_PREFIX}STATE_SWEEP_INTERVAL_S={self.state_sweep_interval_s} must be > 0"
            )
        if self.shutdown_timeout_s <= 0:
            raise SettingsError(f"invalid {ENV_PREFIX}SHUTDOWN_TIMEOUT_S={self.shutdown_timeout_s}: must be > 0")
        if self.batch_max_ms < 0 or self.commit_interval_s <= 0:
            raise SettingsError(
                f"invalid timing: {ENV_PREFIX}BATCH_MAX_MS={self.batch_max_ms} must be >= 0 and "
                f"{ENV_PREFIX}COMMIT_INTERVAL_S={self.commit_interval_s} must be > 0"
            )
        if not 0 < self.web_port < 65536:
            raise SettingsError(f"invalid {ENV_PREFIX}WEB_PORT={self.web_port}: expected a TCP port 1-65535")

    @property
    def bootstrap_servers(self) -> str:
        """The broker list without faust's kafka:// scheme, as confluent-kafka expects it."""
        return ",".join(url.strip().removeprefix("kafka://") for url in self.broker.split(","))

    @property
    def state_table(self) -> str:
        return "user-state"

    @property
    def changelog_topic(self) -> str:
        """Faust names a table's changelog `<app id>-<table name>-changelog`."""
        return f"{self.app_id}-{self.state_table}-changelog"

    @property
    def item_activity_topic(self) -> str:
        """The internal topic of per-item event weights, keyed by item id: it shards live popularity by item."""
        return f"{self.app_id}-item-activity"

    @property
    def popularity_table(self) -> str:
        return "item-popularity"

    @property
    def popularity_changelog_topic(self) -> str:
        return f"{self.app_id}-{self.popularity_table}-changelog"

    @classmethod
    def env_names(cls) -> list[str]:
        return [ENV_PREFIX + f.name.upper() for f in dataclasses.fields(cls)]

    @classmethod
    def describe(cls) -> str:
        """Return one line per setting: env variable, default and meaning."""
        lines = []
        for f in dataclasses.fields(cls):
            lines.append(f"{ENV_PREFIX}{f.name.upper():<24} default={f.default!s:<28} {f.metadata['help']}")
        return "\n".join(lines)


def _parse(f: dataclasses.Field, raw: str, env_name: str) -> Any:
    kind = f.type if isinstance(f.type, type) else {"int": int, "float": float, "bool": bool, "Path": Path, "str": str}[f.type]
    text = raw.strip()
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"invalid {env_name}={raw!r}: expected true or false")
    if kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            raise SettingsError(f"invalid {env_name}={raw!r}: expected {'an integer' if kind is int else 'a number'}") from None
    if kind is Path:
        return Path(text)
    return text
