"""Batch processing of input messages into state updates, recommendations and dead letters.

This module contains the worker's logic without faust: the faust agent passes it a batch of
messages from one partition and a state store, and sends what it returns. Within a batch the
steps of many users run as one ONNX Runtime call per wave: wave i contains the i-th pending
event of every user, so each user's events are still applied in offset order.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import numpy as np

from worker import dead_letters as reasons
from worker.config import (
    EMIT_COALESCE,
    ENV_PREFIX,
    EXCLUDE_NONE,
    EXCLUDE_STRONG,
    ON_MODEL_CHANGE_REBUILD,
    STRONG_EXCLUDE_EVENT_TYPES,
    Settings,
)
from worker.dead_letters import build_dead_letter
from worker.events import Event, InvalidEvent, decode_event
from worker.metrics import WorkerMetrics
from worker.model import BundleError, StepModel, StepOutput
from worker.popularity import Count, activity_records
from worker.ranking import blend_scores, cap_per_category, rank_candidates
from worker.state import RecentEvent, StateCodecError, UserState, decode_state, encode_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InputMessage:
    """One record of the input topic, as read from Kafka."""

    key: bytes | None
    value: bytes
    topic: str
    partition: int
    offset: int
    timestamp_ms: int  # the Kafka message timestamp (producer create time)


@dataclass(frozen=True)
class OutputMessage:
    key: bytes | None
    value: bytes
    source_timestamp_ms: int | None = None  # Kafka timestamp of the event behind a recommendation


class StateStore(Protocol):
    """The per-user state table; `message` identifies the partition that stores the key."""

    def get(self, user_id: str, message: InputMessage) -> bytes | None: ...

    def put(self, user_id: str, value: bytes, message: InputMessage) -> None: ...


class PopularitySource(Protocol):
    """Live item popularity that the blend reads when STREAMREC_BLEND_POPULARITY is above 0."""

    def counts(self, model: StepModel, item_indices: np.ndarray) -> np.ndarray | None:
        """Return the (batch, C) decayed event counts of the (batch, C) item indices, or None while none are known."""
        ...


class DictStore:
    """A StateStore over a dict, to run the processor without faust; outside faust a key's partition does not matter."""

    def __init__(self) -> None:
        self.values: dict[str, bytes] = {}

    def get(self, user_id: str, message: InputMessage) -> bytes | None:
        return self.values.get(user_id)

    def put(self, user_id: str, value: bytes, message: InputMessage) -> None:
        self.values[user_id] = value


@dataclass
class BatchResult:
    recommendations: list[OutputMessage] = field(default_factory=list)
    dead_letters: list[OutputMessage] = field(default_factory=list)
    # (user id, encoded state, a message of that user): to be written with StateStore.put
    # only once the outputs above are delivered, so a crash never leaves a state that has
    # absorbed an event whose recommendation was lost.
    state_updates: list[tuple[str, bytes, InputMessage]] = field(default_factory=list)
    # Live popularity input: one count per item the applied events touched, for the
    # item-activity topic. Filled only when the processor has a popularity source.
    item_activity: dict[str, Count] = field(default_factory=dict)
    applied_events: list["_PendingEvent"] = field(default_factory=list)
    applied: int = 0
    skipped: int = 0

    def write_states(self, store: "StateStore") -> None:
        for user_id, value, message in self.state_updates:
            store.put(user_id, value, message)


@dataclass
class _PendingEvent:
    message: InputMessage
    event: Event


@dataclass
class _Scored:
    """The top-K of one applied event, kept until its recommendation message is built."""

    pending: _PendingEvent
    scores: np.ndarray  # (top_k,) non-finite entries are left out of the message
    items: np.ndarray  # (top_k,) item indices
    events_absorbed: int
    produced_at_ms: int


@dataclass
class _UserBatch:
    state: UserState
    events: list[_PendingEvent]
    last_message: InputMessage
    latest: _Scored | None = None  # coalesced emission: only the last applied event's top-K is published
    changed: bool = False  # only changed states are written, so a fully replayed batch writes nothing


def check_model_settings(settings: Settings, model: StepModel) -> None:
    """Raise BundleError when `model` cannot serve the ranking that `settings` configure."""
    if settings.top_k > model.k:
        raise BundleError(
            f"{model.bundle_dir}: {ENV_PREFIX}TOP_K={settings.top_k} is more than the bundle's k={model.k} candidates; "
            f"lower {ENV_PREFIX}TOP_K or train a bundle with `python -m export train --candidates {settings.top_k}`"
        )
    if settings.blend_conversion > 0 and not model.has_conversion:
        raise BundleError(
            f"{model.bundle_dir}: {ENV_PREFIX}BLEND_CONVERSION={settings.blend_conversion} needs a conversion head, and "
            f"model {model.version} has none; set {ENV_PREFIX}BLEND_CONVERSION=0 or serve a bundle trained without --no-conversion-head"
        )


class Processor:
    """Apply batches of input messages to user states through a StepModel.

    `popularity`, when given, supplies live item popularity to the blend.
    """

    def __init__(
        self, settings: Settings, model: StepModel, metrics: WorkerMetrics, popularity: PopularitySource | None = None
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.popularity = popularity
        self._weights = settings.blend_weights
        blend = {"name": settings.blend_name, "weights": self._weights.as_dict()}
        self._blend_json = json.dumps(blend, separators=(",", ":"))
        if self._weights.popularity and popularity is None:
            log.warning(
                "%sBLEND_POPULARITY=%s has no effect: the processor has no popularity source",
                ENV_PREFIX, settings.blend_popularity,
            )
        self._install(model)

    def check_model(self, model: StepModel) -> None:
        """Raise BundleError when `model` cannot serve this processor's ranking settings."""
        check_model_settings(self.settings, model)

    def set_model(self, model: StepModel) -> None:
        """Serve `model` from the next batch on; states of the old version are rebuilt or reset lazily.

        Raises BundleError, and keeps the current model, when `model` cannot serve the ranking settings.
        """
        self._install(model)

    def _install(self, model: StepModel) -> None:
        self.check_model(model)
        allowed = _allowed_items(self.settings, model)
        cap = self.settings.max_per_category > 0
        if cap and not model.has_categories:
            log.warning(
                "%sMAX_PER_CATEGORY=%d has no effect: model %s has no item categories",
                ENV_PREFIX, self.settings.max_per_category, model.version,
            )
            cap = False

        self.model = model
        self._event_types = frozenset(model.event_types)
        self._item_json_prefixes = _item_json_prefixes(model)
        self._allowed = allowed
        self._cap = cap
        # The graph already returns its candidates best first, so without a blend or a rule
        # publishing is a slice.
        self._graph_order = self._weights.preference_only and allowed is None and not cap

    def process(self, messages: Sequence[InputMessage], store: StateStore) -> BatchResult:
        """Decode, deduplicate and apply `messages`; read states from `store` but write none.

        The caller sends the result's outputs, waits for their delivery, then calls
        result.write_states(store).
        """
        result = BatchResult()
        self.metrics.batch_size.observe(len(messages))
        self.metrics.events_consumed.inc(len(messages))

        users = self._decode(messages, result)
        for user_id, batch in users.items():
            batch.state = self._load_state(user_id, batch.last_message, store)
        self._refresh_stale_states(users)

        self._apply_waves(users, result)
        if self.popularity is not None:
            applied = ((pending.event.item_id, pending.event.event_type, pending.event.timestamp_ms) for pending in result.applied_events)
            result.item_activity = activity_records(
                applied, self.settings.popularity_event_weight_map, self.settings.popularity_half_life_s
            )

        for user_id, batch in users.items():
            if batch.changed:
                result.state_updates.append((user_id, encode_state(batch.state), batch.last_message))
            if batch.latest is not None:
                result.recommendations.append(self._recommendation(user_id, batch.latest))
        self._observe_recommendations(result.recommendations)
        return result

    def _observe_recommendations(self, recommendations: list[OutputMessage]) -> None:
        self.metrics.recommendations_published.inc(len(recommendations))
        now_ms = time.time() * 1000
        for recommendation in recommendations:
            latency_s = (now_ms - recommendation.source_timestamp_ms) / 1000
            self.metrics.event_to_recommendation_seconds.observe(max(0.0, latency_s))

    # -- decoding ---------------------------------------------------------------------------

    def _decode(self, messages: Sequence[InputMessage], result: BatchResult) -> dict[str, _UserBatch]:
        users: dict[str, _UserBatch] = {}
        for message in messages:
            try:
                event = decode_event(
                    message.key, message.value, event_types=self._event_types, max_bytes=self.settings.max_event_bytes
                )
            except InvalidEvent as exc:
                result.dead_letters.append(self._dead_letter(message, exc))
                continue

            pending = _PendingEvent(message, event)
            batch = users.get(event.user_id)
            if batch is None:
                users[event.user_id] = _UserBatch(state=None, events=[pending], last_message=message)  # type: ignore[arg-type]
            else:
                batch.events.append(pending)
                batch.last_message = message
        return users

    def _dead_letter(self, message: InputMessage, exc: InvalidEvent) -> OutputMessage:
        self.metrics.events_rejected.labels(exc.reason).inc()
        log.warning(
            "event rejected: reason=%s %s[%d] offset=%d detail=%s",
            exc.reason, message.topic, message.partition, message.offset, exc.detail,
        )
        value = build_dead_letter(
            key=message.key,
            value=message.value,
            topic=message.topic,
            partition=message.partition,
            offset=message.offset,
            timestamp_ms=message.timestamp_ms,
            reason=exc.reason,
            detail=exc.detail,
        )
        return OutputMessage(key=message.key, value=value)

    # -- state ------------------------------------------------------------------------------

    def _load_state(self, user_id: str, message: InputMessage, store: StateStore) -> UserState:
        raw = store.get(user_id, message)
        if raw is not None:
            try:
                return decode_state(raw)
            except StateCodecError as exc:
                self.metrics.states_corrupt.inc()
                log.error(
                    "stored state is corrupt, starting the user afresh: user=%s %s[%d] error=%s",
                    user_id, message.topic, message.partition, exc,
                )
        return self._new_state()

    def _new_state(self) -> UserState:
        hidden, cell = self.model.initial_state()
        return UserState(model_version=self.model.version, hidden=hidden, cell=cell)

    def _refresh_stale_states(self, users: dict[str, _UserBatch]) -> None:
        """Bring states of another model version to the current one: rebuild from recent items or reset."""
        stale = {user_id: batch for user_id, batch in users.items() if batch.state.model_version != self.model.version}
        if not stale:
            return

        rebuild = self.settings.on_model_change == ON_MODEL_CHANGE_REBUILD
        replays: dict[str, list[RecentEvent]] = {}
        for user_id, batch in stale.items():
            old = batch.state
            fresh = self._new_state()
            # Idempotency bookkeeping survives the model change; only the recurrent state is redone.
            fresh.last_partition, fresh.last_offset = old.last_partition, old.last_offset
            fresh.last_timestamp_ms, fresh.last_event_id = old.last_timestamp_ms, old.last_event_id
            fresh.recent = list(old.recent)
            batch.state = fresh
            batch.changed = True
            if rebuild and old.recent:
                replays[user_id] = old.recent
            self.metrics.states_rebuilt.labels("rebuild" if rebuild else "reset").inc()

        wave_index = 0
        while True:
            wave = [(user_id, events[wave_index]) for user_id, events in replays.items() if wave_index < len(events)]
            if not wave:
                break
            states = [users[user_id].state for user_id, _ in wave]
            entries = [entry for _, entry in wave]
            self._step(
                states,
                [e.item_id for e in entries],
                [e.event_type for e in entries],
                exclude=None,
                values=[e.value for e in entries],
            )
            for state in states:
                state.events_absorbed += 1
            wave_index += 1

    # -- stepping ---------------------------------------------------------------------------

    def _apply_waves(self, users: dict[str, _UserBatch], result: BatchResult) -> None:
        cursors = {user_id: 0 for user_id in users}
        while cursors:
            wave: list[tuple[str, _PendingEvent]] = []
            for user_id in list(cursors):
                pending = self._next_unapplied(user_id, users[user_id], cursors, result)
                if pending is not None:
                    wave.append((user_id, pending))
            if wave:
                self._apply_wave(users, wave, result)

    def _next_unapplied(
        self, user_id: str, batch: _UserBatch, cursors: dict[str, int], result: BatchResult
    ) -> _PendingEvent | None:
        """Advance the user's cursor past events the state already contains or rejects; return the next one to apply."""
        while cursors[user_id] < len(batch.events):
            pending = batch.events[cursors[user_id]]
            cursors[user_id] += 1
            message = pending.message
            if batch.state.has_applied(message.partition, message.offset, pending.event.event_id):
                result.skipped += 1
                by_offset = message.partition == batch.state.last_partition and message.offset <= batch.state.last_offset
                if by_offset:
                    # Kafka redelivers by offset after a crash. The local state can then be
                    # ahead of the changelog (its changelog record was lost with the process),
                    # so it is written again to bring the changelog up to date.
                    batch.changed = True
                else:
                    # The same event id at a new position was produced twice upstream.
                    result.dead_letters.append(self._dead_letter(message, _duplicate_event(pending, batch.state)))
                self.metrics.events_skipped.labels("offset" if by_offset else "event_id").inc()
                log.debug(
                    "event already applied, skipped: user=%s event_id=%s %s[%d] offset=%d",
                    user_id, pending.event.event_id, message.topic, message.partition, message.offset,
                )
                continue

            tolerance_ms = self.settings.out_of_order_tolerance_ms
            if pending.event.timestamp_ms < batch.state.last_timestamp_ms - tolerance_ms:
                result.dead_letters.append(self._dead_letter(message, _out_of_order_event(pending, batch.state, tolerance_ms)))
                continue
            return pending
        del cursors[user_id]
        return None

    def _apply_wave(self, users: dict[str, _UserBatch], wave: list[tuple[str, _PendingEvent]], result: BatchResult) -> None:
        states = [users[user_id].state for user_id, _ in wave]
        for state, (_, pending) in zip(states, wave):
            state.remember(
                RecentEvent(pending.event.item_id, pending.event.event_type, pending.event.event_id, pending.event.value),
                self.settings.recent_items,
            )
        output = self._step(
            states,
            [pending.event.item_id for _, pending in wave],
            [pending.event.event_type for _, pending in wave],
            exclude=self._excluded(states),
            values=[pending.event.value for _, pending in wave],
        )
        scores, items = self._rank(output)  # (batch, top_k) each

        produced_at_ms = int(time.time() * 1000)
        coalesce = self.settings.emit == EMIT_COALESCE
        for row, (user_id, pending) in enumerate(wave):
            state = states[row]
            message, event = pending.message, pending.event
            users[user_id].changed = True
            state.events_absorbed += 1
            state.last_partition, state.last_offset = message.partition, message.offset
            state.last_timestamp_ms, state.last_event_id = event.timestamp_ms, event.event_id
            result.applied += 1
            if self.popularity is not None:
                result.applied_events.append(pending)

            scored = _Scored(pending, scores[row], items[row], state.events_absorbed, produced_at_ms)
            if coalesce:
                # The message is built once per user, after the last wave: most events of a
                # busy user never need one.
                users[user_id].latest = scored
            else:
                result.recommendations.append(self._recommendation(user_id, scored))
        self.metrics.events_applied.inc(len(wave))

    def _step(
        self,
        states: list[UserState],
        item_ids: list[str],
        event_types: list[str],
        exclude: list[list[RecentEvent]] | None,
        values: list[float | None] | None = None,
    ):
        """Run one ONNX step for a batch of states and write the new hidden (and cell) states back."""
        model = self.model
        items = np.fromiter((model.item_index.get(item_id, 0) for item_id in item_ids), dtype=np.int64, count=len(item_ids))
        unknown = int(np.count_nonzero(items == 0))
        if unknown:
            self.metrics.unknown_items.inc(unknown)
        types = np.fromiter((model.event_type_index[name] for name in event_types), dtype=np.int64, count=len(event_types))

        hidden = np.stack([state.hidden for state in states], axis=1)  # (num_layers, batch, hidden_size)
        cell = np.stack([state.cell for state in states], axis=1) if model.has_cell_state else None
        exclude_matrix = self._exclude_matrix(exclude, len(states))  # (batch, n_exclude)

        event_values = None
        if model.uses_event_value and values is not None:
            # The graph reads NaN as an absent value.
            event_values = np.array([np.nan if value is None else value for value in values], dtype=np.float32)

        started = time.perf_counter()
        output = model.step(items, types, hidden, exclude_matrix, cell, event_values)
        self.metrics.step_seconds.observe(time.perf_counter() - started)

        for row, state in enumerate(states):
            state.hidden = np.ascontiguousarray(output.hidden[:, row, :])
            if output.cell is not None:
                state.cell = np.ascontiguousarray(output.cell[:, row, :])
        return output

    def _excluded(self, states: list[UserState]) -> list[list[RecentEvent]] | None:
        """Return each state's recent events whose items the graph must not recommend (STREAMREC_EXCLUDE)."""
        mode = self.settings.exclude
        if mode == EXCLUDE_NONE:
            return None
        if mode == EXCLUDE_STRONG:
            return [[entry for entry in state.recent if entry.event_type in STRONG_EXCLUDE_EVENT_TYPES] for state in states]
        return [state.recent for state in states]

    # -- ranking ----------------------------------------------------------------------------

    def _rank(self, output: StepOutput) -> tuple[np.ndarray, np.ndarray]:
        """Return the (batch, top_k) scores and item indices to publish, best first.

        Scores are the graph's logits when the blend weighs preference alone, else the
        blended scores. Filtered-out and missing entries have a non-finite score.
        """
        # NOTE: the lists and the cap choose among the graph's k candidates only, so a
        # narrow allow list or a tight cap can publish fewer than top_k items.
        top_k = self.settings.top_k
        if self._graph_order:
            return output.scores[:, :top_k], output.items[:, :top_k]

        keys = output.scores  # (batch, C) logits
        if not self._weights.preference_only:
            popularity = None
            if self._weights.popularity and self.popularity is not None:
                popularity = self.popularity.counts(self.model, output.items)
            keys = blend_scores(keys, self._weights, output.conversion, popularity)
        if self._allowed is not None:
            keys = np.where(self._allowed[output.items], keys, -np.inf)

        order = rank_candidates(keys)  # (batch, C) candidate positions, best first
        if not self._cap:
            order = order[:, :top_k]
            return np.take_along_axis(keys, order, axis=1), np.take_along_axis(output.items, order, axis=1)
        return self._capped(keys, output.items, order)

    def _capped(self, keys: np.ndarray, items: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Pick each row's best candidates under STREAMREC_MAX_PER_CATEGORY; rows with too few stay -inf padded."""
        top_k = self.settings.top_k
        scores = np.full((len(keys), top_k), -np.inf, dtype=keys.dtype)
        picked_items = np.zeros((len(keys), top_k), dtype=items.dtype)
        finite_counts = np.isfinite(keys).sum(axis=1).tolist()  # filtered-out candidates sort last
        for row, finite in enumerate(finite_counts):
            categories = _CandidateCategories(self.model.categories, items[row].tolist())
            picked = cap_per_category(order[row, :finite].tolist(), categories, self.settings.max_per_category, top_k)
            scores[row, : len(picked)] = keys[row, picked]
            picked_items[row, : len(picked)] = items[row, picked]
        return scores, picked_items

    def _exclude_matrix(self, exclude: list[list[RecentEvent]] | None, batch_size: int) -> np.ndarray:
        width = max((len(entries) for entries in exclude), default=0) if exclude else 0
        matrix = np.zeros((batch_size, max(width, 1)), dtype=np.int64)  # 0 pads: the unknown item is never ranked anyway
        if exclude:
            lookup = self.model.item_index
            for row, entries in enumerate(exclude):
                matrix[row, : len(entries)] = [lookup.get(entry.item_id, 0) for entry in entries]
        return matrix

    def _recommendation(self, user_id: str, scored: _Scored) -> OutputMessage:
        message, event = scored.pending.message, scored.pending.event
        # The items are written as JSON text from fragments cut once per model: json.dumps of
        # a list of dicts was the largest cost of a recommendation. The result is the same JSON.
        prefixes = self._item_json_prefixes
        items = ",".join(
            [
                f"{prefixes[index]}{round(score, 6)!r}}}"
                for index, score in zip(scored.items.tolist(), scored.scores.tolist())
                if math.isfinite(score)
            ]
        )
        rest = {
            "model_version": self.model.version,
            "event_id": event.event_id,
            "event_timestamp_ms": event.timestamp_ms,
            "event_kafka_timestamp_ms": message.timestamp_ms,
            "events_absorbed": scored.events_absorbed,
            "produced_at_ms": scored.produced_at_ms,
            "source": {"topic": message.topic, "partition": message.partition, "offset": message.offset},
        }
        text = (
            '{"user_id":' + json.dumps(user_id) + ',"items":[' + items + '],"blend":' + self._blend_json + ","
            + json.dumps(rest, separators=(",", ":"))[1:]
        )
        value = text.encode("utf-8")
        return OutputMessage(key=user_id.encode("utf-8"), value=value, source_timestamp_ms=message.timestamp_ms)


def _duplicate_event(pending: _PendingEvent, state: UserState) -> InvalidEvent:
    return InvalidEvent(
        reasons.DUPLICATE_EVENT,
        f"event_id {pending.event.event_id!r} was already applied to user {pending.event.user_id!r} "
        f"(last applied: {state.last_event_id!r} at partition {state.last_partition} offset {state.last_offset}); "
        "give each event a unique event_id, or stop producing it twice",
    )


def _out_of_order_event(pending: _PendingEvent, state: UserState, tolerance_ms: int) -> InvalidEvent:
    behind_ms = state.last_timestamp_ms - pending.event.timestamp_ms
    return InvalidEvent(
        reasons.OUT_OF_ORDER,
        f"event timestamp {pending.event.timestamp_ms} ms is {behind_ms} ms before that of the user's last applied "
        f"event {state.last_event_id!r} ({state.last_timestamp_ms} ms); the tolerance is {tolerance_ms} ms. Produce a "
        "user's events in time order, or raise STREAMREC_OUT_OF_ORDER_TOLERANCE_MS to apply late events",
    )


class _CandidateCategories:
    """The categories of one row's candidates by position, looked up only for the positions the cap visits."""

    __slots__ = ("by_item_index", "items")

    def __init__(self, by_item_index: list[frozenset[str]], items: list[int]) -> None:
        self.by_item_index = by_item_index
        self.items = items

    def __getitem__(self, position: int) -> frozenset[str]:
        return self.by_item_index[self.items[position]]


def _allowed_items(settings: Settings, model: StepModel) -> np.ndarray | None:
    """Return a (num_items,) mask of the item indices that the allow and deny lists let through, or None without lists."""
    allow, deny = settings.allow_items, settings.deny_items
    if allow is None and deny is None:
        return None

    allowed = np.ones(len(model.item_ids), dtype=bool)
    if allow is not None:
        allowed[:] = False
        known = [model.item_index[item_id] for item_id in allow if item_id in model.item_index]
        allowed[known] = True
        log.info("allow list: %d item ids, %d of them in model %s", len(allow), len(known), model.version)
        if not known:
            log.warning(
                "no item of %sALLOW_ITEMS_FILE=%s is in model %s: every recommendation will be empty",
                ENV_PREFIX, settings.allow_items_file, model.version,
            )
    if deny is not None:
        known = [model.item_index[item_id] for item_id in deny if item_id in model.item_index]
        allowed[known] = False
        log.info("deny list: %d item ids, %d of them in model %s", len(deny), len(known), model.version)
    return allowed


def _item_json_prefixes(model: StepModel) -> list[str]:
    """Return the JSON text of each item's entry in a recommendation, up to its score."""
    return ['{"item_id":' + json.dumps(item_id) + ',"score":' for item_id in model.item_ids]
