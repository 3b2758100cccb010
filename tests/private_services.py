"""A private Kafka broker and SeaweedFS S3 gateway, on free ports and their own state
directory, for code that stops and restarts them or loads them (the fault suite, the
Kafka and soak benchmarks): never the instance on the default ports that others share.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVICES = REPO_ROOT / "scripts" / "services"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_seaweed_base(rng: random.Random | None = None) -> int:
    """SeaweedFS needs BASE..BASE+2 and the S3 port (BASE+3 here), each also + 10000 for
    gRPC: hence a base well below 55535, not an ephemeral port."""
    rng = rng or random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000, 10)
        if all(port_free(p + grpc) for p in range(base, base + 4) for grpc in (0, 10000)):
            return base
    raise RuntimeError("no free port range for SeaweedFS")


@dataclass
class PrivateServices:
    """One Kafka broker and one SeaweedFS S3 gateway owned by their caller."""

    state_dir: Path
    env: dict[str, str]
    client_env: dict[str, str] = field(default_factory=dict)
    """The SYNTHWATCH_* client settings `scripts/services start` printed."""

    @classmethod
    def create(cls, state_dir: Path) -> PrivateServices:
        base = free_seaweed_base()
        env = dict(os.environ)
        env.setdefault("PYTHON", sys.executable)
        env.update(
            {
                "SYNTHWATCH_SERVICES_DIR": str(state_dir),
                "SYNTHWATCH_KAFKA_PORT": str(free_port()),
                "SYNTHWATCH_KAFKA_CONTROLLER_PORT": str(free_port()),
                "SYNTHWATCH_S3_PORT": str(base + 3),
                "SYNTHWATCH_SEAWEED_PORT_BASE": str(base),
                "SYNTHWATCH_KAFKA_HEAP_OPTS": "-Xms128m -Xmx512m",
            }
        )
        return cls(state_dir, env)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["bash", str(SERVICES), *args],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"services {' '.join(args)}: {proc.stdout}\n{proc.stderr}")
        return proc

    def start(self) -> None:
        """Start whatever is not running (both at first; one after `stop(name)`)."""
        out = self.run("start").stdout
        self.client_env = dict(
            line.split("=", 1) for line in out.splitlines() if line.startswith("SYNTHWATCH_")
        )

    def stop(self, name: str) -> None:
        """Stop `kafka` or `s3` (its data stays, so `start` brings it back as it was)."""
        self.run("stop", name)

    def close(self) -> None:
        self.run("stop", "--clean", check=False)

    @property
    def bootstrap(self) -> str:
        return self.client_env["SYNTHWATCH_KAFKA__BOOTSTRAP_SERVERS"]


@contextmanager
def private_services() -> Iterator[PrivateServices]:
    """Started on entry, stopped and removed on exit."""
    with tempfile.TemporaryDirectory(prefix="sw-services-") as state:
        svc = PrivateServices.create(Path(state))
        try:
            svc.start()
            yield svc
        finally:
            svc.close()
