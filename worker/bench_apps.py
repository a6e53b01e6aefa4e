"""Faust apps that exist only as comparison points for `python -m worker.bench`.

    python -m worker.bench_apps passthrough   # per-event ceiling: no decoding, no model
    python -m worker.bench_apps recompute [--scoring every-step|last-step]
                                              # stateless model: rerun the GRU over recent events

Both read the same STREAMREC_* settings as the worker (broker, topics, partitions, data
directory, web port, batching, recent items, model bundle) and serve /metrics and /readyz
in the worker's format, so the benchmark drives them exactly like `python -m worker`.
Their faust settings are the worker's (worker.app.build_faust_app).
"""

from __future__ import annotations

import argparse
import json
import logging
import logging.config
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from worker.config import Settings, SettingsError
from worker.events import InvalidEvent, decode_event
from worker.logs import logging_config
from worker.metrics import WorkerMetrics
from worker.model import BundleError, StepModel, load_bundle
from worker.processor import BatchResult, InputMessage, OutputMessage, StateStore

log = logging.getLogger(__name__)

PASSTHROUGH = "passthrough"
RECOMPUTE = "recompute"
APPS = (PASSTHROUGH, RECOMPUTE)
SCORE_EVERY_STEP = "every-step"
SCORE_LAST_STEP = "last-step"

# Size of the passthrough's table value, written once per event. A worker state is larger:
# the benchmark measured about 2 KB with hidden size 128 and 50 recent MovieLens events.
PASSTHROUGH_VALUE_BYTES = 512
_OFFSET = struct.Struct("<q")

# Recompute table value: u16 count, then int32 item indices, then uint8 event type indices.
_HISTORY_COUNT = struct.Struct("<H")


# -- recompute: the stateless model, without faust ----------------------------------------


@dataclass
class _UserEvents:
    history_items: list[int]
    history_types: list[int]
    pending: list[tuple[InputMessage, Any]]  # (message, decoded Event) in offset order
    last_message: InputMessage


def encode_history(items: Sequence[int], types: Sequence[int]) -> bytes:
    """Serialise a user's recent events as vocabulary indices (see _HISTORY_COUNT)."""
    return (
        _HISTORY_COUNT.pack(len(items))
        + np.asarray(items, dtype="<i4").tobytes()
        + np.asarray(types, dtype=np.uint8).tobytes()
    )


def decode_history(data: bytes) -> tuple[list[int], list[int]]:
    """Parse bytes written by encode_history into (item indices, event type indices)."""
    (count,) = _HISTORY_COUNT.unpack_from(data)
    expected = _HISTORY_COUNT.size + 5 * count
    if len(data) != expected:
        raise ValueError(f"history record of {len(data)} bytes, expected {expected} for {count} events")
    items = np.frombuffer(data, dtype="<i4", count=count, offset=_HISTORY_COUNT.size)
    types = np.frombuffer(data, dtype=np.uint8, count=count, offset=_HISTORY_COUNT.size + 4 * count)
    return items.tolist(), types.tolist()


class RecurrentStep:
    """The recurrent part of a bundle's step graph: new hidden (and cell) state, no scoring or top-K.

    Cut out of the step graph with onnx.utils.Extractor, so it needs the onnx package (the
    train extra), which the worker itself does not install.
    """

    def __init__(self, model: StepModel, threads: int, optimization: str) -> None:
        import onnx
        import onnx.utils
        import onnxruntime as ort

        from worker.model import _OPT_LEVELS

        graph = onnx.load_from_string((model.bundle_dir / model.manifest["graph_file"]).read_bytes())
        state_roles = ["hidden", "cell"] if model.has_cell_state else ["hidden"]
        self.input_names = [model.manifest["inputs"][role] for role in ["item", "event_type", *state_roles]]
        self.output_names = [model.manifest["outputs"][role] for role in state_roles]
        recurrent = onnx.utils.Extractor(graph).extract_model(self.input_names, self.output_names)

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = _OPT_LEVELS[optimization]
        self.session = ort.InferenceSession(recurrent.SerializeToString(), sess_options=options, providers=["CPUExecutionProvider"])

    def step(self, items: np.ndarray, types: np.ndarray, hidden: np.ndarray, cell: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """Return the new (hidden, cell) states, each (num_layers, batch, hidden_size); cell is None for a GRU."""
        states = [hidden] if cell is None else [hidden, cell]
        results = self.session.run(self.output_names, dict(zip(self.input_names, [items, types, *states])))
        return results[0], (results[1] if cell is not None else None)


class Recomputer:
    """Recompute each user's hidden state from a zero state over their last `history` events.

    The table keeps only the recent events (no hidden state). Batches are applied in waves
    as the worker's Processor does: wave i contains the i-th event of every user in the batch.
    Within a wave the histories are right-aligned, so step t runs one ONNX call over the
    users whose history is long enough to have an event at t, and only the last step's
    top-K is published. Without `recurrent_step` every step runs the whole step graph and
    so also scores the catalogue; with it, the steps before the last skip the scoring.
    """

    def __init__(
        self,
        model: StepModel,
        history: int,
        metrics: WorkerMetrics,
        max_event_bytes: int,
        recurrent_step: RecurrentStep | None = None,
    ) -> None:
        self.model = model
        self.history = history
        self.metrics = metrics
        self.max_event_bytes = max_event_bytes
        self.recurrent_step = recurrent_step
        self._event_types = frozenset(model.event_types)

    def process(self, messages: Sequence[InputMessage], store: StateStore) -> BatchResult:
        """Apply a batch: one recommendation per valid event, and the new histories.

        As with the worker's Processor, the caller writes the histories (result.write_states)
        once the recommendations are delivered.
        """
        self.metrics.batch_size.observe(len(messages))
        self.metrics.events_consumed.inc(len(messages))
        users = self._decode(messages, store)

        result = BatchResult()
        wave_index = 0
        while True:
            wave = [(user_id, batch) for user_id, batch in users.items() if wave_index < len(batch.pending)]
            if not wave:
                break
            result.recommendations += self._apply_wave(wave, wave_index)
            wave_index += 1

        for user_id, batch in users.items():
            result.state_updates.append((user_id, encode_history(batch.history_items, batch.history_types), batch.last_message))
        result.applied = len(result.recommendations)
        self.metrics.recommendations_published.inc(len(result.recommendations))
        return result

    def _decode(self, messages: Sequence[InputMessage], store: StateStore) -> dict[str, _UserEvents]:
        users: dict[str, _UserEvents] = {}
        for message in messages:
            try:
                event = decode_event(message.key, message.value, event_types=self._event_types, max_bytes=self.max_event_bytes)
            except InvalidEvent as exc:
                # The benchmark streams contain no invalid events, so there is no dead-letter topic here.
                self.metrics.events_rejected.labels(exc.reason).inc()
                log.warning(
                    "event rejected: reason=%s %s[%d] offset=%d detail=%s",
                    exc.reason, message.topic, message.partition, message.offset, exc.detail,
                )
                continue

            batch = users.get(event.user_id)
            if batch is None:
                raw = store.get(event.user_id, message)
                items, types = decode_history(raw) if raw is not None else ([], [])
                batch = users[event.user_id] = _UserEvents(items, types, [], message)
            batch.pending.append((message, event))
            batch.last_message = message
        return users

    def _apply_wave(self, wave: list[tuple[str, _UserEvents]], wave_index: int) -> list[OutputMessage]:
        model = self.model
        for _, batch in wave:
            _, event = batch.pending[wave_index]
            batch.history_items.append(model.item_index.get(event.item_id, 0))
            batch.history_types.append(model.event_type_index[event.event_type])
            del batch.history_items[: -self.history]
            del batch.history_types[: -self.history]

        scores, top_items = self._recompute([batch.history_items for _, batch in wave], [batch.history_types for _, batch in wave])
        self.metrics.events_applied.inc(len(wave))

        produced_at_ms = int(time.time() * 1000)
        recommendations = []
        for row, (user_id, batch) in enumerate(wave):
            message, event = batch.pending[wave_index]
            body = {
                "user_id": user_id,
                "items": [
                    {"item_id": model.item_ids[int(index)], "score": round(float(score), 6)}
                    for index, score in zip(top_items[row], scores[row])
                    if np.isfinite(score)
                ],
                "model_version": model.version,
                "event_id": event.event_id,
                "event_timestamp_ms": event.timestamp_ms,
                "event_kafka_timestamp_ms": message.timestamp_ms,
                "events_absorbed": len(batch.history_items),
                "produced_at_ms": produced_at_ms,
                "source": {"topic": message.topic, "partition": message.partition, "offset": message.offset},
            }
            value = json.dumps(body, separators=(",", ":")).encode("utf-8")
            recommendations.append(OutputMessage(key=user_id.encode("utf-8"), value=value, source_timestamp_ms=message.timestamp_ms))
        return recommendations

    def _recompute(self, histories: list[list[int]], types: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Run the step graph over right-aligned histories from a zero state; return the last step's top-K."""
        model = self.model
        batch_size = len(histories)
        lengths = np.array([len(history) for history in histories])
        steps = int(lengths.max())
        first_step = steps - lengths  # (batch,) the step at which each row's history starts

        item_matrix = np.zeros((batch_size, steps), dtype=np.int64)  # (batch, steps)
        type_matrix = np.zeros((batch_size, steps), dtype=np.int64)  # (batch, steps)
        exclude = np.zeros((batch_size, steps), dtype=np.int64)  # (batch, steps), 0 pads
        for row, (history, history_types) in enumerate(zip(histories, types)):
            item_matrix[row, first_step[row] :] = history
            type_matrix[row, first_step[row] :] = history_types
            exclude[row, : len(history)] = history

        hidden = np.zeros((model.num_layers, batch_size, model.hidden_size), dtype=np.float32)  # (layers, batch, hidden)
        cell = hidden.copy() if model.has_cell_state else None
        no_exclude = np.zeros((batch_size, 1), dtype=np.int64)  # (batch, 1)
        for step in range(steps - 1):
            rows = np.flatnonzero(first_step <= step)
            active_hidden = np.ascontiguousarray(hidden[:, rows, :])  # (layers, active, hidden)
            active_cell = np.ascontiguousarray(cell[:, rows, :]) if cell is not None else None  # (layers, active, hidden)
            started = time.perf_counter()
            if self.recurrent_step is not None:
                new_hidden, new_cell = self.recurrent_step.step(item_matrix[rows, step], type_matrix[rows, step], active_hidden, active_cell)
            else:
                output = model.step(item_matrix[rows, step], type_matrix[rows, step], active_hidden, no_exclude[: len(rows)], active_cell)
                new_hidden, new_cell = output.hidden, output.cell
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            hidden[:, rows, :] = new_hidden
            if cell is not None:
                cell[:, rows, :] = new_cell

        # Every row is active at the last step, so the output rows are the batch rows in order.
        started = time.perf_counter()
        output = model.step(item_matrix[:, -1], type_matrix[:, -1], hidden, exclude, cell)
        self.metrics.step_seconds.observe(time.perf_counter() - started)
        return output.scores, output.items  # (batch, k), (batch, k)


# -- the faust apps -----------------------------------------------------------------------


def create_bench_app(kind: str, settings: Settings, metrics: WorkerMetrics, recomputer: Recomputer | None = None) -> Any:
    """Build the faust app `kind`; the recompute app needs `recomputer`. Nothing connects until it starts."""
    if kind == RECOMPUTE and recomputer is None:
        raise ValueError("the recompute app needs a Recomputer")
    from worker.app import RAW, build_faust_app, process_and_deliver

    app = build_faust_app(settings)
    events_topic = app.topic(settings.events_topic, partitions=settings.partitions, **RAW)
    output_topic = app.topic(settings.recommendations_topic, **RAW)
    dead_letter_topic = app.topic(settings.dead_letter_topic, **RAW)
    table = app.Table(settings.state_table, partitions=settings.partitions, **RAW)

    async def pass_through(stream: Any) -> None:
        async for event in stream.events():
            message = event.message
            # The offset makes every value distinct, so RocksDB's block compression cannot shrink repeated values.
            table[message.key] = _OFFSET.pack(message.offset).ljust(PASSTHROUGH_VALUE_BYTES, b"\0")
            timestamp_ms = int(round(message.timestamp * 1000))
            # The benchmark reads the source fields of the worker's recommendation body; only those are sent.
            marker = f'{{"event_kafka_timestamp_ms":{timestamp_ms},"source":{{"partition":{message.partition},"offset":{message.offset}}}}}'
            await output_topic.send(key=message.key, value=marker.encode("ascii"))
            metrics.events_consumed.inc()
            metrics.events_applied.inc()
            metrics.recommendations_published.inc()

    async def recompute(stream: Any) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_max_ms / 1000):
            await process_and_deliver(events, recomputer.process, table, output_topic, dead_letter_topic)

    agent = pass_through if kind == PASSTHROUGH else recompute
    app.agent(events_topic, name=f"bench-{kind}")(agent)
    _add_web_views(app, kind, metrics)
    return app


def _add_web_views(app: Any, kind: str, metrics: WorkerMetrics) -> None:
    from faust.web import Request, Response, View
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            return self.bytes(generate_latest(metrics.registry), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/readyz")
    class ReadinessView(View):
        async def get(self, request: Request) -> Response:
            recovered = app.tables.recovery.completed.is_set()
            ready = recovered and not app.rebalancing
            body = {"ready": ready, "recovered": recovered, "rebalancing": app.rebalancing, "app": kind}
            return self.json(body, status=200 if ready else 503)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m worker.bench_apps",
        description="Run a comparison app of the benchmark; settings come from the worker's STREAMREC_* variables.",
    )
    parser.add_argument(
        "app",
        choices=APPS,
        help="passthrough: a table write and one output per event, no decoding; "
        "recompute: rerun the GRU over each user's recent events (STREAMREC_RECENT_ITEMS) on every event",
    )
    parser.add_argument(
        "--scoring",
        choices=(SCORE_EVERY_STEP, SCORE_LAST_STEP),
        default=SCORE_EVERY_STEP,
        help="recompute only: run the whole step graph, scoring included, at every step (default), "
        "or only the recurrent part before the last step (needs the onnx package)",
    )
    args = parser.parse_args(argv)

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"bench_apps: {exc}", file=sys.stderr)
        return 2
    logging.config.dictConfig(logging_config(settings.log_level, settings.log_format))

    metrics = WorkerMetrics()
    recomputer = None
    if args.app == RECOMPUTE:
        try:
            recomputer = _build_recomputer(settings, metrics, args.scoring)
        except (BundleError, ImportError) as exc:
            print(f"bench_apps: cannot build the recompute model: {exc}", file=sys.stderr)
            return 2

    import faust

    app = create_bench_app(args.app, settings, metrics, recomputer)
    worker = faust.Worker(
        app,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level, settings.log_format),
        redirect_stdouts=False,
    )
    worker.spinner = None  # as in worker/__main__.py: the spinner turns on DEBUG logging
    worker.execute_from_commandline()
    return 0


def _build_recomputer(settings: Settings, metrics: WorkerMetrics, scoring: str) -> Recomputer:
    model = load_bundle(settings.bundle_dir, threads=settings.ort_threads, optimization=settings.ort_optimization)
    recurrent_step = None
    if scoring == SCORE_LAST_STEP:
        recurrent_step = RecurrentStep(model, settings.ort_threads, settings.ort_optimization)
    log.info("recompute model ready: version=%s history=%d scoring=%s", model.version, settings.recent_items, scoring)
    return Recomputer(model, settings.recent_items, metrics, settings.max_event_bytes, recurrent_step)


if __name__ == "__main__":
    sys.exit(main())
