"""Hostile media through the real worker: fuzzed clips and images, a playlist naming a
local file, a decompression-bomb header. The worker never crashes or hangs, each item
ends with a verdict or a DLQ record with a reason, and its memory stays bounded."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tests.faults.conftest import Run
from tests.media_factory import make_image, make_png_header, make_video

# What a hostile item may end as: the worker's refusals, never "internal" (a bug).
EXPECTED_REASONS = {
    "corrupt_media",
    "unsupported_media",
    "limit_exceeded",
    "too_large",
}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _variants(root: Path, name: str, rng: random.Random, n: int) -> list[str]:
    clip = make_video(root / f"{name}-seed.mp4", seconds=1.0, width=96, height=64)
    still = make_image(root / f"{name}-seed.jpg", width=96, height=64)
    out = []
    for i in range(n):
        data = bytearray((clip if i % 2 else still).read_bytes())
        if rng.random() < 0.5:
            data = data[: rng.randrange(16, len(data))]
        for _ in range(rng.randrange(1, 8)):
            pos = rng.randrange(len(data))
            data[pos] ^= 1 << rng.randrange(8)
        target = root / f"{name}-v{i}{'.mp4' if i % 2 else '.jpg'}"
        target.write_bytes(bytes(data))
        out.append(target.name)
    secret = root / f"{name}-secret.txt"
    secret.write_text("not for the decoder\n")
    (root / f"{name}-list.m3u8").write_text(f"#EXTM3U\n#EXTINF:1,\nfile://{secret}\n{secret}\n")
    (root / f"{name}-concat.mp4").write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    make_png_header(root / f"{name}-bomb.png", width=100_000, height=100_000)
    return [*out, f"{name}-list.m3u8", f"{name}-concat.mp4", f"{name}-bomb.png"]


def test_fuzzed_and_crafted_media_end_in_the_dlq_with_a_reason_and_the_worker_survives(
    run: Run, s3: Any, bucket: str
) -> None:
    base, root = run.media
    names = _variants(root, run.name, random.Random(f"hostile-{run.name}"), 40)
    worker = run.start_worker()
    rss_start = _rss_mb(worker.proc.pid)
    ids = run.submit([f"{base}/{n}" for n in names])
    peak = rss_start
    ledger = None
    for _ in range(60):
        ledger = run.collect(lambda led: led.all_ended(set(ids))(led), timeout=5)
        assert worker.proc.poll() is None, worker.tail()
        peak = max(peak, _rss_mb(worker.proc.pid))
        if ledger.all_ended(set(ids))(ledger):
            break
    assert ledger is not None
    run.stop_all()
    run.assert_whole(ledger, set(ids), s3, bucket)
    reasons = {d["id"]: d["reason"] for d in ledger.dlq}
    assert set(reasons.values()) <= EXPECTED_REASONS, reasons
    by_url = {u.rsplit("/", 1)[1]: i for i, u in ids.items()}
    for crafted in (f"{run.name}-list.m3u8", f"{run.name}-concat.mp4", f"{run.name}-bomb.png"):
        assert crafted in {n for n, i in by_url.items() if i in reasons}, crafted
    # Decoding happens in a sandboxed child: the worker's own memory barely moves.
    assert peak - rss_start < 500, (rss_start, peak)
