"""A worker's health: liveness (progress), readiness (dependencies), consumer lag.

`Health` owns what the probes read: the watchdog of progress, the age of the oldest
record in flight, and the dependencies found unreachable. Every place that finds the
broker, the store or the DLQ guard down or back goes through `mark_down` / `mark_up`,
which keep readiness and the `synthwatch_dependency_up` gauge in step.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from synthwatch.operators.store import S3Store
from synthwatch.pipeline import metrics

log = structlog.get_logger("synthwatch.health")


class Watchdog:
    """Progress tracking for liveness: stalled means work is pending and none finished
    for `stall_s`. Idle is not stalled, and neither is a stage paused for an outage (it
    beats on every probe): a restart would not bring a dependency back."""

    def __init__(self, stall_s: float) -> None:
        self.stall_s = stall_s
        self.in_flight = 0
        self.last = time.monotonic()

    def started(self) -> None:
        if self.in_flight == 0:
            self.last = time.monotonic()
        self.in_flight += 1

    def finished(self) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def stalled_for(self) -> float:
        """Seconds without progress while work is pending; 0.0 when not stalled."""
        idle = time.monotonic() - self.last
        return idle if self.in_flight > 0 and idle > self.stall_s else 0.0


class InFlight:
    """When each record a stage is working on was taken, for the age of the oldest.

    The consumer commits no offset past a record in flight (`offsets.py`), so one
    record stuck in a stage (a hung call, a store outage the stage waits out) holds its
    partition's commits back while later records keep flowing: consumer lag only creeps
    up, and a restart redelivers everything after it. The oldest record's age shows it
    at once (`synthwatch_oldest_in_flight_seconds`)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._taken: dict[str, dict[int, float]] = {}
        self._tokens = itertools.count()

    def start(self, stage: str) -> int:
        token = next(self._tokens)
        self._taken.setdefault(stage, {})[token] = self._clock()
        return token

    def finish(self, stage: str, token: int) -> None:
        self._taken.get(stage, {}).pop(token, None)

    def oldest_s(self, stage: str) -> float:
        """Seconds since the oldest unfinished record of `stage` was taken; 0.0 if none."""
        taken = self._taken.get(stage)
        return self._clock() - min(taken.values()) if taken else 0.0


class Health:
    """What `/health/live`, `/health/ready` and the dependency gauges report."""

    def __init__(self, *, stall_s: float, bootstrap_servers: str, store: S3Store | None) -> None:
        self.watchdog = Watchdog(stall_s)
        self.in_flight = InFlight()
        self.bootstrap_servers = bootstrap_servers
        self.store = store
        """The object store, when a stage here uses it (probed for readiness)."""
        self.down: dict[str, str] = {}
        """Dependencies found unreachable (name -> why); readiness is false while any is."""
        self.lag_reported: set[tuple[str, str]] = set()
        """(topic, partition) label sets of `synthwatch_consumer_lag` this worker serves."""
        # Probes get their own thread, so readiness stays current while every work
        # thread is busy with a long decode.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sw-probe")

    # -- dependencies -------------------------------------------------------------

    def mark_down(self, name: str, why: str, *, keep_reason: bool = False) -> None:
        """Dependency `name` is unreachable: readiness false, its gauge 0. `keep_reason`:
        a reason already recorded (the failure a stage saw) is not replaced by a probe's."""
        if not (keep_reason and name in self.down):
            self.down[name] = why[:300]
        metrics.DEPENDENCY_UP.labels(name).set(0)

    def stop_serving(self, name: str, why: str) -> None:
        """Readiness false for a cause of our own, not a dependency (no gauge)."""
        self.down[name] = why[:300]

    def mark_up(self, name: str) -> bool:
        """`name` answers: its gauge 1. Returns whether it had been down."""
        metrics.DEPENDENCY_UP.labels(name).set(1)
        return self.down.pop(name, None) is not None

    async def probe(self, check: Callable[[], bool]) -> bool:
        return await asyncio.get_running_loop().run_in_executor(self._pool, check)

    def store_up(self) -> bool:
        if self.store is None:
            return True
        try:
            self.store.client.head_bucket(Bucket=self.store.bucket)
        except Exception:  # any failure to answer is "down" for readiness
            return False
        return True

    def broker_up(self) -> bool:
        """A TCP connection to any bootstrap server opens (the consumer's own
        reconnection is aiokafka's business; this only feeds readiness)."""
        for server in self.bootstrap_servers.split(","):
            host, _, port = server.strip().rpartition(":")
            try:
                with socket.create_connection((host.strip("[]"), int(port)), timeout=2.0):
                    return True
            except (OSError, ValueError):
                continue
        return False

    async def probe_dependencies(self) -> None:
        """Timer: probe the broker and (where used) the store."""
        checks = [("kafka", self.broker_up)]
        if self.store is not None:
            checks.append(("s3", self.store_up))
        for name, check in checks:
            try:
                up = await self.probe(check)
            except Exception:  # a timer must never raise (it would crash the app)
                up = False
            if up:
                self.mark_up(name)
            else:
                if name not in self.down:
                    log.warning("dependency unreachable", dependency=name)
                self.mark_down(name, "does not answer", keep_reason=True)

    # -- consumer lag ---------------------------------------------------------------

    async def update_lag(self, consumer: Any) -> None:
        """Timer: `synthwatch_consumer_lag` per assigned partition. A timer that raises
        crashes the whole faust app, so nothing may escape: the fault suite found a
        rebalance leaving a new partition without a high-water mark."""
        try:
            await self.measure_lag(consumer)
        except Exception as exc:
            log.warning("consumer lag not measured", error=f"{type(exc).__name__}: {exc}")

    async def measure_lag(self, consumer: Any) -> None:
        assigned = {(tp.topic, str(tp.partition)) for tp in consumer.assignment()}
        # A partition handed to another member in a rebalance is that member's to
        # report: a series left at its last value here would count its lag twice.
        for gone in self.lag_reported - assigned:
            metrics.CONSUMER_LAG.remove(*gone)
        self.lag_reported &= assigned
        for tp in consumer.assignment():
            # faust keeps the committed offsets in a private map and offers no accessor.
            committed = getattr(consumer, "_committed_offset", {}).get(tp)
            position = committed if committed is not None else await consumer.position(tp)
            highwater = consumer.highwater(tp)
            if position is None or highwater is None:  # not fetched yet (just assigned)
                continue
            lag = max(0, highwater - position)
            metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(lag)
            self.lag_reported.add((tp.topic, str(tp.partition)))

    # -- web views ------------------------------------------------------------------

    def metrics_page(self, view: Any) -> Any:
        return view.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    def live_page(self, view: Any) -> Any:
        # Progress, not broker reachability: a worker that cannot reach the broker is
        # not fixed by a restart, a worker wedged on a record is.
        stalled = self.watchdog.stalled_for()
        body: dict[str, Any] = {"live": not stalled, "in_flight": self.watchdog.in_flight}
        if stalled:
            body["stalled_s"] = round(stalled, 1)
        return view.json(body, status=503 if stalled else 200)

    def ready_page(self, view: Any, assigned: int) -> Any:
        ready = assigned > 0 and not self.down
        body: dict[str, Any] = {"ready": ready, "partitions": assigned}
        if self.down:
            body["down"] = dict(self.down)
        return view.json(body, status=200 if ready else 503)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
