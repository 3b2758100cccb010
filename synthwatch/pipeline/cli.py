"""The `synthwatch` command line: scan (embedded), worker, submit, topics, models, alerts,
verify and keys.

Errors a user can cause (a missing file, an unsupported format, a refused address,
missing weights) print one line and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from synthwatch.errors import ConfigError, SynthwatchError
from synthwatch.pipeline.scan import (
    ScanResult,
    exit_on_next_interrupt,
    expand_sources,
    scan_all,
    shown_source,
)
from synthwatch.pipeline.settings import Settings
from synthwatch.schemas import encode

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Scan media for synthetic content (deepfake video, generated images).",
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(no_args_is_help=True, help="List, import and pull detector weights.")
topics_app = typer.Typer(no_args_is_help=True, help="Manage the Kafka topics.")
app.add_typer(models_app, name="models")
dlq_app = typer.Typer(no_args_is_help=True, help="Inspect and replay the dead-letter topic.")
app.add_typer(topics_app, name="topics")
app.add_typer(dlq_app, name="dlq")
alerts_app = typer.Typer(
    no_args_is_help=True, help="Work with alert records (alert.v2; alert.v1 is still read)."
)
app.add_typer(alerts_app, name="alerts")
keys_app = typer.Typer(no_args_is_help=True, help="The key that signs evidence bundles.")
app.add_typer(keys_app, name="keys")

err = Console(stderr=True)
out = Console()

P = ParamSpec("P")
R = TypeVar("R")


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can cause into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except SynthwatchError as exc:
            # escape: a message may hold brackets (`synthwatch[train]`, a file name)
            # that rich would otherwise read as markup and drop.
            err.print(
                f"[bold red]error[/] ({exc.reason}): {escape(str(exc))}",
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(2) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            err.print(
                f"[bold red]error[/] (settings): {escape(where)}: {escape(first['msg'])}",
                highlight=False,
            )
            raise typer.Exit(2) from None
        except OSError as exc:  # an unwritable output or evidence path, a full disk
            err.print(
                f"[bold red]error[/] (os): {escape(str(exc))}", highlight=False, soft_wrap=True
            )
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


FLAGS = {
    "models__backend": "--backend",
    "sample__frames": "--frames",
    "models__allow_missing": "--allow-missing-models",
}
"""The command-line option behind each setting a command may override."""


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with CLI flags layered on top, every value
    validated: a bad one is a `ConfigError` naming the variable or the option."""
    from synthwatch.pipeline import settings as settings_mod

    settings = settings_mod.load()
    update: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition("__")
        if not key:
            update[section] = value
            continue
        current = update.get(section) or getattr(settings, section)
        try:
            update[section] = type(current).model_validate({**current.model_dump(), key: value})
        except ValidationError as exc:
            flag = FLAGS.get(dotted, dotted)
            raise ConfigError(
                settings_mod.validation_line(exc, where=functools.partial(_named, flag))
            ) from None
    return settings.model_copy(update=update) if update else settings


AllowMissing = Annotated[
    bool,
    typer.Option(
        "--allow-missing-models",
        help="Run with the models that are installed when some listed ones are missing or "
        "altered; each verdict names what did not run, and an item nothing else can score "
        "is inconclusive.",
    ),
]


def _named(flag: str, _loc: tuple[str | int, ...]) -> str:
    return flag


@app.command()
@user_errors
def scan(
    sources: Annotated[list[str], typer.Argument(help="Files, directories or http(s) URLs.")],
    json_out: Annotated[
        str | None,
        typer.Option("--json", help="Write one JSON object per item to FILE, or - for stdout."),
    ] = None,
    evidence_dir: Annotated[
        Path | None, typer.Option(help="Write evidence bundles for alerting items here.")
    ] = None,
    alerts_out: Annotated[
        Path | None,
        typer.Option(
            "--alerts",
            help=(
                "Write the alert of each alerting item to FILE as alert.v2 JSON lines, the "
                "records the Kafka pipeline puts on media.alerts (for `alerts convert` and "
                "`alerts send`). Needs --evidence-dir: each alert points to its bundle."
            ),
        ),
    ] = None,
    backend: Annotated[
        str | None, typer.Option(help="auto | onnxruntime | torch | tensorrt")
    ] = None,
    frames: Annotated[int | None, typer.Option(help="Frames sampled per video.")] = None,
    workers: Annotated[int, typer.Option(help="Items decoded at once.")] = 2,
    allow_missing_models: AllowMissing = False,
) -> None:
    """Scan local files or URLs in this process (no broker) and print the verdicts."""
    from synthwatch.operators.store import LocalStore
    from synthwatch.pipeline import logs

    settings = load_settings(
        models__backend=backend,
        sample__frames=frames,
        models__allow_missing=True if allow_missing_models else None,
    )
    if workers < 1:
        raise ConfigError(f"--workers: must be at least 1 (got {workers})")
    logs.configure("WARNING", settings.log_json)
    items = expand_sources(sources)
    if not items:
        err.print("[bold red]error[/]: nothing to scan (no media files found)")
        raise typer.Exit(2)
    if alerts_out is not None and evidence_dir is None:
        raise ConfigError(
            "--alerts needs --evidence-dir: every alert points to its signed evidence bundle"
        )
    if evidence_dir is not None:
        _check_writable_dir(evidence_dir, "--evidence-dir")
    if alerts_out is not None:
        _check_writable_dir(alerts_out.parent, "--alerts")
    json_fh = _open_json(json_out)
    alerts_fh = alerts_out.open("wb") if alerts_out is not None else None
    store = LocalStore(evidence_dir) if evidence_dir else None

    def write(res: ScanResult) -> None:
        if alerts_fh is not None and res.alert is not None:
            alerts_fh.write(encode(res.alert) + b"\n")
            alerts_fh.flush()
        if json_fh is not None:
            line = (
                res.record
                if res.error is None
                else {
                    "source": shown_source(res.source),
                    "error": res.reason,
                    "message": res.error,
                }
            )
            json_fh.write(json.dumps(line, sort_keys=True) + "\n")
            json_fh.flush()

    try:
        with _progress() as progress:
            task = progress.add_task("scanning", total=None)
            results = scan_all(
                settings,
                items,
                store=store,
                workers=workers,
                on_result=write,
                on_progress=lambda done, total: progress.update(task, completed=done, total=total),
            )
    except KeyboardInterrupt:
        # The items in flight are done and every line written is flushed: leave at once
        # rather than through an interpreter shutdown a second Ctrl-C could break off.
        err.print("interrupted")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    # Every verdict is written and the engine closed: an interrupt now could only cut
    # the shutdown short, so it ends the process cleanly instead.
    exit_on_next_interrupt()
    if json_fh is not None and json_fh is not sys.stdout:
        json_fh.close()
    if alerts_fh is not None:
        alerts_fh.close()
    _print_table(results, to_stderr=json_out == "-")
    alerted = sum(1 for r in results if "evidence" in r.record)
    if store is not None and alerted:
        err.print(f"evidence bundles for {alerted} item(s) in {evidence_dir}", highlight=False)
    if alerts_out is not None:
        err.print(f"{alerted} alert(s) written to {alerts_out}", highlight=False)
    if json_out not in (None, "-"):
        err.print(f"verdicts written to {json_out}", highlight=False)
    if any(r.error for r in results):
        raise typer.Exit(1)


def _check_writable_dir(path: Path, option: str) -> None:
    """Create `path` if needed and prove a file can be written there, before any item
    is scanned: a typo must not surface on the first alerting item, minutes in."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".synthwatch-write-check-") as probe:
            probe.write(b"synthwatch")  # deleted on close
            probe.flush()
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot write there ({exc.strerror or exc})") from None


def _open_json(json_out: str | None) -> Any:
    if json_out is None:
        return None
    if json_out == "-":
        return sys.stdout
    path = Path(json_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.open("w", encoding="utf-8")


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )


_DECISION_STYLE = {
    "flag": "bold red",
    "review": "yellow",
    "pass": "green",
    "inconclusive": "bold magenta",
}


def _print_table(results: list[ScanResult], *, to_stderr: bool) -> None:
    table = Table(title="synthwatch verdicts", title_justify="left")
    table.add_column("source", overflow="fold")
    table.add_column("type")
    table.add_column("score", justify="right")
    table.add_column("decision")
    table.add_column("faces", justify="right")  # distinct faces, tracked across frames
    table.add_column("notes / error", overflow="fold")
    for r in results:
        if r.error is not None:
            table.add_row(
                escape(r.source), "-", "-", f"[red]error: {r.reason}[/]", "-", escape(r.error)
            )
            continue
        rec = r.record
        decision = rec["decision"]
        score = rec["synthetic_score"]
        table.add_row(
            escape(r.source),
            rec["media_type"],
            "-" if score is None else f"{score:.3f}",
            f"[{_DECISION_STYLE[decision]}]{decision}[/]",
            str(rec["faces_found"]),
            escape("; ".join(rec.get("notes", []))),
        )
    (err if to_stderr else out).print(table)


@app.command()
@user_errors
def worker(
    role: Annotated[
        str,
        typer.Option(help="fetch | detect | decide | sink | all (all: sink when its URL is set)"),
    ] = "all",
    allow_missing_models: AllowMissing = False,
) -> None:
    """Run a streaming worker for one role (or all) against Kafka and S3."""
    from synthwatch.pipeline import logs, topology

    if role not in ("fetch", "detect", "decide", "sink", "all"):
        err.print(
            f"[bold red]error[/]: unknown role {role!r}: use fetch, detect, decide, sink or all"
        )
        raise typer.Exit(2)
    settings = load_settings(models__allow_missing=True if allow_missing_models else None)
    logs.configure(settings.log_level, settings.log_json)
    topology.run_worker(settings, role)  # type: ignore[arg-type]


@app.command()
@user_errors
def submit(
    urls: Annotated[list[str], typer.Argument(help="http(s):// or s3:// URLs to scan.")],
    source: Annotated[str, typer.Option(help="Name of the feed these come from.")] = "cli",
) -> None:
    """Produce one MediaRef per URL to the refs topic; prints the ids."""
    import asyncio

    from synthwatch.pipeline.kafka import produce_refs
    from synthwatch.schemas import MediaRef

    settings = load_settings()
    refs = [
        MediaRef(id=uuid.uuid4().hex, url=u, source=source, submitted_at=time.time()) for u in urls
    ]
    asyncio.run(produce_refs(settings, refs))
    for ref in refs:
        typer.echo(f"{ref.id}\t{ref.url}")  # plain: scripts parse these lines


@topics_app.command("create")
@user_errors
def topics_create() -> None:
    """Create the pipeline's topics (idempotent)."""
    import asyncio

    from synthwatch.pipeline.kafka import create_topics

    settings = load_settings()
    created = asyncio.run(create_topics(settings))
    for name, was_created in created.items():
        out.print(f"{name}\t{'created' if was_created else 'exists'}")


@dlq_app.command("replay")
@user_errors
def dlq_replay(
    reason: Annotated[
        list[str] | None, typer.Option(help="Only this reason (repeatable), e.g. storage.")
    ] = None,
    stage: Annotated[
        list[str] | None,
        typer.Option(help="Only this stage (repeatable): fetch, detect, decide, sink."),
    ] = None,
    media_id: Annotated[
        list[str] | None, typer.Option("--id", help="Only this media id (repeatable).")
    ] = None,
    since: Annotated[
        float | None, typer.Option(help="Only records dead-lettered at or after this Unix time.")
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Replay at most this many.")] = None,
    dry_run: Annotated[
        bool, typer.Option(help="List what would be replayed; send nothing.")
    ] = False,
) -> None:
    """Re-submit dead-lettered records to their stage's input topic, after a fix.

    Prints one line per matching record: `replayed|would replay|skipped`, the media id,
    stage, reason and the DLQ partition:offset it came from.
    """
    import asyncio

    from synthwatch.pipeline.kafka import replay_dlq

    settings = load_settings()
    done = asyncio.run(
        replay_dlq(
            settings,
            reasons=reason or (),
            stages=stage or (),
            ids=media_id or (),
            since=since,
            limit=limit,
            dry_run=dry_run,
        )
    )
    sent = 0
    for r in done:
        if r.target is None:
            what = f"skipped ({r.why_not})"
        else:
            what = "would replay" if dry_run else "replayed"
            sent += 1
        typer.echo(
            f"{what}\t{r.letter.id or '-'}\t{r.letter.stage}\t{r.letter.reason}"
            f"\t{r.partition}:{r.offset}\t{r.target or '-'}"
        )
    verb = "would replay" if dry_run else "replayed"
    err.print(f"{verb} {sent} of {len(done)} matching dead letters", highlight=False)


@alerts_app.command("convert")
@user_errors
def alerts_convert(
    file: Annotated[
        str,
        typer.Argument(
            help="alert.v2 or alert.v1 JSON lines (e.g. from kafka-console-consumer); - is stdin."
        ),
    ] = "-",
    fmt: Annotated[str, typer.Option("--format", help="native | ocsf | splunk_hec")] = "ocsf",
) -> None:
    """Print each alert line as native JSON, an OCSF Detection Finding or a Splunk HEC
    event, one per line. A bad line is reported on stderr with its line number, the
    others are still converted, and the exit code is 1."""

    from synthwatch.operators.siem import FORMATS, format_alert

    if fmt not in FORMATS:
        err.print(f"[bold red]error[/]: unknown format {fmt!r}: use {', '.join(FORMATS)}")
        raise typer.Exit(2)
    sink = load_settings().sink
    bad = 0
    for alert in _alert_lines(file):
        if alert is None:
            bad += 1
            continue
        body = format_alert(
            alert,
            fmt,
            sourcetype=sink.splunk_sourcetype,
            index=sink.splunk_index,
        )
        typer.echo(body.decode())
    if bad:
        err.print(f"{bad} line(s) not converted", highlight=False)
        raise typer.Exit(1)


@alerts_app.command("send")
@user_errors
def alerts_send(
    file: Annotated[
        str,
        typer.Argument(
            help="alert.v2 or alert.v1 JSON lines (e.g. from scan --alerts); - is stdin."
        ),
    ] = "-",
) -> None:
    """Deliver each alert line to the configured sink (SYNTHWATCH_SINK__URL, in its
    format, signed with SYNTHWATCH_SINK__SECRET), with the worker's retries: the
    webhook sink for a one-machine deployment. A bad or undeliverable line is reported
    with its line number, the others are still sent, and the exit code is 1."""
    from synthwatch.operators.webhook import WebhookSink

    failed = 0
    sent = 0
    with WebhookSink(load_settings().sink) as sink:
        for alert in _alert_lines(file):
            if alert is None:
                failed += 1
                continue
            try:
                sink.deliver(alert)
            except SynthwatchError as exc:
                failed += 1
                err.print(
                    f"[bold red]error[/] ({exc.reason}): alert {alert.alert_id}: "
                    f"{escape(str(exc))}",
                    highlight=False,
                    soft_wrap=True,
                )
                continue
            sent += 1
        err.print(f"{sent} alert(s) delivered to {escape(sink.endpoint)}", highlight=False)
    if failed:
        err.print(f"{failed} line(s) not delivered", highlight=False)
        raise typer.Exit(1)


def _alert_lines(file: str) -> Iterator[Any]:
    """Each alert of a JSON-lines file (or stdin), or None for a line that is not one,
    after printing which line and why."""
    from synthwatch.schemas import Alert, decode

    with sys.stdin.buffer if file == "-" else open(file, "rb") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield decode(line, Alert)
            except SynthwatchError as exc:
                err.print(
                    f"[bold red]error[/] ({exc.reason}): line {number}: {escape(str(exc))}",
                    highlight=False,
                    soft_wrap=True,
                )
                yield None


@app.command()
@user_errors
def verify(
    bundle: Annotated[
        str,
        typer.Argument(
            help="An evidence bundle: its folder (or its manifest.json), or s3://bucket/prefix."
        ),
    ],
    keys: Annotated[
        list[Path] | None,
        typer.Option("--key", help="Also trust this public key (PEM); may be repeated."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check a bundle's Ed25519 signature, every object's sha256 and size, and that
    nothing was added; name each object altered, missing or added.

    Exit code: 0 intact and signed by a trusted key; otherwise the sum of 4 (signature
    does not verify: manifest or signature altered), 8 (unsigned, or signed by a key
    you do not trust), 16 (an object altered), 32 (an object missing), 64 (an object
    added); 2 when BUNDLE is not an evidence bundle. Trusted keys: the current signing
    key, signing.trusted_keys_dir's *.pem (keep old keys there after a rotation), --key.
    """
    from synthwatch.operators.evidence import verify_bundle
    from synthwatch.operators.signing import trusted_keys

    settings = load_settings()
    store, folder = _bundle_location(bundle, settings)
    check = verify_bundle(store, folder, trusted_keys(settings.signing, keys))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "bundle": store.uri(folder),
                    "verified": check.exit_code == 0,
                    "exit_code": check.exit_code,
                    "signature": check.signature,
                    "key_id": check.key_id,
                    "objects": check.objects,
                    "altered": check.altered,
                    "missing": check.missing,
                    "added": check.added,
                    "problems": check.problems,
                },
                sort_keys=True,
            )
        )
    elif check.exit_code == 0:
        out.print(
            f"[green]verified[/]: {escape(store.uri(folder))}: signature valid "
            f"(Ed25519, key {check.key_id}), {check.objects} object(s) intact, none added",
            highlight=False,
            soft_wrap=True,
        )
    else:
        out.print(f"[bold red]NOT verified[/]: {escape(store.uri(folder))}", highlight=False)
        for line in check.problems:
            out.print(f"  - {escape(line)}", highlight=False, soft_wrap=True)
    raise typer.Exit(check.exit_code)


def _bundle_location(bundle: str, settings: Settings) -> tuple[Any, str]:
    """(store, folder key) of a bundle named by a local path or an s3:// URI."""
    from synthwatch.operators.store import LocalStore, S3Store, s3_client

    if bundle.startswith("s3://"):
        bucket, _, key = bundle[len("s3://") :].partition("/")
        key = key.rstrip("/").removesuffix("/manifest.json").removesuffix("manifest.json")
        if not bucket or not key:
            raise ConfigError(f"{bundle}: name a bundle as s3://bucket/prefix/bundle")
        return S3Store(s3_client(settings.s3), bucket), key.rstrip("/")
    path = Path(bundle)
    if path.name == "manifest.json":
        path = path.parent
    if not path.is_dir():
        raise ConfigError(f"{bundle}: no such bundle folder")
    path = path.resolve()
    return LocalStore(path.parent), path.name


@keys_app.command("show")
@user_errors
def keys_show() -> None:
    """Print the evidence signing key's id and public key (PEM), and where it is kept.
    Publish the public key so readers of your bundles can verify them."""
    from synthwatch.operators.signing import Signer

    signer = Signer.from_settings(load_settings().signing)
    err.print(f"key id: {signer.key_id} (Ed25519), from {escape(signer.source)}", highlight=False)
    typer.echo(signer.public_pem, nl=False)


@keys_app.command("generate")
@user_errors
def keys_generate(
    path: Annotated[Path, typer.Argument(help="Where to write the new private key (PEM).")],
) -> None:
    """Create a new Ed25519 signing key (mode 0600; never over an existing file). Point
    signing.key_file at it, or store it in a Kubernetes Secret; to rotate, put the old
    public key in signing.trusted_keys_dir so earlier bundles keep verifying."""
    from synthwatch.operators.signing import Signer, write_new_key

    signer = Signer(write_new_key(path), str(path))
    err.print(f"wrote {escape(str(path))}: key id {signer.key_id}", highlight=False)
    typer.echo(signer.public_pem, nl=False)


@models_app.command("list")
@user_errors
def models_list() -> None:
    """Show every registered model and whether its weights are in place."""
    from synthwatch.models.registry import ModelStore

    settings = load_settings()
    store = ModelStore(settings.model_dir)
    table = Table(title=f"models in {settings.model_dir}", title_justify="left")
    for col in ("name", "version", "status", "path"):
        table.add_column(col, overflow="fold")
    for st in store.list():
        style = {"present": "green", "missing": "yellow"}.get(st.state, "red")
        paths = ", ".join(str(p) for p in st.paths)
        table.add_row(st.name, st.version, f"[{style}]{st.state}[/]", paths)
    out.print(table)


@models_app.command("pull")
@user_errors
def models_pull(names: Annotated[list[str], typer.Argument(help="Registry names.")]) -> None:
    """Download weights from their upstream source, verifying the sha256."""
    from synthwatch.models.registry import ModelStore

    store = ModelStore(load_settings().model_dir)
    for name in names:
        for path in store.pull(name):
            out.print(f"{name}\t{path}", highlight=False)


@models_app.command("import")
@user_errors
def models_import(files: Annotated[list[Path], typer.Argument(help="Weight files.")]) -> None:
    """Copy weight files into the model directory, identified by their sha256."""
    from synthwatch.models.registry import ModelStore

    store = ModelStore(load_settings().model_dir)
    for f in files:
        spec = store.import_file(f)
        out.print(f"{f}\t-> {spec.name}")


def _scan_labelled(
    settings: Settings, label_files: list[Path], workers: int, geometry: int | None = None
) -> tuple[list[Any], list[str]]:
    """Scan every item of the label files; (scored items, `name (sha256)` of each file).
    With `geometry`, stills are scanned as `ev.normalise_geometry` copies."""
    from synthwatch.pipeline import evaluate as ev
    from synthwatch.pipeline import logs
    from synthwatch.train.labels import read_labels

    logs.configure("WARNING", settings.log_json)
    labelled = [item for f in label_files for item in read_labels(f)]
    with tempfile.TemporaryDirectory(prefix="synthwatch-geometry-") as tmp:
        sources = [
            str(ev.normalise_geometry(i.path, Path(tmp) / f"{n}.png", geometry))
            if geometry is not None
            else str(i.path)
            for n, i in enumerate(labelled)
        ]
        results = scan_all(settings, sources, workers=workers)
    scored = [
        ev.Scored(item=i, verdict=r.verdict, error=r.error or "")
        for i, r in zip(labelled, results, strict=True)
    ]
    for s in scored:
        if s.verdict is None:
            err.print(f"[yellow]not scanned[/]: {s.item.rel}: {s.error}", highlight=False)
    return scored, [ev.file_id(f) for f in label_files]


@app.command()
@user_errors
def calibrate(
    labels: Annotated[list[Path], typer.Option("--labels", help="CSV path,label (repeatable).")],
    out_path: Annotated[Path, typer.Option("--out", help="Calibration file to write.")] = Path(
        "calibration.json"
    ),
    method: Annotated[str, typer.Option(help="platt | isotonic")] = "platt",
    workers: Annotated[int, typer.Option(help="Items decoded at once.")] = 2,
    allow_missing_models: AllowMissing = False,
) -> None:
    """Fit a per-model calibration on labelled media and save it.

    Use it with SYNTHWATCH_MODELS__CALIBRATION=FILE. Calibrators are bound to the exact
    model versions they were fitted on.
    """
    from synthwatch.operators import calibrate as cal
    from synthwatch.pipeline import evaluate as ev

    if method not in ("platt", "isotonic"):
        raise typer.BadParameter("--method must be platt or isotonic")
    # Fit on the models' own scores: a calibration already in use must not shape its
    # successor, so scan with none.
    empty = Path(tempfile.mkdtemp(prefix="synthwatch-cal-")) / "none.json"
    cal.save(cal.EMPTY, empty)
    settings = load_settings(
        models__calibration=empty,
        models__allow_missing=True if allow_missing_models else None,
    )
    scored, fitted_on = _scan_labelled(settings, labels, workers)
    fitted = ev.fit_calibration(
        scored,
        method="isotonic" if method == "isotonic" else "platt",
        fitted_on=fitted_on,
        warn=lambda m: err.print(f"[yellow]{m}[/]", highlight=False),
    )
    cal.save(fitted, out_path)
    table = Table(title=f"calibration ({method}) -> {out_path}", title_justify="left")
    for col in ("signal", "model", "n", "fake", "a", "b"):
        table.add_column(col)
    for c in fitted.calibrators:
        table.add_row(c.signal, c.model, str(c.n), str(c.n_fake), f"{c.a:.3f}", f"{c.b:.3f}")
    out.print(table)


@app.command("eval")
@user_errors
def eval_cmd(
    labels: Annotated[list[Path], typer.Option("--labels", help="CSV path,label (repeatable).")],
    json_path: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
    plot: Annotated[Path | None, typer.Option(help="Write ROC curves here (png/svg/pdf).")] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Write the tables as Markdown here.")
    ] = None,
    folds: Annotated[
        int, typer.Option(help="Cross-validation folds for refitted calibration (0: skip).")
    ] = 5,
    geometry: Annotated[
        int | None,
        typer.Option(
            min=32,
            help="Scan every still as a centre square crop resized to this side (PNG), so "
            "no detector can tell classes apart by size or aspect (ml72: 512).",
        ),
    ] = None,
    workers: Annotated[int, typer.Option(help="Items decoded at once.")] = 2,
    allow_missing_models: AllowMissing = False,
) -> None:
    """Scan labelled media and report AUC, EER, precision/recall/FPR per media type."""
    from synthwatch.models.registry import ModelStore
    from synthwatch.operators.policy import Policy
    from synthwatch.pipeline import evaluate as ev
    from synthwatch.pipeline.engine import load_calibration

    settings = load_settings(models__allow_missing=True if allow_missing_models else None)
    scored, fitted_on = _scan_labelled(settings, labels, workers, geometry)
    calibration, _ = load_calibration(settings.models)
    policy = Policy.from_settings(settings.policy)
    # Items our own models were trained on score better than unseen ones: mark them.
    used = {sig.model.split("@")[0] for s in scored if s.verdict for sig in s.verdict.signals}
    splits = ev.training_splits(ModelStore(settings.model_dir), used)
    report = ev.report(scored, calibration, policy, seen=ev.seen_in_training(scored, splits))
    report["labels"] = fitted_on
    report["geometry"] = geometry
    report["calibration_fitted_on"] = calibration.fitted_on
    report["signals"] = ev.signal_table(report)
    _print_eval(report, "as configured")
    _print_signals(report["signals"])
    if folds > 1:
        # A model trained here with cross-validation scores the items it was trained on
        # with the fold model that never saw them; the shipped model would be scoring
        # its own training data.
        unseen = ev.with_out_of_fold(scored, ev.out_of_fold(ModelStore(settings.model_dir), used))
        held_out = ev.cross_validate(unseen, policy, folds=folds)
        cv = ev.report(unseen, calibration, policy, scores_override=held_out)
        report["cross_validated"] = {
            "folds": folds,
            "overall": cv["overall"],
            "by_type": cv["by_type"],
            "by_group": cv["by_group"],
            "items": [
                {
                    "path": r["path"],
                    "synthetic_score": r["synthetic_score"],
                    "decision": r["decision"],
                }
                for r in cv["items"]
                if "error" not in r
            ],
        }
        _print_eval(cv, f"calibration refitted per fold ({folds}-fold cross-validation)")
        _print_groups(cv["by_group"])
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
        err.print(f"report written to {json_path}", highlight=False)
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(ev.markdown(report))
        err.print(f"tables written to {markdown}", highlight=False)
    if plot is not None:
        ev.plot_roc(report, plot, ", ".join(f.name for f in labels))
        err.print(f"ROC curves written to {plot}", highlight=False)
    if report["errors"]:
        raise typer.Exit(1)


def _print_groups(groups: dict[str, Any]) -> None:
    table = Table(
        title="by source or generator family, cross-validated (fakes ranked against all "
        "reals; FPR of each group's reals)",
        title_justify="left",
    )
    for col in ("group", "n", "fake", "inconclusive", "AUC", "recall@review", "FPR@review"):
        table.add_column(col, justify="right")

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    for name, m in groups.items():
        t = m["at_review"]
        table.add_row(
            name,
            str(m["n"]),
            str(m["n_fake"]),
            str(m["n_inconclusive"]),
            fmt(m["auc"]) if m["n_fake"] else "-",
            fmt(t["recall"]) if m["n_fake"] else "-",
            fmt(t["fpr"]) if m["n_real"] else "-",
        )
    out.print(table)


def _print_signals(rows: list[dict[str, Any]]) -> None:
    table = Table(
        title="each signal alone (raw AUC; then without the items its model was trained on)",
        title_justify="left",
    )
    for col in ("signal", "n", "fake", "AUC", "n unseen", "fake", "AUC unseen"):
        table.add_column(col, justify="right")
    for row in rows:
        a, u = row["all"], row["not_trained_on"]
        table.add_row(
            row["signal"],
            *(
                "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
                for v in (a["n"], a["n_fake"], a["auc"], u["n"], u["n_fake"], u["auc"])
            ),
        )
    out.print(table)


def _print_eval(report: dict[str, Any], title: str) -> None:
    table = Table(title=f"evaluation: {title}", title_justify="left")
    for col in (
        "type",
        "n",
        "fake",
        "inconclusive",
        "AUC",
        "EER",
        "thr",
        "precision",
        "recall",
        "FPR",
    ):
        table.add_column(col, justify="right")

    def fmt(v: Any) -> str:
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)

    rows = [*report["by_type"].items(), ("overall", report["overall"])]
    for name, m in rows:
        for key in ("at_review", "at_flag"):
            t = m[key]
            table.add_row(
                name if key == "at_review" else "",
                str(m["n"]) if key == "at_review" else "",
                str(m["n_fake"]) if key == "at_review" else "",
                f"{m['n_inconclusive']} ({m['inconclusive_rate'] or 0:.0%})"
                if key == "at_review"
                else "",
                fmt(m["auc"]) if key == "at_review" else "",
                fmt(m["eer"]) if key == "at_review" else "",
                fmt(t["threshold"]),
                fmt(t["precision"]),
                fmt(t["recall"]),
                fmt(t["fpr"]),
            )
    out.print(table)


@app.command()
@user_errors
def train(
    model: Annotated[
        str,
        typer.Argument(help="sbi (face model) | fingerprint (whole-image) | scene (stills)"),
    ],
    out_dir: Annotated[Path, typer.Option("--out", help="Directory for <name>.pt and .json.")],
    real: Annotated[
        list[Path] | None,
        typer.Option("--real", help="sbi, fingerprint: real images/videos (repeatable)."),
    ] = None,
    labels: Annotated[
        list[Path] | None,
        typer.Option("--labels", help="scene: CSV path,label[,group] (repeatable)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed; the same seed reproduces the weights.")] = 0,
    steps: Annotated[int | None, typer.Option(help="Override the recipe's step count.")] = None,
    folds: Annotated[int, typer.Option(min=2, help="scene: cross-validation folds.")] = 5,
    device: Annotated[
        str | None, typer.Option(help="cpu | cuda (default: cuda when present).")
    ] = None,
) -> None:
    """Train one of synthwatch's own detectors.

    sbi: self-blended images from real face crops (faces found with MTCNN when its
    weights are installed, else the LBP cascade). fingerprint: real photos against
    copies carrying simulated up-sampling traces; the sample photographs shipped inside
    scikit-image and scikit-learn are always included. scene: a logistic probe on frozen
    ImageNet MobileNetV2 features of labelled stills at one geometry, cross-validated
    (its report holds every item's out-of-fold score).
    """
    import importlib.util

    from synthwatch.models.registry import MOBILENET_V2, ModelStore
    from synthwatch.pipeline import logs
    from synthwatch.pipeline.engine import load_face_detector

    if importlib.util.find_spec("torch") is None:
        raise ConfigError(
            "training needs torch, which the scanner's install leaves out: "
            "pip install 'synthwatch[train]' (make test's .venv-dev has it)"
        )
    from synthwatch.train.loop import train_fingerprint, train_sbi

    if model not in ("sbi", "fingerprint", "scene"):
        raise ConfigError(f"MODEL must be sbi, fingerprint or scene (got {model!r})")
    if model == "scene" and not labels:
        raise ConfigError("scene needs --labels")
    if model != "scene" and not real:
        raise ConfigError(f"{model} needs --real")
    settings = load_settings()
    logs.configure(settings.log_level, settings.log_json)
    store = ModelStore(settings.model_dir)
    if model == "scene":
        from synthwatch.train.scene import train_scene

        backbone = store.file_path(MOBILENET_V2)
        if not backbone.is_file():
            raise ConfigError(
                f"scene: the ImageNet backbone is not at {backbone}; "
                "run `python -m synthwatch.models.fetch`"
            )
        report = train_scene(labels or [], out_dir, backbone=backbone, seed=seed, folds=folds)
        what = "cross-validated AUC"
    elif model == "sbi":
        detector, detector_name = load_face_detector(store, settings.models)
        err.print(f"faces found with {detector_name}", highlight=False)
        report = train_sbi(
            real or [], out_dir, face_detector=detector, seed=seed, steps=steps, device=device
        )
        what = "validation AUC"
    else:
        report = train_fingerprint(real or [], out_dir, seed=seed, steps=steps, device=device)
        what = "validation AUC"
    out.print(
        f"{report.name}: {report.weights} sha256 {report.weights_sha256} "
        f"{what} {report.val_auc:.4f} in {report.wall_time_s:.0f} s on {report.device}",
        highlight=False,
    )


@app.command()
@user_errors
def serve(
    host: Annotated[
        str | None, typer.Option(help="Address to bind (SYNTHWATCH_API__HOST; 127.0.0.1).")
    ] = None,
    port: Annotated[int | None, typer.Option(help="Port (SYNTHWATCH_API__PORT; 8080).")] = None,
    insecure_no_auth: Annotated[
        bool,
        typer.Option(
            "--insecure-no-auth",
            help="Serve without API keys, on a loopback address only: for local use.",
        ),
    ] = False,
    allow_missing_models: AllowMissing = False,
) -> None:
    """Serve the HTTP API and the review page; this process runs the scans (embedded
    mode). Needs API keys (SYNTHWATCH_API__KEYS_FILE or SYNTHWATCH_API__KEYS)."""
    from synthwatch.pipeline import api, logs

    settings = load_settings(
        api__host=host,
        api__port=port,
        models__allow_missing=True if allow_missing_models else None,
    )
    logs.configure(settings.log_level, settings.log_json)
    api.serve(settings, insecure_no_auth=insecure_no_auth)


@app.command()
@user_errors
def rescan(
    verdict_files: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="VERDICTS...",
            help="JSON-lines verdict files: what `scan --json` wrote, or verdict records.",
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            help="Only items submitted at or after this time: ISO 8601 (UTC when no zone "
            "is given) or Unix seconds."
        ),
    ] = None,
    until: Annotated[
        str | None, typer.Option(help="Only items submitted before this time (as --since).")
    ] = None,
    source: Annotated[
        list[str] | None, typer.Option(help="Only items from this source (repeatable).")
    ] = None,
    decision: Annotated[
        list[str] | None,
        typer.Option(help="Only items whose earlier decision was this (repeatable)."),
    ] = None,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write the diff as JSON to FILE.")
    ] = None,
    json_stdout: Annotated[
        bool, typer.Option("--json", help="Print the diff as JSON on stdout instead of a table.")
    ] = False,
    verdicts_out: Annotated[
        Path | None,
        typer.Option(help="Write the new verdicts to FILE as JSON lines (as `scan --json`)."),
    ] = None,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="Re-submit the items' stored blobs to the running pipeline (Kafka, "
            "SYNTHWATCH_KAFKA__*) and read its new verdicts; it alerts on every flip.",
        ),
    ] = False,
    from_topic: Annotated[
        bool,
        typer.Option(
            "--from-topic",
            help="With --cluster: take the earlier verdicts from the verdicts topic (from "
            "its beginning to its end at the start).",
        ),
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="With --cluster: seconds to wait for the new verdicts.")
    ] = 600.0,
    workers: Annotated[int, typer.Option(help="Items decoded at once (embedded mode).")] = 2,
) -> None:
    """Scan stored items again with the current models, calibration and policy, and
    show which verdicts changed and why. Exit 0 when it ran: flips are findings."""
    import asyncio

    from synthwatch.pipeline import logs
    from synthwatch.pipeline import rescan as rs

    files = verdict_files or []
    if from_topic and not cluster:
        raise ConfigError("--from-topic reads the pipeline's verdicts topic: add --cluster")
    if not files and not from_topic:
        raise ConfigError("name the verdict files to re-scan (or --cluster --from-topic)")
    if workers < 1:
        raise ConfigError(f"--workers: must be at least 1 (got {workers})")
    if timeout <= 0:
        raise ConfigError(f"--timeout: must be more than 0 seconds (got {timeout:g})")
    filters = rs.Filters(
        since=rs.parse_time(since, "--since") if since is not None else None,
        until=rs.parse_time(until, "--until") if until is not None else None,
        sources=tuple(source or ()),
        decisions=rs.check_decisions(decision or ()),
    )
    for path, option in ((out_file, "--out"), (verdicts_out, "--verdicts-out")):
        if path is not None:
            _check_writable_dir(path.parent, option)
    settings = load_settings()
    logs.configure("WARNING", settings.log_json)
    loaded = rs.read_verdict_files(files)
    if from_topic:
        topic = asyncio.run(rs.read_verdicts_topic(settings))
        merged = rs.latest_per_id([*loaded.verdicts, *topic.verdicts])
        loaded = rs.Loaded(merged.verdicts, skipped=loaded.skipped + topic.skipped)
    selected = [v for v in loaded.verdicts if filters.matches(v)]
    if not selected:
        err.print(f"no verdict matched the filters ({len(loaded.verdicts)} read)", highlight=False)
    run = rs.new_run_id()
    with _progress() as progress:
        task = progress.add_task("re-scanning", total=None)

        def advance(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        if cluster:
            outcomes = rs.rescan_cluster(
                settings, selected, run=run, timeout_s=timeout, on_progress=advance
            )
        else:
            outcomes = rs.rescan_embedded(
                settings, selected, run=run, workers=workers, on_progress=advance
            )
    result = rs.diff(
        outcomes,
        run=run,
        mode="cluster" if cluster else "embedded",
        filters=filters,
        input_skipped=loaded.skipped,
    )
    text = rs.to_json(result)
    if out_file is not None:
        out_file.write_text(text, encoding="utf-8")
    if verdicts_out is not None:
        from synthwatch.pipeline.scan import verdict_record

        with verdicts_out.open("w", encoding="utf-8") as fh:
            for o in outcomes:
                if o.new is not None:
                    fh.write(json.dumps(verdict_record(o.new), sort_keys=True) + "\n")
    if json_stdout:
        sys.stdout.write(text)
        err.print(rs.summary_line(result), highlight=False)
    else:
        _print_rescan(result)
        out.print(rs.summary_line(result), highlight=False)
    if out_file is not None:
        err.print(f"diff written to {out_file}", highlight=False)


def _print_rescan(result: Any) -> None:
    """The flipped items (and those not re-scanned), one row each."""
    flipped = [i for i in result.items if i.flipped]
    if flipped:
        table = Table(title=f"synthwatch rescan {result.run[:12]}: flipped", title_justify="left")
        table.add_column("item", overflow="fold")
        table.add_column("id")
        table.add_column("decision")
        table.add_column("score", justify="right")
        table.add_column("why", overflow="fold")
        for i in flipped:
            table.add_row(
                escape(i.name),
                i.id[:12],
                f"[{_DECISION_STYLE[i.previous_decision]}]{i.previous_decision}[/] -> "
                f"[{_DECISION_STYLE[i.decision]}]{i.decision}[/]",
                f"{_score(i.previous_score)} -> {_score(i.score)}",
                escape(_why(i)),
            )
        out.print(table)
    failed = [i for i in result.items if i.status != "rescanned"]
    if failed:
        table = Table(title="not re-scanned", title_justify="left")
        table.add_column("item", overflow="fold")
        table.add_column("id")
        table.add_column("reason")
        table.add_column("error", overflow="fold")
        for i in failed:
            table.add_row(escape(i.name), i.id[:12], f"[red]{i.reason}[/]", escape(i.error or ""))
        out.print(table)


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _why(item: Any) -> str:
    """The signals that moved (three at most), and a changed model set or policy."""
    parts = []
    for c in item.signals[:3]:
        if c.status == "appeared":
            parts.append(f"+{c.name} {_score(c.after)}")
        elif c.status == "disappeared":
            parts.append(f"-{c.name} (was {_score(c.before)})")
        else:
            parts.append(f"{c.name} {_score(c.before)}->{_score(c.after)}")
    if len(item.signals) > 3:
        parts.append(f"{len(item.signals) - 3} more")
    if item.model_set is not None and item.model_set.before != item.model_set.after:
        parts.append("model set changed")
    if item.policy_version is not None and item.policy_version.before != item.policy_version.after:
        parts.append(f"policy {item.policy_version.before}->{item.policy_version.after}")
    return "; ".join(parts) or "decided by: " + ", ".join(item.decided_by.after)


def main() -> None:
    app()


# `synthwatch hashes` lives in its own module, which registers itself on `app`.
from synthwatch.pipeline import cli_hashes as _cli_hashes  # noqa: E402,F401
