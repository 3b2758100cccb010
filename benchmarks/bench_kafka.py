"""End to end through the real Kafka broker and S3 store: items/s and latency from
submit to verdict with 1 and 2 `synthwatch worker --role all` processes, against
embedded `scan_all` on the same items, in one run.

A private broker and store (`scripts/services` with its own state dir and free ports,
stopped with `stop --clean` at the end); media served over HTTP from 127.0.0.1; each
run its own topics and consumer group; our bundled models only; nothing alerts (as in
bench_e2e), so decide writes no evidence.

Runs:
- kafka, 1 worker, models.threads=2, detect_concurrency=2 (the embedded engine's
  settings): against embedded `scan_all(workers=2)`.
- kafka, 1 worker and 2 workers, each models.threads=1, detect_concurrency=1, so each
  worker uses about one core: the scaling pair.

usage: python -m benchmarks.bench_kafka [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import http.server
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import bench_e2e
from benchmarks._common import ROOT, Report, Target, console, proc_table, tree_cpu_s
from tests.private_services import PrivateServices, free_port
from tests.private_services import private_services as shared_private_services

FRAMES = 16
PARTITIONS = 4
"""SYNTHWATCH_SAMPLE__FRAMES for workers and the embedded run alike (the default)."""


# --------------------------------------------------------------------------- services


@contextmanager
def private_services() -> Iterator[PrivateServices]:
    console.print("starting a private Kafka and SeaweedFS")
    with shared_private_services() as svc:
        yield svc


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


@contextmanager
def media_server(root: Path) -> Iterator[str]:
    """Serve `root` on 127.0.0.1; its base URL."""
    handler = functools.partial(_Quiet, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()


# --------------------------------------------------------------------------- workers


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def ready(self) -> bool:
        import httpx

        try:
            r = httpx.get(f"http://127.0.0.1:{self.port}/health/ready", timeout=3)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def rss_kb(self) -> int | None:
        """VmRSS of the worker process itself (its decoder children not included)."""
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@dataclass
class Run:
    """One measured configuration: its own topics and consumer group."""

    services: PrivateServices
    base_url: str
    work: Path
    threads: int
    concurrency: int
    partitions: int = PARTITIONS
    name: str = field(default_factory=lambda: f"b{uuid.uuid4().hex[:8]}")
    workers: list[Worker] = field(default_factory=list)

    def topic(self, what: str) -> str:
        return f"{self.name}.media.{what}"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.services.client_env)
        env.update(
            {
                "SYNTHWATCH_KAFKA__APP_ID": f"synthwatch-{self.name}",
                "SYNTHWATCH_KAFKA__PARTITIONS": str(self.partitions),
                **{
                    f"SYNTHWATCH_KAFKA__TOPIC_{t.upper()}": self.topic(t)
                    for t in ("refs", "fetched", "verdicts", "alerts", "dlq", "retry")
                },
                "SYNTHWATCH_KAFKA__DETECT_CONCURRENCY": str(self.concurrency),
                "SYNTHWATCH_MODELS__THREADS": str(self.threads),
                "SYNTHWATCH_FETCH__ALLOW_NETWORKS": '["127.0.0.0/8"]',
                "SYNTHWATCH_MODEL_DIR": str(self.work / "no-third-party-models"),
                "SYNTHWATCH_MODELS__AUDIO_MODELS": "[]",
                "SYNTHWATCH_POLICY__ALERT_ON": "[]",
                "SYNTHWATCH_SAMPLE__FRAMES": str(FRAMES),
                "SYNTHWATCH_LOG_JSON": "true",
                "SYNTHWATCH_LOG_LEVEL": "WARNING",
            }
        )
        env.update(extra)
        return env

    def settings(self) -> Any:
        from synthwatch.pipeline.settings import KafkaSettings, Settings

        return Settings(
            kafka=KafkaSettings(
                bootstrap_servers=self.services.bootstrap,
                partitions=self.partitions,
                **{
                    f"topic_{t}": self.topic(t)
                    for t in ("refs", "fetched", "verdicts", "alerts", "dlq", "retry")
                },
            )
        )

    def start(self, n: int) -> None:
        from synthwatch.pipeline.kafka import create_topics

        asyncio.run(create_topics(self.settings()))
        for i in range(n):
            port = free_port()
            log = self.work / f"{self.name}-w{i}.log"
            with log.open("wb") as fh:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "synthwatch", "worker", "--role", "all"],
                    env=self.env(SYNTHWATCH_WEB_PORT=str(port)),
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    cwd=ROOT,
                )
            self.workers.append(Worker(proc, port, log))
        deadline = time.monotonic() + 180
        while not all(w.ready() for w in self.workers):
            for w in self.workers:
                if w.proc.poll() is not None:
                    raise RuntimeError(f"worker exited:\n{w.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("workers not ready after 180 s")
            time.sleep(0.5)

    def stop(self) -> None:
        for w in self.workers:
            w.stop()

    def submit(self, urls: list[str], rotate_every: int = 0) -> dict[str, float]:
        """Produce one MediaRef per URL, spread evenly over the partitions of every stage
        (`_id_on_partition`); id -> the submit time it carries. URL i goes to partition
        i + i // rotate_every (mod partitions): when `urls` repeats a set of that length
        once per partition, every item of the set lands on every partition once, so each
        worker of a pair gets the same work, whatever the group gives it."""
        return asyncio.run(self._submit(urls, rotate_every))

    async def _submit(self, urls: list[str], rotate_every: int) -> dict[str, float]:
        from aiokafka import AIOKafkaProducer

        from synthwatch.schemas import MediaRef, encode

        producer = AIOKafkaProducer(bootstrap_servers=self.services.bootstrap, acks="all")
        await producer.start()
        sent: dict[str, float] = {}
        try:
            for i, url in enumerate(urls):
                partition = (i + (i // rotate_every if rotate_every else 0)) % self.partitions
                ref = MediaRef(
                    id=_id_on_partition(partition, self.partitions),
                    url=url,
                    source="bench",
                    submitted_at=time.time(),
                )
                await producer.send_and_wait(
                    self.topic("refs"),
                    value=encode(ref),
                    key=ref.id.encode(),
                    partition=partition,
                )
                sent[ref.id] = ref.submitted_at
        finally:
            await producer.stop()
        return sent

    def collect(
        self, ids: set[str], timeout: float, progress: Callable[[int], None] = lambda _n: None
    ) -> dict[str, float]:
        """Wait for a verdict (or DLQ record) per id; id -> when we read it.
        `progress(count)` is called as they arrive."""
        return asyncio.run(self._collect(ids, timeout, progress))

    async def _collect(
        self, ids: set[str], timeout: float, progress: Callable[[int], None]
    ) -> dict[str, float]:
        from aiokafka import AIOKafkaConsumer

        consumer = AIOKafkaConsumer(
            self.topic("verdicts"),
            self.topic("dlq"),
            bootstrap_servers=self.services.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        seen: dict[str, float] = {}
        dead: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            while not ids <= seen.keys():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{len(ids - seen.keys())} of {len(ids)} items unfinished")
                batch = await consumer.getmany(timeout_ms=200)
                now = time.time()
                for tp, msgs in batch.items():
                    for m in msgs:
                        rec = json.loads(m.value)
                        if rec.get("id") in ids and rec["id"] not in seen:
                            seen[rec["id"]] = now
                            if tp.topic.endswith(".dlq"):
                                dead.append(f"{rec['id']}: {rec.get('reason')}")
                progress(len(seen))
        finally:
            await consumer.stop()
        if dead:
            raise RuntimeError(f"dead-lettered: {dead[:3]}")
        return seen


def service_cpu_s(svc: PrivateServices, workers: Sequence[Worker] = ()) -> dict[str, float]:
    """CPU seconds used so far by the broker, the store (their pid files), the workers
    (with their decoder children) and this process (the origin server's threads and
    our consumer of verdicts: the harness)."""
    table = proc_table()
    own = resource.getrusage(resource.RUSAGE_SELF)
    out = {"harness": own.ru_utime + own.ru_stime}
    for name, pid_file in (("kafka", "kafka/kafka.pid"), ("s3", "seaweedfs/weed.pid")):
        try:
            pid = int((svc.state_dir / pid_file).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if pid in table:
            out[name] = tree_cpu_s(pid, table)
    for i, w in enumerate(workers):
        out[f"worker{i}"] = tree_cpu_s(w.proc.pid, table)
    return out


@dataclass
class KafkaResult:
    workers: int
    threads: int
    concurrency: int
    items: int
    wall_s: float
    latencies: list[float]
    service_cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds the broker and the store used while the measured items ran."""

    @property
    def items_per_s(self) -> float:
        return self.items / self.wall_s

    def pct(self, q: float) -> float:
        return float(np.percentile(self.latencies, q))


def _id_on_partition(partition: int, partitions: int) -> str:
    """A media id that Kafka's default partitioner (murmur2 of the key, as in the Java
    client and aiokafka) puts on `partition`. Every stage keys its record by the media id,
    so refs spread round-robin stay spread on media.fetched and media.verdicts too; with
    random ids a few dozen items split unevenly between two workers' partitions, and the
    scaling pair would measure that luck instead of the workers."""
    from aiokafka.partitioner import murmur2

    while True:
        candidate = uuid.uuid4().hex
        if (murmur2(candidate.encode()) & 0x7FFFFFFF) % partitions == partition:
            return candidate


def measure_kafka(
    svc: PrivateServices,
    base_url: str,
    work: Path,
    urls: list[str],
    *,
    workers: int,
    threads: int,
    concurrency: int,
    rotate_every: int = 0,
) -> KafkaResult:
    run = Run(svc, base_url, work, threads=threads, concurrency=concurrency)
    try:
        run.start(workers)
        warm = run.submit(urls[: 2 * workers])  # ONNX sessions, decoder children, etc.
        run.collect(set(warm), timeout=300)
        before = service_cpu_s(svc, run.workers)
        sent = run.submit(urls, rotate_every)
        t0 = min(sent.values())
        done = run.collect(set(sent), timeout=600 + 30 * len(urls))
        after = service_cpu_s(svc, run.workers)
    finally:
        run.stop()
    return KafkaResult(
        workers=workers,
        threads=threads,
        concurrency=concurrency,
        items=len(urls),
        wall_s=max(done.values()) - t0,
        latencies=[done[i] - sent[i] for i in sent],
        service_cpu_s={k: after[k] - before[k] for k in after if k in before},
    )


def cpu_note(run: KafkaResult, embedded: bench_e2e.Measured) -> str:
    """Where the cores' CPU-seconds went during a Kafka run, beside embedded's total."""
    cpu = run.service_cpu_s
    had = bench_e2e.CORES * run.wall_s
    worker = sum(v for k, v in cpu.items() if k.startswith("worker"))
    used = worker + sum(cpu.get(k, 0.0) for k in ("s3", "kafka", "harness"))
    return (
        f"CPU-s during the {run.workers}-worker run (threads={run.threads}), of the "
        f"{had:.1f} the {bench_e2e.CORES} cores had: worker(s) {worker:.1f} (embedded used "
        f"{embedded.cpu_s:.1f} for the same items), store {cpu.get('s3', 0.0):.1f}, broker "
        f"{cpu.get('kafka', 0.0):.1f}, this harness (origin server, verdict consumer) "
        f"{cpu.get('harness', 0.0):.1f}, idle or other processes {had - used:.1f}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="the quick media set (about 3 minutes)")
    args = ap.parse_args(argv)
    from synthwatch.pipeline import logs

    logs.configure("WARNING", None)
    # The set once per partition, rotated (see Run.submit), so the scaling pair measures
    # the workers, not which of them drew the 1080p clips. The quick set alone (8 items,
    # about 4 s of work) measured mostly the first fetch and the last item's tail.
    distinct = bench_e2e.media_set(args.quick)
    paths = distinct * PARTITIONS
    with (
        tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp,
        private_services() as svc,
        media_server(bench_e2e.CACHE) as base,
    ):
        work = Path(tmp)
        urls = [f"{base}/{p.name}" for p in paths]
        (work / "no-third-party-models").mkdir()
        settings = bench_e2e.bench_settings(work / "no-third-party-models")
        bench_e2e.run_ours(settings, [str(p) for p in paths[:4]], workers=2)  # warm
        embedded = bench_e2e.run_ours(settings, [str(p) for p in paths], workers=2)
        k_full = measure_kafka(
            svc, base, work, urls, workers=1, threads=2, concurrency=2, rotate_every=len(distinct)
        )
        k1 = measure_kafka(
            svc, base, work, urls, workers=1, threads=1, concurrency=1, rotate_every=len(distinct)
        )
        k2 = measure_kafka(
            svc, base, work, urls, workers=2, threads=1, concurrency=1, rotate_every=len(distinct)
        )
    report = Report(
        name="bench_kafka",
        title=f"Kafka + S3 end to end, {len(paths)} mixed items (ratios in the same run)",
        columns=["configuration", "items/s", "vs embedded", "p50 s", "p95 s", "p99 s"],
        params={
            "quick": args.quick,
            "items": len(paths),
            "frames": FRAMES,
            "partitions": PARTITIONS,
        },
    )
    report.rows.append(
        {
            "configuration": "embedded scan_all, 2 workers, 2 model threads",
            "items/s": embedded.items_per_s,
            "vs embedded": 1.0,
        }
    )
    for r in (k_full, k1, k2):
        report.rows.append(
            {
                "configuration": f"kafka, {r.workers} worker(s), threads={r.threads}, "
                f"detect_concurrency={r.concurrency}",
                "items/s": r.items_per_s,
                "vs embedded": r.items_per_s / embedded.items_per_s,
                "p50 s": r.pct(50),
                "p95 s": r.pct(95),
                "p99 s": r.pct(99),
            }
        )
    report.targets = [
        Target("kafka 1 worker / embedded", k_full.items_per_s / embedded.items_per_s, 0.9),
        Target("kafka 2 workers / 1 worker (1 core each)", k2.items_per_s / k1.items_per_s, 1.7),
    ]
    report.notes = [
        "latency: from the submitted_at we put in each MediaRef to when our consumer read "
        "its verdict; all refs are submitted at once, so it includes queueing",
        "scaling pair: SYNTHWATCH_MODELS__THREADS=1, SYNTHWATCH_KAFKA__DETECT_CONCURRENCY=1 "
        "per worker, 4 partitions",
        "bundled models only; SYNTHWATCH_POLICY__ALERT_ON=[] so no evidence is written",
        f"media: {sum(p.stat().st_size for p in paths) / 1e6:.0f} MB in all",
        cpu_note(k_full, embedded),
    ]
    report.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
