"""Benchmark the worker against a per-event ceiling and a stateless alternative.

    python -m worker.bench [--quick] [--json FILE] [--repeat N]
    python -m worker.bench --synthetic [--events N] [--json FILE]
    (--help lists every option)

One run starts one embedded broker and five variants, each a process with its own
consumer group:

| variant           | process                              | per event                                          |
| ----------------- | ------------------------------------ | -------------------------------------------------- |
| passthrough       | python -m worker.bench_apps          | no decoding: a 512-byte table write and one output |
| batch1            | python -m worker, BATCH_MAX_EVENTS=1 | the worker, one event per ONNX call                |
| batched           | python -m worker, defaults           | the worker with its micro-batching                 |
| batched_coalesced | python -m worker, EMIT=coalesce      | as batched, one output per user and batch          |
| recompute         | python -m worker.bench_apps          | the GRU rerun over the last 50 events, no hidden state |

Each variant reads its own input topic, and every input topic receives the same messages
in the same order, so every variant consumes the same backlog, partition by partition.
The topics are separate so that one variant's paced phase does not add to another
variant's backlog.

All workers start together and wait until each has joined its consumer group (about 30 s
on the embedded broker). Then, one variant at a time, the backlog is produced (well under
a second for 100,000 events) and the variant consumes it. events/s is the backlog size
divided by the time from the variant's first to its last output record, so the group
join is not timed. events/CPU s divides by the CPU time of the variant's process instead, which other
load on the machine changes less. A paced phase then produces events at half of the
batched variant's rate, the same rate for every variant, and measures the latency from
each input message's Kafka timestamp to its output's Kafka timestamp. The other workers
stay up and idle meanwhile, and their CPU time is reported as idle_neighbours_cpu_seconds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from devkit.broker import BrokerError, EmbeddedBroker
from devkit.replay import KafkaMessage, event_message, interaction_events, replay_messages
from devkit.worker_process import WorkerProcess, worker_env
from export.data import DatasetError
from worker.bench_apps import SCORE_EVERY_STEP, SCORE_LAST_STEP
from worker.config import Settings
from worker.create_topics import create_worker_topics
from worker.topics import TopicSetupError

log = logging.getLogger(__name__)

PARTITIONS = Settings().partitions
SYNTHETIC_USERS = 100_000
SYNTHETIC_ITEMS = 50_000
SYNTHETIC_EVENTS = 100_000
QUICK_EVENTS = 3_000
PACED_SECONDS = 6.0
QUICK_PACED_SECONDS = 3.0
# A phase fails when its consumer group commits no new offset for this long.
STALL_TIMEOUT_S = 120.0
PROGRESS_INTERVAL_S = 5.0
POLL_INTERVAL_S = 1.0
# Outputs still in a worker's producer buffer when its offsets are committed arrive soon after.
OUTPUT_SETTLE_S = 2.0
OUTPUT_WAIT_S = 30.0
BUNDLE_SEED = 7


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    command: tuple[str, ...]  # arguments of `python -m`
    env: dict[str, str] = field(default_factory=dict)
    every_event: bool = True  # one output record per input event
    runs_model: bool = True


VARIANTS = (
    Variant("passthrough", "faust per-event ceiling: table write + one output, no decoding, no model",
            ("worker.bench_apps", "passthrough"), runs_model=False),
    Variant("batch1", "worker, STREAMREC_BATCH_MAX_EVENTS=1", ("worker",), {"STREAMREC_BATCH_MAX_EVENTS": "1"}),
    Variant("batched", "worker, default batching", ("worker",)),
    Variant("batched_coalesced", "worker, STREAMREC_EMIT=coalesce", ("worker",), {"STREAMREC_EMIT": "coalesce"}, every_event=False),
    Variant("recompute", "stateless: GRU rerun over the last recent-items events per event", ("worker.bench_apps", "recompute")),
)
VARIANT_NAMES = tuple(variant.name for variant in VARIANTS)
# The paced rate derives from the batched variant, so it is measured first.
MEASURE_ORDER = ("batched", "passthrough", "batch1", "batched_coalesced", "recompute")


class BenchError(RuntimeError):
    """The benchmark cannot run: missing data, a broker or worker that fails to start."""


class VariantFailed(RuntimeError):
    """One variant stalled or exited; the others still run."""


# -- event streams --------------------------------------------------------------------------


def movielens_events(data: str | None, limit: int | None) -> tuple[list[dict[str, Any]], list[str]]:
    """Return MovieLens ratings as events in timestamp order (the first `limit`) and every item id of the dataset."""
    from export.data import load_movielens, resolve_dataset_dir
    from export.sequences import ItemVocabulary

    dataset_dir = resolve_dataset_dir(data)
    interactions = load_movielens(dataset_dir)
    events = interaction_events(interactions, dataset_dir.name)
    return events[:limit] if limit is not None else events, ItemVocabulary.from_interactions(interactions).item_ids


def repeated(events: list[dict[str, Any]], repeat: int) -> list[dict[str, Any]]:
    """Append `repeat - 1` copies with new event ids and later timestamps, so the worker applies them again."""
    copies = list(events)
    for round_index in range(1, repeat):
        copies += [_in_round(event, round_index, _span_ms(events)) for event in events]
    return copies


def _span_ms(events: list[dict[str, Any]]) -> int:
    return events[-1]["timestamp"] - events[0]["timestamp"] + 1


def _in_round(event: dict[str, Any], round_index: int, span_ms: int) -> dict[str, Any]:
    """Return `event` as replayed in round `round_index`: a new id, and a timestamp `round_index` spans later."""
    return {**event, "event_id": f"{event['event_id']}#{round_index}", "timestamp": event["timestamp"] + round_index * span_ms}


def synthetic_item_ids(items: int) -> list[str]:
    return [f"item-{index}" for index in range(items)]


def synthetic_events(count: int, users: int, items: int, seed: int) -> list[dict[str, Any]]:
    """Draw `count` independent events: users and items by power-law popularity, in time order.

    User weights fall as rank^-0.7 and item weights as rank^-0.9, so a few users and items
    are frequent and most are rare. Event types: 70% view, 20% click, 7% add_to_cart, 3% purchase.
    """
    rng = np.random.default_rng(seed)
    user_weights = np.arange(1, users + 1, dtype=np.float64) ** -0.7
    item_weights = np.arange(1, items + 1, dtype=np.float64) ** -0.9
    user_draws = rng.choice(users, size=count, p=user_weights / user_weights.sum())
    item_draws = rng.choice(items, size=count, p=item_weights / item_weights.sum())
    type_draws = rng.choice(4, size=count, p=[0.7, 0.2, 0.07, 0.03])
    timestamps = 1_700_000_000_000 + np.cumsum(rng.integers(1, 200, size=count))

    # Popularity rank must not follow the id order, or item 0 would be the most popular everywhere.
    item_ids = np.array(synthetic_item_ids(items))[rng.permutation(items)]
    types = ("view", "click", "add_to_cart", "purchase")
    return [
        {
            "event_id": f"synthetic:{index}",
            "user_id": f"user-{user_draws[index]}",
            "item_id": str(item_ids[item_draws[index]]),
            "event_type": types[type_draws[index]],
            "timestamp": int(timestamps[index]),
        }
        for index in range(count)
    ]


def paced_messages(base_events: list[dict[str, Any]], count: int, first_round: int) -> list[KafkaMessage]:
    """Return `count` events that continue the stream after round `first_round - 1` of `repeated`.

    New ids make the worker apply them, and later timestamps keep each user's events in time
    order, so none is rejected as out of order.
    """
    span_ms = _span_ms(base_events)
    return [
        event_message(_in_round(base_events[index % len(base_events)], first_round + index // len(base_events), span_ms))
        for index in range(count)
    ]


# -- model bundle ---------------------------------------------------------------------------


def build_random_bundle(item_ids: list[str], out_dir: Path, seed: int, dataset: str) -> Path:
    """Write a GRU bundle with seeded random weights and the default ModelConfig sizes over `item_ids`.

    The compute cost of a step depends on the shapes (hidden size, catalogue size), not on
    the weights, so a benchmark needs no trained model. Needs torch (the train extra).
    """
    try:
        import torch

        from export.bundle import write_bundle
        from export.model import GRU4Rec, ModelConfig
        from export.sequences import ItemVocabulary
    except ImportError as exc:
        raise BenchError(f"building a bundle needs the train extra ({exc}); install it or pass --bundle DIR") from exc

    torch.manual_seed(seed)
    vocabulary = ItemVocabulary(item_ids)
    model = GRU4Rec(ModelConfig(num_items=len(vocabulary)))
    metrics = {"model": {"test": {}}, "baselines": {}}
    write_bundle(out_dir, model, vocabulary, {}, metrics, train_config={"seed": seed}, training_data={"dataset": dataset})
    return out_dir


# -- broker access --------------------------------------------------------------------------


class BrokerProbe:
    """Read a consumer group's committed offsets without joining the group."""

    def __init__(self, bootstrap: str) -> None:
        from confluent_kafka.admin import AdminClient

        self.bootstrap = bootstrap
        self.admin = AdminClient({"bootstrap.servers": bootstrap})

    def committed(self, group: str, topic: str, partitions: int) -> list[int]:
        """Return the group's committed offset per partition, 0 where it has committed none."""
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        request = ConsumerGroupTopicPartitions(group, [TopicPartition(topic, p) for p in range(partitions)])
        result = self.admin.list_consumer_group_offsets([request])[group].result()
        return [max(entry.offset, 0) for entry in sorted(result.topic_partitions, key=lambda entry: entry.partition)]


@dataclass(frozen=True)
class Output:
    """The fields of one output record that the benchmark uses."""

    timestamp_ms: int  # Kafka timestamp of the output record
    source_timestamp_ms: int  # Kafka timestamp of the input message behind it
    source_partition: int
    source_offset: int
    event_id: str | None  # absent from the passthrough's outputs


def read_outputs(
    bootstrap: str, topic: str, start: list[int], expected: int | None, idle_s: float, timeout_s: float = 120.0
) -> tuple[list[Output], list[int]]:
    """Consume `topic` from the `start` offsets until `expected` outputs, or until none came for idle_s.

    Returns the outputs and the next offset of every partition. The consumer exists only
    for this call, so that it does not fetch (and use CPU) while a variant is measured.
    Counts come from consuming, never from end offsets: Tansu 0.6.0 reported high
    watermarks below the real end after concurrent produce requests (100,000 messages
    delivered, end offsets summing to 98,543, all 100,000 still consumable).
    """
    from confluent_kafka import Consumer, TopicPartition

    # Assigned, never subscribed, so the group id joins no group.
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-reader-{topic}", "enable.auto.commit": False})
    positions = list(start)
    outputs: list[Output] = []
    try:
        consumer.assign([TopicPartition(topic, partition, offset) for partition, offset in enumerate(start)])
        started = last_record = time.monotonic()
        while time.monotonic() - started < timeout_s and (expected is None or len(outputs) < expected):
            messages = consumer.consume(num_messages=5000, timeout=0.5)
            for message in messages:
                if message.error() is None:
                    outputs.append(_parse_output(message.timestamp()[1], message.value()))
                    positions[message.partition()] = message.offset() + 1
            if messages:
                last_record = time.monotonic()
            elif time.monotonic() - last_record >= idle_s:
                break
    finally:
        consumer.close()
    return outputs, positions


def _parse_output(timestamp_ms: int, value: bytes) -> Output:
    body = json.loads(value)
    source = body["source"]
    return Output(timestamp_ms, body["event_kafka_timestamp_ms"], source["partition"], source["offset"], body.get("event_id"))


# -- variant processes ----------------------------------------------------------------------


class VariantProcess(WorkerProcess):
    """A worker-like child process: `python -m <command>` with STREAMREC_* settings."""

    def __init__(self, command: Sequence[str], env: dict[str, str], log_path: Path) -> None:
        super().__init__(env, log_path)
        self.command = tuple(command)
        # Inherited STREAMREC_* variables would change the variant behind the benchmark's back.
        # This also drops devkit's EMBEDDED_BROKER_WORKER_ENV (one record per producer batch):
        # it protects changelog recovery, which no variant goes through here, and it would
        # measure a producer setting that a deployment against Kafka does not use.
        own = set(env) | {"STREAMREC_WEB_HOST", "STREAMREC_WEB_PORT"}
        self.env = {name: value for name, value in self.env.items() if not name.startswith("STREAMREC_") or name in own}

    def start(self) -> "VariantProcess":
        import subprocess

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            self.process = subprocess.Popen([sys.executable, "-m", *self.command], env=self.env, stdout=log_file, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process so far, from /proc/<pid>/stat."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_mb(self) -> float:
        """Return the process's peak resident set size in MiB (VmHWM in /proc/<pid>/status)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise BenchError(f"/proc/{self.pid}/status has no VmHWM line")

    def samples(self, names: Sequence[str]) -> dict[str, float]:
        """Return the named unlabelled samples of one /metrics read (0 for an absent sample)."""
        values = dict.fromkeys(names, 0.0)
        for line in self.metrics_text().splitlines():
            name, _, value = line.partition(" ")
            if name in values:
                values[name] = float(value)
        return values


@dataclass
class VariantRun:
    variant: Variant
    settings: Settings
    process: VariantProcess
    result: dict[str, Any] = field(default_factory=dict)
    backlog_end: list[int] = field(default_factory=list)  # committed input offsets once the backlog is consumed
    output_positions: list[int] = field(default_factory=list)  # next output offset to read, per partition
    failure: str | None = None


def variant_settings(variant: Variant, bootstrap: str, bundle_dir: Path, work_dir: Path, partitions: int) -> Settings:
    name = variant.name.replace("_", "-")
    return Settings.from_env(
        {},
        bundle_dir=bundle_dir,
        broker=f"kafka://{bootstrap}",
        app_id=f"bench-{name}",
        events_topic=f"bench-{name}-events",
        recommendations_topic=f"bench-{name}-outputs",
        dead_letter_topic=f"bench-{name}-dlq",
        partitions=partitions,
        state_dir=work_dir / name / "state",
        create_topics=False,
    )


def start_variant(variant: Variant, bootstrap: str, bundle_dir: Path, work_dir: Path, partitions: int) -> VariantRun:
    settings = variant_settings(variant, bootstrap, bundle_dir, work_dir, partitions)
    create_worker_topics(settings)
    # faust creates the state directory without its parents.
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    process = VariantProcess(variant.command, {**worker_env(settings), **variant.env}, work_dir / f"{settings.app_id}.log")
    return VariantRun(variant, settings, process.start())


# -- measurement ----------------------------------------------------------------------------


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def wait_until_committed(run: VariantRun, probe: BrokerProbe, start: list[int], count: int, phase: str, stall_timeout_s: float) -> list[int]:
    """Wait until the variant's group has committed `count` offsets past `start`; return the committed offsets.

    The input topics have no transactions and no compaction, so every offset is a message,
    and the committed offsets summed over the partitions count the messages consumed.
    """
    settings = run.settings
    started = last_change = last_report = time.monotonic()
    last_done = -1
    while True:
        committed = probe.committed(settings.app_id, settings.events_topic, settings.partitions)
        done = sum(committed) - sum(start)
        now = time.monotonic()
        if done >= count:
            return committed
        if run.process.exited():
            raise VariantFailed(f"process exited with code {run.process.process.returncode}:\n{run.process.log_tail(20)}")
        if done != last_done:
            last_done, last_change = done, now
        elif now - last_change > stall_timeout_s:
            raise VariantFailed(f"no offset committed for {stall_timeout_s:.0f} s at {done} of {count} events; log: {run.process.log_path}")
        if now - last_report >= PROGRESS_INTERVAL_S:
            say(f"[{run.variant.name}] {phase}: {done:,} of {count:,} events done ({done / (now - started):,.0f} events/s)")
            last_report = now
        time.sleep(POLL_INTERVAL_S)


def read_variant_outputs(run: VariantRun, bootstrap: str, expected: int | None) -> list[Output]:
    """Read the variant's new outputs: `expected` of them, or, for coalesced output, until none arrive."""
    idle_s = OUTPUT_WAIT_S if expected is not None else OUTPUT_SETTLE_S
    start = run.output_positions or [0] * run.settings.partitions
    outputs, run.output_positions = read_outputs(bootstrap, run.settings.recommendations_topic, start, expected, idle_s)
    return outputs


def measure_backlog(run: VariantRun, probe: BrokerProbe, messages: list[KafkaMessage], neighbours: list[VariantRun], stall_timeout_s: float) -> None:
    """Produce the backlog, wait until the variant has consumed it, and record throughput and compute."""
    settings, process, result = run.settings, run.process, run.result
    cpu_before = process.cpu_seconds()
    neighbour_cpu_before = sum(other.process.cpu_seconds() for other in neighbours)
    load_before = os.getloadavg()[0]

    stats = replay_messages(probe.bootstrap, settings.events_topic, messages, progress_interval_s=60.0)
    if not stats.ok:
        raise VariantFailed(f"producing the backlog failed: {stats}")
    say(f"[{run.variant.name}] backlog of {len(messages):,} events produced in {stats.elapsed_s:.1f} s; consuming")
    run.backlog_end = wait_until_committed(run, probe, [0] * settings.partitions, len(messages), "backlog", stall_timeout_s)

    # The CPU times are read before the outputs, so that reading them costs the variant nothing.
    cpu_s = process.cpu_seconds() - cpu_before
    neighbours_cpu_s = sum(other.process.cpu_seconds() for other in neighbours) - neighbour_cpu_before
    samples = process.samples(_MODEL_SAMPLES)
    outputs = read_variant_outputs(run, probe.bootstrap, len(messages) if run.variant.every_event else None)
    outputs = [output for output in outputs if output.source_offset < run.backlog_end[output.source_partition]]

    timestamps = [output.timestamp_ms for output in outputs]
    span_s = (max(timestamps) - min(timestamps)) / 1000 if len(outputs) > 1 else 0.0
    applied = samples["streamrec_events_applied_total"]
    result.update(
        events=len(messages),
        outputs=len(outputs),
        distinct_sources=len({(output.source_partition, output.source_offset) for output in outputs}),
        events_applied=int(applied),
        events_per_s=len(messages) / span_s if span_s > 0 else None,
        backlog_seconds=span_s,
        cpu_seconds=cpu_s,
        events_per_cpu_s=len(messages) / cpu_s if cpu_s > 0 else None,
        compute_us_per_event=(samples["streamrec_step_seconds_sum"] / applied * 1e6) if run.variant.runs_model and applied else 0.0,
        onnx_calls=int(samples["streamrec_step_seconds_count"]),
        events_per_batch=_ratio(samples["streamrec_batch_size_events_sum"], samples["streamrec_batch_size_events_count"]),
        idle_neighbours_cpu_seconds=neighbours_cpu_s,
        load_avg_1m=[round(load_before, 2), round(os.getloadavg()[0], 2)],
    )
    if run.variant.runs_model and run.variant.name != "recompute":
        result["events_per_onnx_call"] = _ratio(applied, samples["streamrec_step_seconds_count"])
    result["complete"] = _backlog_complete(run.variant, messages, outputs, applied)
    say(f"[{run.variant.name}] backlog done: {_format(result['events_per_s'], ',.0f')} events/s over {span_s:.1f} s, "
        f"{len(outputs):,} outputs, {cpu_s:.1f} CPU s")


_MODEL_SAMPLES = (
    "streamrec_events_applied_total",
    "streamrec_step_seconds_sum",
    "streamrec_step_seconds_count",
    "streamrec_batch_size_events_sum",
    "streamrec_batch_size_events_count",
)


def _backlog_complete(variant: Variant, messages: list[KafkaMessage], outputs: list[Output], applied: float) -> bool:
    """Tell whether every backlog event was applied and produced the outputs the variant promises."""
    if applied != len(messages):
        return False
    if variant.every_event:
        sources = {(output.source_partition, output.source_offset) for output in outputs}
        return len(outputs) == len(messages) and len(sources) == len(messages)
    # Coalesced: only each user's last event of a batch is published, so every user's last
    # event of the backlog must be among the published ones.
    last_event_ids = {key: json.loads(value)["event_id"] for key, value in messages}
    return set(last_event_ids.values()) <= {output.event_id for output in outputs}


def measure_paced(run: VariantRun, probe: BrokerProbe, messages: list[KafkaMessage], rate: float, stall_timeout_s: float) -> None:
    """Produce `messages` at `rate` events/s and record the input-to-output latency of each output."""
    settings, result = run.settings, run.result
    say(f"[{run.variant.name}] paced phase: {len(messages):,} events at {rate:,.0f} events/s")

    # No linger: the input timestamp is taken when the message is handed to the producer.
    stats = replay_messages(probe.bootstrap, settings.events_topic, messages, rate, producer_config={"linger.ms": 0}, progress_interval_s=60.0)
    if not stats.ok:
        raise VariantFailed(f"producing the paced events failed: {stats}")
    wait_until_committed(run, probe, run.backlog_end, len(messages), "paced phase", stall_timeout_s)
    outputs = read_variant_outputs(run, probe.bootstrap, len(messages) if run.variant.every_event else None)
    outputs = [output for output in outputs if output.source_offset >= run.backlog_end[output.source_partition]]
    latency_ms = np.array([output.timestamp_ms - output.source_timestamp_ms for output in outputs], dtype=np.float64)
    result.update(
        paced_rate=rate,
        paced_events=len(messages),
        paced_outputs=len(outputs),
        achieved_input_rate=stats.rate_per_s,
        p50_ms=float(np.percentile(latency_ms, 50)) if len(outputs) else None,
        p99_ms=float(np.percentile(latency_ms, 99)) if len(outputs) else None,
        max_ms=float(latency_ms.max()) if len(outputs) else None,
        peak_rss_mb=run.process.peak_rss_mb(),
        # Above its backlog rate a variant cannot keep up, and its latency is mostly queueing.
        overloaded_at_paced_rate=result["events_per_s"] is not None and result["events_per_s"] < rate,
    )
    if run.variant.every_event and len(outputs) != len(messages):
        result["complete"] = False
    say(f"[{run.variant.name}] latency p50 {_format(result['p50_ms'], '.0f')} ms, p99 {_format(result['p99_ms'], '.0f')} ms "
        f"over {len(outputs):,} outputs; peak RSS {result['peak_rss_mb']:.0f} MiB")


# faust-streaming 0.15 keeps each partition's changelog offset under this key, beside the table's keys.
_FAUST_OFFSET_KEY = b"__faust\0offset__"


def state_bytes_per_user(state_dir: Path, table: str) -> tuple[float | None, int]:
    """Return the mean value size of a stopped worker's RocksDB table and its number of keys."""
    from rocksdict import AccessType, Rdict

    sizes: list[int] = []
    for path in sorted(state_dir.glob(f"v*/tables/{table}-*.db")):
        database = Rdict(str(path), access_type=AccessType.read_only())
        try:
            sizes += [len(value) for key, value in database.items() if key != _FAUST_OFFSET_KEY]
        finally:
            database.close()
    return (float(np.mean(sizes)) if sizes else None), len(sizes)


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator


def _format(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


# -- report ---------------------------------------------------------------------------------


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    def value(variant: str, key: str) -> float | None:
        return results.get(variant, {}).get(key)

    return {
        "batched_over_passthrough": _ratio(value("batched", "events_per_s"), value("passthrough", "events_per_s")),
        "coalesced_over_passthrough": _ratio(value("batched_coalesced", "events_per_s"), value("passthrough", "events_per_s")),
        "batched_over_batch1": _ratio(value("batched", "events_per_s"), value("batch1", "events_per_s")),
        "recompute_over_batched_compute": _ratio(value("recompute", "compute_us_per_event"), value("batched", "compute_us_per_event")),
        # The same throughput ratios per CPU second of the variant's process, less sensitive to other load on the machine.
        "batched_over_passthrough_per_cpu_s": _ratio(value("batched", "events_per_cpu_s"), value("passthrough", "events_per_cpu_s")),
        "batched_over_batch1_per_cpu_s": _ratio(value("batched", "events_per_cpu_s"), value("batch1", "events_per_cpu_s")),
    }


# (title, result key, width, number format)
_COLUMNS = (
    ("events/s", "events_per_s", 9, ",.0f"),
    ("events/CPU s", "events_per_cpu_s", 12, ",.0f"),
    ("p50 ms", "p50_ms", 8, ",.0f"),
    ("p99 ms", "p99_ms", 8, ",.0f"),
    ("peak RSS MiB", "peak_rss_mb", 12, ",.0f"),
    ("compute us/event", "compute_us_per_event", 16, ",.1f"),
    ("events/batch", "events_per_batch", 12, ",.1f"),
    ("state B/user", "state_bytes_per_user", 12, ",.0f"),
    ("outputs", "outputs", 9, ","),
    ("complete", "complete", 8, ""),
)
_NAME_WIDTH = 18
_RATIO_LABELS = {
    "batched_over_passthrough": "batched / passthrough (events/s)",
    "coalesced_over_passthrough": "batched_coalesced / passthrough (events/s)",
    "batched_over_batch1": "batched / batch1 (events/s)",
    "recompute_over_batched_compute": "recompute / batched (model compute per event)",
    "batched_over_passthrough_per_cpu_s": "batched / passthrough (events per CPU s)",
    "batched_over_batch1_per_cpu_s": "batched / batch1 (events per CPU s)",
}


def render_table(results: dict[str, dict[str, Any]], ratio_values: dict[str, float | None]) -> str:
    header = "variant".ljust(_NAME_WIDTH) + "".join(" " + title.rjust(width) for title, _, width, _ in _COLUMNS)
    lines = [header, "-" * len(header)]
    for name, result in results.items():
        cells = []
        for _, key, width, number_format in _COLUMNS:
            text = _cell(result.get(key), number_format)
            if key in ("p50_ms", "p99_ms") and result.get("overloaded_at_paced_rate"):
                text += "*"
            cells.append(" " + text.rjust(width))
        line = name.ljust(_NAME_WIDTH) + "".join(cells)
        if result.get("error"):
            line += f"  FAILED: {result['error'].splitlines()[0]}"
        lines.append(line)

    if any(result.get("overloaded_at_paced_rate") for result in results.values()):
        lines.append("* the paced rate is above this variant's backlog rate, so its latency is mostly time spent queueing")
    lines.append("")
    for key, label in _RATIO_LABELS.items():
        lines.append(f"{label:<48} {_format(ratio_values.get(key), '.2f')}")
    return "\n".join(lines)


def _cell(value: Any, number_format: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return format(value, number_format)


def json_document(results: dict[str, dict[str, Any]], ratio_values: dict[str, float | None], run_info: dict[str, Any]) -> dict[str, Any]:
    """Return the --json document: one object per variant (null numbers where it failed), the ratios and the run."""
    document: dict[str, Any] = {}
    for name in VARIANT_NAMES:
        result = {**dict.fromkeys(("events_per_s", "p50_ms", "p99_ms")), **results.get(name, {})}
        document[name] = {key: _rounded(value) for key, value in result.items()}
    document["ratios"] = {key: _rounded(value) for key, value in ratio_values.items()}
    document["run"] = run_info
    return document


def _rounded(value: Any) -> Any:
    """Round a float to 3 decimals, so that 31.439999999999998 CPU seconds reads 31.44."""
    return round(value, 3) if isinstance(value, float) else value


# -- orchestration --------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    backlog: list[KafkaMessage]
    base_events: list[dict[str, Any]]
    repeat: int  # rounds of base_events in the backlog
    stream: str
    item_ids: list[str]
    variants: tuple[Variant, ...]
    paced_seconds: float
    paced_rate: float | None
    partitions: int
    stall_timeout_s: float


def run_benchmark(plan: Plan, bundle_dir: Path, work_dir: Path) -> dict[str, dict[str, Any]]:
    """Start the broker and every variant, measure them one at a time, and return their results by name."""
    with EmbeddedBroker(log_path=work_dir / "broker.log") as broker:
        say(f"broker on {broker.bootstrap}; logs in {work_dir}")
        runs: list[VariantRun] = []
        probe = BrokerProbe(broker.bootstrap)
        try:
            for variant in plan.variants:
                runs.append(start_variant(variant, broker.bootstrap, bundle_dir, work_dir, plan.partitions))
                say(f"[{variant.name}] started: python -m {' '.join(variant.command)} (pid {runs[-1].process.pid})")
            _wait_all_ready(runs)
            _measure_all(runs, probe, plan)
        finally:
            for run in runs:
                code = run.process.stop()
                if code != 0 and run.failure is None:
                    log.warning("variant %s exited with code %s; log: %s", run.variant.name, code, run.process.log_path)
            # Tansu stops on SIGTERM only once its clients have disconnected, and the admin
            # client disconnects when it is freed.
            del probe
    for run in runs:
        _record_state_size(run)
    return {run.variant.name: run.result for run in runs}


def _wait_all_ready(runs: list[VariantRun]) -> None:
    say(f"waiting for {len(runs)} consumer groups to join (about 30 s on the embedded broker)")
    started = time.monotonic()
    for run in runs:
        try:
            run.process.wait_ready()
        except (RuntimeError, TimeoutError) as exc:
            raise BenchError(f"variant {run.variant.name} did not become ready: {exc}") from exc
    say(f"all {len(runs)} variants ready after {time.monotonic() - started:.0f} s")


def _measure_all(runs: list[VariantRun], probe: BrokerProbe, plan: Plan) -> None:
    order = {name: index for index, name in enumerate(MEASURE_ORDER)}
    paced_rate = plan.paced_rate
    for run in sorted(runs, key=lambda run: order.get(run.variant.name, len(order))):
        neighbours = [other for other in runs if other is not run]
        try:
            measure_backlog(run, probe, plan.backlog, neighbours, plan.stall_timeout_s)
            if paced_rate is None:
                paced_rate = _paced_rate_from(run)
            paced = paced_messages(plan.base_events, max(1, round(paced_rate * plan.paced_seconds)), first_round=plan.repeat)
            measure_paced(run, probe, paced, paced_rate, plan.stall_timeout_s)
        except VariantFailed as exc:
            run.failure = str(exc)
            run.result["error"] = str(exc)
            say(f"[{run.variant.name}] FAILED: {exc}")


def _paced_rate_from(run: VariantRun) -> float:
    """Half the batched variant's backlog rate: the worker then runs below capacity."""
    rate = run.result.get("events_per_s")
    if run.variant.name != "batched" or not rate:
        raise VariantFailed("the paced rate derives from the batched variant's backlog rate; pass --paced-rate")
    return rate / 2


def _record_state_size(run: VariantRun) -> None:
    try:
        mean_bytes, users = state_bytes_per_user(run.settings.state_dir, run.settings.state_table)
    except Exception as exc:  # rocksdict raises its own exception types for a locked or missing database
        log.warning("could not read the table of %s: %s", run.variant.name, exc)
        return
    run.result["state_bytes_per_user"] = mean_bytes
    run.result["table_keys"] = users


# -- command line ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.bench",
        description="Replay one event stream through the worker and four comparison variants; print throughput, latency, memory and compute.",
    )
    stream = parser.add_argument_group("event stream")
    stream.add_argument("--data", default=None, metavar="DIR", help="MovieLens-100K folder (default: the search of export.data.resolve_dataset_dir)")
    stream.add_argument("--repeat", type=_positive_int, default=1, metavar="N", help="replay the MovieLens ratings N times, each pass with new event ids (default: 1)")
    stream.add_argument("--synthetic", action="store_true", help=f"use a seeded synthetic stream: {SYNTHETIC_USERS:,} users, {SYNTHETIC_ITEMS:,} items")
    stream.add_argument("--events", type=_positive_int, default=None, metavar="N", help=f"events of the synthetic stream (default: {SYNTHETIC_EVENTS:,}); with MovieLens, keep the first N")
    stream.add_argument("--seed", type=int, default=0, help="seed of the synthetic stream (default: 0)")

    run = parser.add_argument_group("run")
    run.add_argument("--quick", action="store_true", help=f"smoke run: the first {QUICK_EVENTS:,} events and a {QUICK_PACED_SECONDS:g} s paced phase")
    run.add_argument("--variants", default=",".join(VARIANT_NAMES), help=f"comma-separated subset of {','.join(VARIANT_NAMES)} (default: all)")
    run.add_argument(
        "--recompute-scoring",
        choices=(SCORE_EVERY_STEP, SCORE_LAST_STEP),
        default=SCORE_EVERY_STEP,
        help="recompute variant: score the catalogue at every one of the recomputed steps (default), or at the last only",
    )
    run.add_argument("--bundle", type=Path, default=None, metavar="DIR", help="model bundle to serve (default: a random-weight GRU bundle over the stream's items, built with torch)")
    run.add_argument("--partitions", type=_positive_int, default=PARTITIONS, help=f"partitions of every topic (default: {PARTITIONS}, the worker's default)")
    run.add_argument("--paced-seconds", type=float, default=None, metavar="S", help=f"length of the paced phase in seconds (default: {PACED_SECONDS:g}, --quick: {QUICK_PACED_SECONDS:g})")
    run.add_argument("--paced-rate", type=float, default=None, metavar="EVENTS_PER_S", help="rate of the paced phase (default: half the batched variant's backlog rate)")
    run.add_argument("--stall-timeout", type=float, default=STALL_TIMEOUT_S, metavar="S", help=f"seconds without a committed offset before a variant counts as failed (default: {STALL_TIMEOUT_S:g})")
    run.add_argument("--work-dir", type=Path, default=None, metavar="DIR", help="folder for logs, tables and the bundle (default: a temporary folder, removed unless a variant fails or --keep)")
    run.add_argument("--keep", action="store_true", help="keep the work folder")
    run.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the results as JSON to FILE")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def _select_variants(text: str, recompute_scoring: str) -> tuple[Variant, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VARIANT_NAMES))
    if unknown or not names:
        raise BenchError(f"invalid --variants {text!r}: expected names from {', '.join(VARIANT_NAMES)}")
    selected = []
    for variant in VARIANTS:
        if variant.name == "recompute":
            variant = dataclasses.replace(variant, command=(*variant.command, "--scoring", recompute_scoring))
        if variant.name in names:
            selected.append(variant)
    return tuple(selected)


def _build_plan(args: argparse.Namespace) -> Plan:
    variants = _select_variants(args.variants, args.recompute_scoring)
    if args.paced_rate is None and "batched" not in {variant.name for variant in variants}:
        raise BenchError("without the batched variant the paced rate is unknown; pass --paced-rate EVENTS_PER_S")
    if args.paced_rate is not None and args.paced_rate <= 0:
        raise BenchError(f"invalid --paced-rate {args.paced_rate}: expected events per second > 0")

    limit = QUICK_EVENTS if args.quick and args.events is None else args.events
    if args.synthetic:
        base = synthetic_events(limit or SYNTHETIC_EVENTS, SYNTHETIC_USERS, SYNTHETIC_ITEMS, args.seed)
        item_ids, stream = synthetic_item_ids(SYNTHETIC_ITEMS), f"synthetic(seed={args.seed})"
    else:
        base, item_ids = movielens_events(args.data, limit)
        stream = "ml-100k"
    backlog = [event_message(event) for event in repeated(base, args.repeat)]

    paced_seconds = args.paced_seconds
    if paced_seconds is None:
        paced_seconds = QUICK_PACED_SECONDS if args.quick else PACED_SECONDS
    return Plan(backlog, base, args.repeat, stream, item_ids, variants, paced_seconds, args.paced_rate, args.partitions, args.stall_timeout)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="streamrec-bench-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    try:
        plan = _build_plan(args)
        bundle_dir = args.bundle
        if bundle_dir is None:
            say(f"building a random-weight bundle over {len(plan.item_ids):,} items")
            bundle_dir = build_random_bundle(plan.item_ids, work_dir / "bundle", BUNDLE_SEED, plan.stream)
        say(f"stream {plan.stream}: {len(plan.backlog):,} backlog events; variants: {', '.join(v.name for v in plan.variants)}")
        results = run_benchmark(plan, bundle_dir, work_dir)
    except (BenchError, BrokerError, DatasetError, TopicSetupError, OSError, ValueError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1

    ratio_values = ratios(results)
    ordered = {name: results[name] for name in VARIANT_NAMES if name in results}
    print(render_table(ordered, ratio_values))
    run_info = {
        "stream": plan.stream,
        "backlog_events": len(plan.backlog),
        "partitions": plan.partitions,
        "paced_seconds": plan.paced_seconds,
        "recompute_scoring": args.recompute_scoring,
        "bundle": str(bundle_dir),
        "variants": {variant.name: variant.description for variant in plan.variants},
        "cpu_count": os.cpu_count(),
        "wall_seconds": round(time.monotonic() - started, 1),
    }
    if args.json is not None:
        args.json.write_text(json.dumps(json_document(results, ratio_values, run_info), indent=2) + "\n")

    failed = [name for name, result in results.items() if result.get("error") or not result.get("complete")]
    if failed or args.keep or args.work_dir is not None:
        say(f"work folder kept: {work_dir}")
    else:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
