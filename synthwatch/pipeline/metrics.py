"""Prometheus metrics, one name per concept, in base units.

Served on the worker's web port at `/metrics`. No ids as labels: labels are the stage,
an outcome or reason from a fixed set, and topic/partition for lag.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ITEMS = Counter(
    "synthwatch_items_total",
    "Items finished by a stage, by outcome (ok, flag, review, pass, dlq).",
    ["stage", "outcome"],
)
DLQ = Counter(
    "synthwatch_dlq_total",
    "Records sent to the dead-letter topic, by stage and reason.",
    ["stage", "reason"],
)
BATCH_SIZE = Histogram(
    "synthwatch_batch_size",
    "Rows per inference batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
INFERENCE_SECONDS = Histogram(
    "synthwatch_inference_seconds",
    "Wall time of one inference batch.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STAGE_SECONDS = Histogram(
    "synthwatch_stage_seconds",
    "Wall time to process one record in a stage.",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
CONSUMER_LAG = Gauge(
    "synthwatch_consumer_lag",
    "Records between the committed offset and the high-water mark.",
    ["topic", "partition"],
)


def observe_batch(size: int, seconds: float) -> None:
    BATCH_SIZE.observe(size)
    INFERENCE_SECONDS.observe(seconds)


RETRIED = Counter(
    "synthwatch_retried_total",
    "Records sent to the retry topic after a transient failure, by stage and reason.",
    ["stage", "reason"],
)
DEPENDENCY_UP = Gauge(
    "synthwatch_dependency_up",
    "1 when the dependency (kafka, s3) answered its last probe, else 0.",
    ["dependency"],
)
