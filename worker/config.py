"""Worker settings: one frozen, typed object read from STREAMREC_* environment variables."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Mapping

from worker.ranking import DEFAULT_EVENT_WEIGHTS, DEFAULT_HALF_LIFE_S, BlendWeights

ENV_PREFIX = "STREAMREC_"

EMIT_EVERY_EVENT = "every_event"
EMIT_COALESCE = "coalesce"
ON_MODEL_CHANGE_REBUILD = "rebuild"
ON_MODEL_CHANGE_RESET = "reset"
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
EXCLUDE_SEEN = "seen"
EXCLUDE_STRONG = "strong"
EXCLUDE_NONE = "none"
# Event types that STREAMREC_EXCLUDE=strong keeps out of a user's recommendations.
STRONG_EXCLUDE_EVENT_TYPES = frozenset({"purchase", "add_to_cart", "rating"})
_MAX_BLEND_NAME_CHARS = 100


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
    top_k: int = _setting(20, "Items published per recommendation, taken from the bundle's k candidates after re-ranking; at most the bundle's k.")
    blend_preference: float = _setting(1.0, "Blend weight of preference: the next-item probability relative to the best candidate's.")
    blend_conversion: float = _setting(
        0.0, "Blend weight of the conversion head's probability of a strong interaction; above 0 needs a bundle with the head."
    )
    blend_popularity: float = _setting(0.0, "Blend weight of live item popularity (decayed event counts, relative to the largest count among the user's candidates).")
    blend_name: str = _setting("default", "Label of the blend, copied into each recommendation so that A/B tests can tell blends apart.")
    exclude: str = _setting(
        EXCLUDE_SEEN,
        "Recent items never recommended: seen = every recent item; strong = items the user purchased, added to cart or rated; none.",
        (EXCLUDE_SEEN, EXCLUDE_STRONG, EXCLUDE_NONE),
    )
    allow_items_file: str = _setting(
        "", "File of item ids, one per line ('#' comments), that recommendations are restricted to; empty allows every item."
    )
    deny_items_file: str = _setting("", "File of item ids, one per line ('#' comments), that are never recommended; empty denies none.")
    max_per_category: int = _setting(0, "Most items of one category among the published items; 0 turns the cap off.")
    popularity_half_life_s: float = _setting(DEFAULT_HALF_LIFE_S, "Seconds of event time after which an item's popularity count halves.")
    popularity_event_weights: str = _setting(
        ",".join(f"{name}={weight:g}" for name, weight in DEFAULT_EVENT_WEIGHTS.items()),
        "Weight of one event of each type in popularity, as TYPE=WEIGHT pairs; types not listed count as a view.",
    )

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
            "producer_max_batch_bytes", "top_k",
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
        self._validate_ranking()

    def _validate_ranking(self) -> None:
        for name in ("blend_preference", "blend_conversion", "blend_popularity"):
            if getattr(self, name) < 0:
                raise SettingsError(f"invalid {ENV_PREFIX}{name.upper()}={getattr(self, name)}: must be >= 0 (0 leaves the objective out)")
        if self.blend_preference + self.blend_conversion + self.blend_popularity <= 0:
            raise SettingsError(
                f"invalid blend: {ENV_PREFIX}BLEND_PREFERENCE, {ENV_PREFIX}BLEND_CONVERSION and {ENV_PREFIX}BLEND_POPULARITY "
                "are all 0; set at least one above 0"
            )
        if not self.blend_name or len(self.blend_name) > _MAX_BLEND_NAME_CHARS or not self.blend_name.isprintable():
            raise SettingsError(
                f"invalid {ENV_PREFIX}BLEND_NAME={self.blend_name!r}: expected 1 to {_MAX_BLEND_NAME_CHARS} printable characters"
            )
        if self.max_per_category < 0:
            raise SettingsError(f"invalid {ENV_PREFIX}MAX_PER_CATEGORY={self.max_per_category}: must be >= 0 (0 turns the cap off)")
        if self.popularity_half_life_s <= 0:
            raise SettingsError(f"invalid {ENV_PREFIX}POPULARITY_HALF_LIFE_S={self.popularity_half_life_s}: must be > 0")
        # These raise SettingsError on an invalid value or an unreadable file.
        self.popularity_event_weight_map
        self.allow_items
        self.deny_items

    @property
    def blend_weights(self) -> BlendWeights:
        return BlendWeights(self.blend_preference, self.blend_conversion, self.blend_popularity)

    @cached_property
    def popularity_event_weight_map(self) -> dict[str, float]:
        """STREAMREC_POPULARITY_EVENT_WEIGHTS parsed: event type -> weight of one event."""
        return _parse_event_weights(self.popularity_event_weights, f"{ENV_PREFIX}POPULARITY_EVENT_WEIGHTS")

    @cached_property
    def allow_items(self) -> frozenset[str] | None:
        """Item ids of STREAMREC_ALLOW_ITEMS_FILE, or None when every item is allowed."""
        return _read_item_list(self.allow_items_file, f"{ENV_PREFIX}ALLOW_ITEMS_FILE")

    @cached_property
    def deny_items(self) -> frozenset[str] | None:
        """Item ids of STREAMREC_DENY_ITEMS_FILE, or None when no item is denied."""
        return _read_item_list(self.deny_items_file, f"{ENV_PREFIX}DENY_ITEMS_FILE")

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


def _parse_event_weights(text: str, env_name: str) -> dict[str, float]:
    weights: dict[str, float] = {}
    for pair in text.split(","):
        name, separator, number = (part.strip() for part in pair.partition("="))
        try:
            weight = float(number)
        except ValueError:
            weight = math.nan
        if not separator or not name or not math.isfinite(weight) or weight < 0:
            raise SettingsError(
                f"invalid {env_name}={text!r}: entry {pair.strip()!r} is not TYPE=WEIGHT with a finite weight >= 0; "
                "expected for example view=1,click=2,purchase=8"
            )
        if name in weights:
            raise SettingsError(f"invalid {env_name}={text!r}: event type {name!r} is listed twice")
        weights[name] = weight
    return weights


def _read_item_list(path_text: str, env_name: str) -> frozenset[str] | None:
    """Read item ids, one per line, ignoring blank lines and text after '#'. Return None for an empty path."""
    if not path_text.strip():
        return None
    path = Path(path_text.strip())
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SettingsError(f"invalid {env_name}={path_text!r}: cannot read the item list ({exc}); fix the path or set it empty") from None
    item_ids = (line.partition("#")[0].strip() for line in text.splitlines())
    return frozenset(item_id for item_id in item_ids if item_id)


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
