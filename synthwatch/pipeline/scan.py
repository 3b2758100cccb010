"""Embedded mode: fetch and analyse local files or URLs in this process, no broker.

`scan_all` is what `synthwatch scan`, `eval`, `calibrate`, the benchmarks and scripts
run: every source is checked before any model loads, one `Engine` serves all items (the
crops of concurrent items share batches), evidence bundles are written for alerting
items when a store is given, and one item's failure never loses another's verdict. A
Ctrl-C lets the items in flight finish, then ends the process.
"""

from __future__ import annotations

import functools
import os
import signal
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from synthwatch.errors import SynthwatchError
from synthwatch.operators.redact import redact_url
from synthwatch.operators.sniff import MEDIA_SUFFIXES
from synthwatch.pipeline.settings import Settings


def shown_source(source: str) -> str:
    """A source as output may show it: URLs lose credentials and signatures; local
    paths are left exactly as the user typed them."""
    return redact_url(source) if "://" in source else source


def expand_sources(sources: list[str]) -> list[str]:
    """Directories expand to the media files below them (by suffix, sorted); files and
    URLs pass through unchanged, so naming a file always scans it."""
    expanded: list[str] = []
    for src in sources:
        path = Path(src)
        if "://" not in src and path.is_dir():
            expanded.extend(
                str(p)
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in MEDIA_SUFFIXES
            )
        else:
            expanded.append(src)
    return expanded


@dataclass
class ScanResult:
    source: str
    record: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    reason: str | None = None
    verdict: Any = None
    """The Verdict, when the item was analysed."""
    alert: Any = None
    """The Alert, when a store was given and the policy alerts on the decision: the
    record the Kafka pipeline would put on `media.alerts`."""


def scan_all(
    settings: Settings,
    sources: list[str],
    *,
    store: Any = None,
    workers: int = 2,
    on_result: Callable[[ScanResult], None] = lambda _r: None,
    on_progress: Callable[[int, int], None] = lambda _done, _total: None,
) -> list[ScanResult]:
    """Fetch and analyse every source with one engine (crops of concurrent items share
    batches); with a store, write evidence bundles for alerting items. One item's
    failure, even a bug, is recorded in its result and never loses the others.

    Every source is checked first (a missing file, a refused address), before any model
    is loaded: when none is usable the answer comes at once. `on_result` sees the
    results in the order of `sources`; `on_progress(done, total)` follows the analysis.
    """
    from synthwatch.operators import sandbox
    from synthwatch.operators.fetch import Fetcher

    results: list[ScanResult] = [ScanResult(source=s) for s in sources]
    with Fetcher(settings.fetch, embedded=True) as fetcher:
        for res in results:
            try:
                fetcher.precheck(res.source)
            except SynthwatchError as exc:
                res.error, res.reason = str(exc), exc.reason
        todo = [r for r in results if r.error is None]
        if not todo:
            for res in results:
                on_result(res)
            return results
        # The decoder children import PyAV and Pillow (about 0.3 s each) while the
        # models load here, instead of after.
        sandbox.prestart(settings.sample.max_memory_mb, min(workers, len(todo)))
        return _scan(settings, fetcher, results, todo, store, workers, on_result, on_progress)


def _scan(
    settings: Settings,
    fetcher: Any,
    results: list[ScanResult],
    todo: list[ScanResult],
    store: Any,
    workers: int,
    on_result: Callable[[ScanResult], None],
    on_progress: Callable[[int, int], None],
) -> list[ScanResult]:
    from synthwatch.operators.alert import alert_with_evidence
    from synthwatch.operators.evidence import model_weights
    from synthwatch.operators.signing import Signer
    from synthwatch.pipeline.engine import Engine, Item, sampled_context, sampled_evidence

    signer = Signer.from_settings(settings.signing) if store is not None else None

    with (
        Engine(settings) as engine,
        tempfile.TemporaryDirectory(prefix="synthwatch-") as tmp,
    ):

        def one(res: ScanResult) -> ScanResult:
            downloaded: Path | None = None
            try:
                fetched = fetcher.fetch(res.source, Path(tmp))
                if fetched.path.is_relative_to(tmp):
                    downloaded = fetched.path  # a URL's bytes: ours to delete when done
                # Verdicts, reports and the --json output may travel: no signatures.
                item = Item.local(fetched, source=shown_source(res.source))
                analysis = engine.analyze(item)
                res.verdict = analysis.verdict
                record: dict[str, Any] = verdict_record(analysis.verdict)
                if store is not None and signer is not None:
                    decided = alert_with_evidence(
                        analysis.verdict,
                        functools.partial(sampled_evidence, engine, analysis, fetched.path),
                        store,
                        evidence_prefix="",
                        policy=engine.policy,
                        signer=signer,
                        weights=model_weights(analysis.verdict, engine.store.weights_id),
                        context=functools.partial(sampled_context, analysis),
                    )
                    if decided is not None:
                        alert, bundle = decided
                        res.alert = alert
                        record["alert_id"] = alert.alert_id
                        record["evidence"] = bundle.manifest_uri
                res.record = record
            except SynthwatchError as exc:
                res.error, res.reason = str(exc), exc.reason
            except Exception as exc:  # a bug must not lose the other items' verdicts
                res.error, res.reason = f"{type(exc).__name__}: {exc}", "internal"
            finally:
                if downloaded is not None:
                    downloaded.unlink(missing_ok=True)
            return res

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="scan") as pool:
            on_progress(0, len(todo))
            done = pool.map(one, todo)
            pending = {id(r) for r in todo}
            finished = 0
            try:
                for res in results:
                    if id(res) in pending:
                        next(done)
                        finished += 1
                        on_progress(finished, len(todo))
                    on_result(res)
            except KeyboardInterrupt:
                drain_on_interrupt(pool)
                raise
    return results


def drain_on_interrupt(pool: ThreadPoolExecutor) -> None:
    """After Ctrl-C: start no more items and wait for the ones in flight, so the engine
    is closed after its last user and no thread runs torch or ONNX Runtime while the
    interpreter shuts down. From then on, until the process ends (closing the engine,
    the decoder children, the atexit hooks), a second Ctrl-C ends it at once (exit 130)
    without running finalisers: every verdict line already written is whole and
    flushed, and a hard exit cannot corrupt what a shutdown racing live threads can."""
    exit_on_next_interrupt()
    pool.shutdown(wait=True, cancel_futures=True)


def exit_on_next_interrupt() -> None:
    """From now on Ctrl-C ends the process at once with exit code 130, skipping the
    interpreter's shutdown (atexit hooks, finalisers), which an interrupt would
    otherwise break off with a traceback."""
    signal.signal(signal.SIGINT, lambda _signum, _frame: os._exit(130))


def verdict_record(verdict: Any) -> dict[str, Any]:
    from synthwatch.schemas import to_builtins

    record = to_builtins(verdict)
    record.pop("type", None)
    return record
