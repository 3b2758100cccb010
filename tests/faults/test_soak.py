"""Soak: many refs through two workers that are SIGKILLed at random and restarted.

Slow (minutes), so not in CI by default: `make reliability` runs it. Prints the tally a
reliability review wants: refs, verdicts, DLQ records, redeliveries, kills, lost.
"""

from __future__ import annotations

import os
import random
import time
from typing import Any

import pytest

from tests.faults.conftest import Run, Worker

pytestmark = pytest.mark.slow


def test_soak_random_sigkills_lose_nothing_and_dedup_to_one_verdict_each(
    run: Run, s3: Any, bucket: str
) -> None:
    n = int(os.environ.get("SYNTHWATCH_SOAK_REFS", "1000"))
    seed = int(os.environ.get("SYNTHWATCH_SOAK_SEED", "0"))
    rng = random.Random(seed)
    run.partitions = 4
    workers: list[Worker] = [run.start_worker(), run.start_worker()]
    urls = run.images(n)
    ids: set[str] = set()
    for i in range(0, n, 100):  # the CLI takes a hundred at a time comfortably
        ids |= set(run.submit(urls[i : i + 100]))
    kills = 0
    deadline = time.monotonic() + 60 * 30
    while time.monotonic() < deadline:
        ledger = run.collect(lambda led: led.all_ended(ids)(led), timeout=rng.uniform(4, 10))
        if ledger.all_ended(ids)(ledger):
            break
        victim = rng.randrange(len(workers))
        workers[victim].kill()
        kills += 1
        workers[victim] = run.start_worker()
    ledger = run.collect(lambda led: led.all_ended(ids)(led), timeout=300, settle=5.0)
    run.stop_all()
    problems = ledger.check(ids, s3, bucket)
    lost = len(ids - ledger.ended())
    redelivered = sum(v - 1 for v in ledger.duplicates().values())
    # After dedup by id one verdict must remain: redelivered copies must agree with it.
    seen: dict[str, tuple[str, str]] = {}
    conflicting = set()
    for v in ledger.verdicts:
        key = (v["sha256"], v["decision"])
        if seen.setdefault(v["id"], key) != key:
            conflicting.add(v["id"])
    print(
        f"\nsoak: refs={n} seed={seed} kills={kills} verdicts={len(ledger.verdicts)} "
        f"dlq={len(ledger.dlq)} redelivered={redelivered} lost={lost} "
        f"conflicting_after_dedup={len(conflicting)} problems={len(problems)}"
    )
    assert kills > 0, "the soak finished before a single kill: raise SYNTHWATCH_SOAK_REFS"
    assert lost == 0 and not problems and not conflicting, (problems[:20], conflicting)
