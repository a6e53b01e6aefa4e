"""All Prometheus metrics of the worker, in one object built on an injectable registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_STEP_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class WorkerMetrics:
    """Counters, histograms and gauges exposed on /metrics.

    Tests pass their own CollectorRegistry so that metric values never leak between them.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.events_consumed = Counter("streamrec_events_consumed_total", "Events read from the input topic.", registry=r)
        self.events_applied = Counter("streamrec_events_applied_total", "Events applied to a user state as one recurrent step.", registry=r)
        self.events_skipped = Counter(
            "streamrec_events_skipped_total", "Events skipped because the state had already absorbed them.", ["reason"], registry=r
        )
        self.events_rejected = Counter(
            "streamrec_events_rejected_total", "Events sent to the dead-letter topic, by reason code.", ["reason"], registry=r
        )
        self.unknown_items = Counter(
            "streamrec_unknown_items_total", "Applied events whose item is not in the model vocabulary.", registry=r
        )
        self.recommendations_published = Counter(
            "streamrec_recommendations_published_total", "Recommendation messages sent to the output topic.", registry=r
        )
        self.states_rebuilt = Counter(
            "streamrec_states_rebuilt_total", "User states of another model version rebuilt or reset.", ["action"], registry=r
        )
        self.states_corrupt = Counter(
            "streamrec_states_corrupt_total", "Stored user states that could not be decoded and were reset.", registry=r
        )
        self.step_seconds = Histogram(
            "streamrec_step_seconds", "Wall time of one ONNX Runtime step call.", buckets=_STEP_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "streamrec_batch_size_events", "Events per processed batch.", buckets=_BATCH_BUCKETS, registry=r
        )
        self.event_to_recommendation_seconds = Histogram(
            "streamrec_event_to_recommendation_seconds",
            "From the input message's Kafka timestamp to the recommendation being produced.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.states_expired = Counter(
            "streamrec_states_expired_total", "User states deleted after idling longer than STREAMREC_STATE_TTL_S.", registry=r
        )
        self.offset_gaps = Counter(
            "streamrec_offset_gaps_total",
            "Jumps in an input partition's offsets within one assignment: events skipped before reaching the worker.",
            registry=r,
        )
        self.batch_failures = Counter(
            "streamrec_batch_failures_total",
            "Batches that raised while being processed or delivered; each is retried until it succeeds.",
            registry=r,
        )
        self.popularity_items = Gauge(
            "streamrec_popularity_items", "Items with a live popularity count in this worker's view of the item-popularity table.", registry=r
        )
        self.popularity_records_invalid = Counter(
            "streamrec_popularity_records_invalid_total",
            "Item-activity or item-popularity records that could not be decoded and were skipped.",
            registry=r,
        )
        self.model_info = Info("streamrec_model", "The model bundle being served.", registry=r)
        self.table_keys = Gauge("streamrec_table_users", "User states held in the local table.", registry=r)
        self.consumer_lag = Gauge(
            "streamrec_consumer_lag_messages",
            "Messages in an assigned input partition not yet processed (highwater minus next offset).",
            ["topic", "partition"],
            registry=r,
        )
        self.model_reloads = Counter(
            "streamrec_model_reloads_total", "Attempts to load a changed model bundle, by result (ok, failed).", ["result"], registry=r
        )
