"""Prometheus metrics, one name per concept, in base units.

Served on the worker's web port at `/metrics`. No ids as labels: labels are the stage,
an outcome, decision or reason from a fixed set, the media type, a model name, and
topic/partition for lag. The names are listed in `docs/OPERATIONS.md` (Metrics), and
`tests/integration/test_metrics_endpoint.py` scrapes a running worker against that list.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics

from synthwatch import __version__

# No `*_created` series beside every counter and histogram: Prometheus ignores them in
# the text format, and they double the series a scrape carries.
disable_created_metrics()  # type: ignore[no-untyped-call]

_LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

ITEMS = Counter(
    "synthwatch_items_total",
    "Records finished by a stage, by outcome: ok, retry (sent to the retry topic), dlq.",
    ["stage", "outcome"],
)
VERDICTS = Counter(
    "synthwatch_verdicts_total",
    "Verdicts made, by media type, decision (flag, review, pass, inconclusive) and model set "
    "(a canary's model set differs from the stable one's: their rates compare).",
    ["media_type", "decision", "model_set"],
)
ALERTS = Counter(
    "synthwatch_alerts_total",
    "Alerts emitted (evidence written, alert acknowledged by the broker), by decision.",
    ["decision"],
)
DLQ = Counter(
    "synthwatch_dlq_total",
    "Records sent to the dead-letter topic, by stage and reason.",
    ["stage", "reason"],
)
RETRIED = Counter(
    "synthwatch_retried_total",
    "Records sent to the retry topic after a transient failure, by stage and reason.",
    ["stage", "reason"],
)
STAGE_SECONDS = Histogram(
    "synthwatch_stage_seconds",
    "Wall time to process one record in a stage.",
    ["stage"],
    buckets=_LATENCY_BUCKETS,
)
END_TO_END_SECONDS = Histogram(
    "synthwatch_end_to_end_seconds",
    "From the reference's submission (its submitted_at) to its verdict being sent.",
    ["media_type"],
    buckets=_LATENCY_BUCKETS,
)
DECODE_SECONDS = Histogram(
    "synthwatch_decode_seconds",
    "Wall time to probe and sample one item's frames and audio.",
    ["media_type"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
BATCH_SIZE = Histogram(
    "synthwatch_batch_size",
    "Rows per inference batch.",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
BATCH_FILL_RATIO = Histogram(
    "synthwatch_batch_fill_ratio",
    "Rows per inference batch over the model's batch cap (1.0: a full batch).",
    ["model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0),
)
INFERENCE_SECONDS = Histogram(
    "synthwatch_inference_seconds",
    "Wall time of one inference batch.",
    ["model", "backend"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
CONSUMER_LAG = Gauge(
    "synthwatch_consumer_lag",
    "Records between the committed offset and the high-water mark.",
    ["topic", "partition"],
)
OLDEST_IN_FLIGHT = Gauge(
    "synthwatch_oldest_in_flight_seconds",
    "Age of the oldest record this worker's stage has taken and not finished; 0 when "
    "none. Offsets are committed only below it, so a stuck record holds its partition's "
    "commits back.",
    ["stage"],
)
DLQ_GUARD_TRIPPED = Gauge(
    "synthwatch_dlq_guard_tripped",
    "1 when the stage stopped because it dead-lettered too many records for reasons that "
    "blame a deploy (routing.DlqLimit); the worker needs a restart after the fix.",
    ["stage"],
)
DEPENDENCY_UP = Gauge(
    "synthwatch_dependency_up",
    "1 when the dependency (kafka, s3, sink) answered its last probe, else 0.",
    ["dependency"],
)
MODEL_INFO = Gauge(
    "synthwatch_model_info",
    "1 for each detector this worker loaded: name, version, weights sha256, backend.",
    ["model", "version", "sha256", "backend"],
)
HASHLIST_ENTRIES = Gauge(
    "synthwatch_hashlist_entries",
    "Entries of the lists of known media this worker matches against, by where the "
    "lists come from (matching.lists: local or kafka).",
    ["lists"],
)
BUILD_INFO = Gauge("synthwatch_build_info", "1, labelled with the synthwatch version.", ["version"])
BUILD_INFO.labels(__version__).set(1)
SINK_DELIVERIES = Counter(
    "synthwatch_sink_deliveries_total",
    "Alert delivery attempts by the sink, by format and outcome "
    "(delivered, retried, dead_lettered).",
    ["format", "outcome"],
)


def batch_observer(model: str, backend: str, max_batch: int) -> _BatchObserver:
    """The batcher's `on_batch` hook for one model: size, fill and inference time."""
    return _BatchObserver(model, backend, max_batch)


class _BatchObserver:
    def __init__(self, model: str, backend: str, max_batch: int) -> None:
        self.size = BATCH_SIZE.labels(model)
        self.fill = BATCH_FILL_RATIO.labels(model)
        self.seconds = INFERENCE_SECONDS.labels(model, backend)
        self.max_batch = max(1, max_batch)

    def __call__(self, size: int, seconds: float) -> None:
        self.size.observe(size)
        self.fill.observe(min(1.0, size / self.max_batch))
        self.seconds.observe(seconds)
