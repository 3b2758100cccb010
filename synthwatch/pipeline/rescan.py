"""`synthwatch rescan`: run stored items again with today's models and policy, and say
which verdicts changed and why.

A newsroom or platform that changes a model, its calibration or the policy (or loads a
new list of known fakes) needs to know which past verdicts no longer hold. This module
reads the earlier verdicts (the JSON lines `synthwatch scan --json` writes, or the
verdicts topic), selects some (`Filters`), scans each item again from the bytes the
earlier verdict names, and compares the two verdicts (`diff`, a pure function).

Two ways to run:

- embedded (`rescan_embedded`): the item's local file (`Verdict.blob`) is hashed and
  must still be the bytes the verdict was made on (its `sha256`); a file that changed
  or is gone is that item's error, never silently re-scored, never fatal to the
  others. One `Engine` scores every item, as `synthwatch scan` does.
- cluster (`rescan_cluster`): each item's content-addressed blob in our bucket is sent
  again through `media.refs` with a `Rescan` marker, so the running pipeline scans it
  with *its* models and policy; the decide stage alerts on every re-scan whose decision
  changed (`operators/alert.py`). The new verdicts are read back from the verdicts
  topic, matched on id and run, until all arrived or the timeout passed.

Every re-scanned verdict carries the marker (`Verdict.rescan`): what the item's
decision, score, model set and policy version were before, and the run it belongs to.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import math
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from synthwatch.errors import (
    ConfigError,
    InvalidInput,
    InvalidRef,
    StorageFailed,
    SynthwatchError,
)
from synthwatch.pipeline.settings import Settings
from synthwatch.schemas import DeadLetter, Decision, MediaRef, Rescan, Verdict, decode

DECISIONS: tuple[Decision, ...] = ("flag", "review", "pass", "inconclusive")

SCORE_EPSILON = 1e-6
"""Scores closer than this are the same score (verdicts carry six decimals)."""

VERDICT_TAG = "verdict.v2"
"""The tag `synthwatch scan --json` leaves out of its lines (they are verdict records
without the `type` field, plus `alert_id`/`evidence` for alerting items)."""


# -- reading earlier verdicts ------------------------------------------------------------


@dataclass
class Loaded:
    """The earlier verdicts read from files or the topic: the latest one per media id."""

    verdicts: list[Verdict] = field(default_factory=list)
    skipped: int = 0
    """Lines or records that hold no verdict: `scan`'s error lines (an item that never
    got a verdict has nothing to compare with), or another producer's records."""
    superseded: int = 0
    """Verdicts replaced by a later verdict of the same id (a redelivery, an earlier
    re-scan): each item is re-scanned once, against its latest verdict."""


def parse_verdict_line(line: str | bytes, where: str) -> Verdict | None:
    """One line of a verdicts file: a Verdict, or None for a `scan` error line.

    `synthwatch scan --json` writes verdict records without their `type` tag (and with
    `alert_id` and `evidence` beside them for alerting items); such a line is read as the
    current verdict version. Raises InvalidInput naming `where` for anything else.
    """
    try:
        obj = json.loads(line)
    except ValueError as exc:  # JSONDecodeError, or bytes that are not UTF-8
        why = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise InvalidInput(f"{where}: not JSON ({why})") from None
    if not isinstance(obj, dict):
        raise InvalidInput(f"{where}: not a verdict record (a JSON object per line)")
    if "error" in obj and "decision" not in obj:
        return None  # scan could not analyse this item: there is no earlier verdict
    obj.setdefault("type", VERDICT_TAG)
    try:
        return decode(json.dumps(obj), Verdict)
    except SynthwatchError as exc:
        raise InvalidInput(f"{where}: not a verdict record: {exc}") from None


def read_verdict_files(paths: Sequence[Path]) -> Loaded:
    """Every verdict in `paths` (JSON lines), the latest per id. Raises InvalidInput for
    a file that cannot be read or a line that is not a verdict: the whole input is
    checked before anything is scanned."""
    found: list[Verdict] = []
    skipped = 0
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise InvalidInput(f"cannot read verdicts file {path}: {why}") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            verdict = parse_verdict_line(line, f"{path}:{n}")
            if verdict is None:
                skipped += 1
            else:
                found.append(verdict)
    return latest_per_id(found, skipped=skipped)


def latest_per_id(verdicts: Iterable[Verdict], *, skipped: int = 0) -> Loaded:
    """The latest verdict of each id (by `detected_at`; the later one read on a tie),
    in the order each id was first seen."""
    latest: dict[str, Verdict] = {}
    total = 0
    for v in verdicts:
        total += 1
        have = latest.get(v.id)
        if have is None or v.detected_at >= have.detected_at:
            latest[v.id] = v
    return Loaded(list(latest.values()), skipped=skipped, superseded=total - len(latest))


async def read_verdicts_topic(settings: Settings) -> Loaded:
    """The verdicts topic from its beginning up to the end offsets found at the start,
    without a consumer group (nothing is committed, no running consumer is disturbed).
    Records that are not verdicts are counted as skipped. Raises BrokerUnavailable."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    from synthwatch.errors import BrokerUnavailable
    from synthwatch.pipeline.kafka import client_kwargs

    k = settings.kafka
    consumer = AIOKafkaConsumer(
        k.topic_verdicts,
        enable_auto_commit=False,
        group_id=None,
        auto_offset_reset="earliest",
        **client_kwargs(k),
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise BrokerUnavailable(f"cannot reach Kafka at {k.bootstrap_servers}: {exc}") from None
    found: list[Verdict] = []
    skipped = 0
    try:
        tps = list(consumer.assignment())
        if not tps:
            return Loaded()
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        pending = {tp for tp in tps if ends[tp] > await consumer.position(tp)}
        while pending:
            batch = await consumer.getmany(*pending, timeout_ms=1000)
            for tp, messages in batch.items():
                for m in messages:
                    if m.offset >= ends[tp]:
                        break
                    try:
                        found.append(decode(m.value, Verdict))
                    except SynthwatchError:
                        skipped += 1
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    return latest_per_id(found, skipped=skipped)


# -- selecting ----------------------------------------------------------------------------


def parse_time(text: str, option: str) -> float:
    """Unix seconds, or an ISO 8601 date or time (no zone = UTC). ConfigError otherwise."""
    with contextlib.suppress(ValueError):
        seconds = float(text)
        if math.isfinite(seconds):
            return seconds
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{option}: {text!r} is neither Unix seconds nor an ISO 8601 date or time "
            "(e.g. 2025-06-01 or 2025-06-01T12:00:00+02:00)"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


@dataclass(frozen=True)
class Filters:
    """Which earlier verdicts to re-scan; the conditions combine with AND, empty = any."""

    since: float | None = None
    """Submitted at or after (Unix seconds)."""
    until: float | None = None
    """Submitted before (Unix seconds): `--since 2025-01-01 --until 2025-02-01` is January."""
    sources: tuple[str, ...] = ()
    decisions: tuple[Decision, ...] = ()
    """The earlier decision."""

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.until <= self.since:
            raise ConfigError("--until must be later than --since")

    def matches(self, verdict: Verdict) -> bool:
        # A producer that predates `submitted_at` left 0: its verdict's time stands in.
        when = verdict.submitted_at or verdict.detected_at
        return (
            (self.since is None or when >= self.since)
            and (self.until is None or when < self.until)
            and (not self.sources or verdict.source in self.sources)
            and (not self.decisions or verdict.decision in self.decisions)
        )

    def describe(self) -> dict[str, Any]:
        return {
            "since": self.since,
            "until": self.until,
            "source": list(self.sources),
            "decision": list(self.decisions),
        }


def check_decisions(values: Sequence[str]) -> tuple[Decision, ...]:
    """`--decision` values, each one of the four decisions; ConfigError otherwise."""
    out: list[Decision] = []
    for value in values:
        if value not in DECISIONS:
            raise ConfigError(f"--decision: {value!r} is not one of {', '.join(DECISIONS)}")
        out.append(value)
    return tuple(out)


# -- the diff -----------------------------------------------------------------------------


class SignalChange(msgspec.Struct, frozen=True, kw_only=True):
    """A signal whose calibrated score moved, or that is only in one of the verdicts."""

    name: str
    status: Literal["moved", "appeared", "disappeared"]
    before: float | None
    after: float | None
    change: float | None
    """after - before; None for a signal in only one verdict."""
    raw_before: float | None = None
    raw_after: float | None = None
    """The scores before calibration: unchanged raw with a moved score means the
    calibration moved, not the model."""


class Change(msgspec.Struct, frozen=True, kw_only=True):
    before: Any
    after: Any


class ItemDiff(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    """What a reader recognises the item by: its file or URL's last part."""
    source: str
    url: str
    status: Literal["rescanned", "error", "pending"]
    """`error`: not re-scanned (`reason`, `error` say why); `pending`: re-submitted to
    the pipeline, no new verdict before the timeout."""
    previous_decision: Decision
    decision: Decision | None = None
    flipped: bool = False
    transition: str | None = None
    """`pass -> flag` for a flipped item."""
    previous_score: float | None = None
    score: float | None = None
    score_change: float | None = None
    model_set: Change | None = None
    policy_version: Change | None = None
    decided_by: Change | None = None
    signals: list[SignalChange] = []
    """Why: appeared and disappeared signals first, then moved ones by |change|."""
    previous_detected_at: float = 0.0
    detected_at: float | None = None
    reason: str | None = None
    error: str | None = None


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    items: int
    rescanned: int
    flipped: int
    unchanged: int
    errors: int
    pending: int
    transitions: dict[str, int]
    """Flipped items by `before -> after`."""


class RescanDiff(msgspec.Struct, frozen=True, kw_only=True):
    run: str
    mode: Literal["embedded", "cluster"]
    created_at: float
    summary: Summary
    items: list[ItemDiff]
    filters: dict[str, Any] = {}
    input_skipped: int = 0
    """Input lines or records without a verdict (see `Loaded.skipped`)."""


@dataclass(frozen=True)
class Outcome:
    """One selected item after the re-scan: its new verdict, or why there is none."""

    previous: Verdict
    new: Verdict | None = None
    reason: str | None = None
    """`missing`, `changed`, `pending`, or the error's reason (`corrupt_media`, ...)."""
    error: str | None = None


def item_name(verdict: Verdict) -> str:
    """The last part of the item's URL (a file name), else its source, else its id."""
    for text in (verdict.url, verdict.source):
        leaf = text.split("?", 1)[0].split("#", 1)[0].rstrip("/").rsplit("/", 1)[-1]
        if leaf:
            return leaf
    return verdict.id


def signal_changes(before: Verdict, after: Verdict) -> list[SignalChange]:
    """The signals that explain a changed score: those in only one verdict (a new
    `match`, a model that no longer runs), then those whose calibrated score moved,
    largest move first. Signals are matched by name."""
    old = {s.name: s for s in before.signals}
    new = {s.name: s for s in after.signals}
    only: list[SignalChange] = []
    moved: list[SignalChange] = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None and b is not None:
            only.append(
                SignalChange(
                    name=name,
                    status="appeared",
                    before=None,
                    after=b.score,
                    change=None,
                    raw_after=b.raw_score,
                )
            )
        elif b is None and a is not None:
            only.append(
                SignalChange(
                    name=name,
                    status="disappeared",
                    before=a.score,
                    after=None,
                    change=None,
                    raw_before=a.raw_score,
                )
            )
        elif a is not None and b is not None and abs(b.score - a.score) > SCORE_EPSILON:
            moved.append(
                SignalChange(
                    name=name,
                    status="moved",
                    before=a.score,
                    after=b.score,
                    change=round(b.score - a.score, 6),
                    raw_before=a.raw_score,
                    raw_after=b.raw_score,
                )
            )
    moved.sort(key=lambda c: (-abs(c.change or 0.0), c.name))
    return only + moved


def item_diff(outcome: Outcome) -> ItemDiff:
    prev, new = outcome.previous, outcome.new
    common: dict[str, Any] = {
        "id": prev.id,
        "name": item_name(prev),
        "source": prev.source,
        "url": prev.url,
        "previous_decision": prev.decision,
        "previous_score": prev.synthetic_score,
        "previous_detected_at": prev.detected_at,
    }
    if new is None:
        status: Literal["error", "pending"] = "pending" if outcome.reason == "pending" else "error"
        return ItemDiff(**common, status=status, reason=outcome.reason, error=outcome.error)
    flipped = new.decision != prev.decision
    change = (
        round(new.synthetic_score - prev.synthetic_score, 6)
        if new.synthetic_score is not None and prev.synthetic_score is not None
        else None
    )
    return ItemDiff(
        **common,
        status="rescanned",
        decision=new.decision,
        flipped=flipped,
        transition=f"{prev.decision} -> {new.decision}" if flipped else None,
        score=new.synthetic_score,
        score_change=change,
        model_set=Change(before=prev.model_set, after=new.model_set),
        policy_version=Change(before=prev.policy_version, after=new.policy_version),
        decided_by=Change(before=prev.decided_by, after=new.decided_by),
        signals=signal_changes(prev, new),
        detected_at=new.detected_at,
    )


def diff(
    outcomes: Sequence[Outcome],
    *,
    run: str,
    mode: Literal["embedded", "cluster"],
    filters: Filters | None = None,
    input_skipped: int = 0,
    created_at: float | None = None,
) -> RescanDiff:
    """Compare each item's earlier verdict with its re-scan. Pure: no I/O."""
    items = [item_diff(o) for o in outcomes]
    transitions: dict[str, int] = {}
    for item in items:
        if item.transition is not None:
            transitions[item.transition] = transitions.get(item.transition, 0) + 1
    rescanned = sum(1 for i in items if i.status == "rescanned")
    flipped = sum(1 for i in items if i.flipped)
    summary = Summary(
        items=len(items),
        rescanned=rescanned,
        flipped=flipped,
        unchanged=rescanned - flipped,
        errors=sum(1 for i in items if i.status == "error"),
        pending=sum(1 for i in items if i.status == "pending"),
        transitions=dict(sorted(transitions.items(), key=lambda kv: (-kv[1], kv[0]))),
    )
    return RescanDiff(
        run=run,
        mode=mode,
        created_at=time.time() if created_at is None else created_at,
        summary=summary,
        items=items,
        filters=filters.describe() if filters is not None else {},
        input_skipped=input_skipped,
    )


def summary_line(d: RescanDiff) -> str:
    s = d.summary
    parts = [f"{s.items} item(s): {s.rescanned} re-scanned, {s.flipped} flipped"]
    if s.transitions:
        parts[0] += " (" + ", ".join(f"{k}: {v}" for k, v in s.transitions.items()) + ")"
    parts.append(f"{s.errors} error(s)")
    if d.mode == "cluster":
        parts.append(f"{s.pending} pending")
    return ", ".join(parts)


def to_json(d: RescanDiff) -> str:
    return json.dumps(msgspec.to_builtins(d), indent=2, sort_keys=False) + "\n"


# -- re-scanning --------------------------------------------------------------------------


def new_run_id() -> str:
    return uuid.uuid4().hex


def marker(previous: Verdict, run: str) -> Rescan:
    """What the item's earlier verdict said, for the new verdict (and alert) to carry."""
    return Rescan(
        run=run,
        previous_decision=previous.decision,
        previous_score=previous.synthetic_score,
        previous_model_set=previous.model_set,
        previous_policy_version=previous.policy_version,
        previous_detected_at=previous.detected_at,
    )


def _looks_like_blob_key(blob: str) -> bool:
    parts = blob.split("/")
    return len(parts) >= 4 and len(parts[-1]) == 64 and not Path(blob).is_absolute()


def rescan_embedded(
    settings: Settings,
    verdicts: Sequence[Verdict],
    *,
    run: str,
    workers: int = 2,
    on_progress: Callable[[int, int], None] = lambda _done, _total: None,
) -> list[Outcome]:
    """Scan each item again from its local file with one Engine; one Outcome per verdict,
    in order. A file that is gone or whose sha256 differs from the verdict's is that
    item's error; no model loads when no item is left to scan."""
    from synthwatch.operators import sandbox
    from synthwatch.operators.fetch import Fetcher

    outcomes: list[Outcome] = [Outcome(previous=v) for v in verdicts]
    ready: dict[int, Any] = {}  # index -> Fetched
    with Fetcher(settings.fetch, embedded=True) as fetcher:
        for n, prev in enumerate(verdicts):
            if not prev.blob:
                outcomes[n] = Outcome(prev, reason="missing", error="the verdict names no file")
                continue
            try:
                got = fetcher.fetch(prev.blob, Path(tempfile.gettempdir()))
            except InvalidRef as exc:  # gone, or no longer a readable regular file
                error = str(exc)
                if _looks_like_blob_key(prev.blob):
                    error += (
                        " (the blob is an object key: this verdict came from the pipeline; "
                        "re-scan it with --cluster)"
                    )
                elif prev.url.startswith(("http://", "https://")):
                    error += (
                        " (the item was scanned from a URL and its bytes were not kept; "
                        "scan the URL again)"
                    )
                outcomes[n] = Outcome(prev, reason="missing", error=error)
                continue
            except SynthwatchError as exc:
                outcomes[n] = Outcome(prev, reason=exc.reason, error=str(exc))
                continue
            if got.sha256 != prev.sha256:
                outcomes[n] = Outcome(
                    prev,
                    reason="changed",
                    error=(
                        f"{prev.blob} changed since the verdict: sha256 {got.sha256[:16]}…, "
                        f"the verdict was made on {prev.sha256[:16]}…; not re-scored"
                    ),
                )
                continue
            ready[n] = got
    if not ready:
        return outcomes
    sandbox.prestart(settings.sample.max_memory_mb, min(workers, len(ready)))
    _analyse(settings, verdicts, ready, outcomes, run, workers, on_progress)
    return outcomes


def _analyse(
    settings: Settings,
    verdicts: Sequence[Verdict],
    ready: dict[int, Any],
    outcomes: list[Outcome],
    run: str,
    workers: int,
    on_progress: Callable[[int, int], None],
) -> None:
    from synthwatch.pipeline.engine import Engine, Item
    from synthwatch.pipeline.scan import drain_on_interrupt

    with Engine(settings) as engine:

        def one(n: int) -> None:
            prev, got = verdicts[n], ready[n]
            item = Item(
                id=prev.id,
                url=prev.url,
                source=prev.source,
                submitted_at=time.time(),
                sha256=got.sha256,
                media_type=got.media_type,
                path=got.path,
                blob=str(got.path),
                mime=got.mime,
                rescan=marker(prev, run),
            )
            try:
                outcomes[n] = Outcome(prev, new=engine.analyze(item).verdict)
            except SynthwatchError as exc:
                outcomes[n] = Outcome(prev, reason=exc.reason, error=str(exc))
            except Exception as exc:  # a bug must not lose the other items' verdicts
                outcomes[n] = Outcome(prev, reason="internal", error=f"{type(exc).__name__}: {exc}")

        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rescan") as pool:
            on_progress(0, len(ready))
            try:
                for done, _ in enumerate(pool.map(one, sorted(ready)), 1):
                    on_progress(done, len(ready))
            except KeyboardInterrupt:
                drain_on_interrupt(pool)
                raise


def rescan_cluster(
    settings: Settings,
    verdicts: Sequence[Verdict],
    *,
    run: str,
    timeout_s: float,
    on_progress: Callable[[int, int], None] = lambda _done, _total: None,
) -> list[Outcome]:
    """Send each item's stored blob through `media.refs` again with the re-scan marker,
    and collect the pipeline's new verdicts (matched on id and run) from the verdicts
    topic, followed from its end as it was before the first send. A dead letter for a
    re-sent item is its error; what has not arrived after `timeout_s` is `pending`.

    Raises BrokerUnavailable or StorageFailed when Kafka or the bucket cannot be used.
    """
    from synthwatch.operators.store import S3Store, blob_key, s3_client
    from synthwatch.pipeline.cluster import ClusterLink
    from synthwatch.pipeline.kafka import produce_refs

    outcomes: list[Outcome] = [Outcome(previous=v) for v in verdicts]
    store = S3Store(s3_client(settings.s3), settings.s3.bucket)
    refs: dict[str, tuple[int, MediaRef]] = {}
    for n, prev in enumerate(verdicts):
        expected = blob_key(settings.s3.blob_prefix, prev.sha256)
        if prev.blob != expected:
            outcomes[n] = Outcome(
                prev,
                reason="invalid_ref",
                error=(
                    f"blob {prev.blob!r} is not this pipeline's blob of its sha256 "
                    f"({expected}); a verdict of `synthwatch scan` is re-scanned without "
                    "--cluster"
                ),
            )
            continue
        if not _blob_exists(store, expected):
            outcomes[n] = Outcome(
                prev,
                reason="missing",
                error=f"s3://{settings.s3.bucket}/{expected} is no longer in the bucket",
            )
            continue
        refs[prev.id] = (
            n,
            MediaRef(
                id=prev.id,
                url=f"s3://{settings.s3.bucket}/{expected}",
                source=prev.source,
                submitted_at=time.time(),
                rescan=marker(prev, run),
            ),
        )
    if not refs:
        return outcomes

    lock = threading.Lock()
    arrived = threading.Event()
    waiting = {media_id: n for media_id, (n, _ref) in refs.items()}

    def settle(media_id: str, outcome: Callable[[Verdict], Outcome]) -> None:
        with lock:
            n = waiting.pop(media_id, None)
            if n is None:
                return  # another run's record, or a redelivery
            outcomes[n] = outcome(verdicts[n])
            on_progress(len(refs) - len(waiting), len(refs))
            if not waiting:
                arrived.set()

    def on_verdict(verdict: Verdict) -> None:
        if verdict.rescan is None or verdict.rescan.run != run:
            return

        def outcome(prev: Verdict) -> Outcome:
            if verdict.sha256 != prev.sha256:  # content-addressed: a broken store
                return Outcome(
                    prev,
                    reason="changed",
                    error=f"the pipeline read sha256 {verdict.sha256[:16]}… for this blob",
                )
            return Outcome(prev, new=verdict)

        settle(verdict.id, outcome)

    def on_dead_letter(letter: DeadLetter) -> None:
        if letter.id is None or _run_of(letter.original) != run:
            return
        error = f"{letter.stage}: {letter.error}"
        settle(letter.id, lambda prev: Outcome(prev, reason=letter.reason, error=error))

    link = ClusterLink(
        settings, on_verdict=on_verdict, on_alert=lambda _a: None, on_dead_letter=on_dead_letter
    )
    link.start()  # positions fixed at the topics' ends: no new verdict can be missed
    try:
        on_progress(0, len(refs))
        asyncio.run(produce_refs(settings, [ref for _n, ref in refs.values()]))
        arrived.wait(timeout_s)
    finally:
        link.close()
    with lock:
        for media_id, n in waiting.items():
            outcomes[n] = Outcome(
                verdicts[n],
                reason="pending",
                error=f"re-submitted as {media_id}; no new verdict within {timeout_s:g} s",
            )
    return outcomes


def _blob_exists(store: Any, key: str) -> bool:
    from botocore.exceptions import BotoCoreError

    try:
        return bool(store.exists(key))
    except BotoCoreError as exc:
        raise StorageFailed(f"S3 unreachable: {type(exc).__name__}") from None


def _run_of(original: str) -> str | None:
    """The re-scan run named by a dead letter's original record (a MediaRef or a
    FetchedMedia as JSON), if any."""
    try:
        obj = json.loads(original)
    except ValueError:
        return None
    marker_obj = obj.get("rescan") if isinstance(obj, dict) else None
    run = marker_obj.get("run") if isinstance(marker_obj, dict) else None
    return run if isinstance(run, str) else None
