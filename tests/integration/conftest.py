"""Real Kafka + S3 for integration tests, provided by ``scripts/services``.

The ``services`` fixture reuses services that are already up (``scripts/services
status`` exits 0) and otherwise starts them, stopping at session end only what it
started itself. Set ``SYNTHWATCH_KEEP_SERVICES=1`` to leave them running.
Everything under tests/integration is marked ``integration``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = REPO_ROOT / "scripts" / "services"
_HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Services:
    bootstrap: str
    s3_endpoint: str
    access_key: str
    secret_key: str
    bucket: str


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if Path(item.path).resolve().is_relative_to(_HERE):
            item.add_marker(pytest.mark.integration)


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.setdefault("PYTHON", sys.executable)
    proc = subprocess.run(
        ["bash", str(SERVICES), *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"scripts/services {' '.join(args)} failed ({proc.returncode}):\n"
            f"{proc.stdout}\n{proc.stderr}"
        )
    return proc


def _parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if line.startswith("SYNTHWATCH_"))


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    status = _run("status", check=False)
    started: list[str] = []
    if status.returncode != 0:
        up = {line.split()[0] for line in status.stdout.splitlines() if ": running" in line}
        started = [name for name in ("kafka", "seaweedfs") if name not in up]
        env = _parse_env(_run("start").stdout)
    else:
        env = _parse_env(_run("env").stdout)
    try:
        yield Services(
            bootstrap=env["SYNTHWATCH_KAFKA__BOOTSTRAP_SERVERS"],
            s3_endpoint=env["SYNTHWATCH_S3__ENDPOINT_URL"],
            access_key=env["SYNTHWATCH_S3__ACCESS_KEY_ID"],
            secret_key=env["SYNTHWATCH_S3__SECRET_ACCESS_KEY"],
            bucket=env["SYNTHWATCH_S3__BUCKET"],
        )
    finally:
        if started and os.environ.get("SYNTHWATCH_KEEP_SERVICES") != "1":
            _run("stop", *started, check=False)


@pytest.fixture(scope="session")
def s3_client(services: Services):  # -> mypy_boto3_s3.S3Client
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=services.s3_endpoint,
        aws_access_key_id=services.access_key,
        aws_secret_access_key=services.secret_key,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}),
    )
    names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if services.bucket not in names:
        client.create_bucket(Bucket=services.bucket)
    return client


class KafkaAdmin:
    """Small sync wrapper over aiokafka's admin client (auto topic creation is off)."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.created: list[str] = []

    async def _with_admin(self, fn):  # type: ignore[no-untyped-def]
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            return await fn(admin)
        finally:
            await admin.close()

    def create_topic(self, name: str | None = None, partitions: int = 1) -> str:
        from aiokafka.admin import NewTopic

        name = name or f"test-{uuid.uuid4().hex[:12]}"
        topic = NewTopic(name=name, num_partitions=partitions, replication_factor=1)
        asyncio.run(self._with_admin(lambda a: a.create_topics([topic])))
        self.created.append(name)
        return name

    def delete_topics(self, names: list[str]) -> None:
        if names:
            asyncio.run(self._with_admin(lambda a: a.delete_topics(names)))


@pytest.fixture
def kafka_admin(services: Services) -> Iterator[KafkaAdmin]:
    admin = KafkaAdmin(services.bootstrap)
    yield admin
    with contextlib.suppress(Exception):  # best-effort cleanup
        admin.delete_topics(admin.created)


# --------------------------------------------------------------------------- the CLI


def synthwatch(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the `synthwatch` CLI as a user would; raises if it exits non-zero."""
    return subprocess.run(
        [sys.executable, "-m", "synthwatch", *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_worker(env: dict[str, str], role: str, log_path: Path) -> subprocess.Popen[bytes]:
    """`synthwatch worker --role ROLE`, its output in `log_path`."""
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "synthwatch", "worker", "--role", role],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def stop_workers(*workers: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """SIGTERM every worker, then wait for each (killed if it outlives `timeout`)."""
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    for worker in workers:
        try:
            worker.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            worker.kill()
