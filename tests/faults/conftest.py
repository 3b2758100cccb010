"""Harness for the fault suite: a private broker and store, real worker processes.

The suite stops and restarts Kafka and SeaweedFS, so it runs its own instance of both
(`scripts/services` with its own state directory and free ports), never the one other
tests share. Workers are `python -m synthwatch worker` processes killed with real
signals; refs point at images served from 127.0.0.1. Every ref must end as exactly one
verdict (after dedup by id) or one DLQ record, and every flagged item must have exactly
one alert id and one complete evidence bundle: `Ledger.check` says so or says why not.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from synthwatch.operators.evidence import verify_bundle
from synthwatch.operators.signing import SigningSettings, trusted_keys
from synthwatch.operators.store import S3Store
from tests.private_services import PrivateServices, free_port

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(item.path).resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def fault_services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateServices]:
    svc = PrivateServices.create(tmp_path_factory.mktemp("fault-services"))
    svc.start()
    try:
        yield svc
    finally:
        svc.close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture(scope="session")
def media_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    root = tmp_path_factory.mktemp("fault-media")
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", root
    server.shutdown()


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def health(self, which: str) -> httpx.Response | None:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health/{which}", timeout=3)
        except httpx.HTTPError:
            return None

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.tail()}")
            r = self.health("ready")
            if r is not None and r.status_code == 200:
                return
            time.sleep(0.5)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.tail()}")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of the sample `name` with `labels` on the worker's /metrics, or None
        when the worker does not answer or serves no such sample."""
        try:
            text = httpx.get(f"http://127.0.0.1:{self.port}/metrics", timeout=3).text
        except httpx.HTTPError:
            return None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and labels.items() <= sample.labels.items():
                    return float(sample.value)
        return None

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def events(self, event: str) -> list[dict[str, Any]]:
        """The worker's JSON log records whose event is `event`."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            start = line.find("{")
            if start < 0 or f'"{event}"' not in line:
                continue
            try:
                rec = json.loads(line[start:])
            except ValueError:
                continue
            if rec.get("event") == event:
                found.append(rec)
        return found

    def wait_event(self, event: str, timeout: float = 60.0, count: int = 1) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events(event)) < count:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"no {event!r} in the worker log:\n{self.tail()}")
            time.sleep(0.2)

    def wait_health(self, which: str, status: int, timeout: float = 60.0) -> dict[str, Any]:
        """Poll /health/<which> until it answers `status`; its JSON body."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            r = self.health(which)
            if r is not None:
                last = r
                if r.status_code == status:
                    body: dict[str, Any] = r.json()
                    return body
            time.sleep(0.5)
        seen = None if last is None else (last.status_code, last.text)
        raise AssertionError(f"/health/{which} never answered {status} (last {seen})")


@dataclass
class Run:
    """One scenario: its own topics and consumer group on the private services."""

    services: PrivateServices
    media: tuple[str, Path]
    name: str = field(default_factory=lambda: f"f{uuid.uuid4().hex[:8]}")
    partitions: int = 2
    extra: dict[str, str] = field(default_factory=dict)
    workers: list[Worker] = field(default_factory=list)
    _topics: bool = False

    def topic(self, what: str) -> str:
        return f"{self.name}.media.{what}"

    def env(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.services.client_env)
        env.update(
            {
                "SYNTHWATCH_KAFKA__APP_ID": f"synthwatch-{self.name}",
                "SYNTHWATCH_KAFKA__PARTITIONS": str(self.partitions),
                "SYNTHWATCH_KAFKA__TOPIC_REFS": self.topic("refs"),
                "SYNTHWATCH_KAFKA__TOPIC_FETCHED": self.topic("fetched"),
                "SYNTHWATCH_KAFKA__TOPIC_VERDICTS": self.topic("verdicts"),
                "SYNTHWATCH_KAFKA__TOPIC_ALERTS": self.topic("alerts"),
                "SYNTHWATCH_KAFKA__TOPIC_DLQ": self.topic("dlq"),
                "SYNTHWATCH_KAFKA__TOPIC_RETRY": self.topic("retry"),
                "SYNTHWATCH_KAFKA__DETECT_CONCURRENCY": "2",
                # A killed worker's partitions move after 8 s instead of 45.
                "SYNTHWATCH_KAFKA__SESSION_TIMEOUT_S": "8",
                "SYNTHWATCH_FETCH__ALLOW_NETWORKS": '["127.0.0.0/8"]',
                # Our own models only (bundled): the suite needs no ../shared.
                "SYNTHWATCH_MODEL_DIR": str(self.media[1] / "no-third-party-models"),
                "SYNTHWATCH_MODELS__AUDIO_MODELS": "[]",
                "SYNTHWATCH_MODELS__IMAGE_ON_VIDEO": "true",
                # Flag everything scored, so every item exercises evidence and alert.
                "SYNTHWATCH_POLICY__FLAG_THRESHOLD": "0.0",
                "SYNTHWATCH_POLICY__REVIEW_THRESHOLD": "0.0",
                "SYNTHWATCH_POLICY__VERSION": f"policy-{self.name}",
                "SYNTHWATCH_SAMPLE__FRAMES": "2",
                "SYNTHWATCH_LOG_JSON": "true",
                "SYNTHWATCH_RETRY__INLINE_BACKOFF_S": "0.2",
                "SYNTHWATCH_RETRY__TOPIC_BACKOFF_S": "1.0",
            }
        )
        env.update(self.extra)
        env.update(overrides)
        return env

    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "synthwatch", *args],
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def create_topics(self) -> None:
        if not self._topics:
            self.cli("topics", "create")
            self._topics = True

    def produce(self, what: str, value: bytes | None, *, key: bytes | None, partition: int) -> None:
        """One raw record onto a run topic, as any producer on the feed could send it."""

        async def send() -> None:
            from aiokafka import AIOKafkaProducer

            producer = AIOKafkaProducer(bootstrap_servers=self.services.bootstrap)
            await producer.start()
            try:
                await producer.send_and_wait(
                    self.topic(what), value=value, key=key, partition=partition
                )
            finally:
                await producer.stop()

        self.create_topics()
        asyncio.run(send())

    def start_worker(
        self, role: str = "all", *, faults: tuple[str, ...] = (), wait: bool = True, **env: str
    ) -> Worker:
        self.create_topics()
        for _ in range(3):
            worker = self._spawn(role, faults, env)
            if not wait:
                return worker
            try:
                worker.wait_ready()
                return worker
            except AssertionError:
                # The free port was taken between our check and the worker's bind (another
                # process's ephemeral port): try another one; anything else is a failure.
                if "address already in use" not in worker.tail(20000):
                    raise
                self.workers.remove(worker)
        raise AssertionError("no free web port for the worker after 3 tries")

    def _spawn(self, role: str, faults: tuple[str, ...], env: dict[str, str]) -> Worker:
        port = free_port()
        log = self.media[1] / f"{self.name}-w{len(self.workers)}-{role}-{port}.log"
        overrides = {"SYNTHWATCH_WEB_PORT": str(port), **env}
        if faults:
            overrides["SYNTHWATCH_FAULT_POINTS"] = json.dumps(list(faults))
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "synthwatch", "worker", "--role", role],
                env=self.env(**overrides),
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(proc, log, port)
        self.workers.append(worker)
        return worker

    def images(self, n: int, *, size: int = 96) -> list[str]:
        """n distinct small JPEGs (noise, so every one has its own sha256) on the media
        server; their URLs."""
        base, root = self.media
        urls = []
        for i in range(n):
            name = f"{self.name}-{i}.jpg"
            noise = np.random.default_rng([i, int(self.name[1:], 16)]).integers(
                0, 256, (size, size, 3), dtype=np.uint8
            )
            Image.fromarray(noise).save(root / name, format="JPEG", quality=90)
            urls.append(f"{base}/{name}")
        return urls

    def submit(self, urls: list[str]) -> dict[str, str]:
        """Submit through the CLI; media id -> url."""
        self.create_topics()
        out = self.cli("submit", *urls, "--source", "faults").stdout
        return dict(line.split("\t", 1) for line in out.splitlines())

    def collect(
        self, until: Callable[[Ledger], bool], timeout: float, *, settle: float = 0.0
    ) -> Ledger:
        """Read verdicts, alerts and DLQ from the beginning until `until(ledger)` holds,
        then keep reading `settle` seconds more (late duplicates must show up)."""
        return asyncio.run(self._collect(until, timeout, settle))

    async def _collect(
        self, until: Callable[[Ledger], bool], timeout: float, settle: float
    ) -> Ledger:
        from aiokafka import AIOKafkaConsumer

        topics = [self.topic(t) for t in ("verdicts", "alerts", "dlq")]
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=self.services.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        ledger = Ledger()
        deadline = time.monotonic() + timeout
        settle_until: float | None = None
        try:
            while time.monotonic() < deadline:
                batch = await consumer.getmany(timeout_ms=500)
                for tp, msgs in batch.items():
                    kind = tp.topic.rsplit(".", 1)[1]
                    for m in msgs:
                        ledger.add(kind, json.loads(m.value))
                if settle_until is None and until(ledger):
                    settle_until = time.monotonic() + settle
                if settle_until is not None and time.monotonic() >= settle_until:
                    break
        finally:
            await consumer.stop()
        return ledger

    def group(self) -> dict[str, Any]:
        """The consumer group's state and members, from the broker."""
        return asyncio.run(self._group())

    async def _group(self) -> dict[str, Any]:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.services.bootstrap)
        await admin.start()
        try:
            (desc,) = await admin.describe_consumer_groups([f"synthwatch-{self.name}"])
            groups = desc.groups if hasattr(desc, "groups") else desc
            g = groups[0]
            state, members = g[2], g[5]
            offsets = await admin.list_consumer_group_offsets(f"synthwatch-{self.name}")
            return {
                "state": state,
                "members": len(members),
                "offsets": {f"{tp.topic}:{tp.partition}": o.offset for tp, o in offsets.items()},
            }
        finally:
            await admin.close()

    def end_offsets(self, what: str) -> dict[str, int]:
        return asyncio.run(self._end_offsets(what))

    async def _end_offsets(self, what: str) -> dict[str, int]:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(bootstrap_servers=self.services.bootstrap, group_id=None)
        await consumer.start()
        try:
            topic = self.topic(what)
            parts = consumer.partitions_for_topic(topic)
            if parts is None:
                await consumer.topics()
                parts = consumer.partitions_for_topic(topic) or set()
            tps = [TopicPartition(topic, p) for p in parts]
            ends = await consumer.end_offsets(tps)
            return {f"{tp.topic}:{tp.partition}": o for tp, o in ends.items()}
        finally:
            await consumer.stop()

    def stop_all(self) -> None:
        for w in self.workers:
            w.terminate()

    def logs(self) -> str:
        return "\n".join(f"--- {w.log.name}\n{w.tail(3000)}" for w in self.workers)

    def assert_whole(self, ledger: Ledger, ids: set[str], s3: Any, bucket: str) -> None:
        """Nothing lost, one alert id and a whole bundle per flagged id (`Ledger.check`);
        on failure the message carries the workers' logs, since a CI run is the only
        place some of these races show."""
        problems = ledger.check(ids, s3, bucket)
        assert not problems, f"{problems}\n{self.logs()}"


@dataclass
class Ledger:
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    dlq: list[dict[str, Any]] = field(default_factory=list)

    def add(self, kind: str, record: dict[str, Any]) -> None:
        getattr(self, kind).append(record)

    def ended(self) -> set[str]:
        return {r["id"] for r in self.verdicts} | {r["id"] for r in self.dlq if r.get("id")}

    def all_ended(self, ids: set[str]) -> Callable[[Ledger], bool]:
        return lambda ledger: ids <= ledger.ended() and ledger.flagged() <= ledger.alerted()

    def flagged(self) -> set[str]:
        return {r["id"] for r in self.verdicts if r["decision"] in ("flag", "review")}

    def alerted(self) -> set[str]:
        return {r["id"] for r in self.alerts}

    def duplicates(self) -> dict[str, int]:
        """Ids with more than one verdict record (redeliveries), and how many."""
        counts = Counter(r["id"] for r in self.verdicts)
        return {k: v for k, v in counts.items() if v > 1}

    def check(self, ids: set[str], s3: Any, bucket: str) -> list[str]:
        """What breaks 'nothing lost': one ending per id, one alert id and one
        complete bundle per flagged id. Empty when all holds."""
        problems = []
        verdict_ids = {r["id"] for r in self.verdicts}
        dlq_ids = {r["id"] for r in self.dlq if r.get("id")}
        if missing := ids - verdict_ids - dlq_ids:
            problems.append(f"lost: {sorted(missing)}")
        if both := (verdict_ids & dlq_ids) & ids:
            problems.append(f"both a verdict and a DLQ record: {sorted(both)}")
        by_id: dict[str, set[str]] = {}
        for a in self.alerts:
            by_id.setdefault(a["id"], set()).add(a["alert_id"])
        for vid in self.flagged() & ids:
            alert_ids = by_id.get(vid, set())
            if len(alert_ids) != 1:
                problems.append(f"{vid}: {len(alert_ids)} alert ids")
                continue
            alert = next(a for a in self.alerts if a["id"] == vid)
            problems.extend(bundle_problems(alert, s3, bucket))
        return problems


def bundle_problems(alert: dict[str, Any], s3: Any, bucket: str) -> list[str]:
    """The evidence bundle is whole: the manifest hashes to the alert's, and `verify`
    finds it signed by the workers' key, every object it lists there with its hash and
    size, and nothing else in the bundle's folder."""
    key = alert["evidence_uri"].removeprefix(f"s3://{bucket}/")
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    if hashlib.sha256(body).hexdigest() != alert["manifest_sha256"]:
        return [f"{alert['id']}: manifest hash differs from the alert's"]
    # The workers inherit this process's environment, so they sign with the key the
    # session's XDG_CONFIG_HOME holds (tests/conftest.py).
    check = verify_bundle(
        S3Store(s3, bucket), key.rsplit("/", 1)[0], trusted_keys(SigningSettings())
    )
    return [f"{alert['id']}: {problem}" for problem in check.problems]


@pytest.fixture
def run(fault_services: PrivateServices, media_server: tuple[str, Path]) -> Iterator[Run]:
    r = Run(fault_services, media_server)
    try:
        yield r
    finally:
        for w in r.workers:
            w.kill()


@pytest.fixture(scope="session")
def s3(fault_services: PrivateServices) -> Any:
    import boto3
    from botocore.config import Config

    env = fault_services.client_env
    return boto3.client(
        "s3",
        endpoint_url=env["SYNTHWATCH_S3__ENDPOINT_URL"],
        aws_access_key_id=env["SYNTHWATCH_S3__ACCESS_KEY_ID"],
        aws_secret_access_key=env["SYNTHWATCH_S3__SECRET_ACCESS_KEY"],
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )


@pytest.fixture(scope="session")
def bucket(fault_services: PrivateServices) -> str:
    return fault_services.client_env["SYNTHWATCH_S3__BUCKET"]
