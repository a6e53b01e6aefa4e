"""The faust application: topics, the RocksDB-backed state table, the agent and the web endpoints."""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, Sequence

import faust
from faust.streams import _current_event
from faust.types import EventT, StreamT
from faust.web import Request, Response, View
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker.config import Settings
from worker.expiry import StateExpiry
from worker.metrics import WorkerMetrics
from worker.model import BundleError, StepModel, load_bundle
from worker.popularity import Count, CountCodecError, PopularityView, decode_count, encode_count, follow_changelog, merge_counts
from worker.processor import BatchResult, InputMessage, Processor, StateStore
from worker.shutdown import BatchTracker

log = logging.getLogger(__name__)

# Keys and values stay bytes end to end: the decoder receives the original bytes (and can send
# them to the dead-letter topic untouched), and the state codec owns the table value format.
RAW = {"key_type": bytes, "value_type": bytes}
# Backoff between attempts at a batch that failed, for example while the broker is unreachable.
RETRY_FIRST_DELAY_S = 0.5
RETRY_MAX_DELAY_S = 30.0


@dataclass
class Components:
    app: faust.App
    settings: Settings
    processor: Processor
    metrics: WorkerMetrics
    table: Any
    tracker: BatchTracker
    popularity: PopularityView | None = None


class _TableStore:
    """The processor's StateStore over the faust table.

    faust picks the RocksDB partition and the changelog partition of a table access from the
    current event of the running task. A batch contains events of several users, so before each
    access the current event is pointed at an event of that user: its partition is the user's.
    """

    def __init__(self, table: Any, events: dict[tuple[int, int], EventT]) -> None:
        self.table = table
        self.events = events

    def _enter(self, message: InputMessage) -> None:
        # NOTE: faust.streams._current_event is private to faust-streaming 0.15. Only the
        # context variable may change here: Stream.current_event belongs to take_events'
        # background fill, and changing it there pairs buffered values with the wrong events.
        _current_event.set(weakref.ref(self.events[(message.partition, message.offset)]))

    def get(self, user_id: str, message: InputMessage) -> bytes | None:
        self._enter(message)
        return self.table.get(user_id.encode("utf-8"))

    def put(self, user_id: str, value: bytes, message: InputMessage) -> None:
        self._enter(message)
        self.table[user_id.encode("utf-8")] = value

    def delete(self, user_id: str, message: InputMessage) -> None:
        self._enter(message)
        del self.table[user_id.encode("utf-8")]

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Return every state of the partitions assigned to this worker."""
        return iter(self.table.data.items())


class StateTable(faust.Table):
    """A faust.Table whose changelog records can be awaited until the broker acknowledges them.

    With at_least_once, faust-streaming 0.15.3 commits offsets after Producer.flush(), which
    returns once no buffered record has gone to aiokafka for 0.1 s and does not wait for the
    record being handed over. So an offset can be committed while the changelog record of a
    state written for an earlier event is still unsent. After a SIGKILL at that moment the
    event is not redelivered, and a worker that recovers from the changelog misses the state.
    The consumer therefore waits for these records before each commit (see
    _commit_after_changelog), and the agent goes on with its next batch meanwhile.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Acknowledged sends drop out at once; failed ones stay until wait_changelog_delivered raises.
        self._unacknowledged: set[asyncio.Future] = set()

    def send_changelog(self, *args: Any, **kwargs: Any) -> Any:
        future = super().send_changelog(*args, **kwargs)
        self._unacknowledged.add(future)
        future.add_done_callback(self._forget_acknowledged)
        return future

    def _forget_acknowledged(self, future: asyncio.Future) -> None:
        if not future.cancelled() and future.exception() is None:
            self._unacknowledged.discard(future)

    async def wait_changelog_delivered(self) -> None:
        """Wait until the broker has acknowledged every changelog record sent so far; raise the first send error."""
        pending, self._unacknowledged = self._unacknowledged, set()
        await asyncio.gather(*pending)


def to_input_message(event: EventT) -> InputMessage:
    message = event.message
    return InputMessage(
        key=message.key,
        value=message.value,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=int(round(message.timestamp * 1000)),
    )


def _set_fetch_max_wait(milliseconds: int) -> None:
    """Make faust's consumers ask the broker to hold a fetch at most `milliseconds`.

    faust-streaming 0.15 passes a fixed fetch_max_wait_ms=1500 to aiokafka. Kafka answers a
    fetch as soon as data arrives, but the embedded test broker (Tansu 0.6) holds it the full
    time: measured on 127.0.0.1 at 200 messages/s, p50 latency was 408 ms at 1500 and 15 ms at 50.
    """
    # NOTE: this replaces the consumer class in faust's aiokafka driver module, the only
    # place faust builds consumers; it is a patch of faust internals, checked by the e2e tests.
    import aiokafka
    from faust.transport.drivers import aiokafka as faust_driver

    base = aiokafka.AIOKafkaConsumer

    class BoundedFetchWaitConsumer(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["fetch_max_wait_ms"] = min(kwargs.get("fetch_max_wait_ms", milliseconds), milliseconds)
            super().__init__(*args, **kwargs)

    faust_driver.aiokafka = _ModuleWith(aiokafka, AIOKafkaConsumer=BoundedFetchWaitConsumer)


def _deliver_fetched_records_in_order() -> None:
    """Make faust's consumer deliver fetched records in offset order, fetching again any it drops.

    Three paths of faust-streaming 0.15.3 lose events, and this wrapper closes them:

    - Consumer.getmany delivers only the records of partitions that are active when it
      iterates them: records of a partition paused meanwhile (for a table recovery, for
      example) are dropped, yet the client's position has moved past them. The partition is
      sought back to its first dropped record.
    - After a table recovery faust resumes the input partitions, then seeks them to the
      committed offsets, while its fetcher keeps running. Records fetched before or during
      that seek come from the old position. Delivered, they were processed ahead of the
      records the seek fetches again, and offset bookkeeping then held commits back. They
      are now held back, and each partition is sought once more after the seek.
    - That seek leaves a partition without a committed offset where the client's position
      is. For a partition kept through a rebalance, that is past the records fetched
      before it and never processed. Such a partition is sought to its earliest offset,
      as consumer_auto_offset_reset="earliest" intends.

    The next records then arrive in order, with no jump that faust would take for
    compaction and commit past. A record delivered twice is skipped by offset.
    """
    # NOTE: this wraps three methods of faust's base Consumer class, internals of
    # faust-streaming 0.15; the crash and rebalance tests exercise it.
    from faust.transport import consumer as faust_consumer

    base = faust_consumer.Consumer
    if getattr(base, "_streamrec_in_order", False):
        return
    fetch = base._wait_next_records
    deliver = base.getmany
    seek_to_committed = base.perform_seek

    def seeks(consumer: Any) -> int:
        # Odd while a seek to the committed offsets runs: each seek adds one at its start and one at its end.
        return getattr(consumer, "_streamrec_seeks", 0)

    def is_input(consumer: Any, tp: Any) -> bool:
        # A partition of a topic that agents consume, not a table's changelog or faust's leader topic.
        return not consumer._is_changelog_tp(tp) and consumer.app.topics.acks_enabled_for(tp.topic)

    def held_back(consumer: Any) -> dict[Any, int]:
        if not hasattr(consumer, "_streamrec_held"):
            consumer._streamrec_held = {}
        return consumer._streamrec_held

    async def seek_to_start(consumer: Any, tps: Any, reason: str) -> None:
        # The committed offset, or the earliest one where none is committed (auto_offset_reset=earliest).
        committed = consumer._committed_offset
        uncommitted = [tp for tp in tps if committed.get(tp) is None]
        earliest = await consumer.earliest_offsets(*uncommitted) if uncommitted else {}
        for tp in tps:
            target = committed.get(tp)
            if target is None:
                target = earliest.get(tp)
                if target is None:
                    continue
            log.info("%s[%d]: %s; fetching from offset %d", tp.topic, tp.partition, reason, target)
            await consumer.seek(tp, target)

    async def seek_held_back(consumer: Any) -> None:
        held, consumer._streamrec_held = held_back(consumer), {}
        assigned = consumer.assignment()
        await seek_to_start(
            consumer, [tp for tp in held if tp in assigned], "records fetched while seeking to the committed offsets were held back"
        )

    async def perform_seek(self: Any) -> None:
        self._streamrec_seeks = seeks(self) + 1
        try:
            await seek_to_committed(self)
        finally:
            self._streamrec_seeks = seeks(self) + 1
        # faust leaves a partition without a committed offset where the client's position is,
        # which for a partition kept through a rebalance is past records never processed.
        uncommitted = [tp for tp in self.assignment() if self._committed_offset.get(tp) is None and is_input(self, tp)]
        await seek_to_start(self, uncommitted, "no committed offset")
        await seek_held_back(self)

    async def _wait_next_records(self: Any, timeout: float) -> Any:
        before = seeks(self)
        records, active_partitions = await fetch(self, timeout)
        self._streamrec_fetched = (records, before)
        return records, active_partitions

    async def getmany(self: Any, timeout: float) -> Any:
        generation = self.app.consumer_generation_id
        self._streamrec_fetched = None
        delivered: dict[Any, int] = {}
        held_offsets: dict[Any, int] = {}
        async for tp, message in deliver(self, timeout):
            fetched_at = self._streamrec_fetched[1] if self._streamrec_fetched else seeks(self)
            if (fetched_at % 2 or seeks(self) != fetched_at) and is_input(self, tp):
                held_offsets.setdefault(tp, message.offset)
                continue
            delivered[tp] = message.offset
            yield tp, message
        fetched = self._streamrec_fetched[0] if self._streamrec_fetched else None
        self._streamrec_fetched = None
        if held_offsets:
            for tp, offset in held_offsets.items():
                held_back(self).setdefault(tp, offset)
            if not seeks(self) % 2:
                await seek_held_back(self)
        # After a rebalance or with the flow stopped, faust itself seeks to the committed offsets.
        if not fetched or not self.flow_active or self.app.consumer_generation_id != generation:
            return
        assigned = self.assignment()
        for tp, records in fetched.items():
            if tp in held_offsets:
                continue
            last = delivered.get(tp)
            dropped = [record.offset for record in records if last is None or record.offset > last]
            if dropped and tp in assigned:
                log.warning(
                    "%d fetched records of %s[%d] from offset %d were not delivered; fetching them again",
                    len(dropped), tp.topic, tp.partition, dropped[0],
                )
                await self.seek(tp, dropped[0])

    base._wait_next_records = _wait_next_records
    base.getmany = getmany
    base.perform_seek = perform_seek
    base._streamrec_in_order = True


def _keep_queued_events_on_repeated_resume() -> None:
    """Make resuming a flow that is not suspended leave faust's stream queues as they are.

    mode's FlowControlEvent.resume() empties every queue it manages, the agents' input
    queues among them. faust-streaming 0.15.3 resumes the flow when a table recovery starts
    and again when it completes. Between the two it resumes fetching from the input
    partitions and waits for the seek to the committed offsets, so events fetched meanwhile
    are queued, and the second resume dropped them while the consumer's position had moved
    past them. The next event then arrived after a jump, which faust commits past. A resume
    after a suspension (a rebalance) still empties the queues: the seek that follows it
    fetches their events again.
    """
    # NOTE: this wraps a method of mode's FlowControlEvent (mode-streaming 0.7), which faust
    # uses as app.flow_control; the crash and rebalance tests exercise it.
    from mode.utils.queues import FlowControlEvent

    if getattr(FlowControlEvent, "_streamrec_keeps_queues", False):
        return
    resume = FlowControlEvent.resume

    def resume_if_suspended(self: Any) -> None:
        if not self.is_active():
            resume(self)

    FlowControlEvent.resume = resume_if_suspended
    FlowControlEvent._streamrec_keeps_queues = True


def _commit_after_changelog() -> None:
    """Make faust's consumer commit offsets only after the changelog records written so far are acknowledged.

    An event is acknowledged to faust once its state is written to the table, before the
    state's changelog record reaches the broker; see StateTable. Waiting here instead of in
    the agent keeps that wait off the path of every batch: it costs one wait per commit.
    A changelog record the broker refused stops the worker without committing, so that
    the events are applied again after the restart.
    """
    # NOTE: this wraps a method of faust's base Consumer class, internals of faust-streaming
    # 0.15 (every commit goes through it); the crash test exercises it.
    from faust.transport import consumer as faust_consumer

    base = faust_consumer.Consumer
    if getattr(base, "_streamrec_commits_after_changelog", False):
        return
    commit_offsets = base._commit_offsets

    async def _commit_offsets(self: Any, offsets: Any, start_new_transaction: bool = True) -> bool:
        for table in list(self.app.tables.values()):
            if not isinstance(table, StateTable):
                continue
            try:
                await table.wait_changelog_delivered()
            except Exception as exc:
                log.error(
                    "changelog records of table %s were not delivered (%r); stopping without committing offsets, "
                    "so that their events are applied again after a restart",
                    table.name, exc,
                )
                await self.crash(exc)
                return False
        return await commit_offsets(self, offsets, start_new_transaction=start_new_transaction)

    base._commit_offsets = _commit_offsets
    base._streamrec_commits_after_changelog = True


class _ModuleWith:
    """A view of a module with some attributes replaced."""

    def __init__(self, module: Any, **replacements: Any) -> None:
        self._module = module
        self._replacements = replacements

    def __getattr__(self, name: str) -> Any:
        if name in self._replacements:
            return self._replacements[name]
        return getattr(self._module, name)


def build_faust_app(settings: Settings) -> faust.App:
    """Return a faust app with the worker's Kafka, RocksDB and web settings and no agents yet."""
    _set_fetch_max_wait(settings.fetch_max_wait_ms)
    _deliver_fetched_records_in_order()
    _commit_after_changelog()
    _keep_queued_events_on_repeated_resume()
    return faust.App(
        settings.app_id,
        broker=settings.broker,
        store="rocksdb://",
        datadir=str(settings.state_dir),
        web_host=settings.web_host,
        web_bind=settings.web_host,  # faust listens on web_bind (default 0.0.0.0), not web_host
        web_port=settings.web_port,
        web_enabled=True,
        processing_guarantee="at_least_once",
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        topic_allow_declare=True,
        broker_commit_interval=settings.commit_interval_s,
        table_standby_replicas=0,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        producer_max_batch_size=settings.producer_max_batch_bytes,
        producer_linger=settings.producer_linger_ms / 1000,
        key_serializer="raw",
        value_serializer="raw",
        Table=StateTable,
        # faust reads environment variables such as WEB_PORT and BROKER_URL, and they win
        # over the arguments above. Kubernetes defines variables of that form for services
        # (a service named "web" gives WEB_PORT=tcp://...), so faust gets an empty environment
        # and STREAMREC_* variables alone configure the worker.
        env={},
    )


async def retry_batch(attempt: Callable[[], Awaitable[None]], description: str, metrics: WorkerMetrics) -> None:
    """Run `attempt` until it succeeds, with a growing pause after each failure.

    faust acknowledges the events of a batch even when the agent raises on them, and commits
    them at the next commit: a failed batch must be retried, never passed over.
    """
    delay_s = RETRY_FIRST_DELAY_S
    while True:
        try:
            await attempt()
            return
        except Exception:
            metrics.batch_failures.inc()
            log.exception("%s failed; retrying in %.0f s (its offsets stay uncommitted until it succeeds)", description, delay_s)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_MAX_DELAY_S)


async def process_and_deliver(
    events: Sequence[EventT],
    process: Callable[[Sequence[InputMessage], StateStore], BatchResult],
    table: Any,
    recommendations_topic: Any,
    dead_letter_topic: Any,
    item_activity_topic: Any | None = None,
) -> BatchResult:
    """Run `process` over a batch of events from any partitions, send its outputs, then write its states.

    States are written only after every output is acknowledged: after a crash in between,
    the redelivered events are applied again and their outputs repeated, instead of being
    skipped as already applied with their outputs lost. It returns without waiting for the
    states' changelog records; the next offset commit waits for them (_commit_after_changelog).
    """
    lookup = {(event.message.partition, event.message.offset): event for event in events}
    store = _TableStore(table, lookup)
    result = process([to_input_message(event) for event in events], store)

    deliveries = []
    for dead_letter in result.dead_letters:
        deliveries.append(await dead_letter_topic.send(key=dead_letter.key, value=dead_letter.value))
    for recommendation in result.recommendations:
        deliveries.append(await recommendations_topic.send(key=recommendation.key, value=recommendation.value))
    if item_activity_topic is not None:
        for item_id, count in result.item_activity.items():
            deliveries.append(await item_activity_topic.send(key=item_id.encode("utf-8"), value=encode_count(count)))
    await asyncio.gather(*deliveries)
    result.write_states(store)
    return result


def create_app(settings: Settings, model: StepModel, metrics: WorkerMetrics | None = None) -> Components:
    """Build the faust app serving `model`; nothing connects to Kafka until the app starts."""
    metrics = metrics if metrics is not None else WorkerMetrics()
    metrics.model_info.info({"version": model.version, "cell": model.cell_type, "path": str(model.bundle_dir)})

    app = build_faust_app(settings)
    popularity, item_activity_topic = None, None
    if settings.blend_popularity > 0:
        popularity, item_activity_topic = _add_popularity(app, settings, metrics)
    processor = Processor(settings, model, metrics, popularity=popularity)
    events_topic = app.topic(settings.events_topic, partitions=settings.partitions, **RAW)
    recommendations_topic = app.topic(settings.recommendations_topic, **RAW)
    dead_letter_topic = app.topic(settings.dead_letter_topic, **RAW)
    table = app.Table(settings.state_table, partitions=settings.partitions, **RAW)
    processed_offsets: dict[int, int] = {}  # input partition -> last processed offset, for the lag gauge
    # A pause longer than a few batch windows means the agent has nothing left to do.
    tracker = BatchTracker(quiet_s=max(0.5, 5 * settings.batch_max_ms / 1000))
    expiry = StateExpiry(settings.state_ttl_s, settings.state_sweep_interval_s, metrics) if settings.state_ttl_s > 0 else None

    async def apply_events(stream: StreamT) -> None:
        # One batch contains events of every assigned partition: the fewer, larger batches, the
        # fewer ONNX Runtime calls and acknowledgement waits per event.
        within_s = settings.batch_max_ms / 1000
        async for events in stream.take_events(settings.batch_max_events, within=within_s):
            _report_offset_gaps(events)
            tracker.started()
            try:
                await _until_delivered(events)
                if expiry is not None:
                    _expire_idle_users(events)
            finally:
                tracker.finished()
            for event in events:
                partition, offset = event.message.partition, event.message.offset
                processed_offsets[partition] = max(offset, processed_offsets.get(partition, -1))

    def _report_offset_gaps(events: Sequence[EventT]) -> None:
        # NOTE: faust takes a jump in offsets for compaction and commits past it, and the
        # events topic is not compacted. The paths by which faust-streaming 0.15.3 skips
        # fetched events are closed (_deliver_fetched_records_in_order); this reports any
        # other. It detects a jump within one assignment only, and it does not recover the events.
        last = dict(processed_offsets)
        for event in events:
            partition, offset = event.message.partition, event.message.offset
            if partition in last and offset > last[partition] + 1:
                metrics.offset_gaps.inc()
                log.error(
                    "events %s[%d] offsets %d..%d were skipped before reaching the worker; to serve them, reset the "
                    "group's offset of this partition to %d",
                    settings.events_topic, partition, last[partition] + 1, offset - 1, last[partition] + 1,
                )
            last[partition] = max(offset, last.get(partition, -1))

    async def forget_revoked(sender: Any, revoked: set, **kwargs: Any) -> None:
        # Another worker may process a revoked partition before it comes back here.
        for tp in revoked:
            if tp.topic == settings.events_topic:
                processed_offsets.pop(tp.partition, None)

    app.on_partitions_revoked.connect(forget_revoked)

    async def _until_delivered(events: Sequence[EventT]) -> None:
        async def deliver() -> None:
            await process_and_deliver(events, processor.process, table, recommendations_topic, dead_letter_topic, item_activity_topic)

        partitions = sorted({event.message.partition for event in events})
        await retry_batch(deliver, f"batch of {len(events)} events from partitions {partitions}", metrics)

    def _expire_idle_users(events: Sequence[EventT]) -> None:
        # A partition's deletes need one of its events as faust's current event.
        first_of_partition: dict[int, EventT] = {}
        for event in events:
            first_of_partition.setdefault(event.message.partition, event)
        due = expiry.due(to_input_message(event) for event in first_of_partition.values())
        if due:
            lookup = {(event.message.partition, event.message.offset): event for event in first_of_partition.values()}
            expiry.sweep(_TableStore(table, lookup), due)

    app.agent(events_topic, name="apply-events")(apply_events)

    @app.timer(interval=5.0)
    async def update_consumer_lag() -> None:
        # Start from no samples, so that partitions revoked by a rebalance stop being exported.
        metrics.consumer_lag.clear()
        for tp in app.consumer.assignment():
            if tp.topic != settings.events_topic:
                continue
            highwater = app.consumer.highwater(tp)
            if highwater is None:
                continue
            next_offset = processed_offsets.get(tp.partition, -1) + 1
            metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(max(0, highwater - next_offset))

    if settings.model_poll_s > 0:
        reloader = ModelReloader(settings, processor, metrics)
        app.timer(interval=settings.model_poll_s, name="reload-model")(reloader.check)

    _add_web_views(app, settings, processor, metrics, table, popularity)
    return Components(
        app=app, settings=settings, processor=processor, metrics=metrics, table=table, tracker=tracker, popularity=popularity
    )


def _add_popularity(app: faust.App, settings: Settings, metrics: WorkerMetrics) -> tuple[PopularityView, Any]:
    """Add the item-popularity table, the agent that counts item activity into it, and the task that follows it.

    Returns the view that the ranking reads and the item-activity topic that the events
    agent writes to.
    """
    half_life_s = settings.popularity_half_life_s
    view = PopularityView(half_life_s)
    activity_topic = app.topic(settings.item_activity_topic, partitions=settings.partitions, **RAW)
    table = app.Table(settings.popularity_table, partitions=settings.partitions, **RAW)

    def add_activity(events: Sequence[EventT]) -> None:
        store = _TableStore(table, {(event.message.partition, event.message.offset): event for event in events})
        merged: dict[str, tuple[Count, InputMessage]] = {}
        for event in events:
            message = to_input_message(event)
            item_id = (message.key or b"").decode("utf-8", errors="replace")
            try:
                activity = decode_count(message.value)
            except CountCodecError as exc:
                metrics.popularity_records_invalid.inc()
                log.error(
                    "skipped an invalid item-activity record: item=%s %s[%d] offset=%d: %s",
                    item_id, message.topic, message.partition, message.offset, exc,
                )
                continue
            current = merged[item_id][0] if item_id in merged else _stored_count(store, item_id, message)
            merged[item_id] = (merge_counts(current, activity, half_life_s), message)
        for item_id, (count, message) in merged.items():
            store.put(item_id, encode_count(count), message)

    def _stored_count(store: _TableStore, item_id: str, message: InputMessage) -> Count | None:
        raw = store.get(item_id, message)
        if raw is None:
            return None
        try:
            return decode_count(raw)
        except CountCodecError as exc:
            metrics.popularity_records_invalid.inc()
            log.error("stored popularity of item %s is invalid, counting it afresh: %s", item_id, exc)
            return None

    async def count_item_activity(stream: StreamT) -> None:
        async for events in stream.take_events(settings.batch_max_events, within=settings.batch_max_ms / 1000):

            async def add() -> None:
                add_activity(events)

            await retry_batch(add, f"item-activity batch of {len(events)} records", metrics)

    async def follow_popularity() -> None:
        await follow_changelog(
            view, settings.bootstrap_servers, settings.popularity_changelog_topic, metrics.popularity_records_invalid.inc
        )

    app.agent(activity_topic, name="count-item-activity")(count_item_activity)
    app.task(follow_popularity)
    return view, activity_topic


class ModelReloader:
    """Poll the bundle directory and swap in a new model version without a restart.

    The swap happens between batches. States of the old version are rebuilt or reset when
    their user's next event arrives (Settings.on_model_change). A bundle that fails to load
    is logged once per manifest change, and the current model keeps serving.
    """

    def __init__(self, settings: Settings, processor: Processor, metrics: WorkerMetrics) -> None:
        self.settings = settings
        self.processor = processor
        self.metrics = metrics
        self._rejected: tuple | None = None  # file signatures of the bundle that failed to load

    def _signature(self) -> tuple:
        entries = []
        for path in sorted(self.settings.bundle_dir.glob("*")):
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((path.name, stat.st_mtime_ns, stat.st_size))
        return tuple(entries)

    async def check(self) -> None:
        manifest_path = self.settings.bundle_dir / "manifest.json"
        try:
            on_disk = json.loads(manifest_path.read_bytes()).get("model_version")
        except (OSError, ValueError) as exc:
            log.debug("bundle manifest unreadable, keeping model %s: %s", self.processor.model.version, exc)
            return
        if on_disk == self.processor.model.version:
            return
        # A failed bundle is retried only once one of its files changes, so a bundle copied
        # file by file is picked up when its last file lands, without an error per poll.
        signature = self._signature()
        if signature == self._rejected:
            return

        try:
            model = await asyncio.to_thread(
                load_bundle, self.settings.bundle_dir, threads=self.settings.ort_threads, optimization=self.settings.ort_optimization
            )
            self.processor.check_model(model)
        except BundleError as exc:
            self._rejected = signature
            self.metrics.model_reloads.labels("failed").inc()
            log.error("new model bundle rejected, still serving %s: %s", self.processor.model.version, exc)
            return

        self._rejected = None
        previous = self.processor.model.version
        self.processor.set_model(model)
        self.metrics.model_reloads.labels("ok").inc()
        self.metrics.model_info.info({"version": model.version, "cell": model.cell_type, "path": str(model.bundle_dir)})
        log.info("model reloaded: version=%s previous=%s on_model_change=%s", model.version, previous, self.settings.on_model_change)


def _add_web_views(
    app: faust.App, settings: Settings, processor: Processor, metrics: WorkerMetrics, table: Any, popularity: PopularityView | None
) -> None:
    @app.page("/metrics")
    class MetricsView(View):
        async def get(self, request: Request) -> Response:
            metrics.table_keys.set(_count_local_keys(table))
            if popularity is not None:
                metrics.popularity_items.set(len(popularity))
            body = generate_latest(metrics.registry)
            return self.bytes(body, content_type=CONTENT_TYPE_LATEST.split(";")[0])

    @app.page("/healthz")
    class LivenessView(View):
        async def get(self, request: Request) -> Response:
            return self.json({"status": "ok"})

    @app.page("/readyz")
    class ReadinessView(View):
        async def get(self, request: Request) -> Response:
            recovered = app.tables.recovery.completed.is_set()
            ready = recovered and not app.rebalancing
            body = {"ready": ready, "recovered": recovered, "rebalancing": app.rebalancing, "model_version": processor.model.version}
            return self.json(body, status=200 if ready else 503)


def _count_local_keys(table: Any) -> int:
    try:
        return sum(1 for _ in table.data.keys())
    except Exception:  # a store mid-rebalance can refuse iteration; the gauge keeps its last value
        log.debug("table size unavailable during rebalance", exc_info=True)
        return 0
