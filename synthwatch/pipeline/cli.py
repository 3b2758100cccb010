"""The `synthwatch` command line: scan (embedded), worker, submit, topics, models.

Errors a user can cause (a missing file, an unsupported format, a refused address,
missing weights) print one line and exit non-zero; they never show a traceback.
"""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, Literal, ParamSpec, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from synthwatch.operators.errors import SynthwatchError
from synthwatch.pipeline.settings import Settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Scan media for synthetic content (deepfake video, generated images).",
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(no_args_is_help=True, help="List, import and pull detector weights.")
topics_app = typer.Typer(no_args_is_help=True, help="Manage the Kafka topics.")
app.add_typer(models_app, name="models")
app.add_typer(topics_app, name="topics")

err = Console(stderr=True)
out = Console()

P = ParamSpec("P")
R = TypeVar("R")

MEDIA_SUFFIXES = frozenset(
    [
        ".jpg",
        ".jpeg",
        ".png",
        ".gif",
        ".webp",
        ".bmp",
        ".tif",
        ".tiff",
        ".heic",
        ".avif",
        ".mp4",
        ".m4v",
        ".mov",
        ".mkv",
        ".webm",
        ".avi",
        ".3gp",
        ".mp3",
        ".wav",
        ".flac",
        ".ogg",
        ".oga",
        ".opus",
        ".m4a",
        ".aac",
    ]
)


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn the errors a user can cause into one line on stderr and exit code 2."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except SynthwatchError as exc:
            err.print(f"[bold red]error[/] ({exc.reason}): {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            err.print(f"[bold red]error[/] (settings): {where}: {first['msg']}", highlight=False)
            raise typer.Exit(2) from None
        except OSError as exc:  # an unwritable output or evidence path, a full disk
            err.print(f"[bold red]error[/] (os): {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with CLI flags layered on top."""
    settings = Settings()
    update: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition("__")
        if key:
            current = update.get(section) or getattr(settings, section)
            update[section] = current.model_copy(update={key: value})
        else:
            update[section] = value
    return settings.model_copy(update=update) if update else settings


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
    backend: Annotated[
        str | None, typer.Option(help="auto | onnxruntime | torch | tensorrt")
    ] = None,
    frames: Annotated[int | None, typer.Option(help="Frames sampled per video.")] = None,
    workers: Annotated[int, typer.Option(help="Items decoded at once.")] = 2,
) -> None:
    """Scan local files or URLs in this process (no broker) and print the verdicts."""
    from synthwatch.operators.fetch import Fetcher
    from synthwatch.operators.store import LocalStore
    from synthwatch.pipeline import logging as sw_logging
    from synthwatch.pipeline.engine import Engine, Item, decide, sampled_evidence

    settings = load_settings(models__backend=backend, sample__frames=frames)
    sw_logging.configure("WARNING", settings.log_json)
    items = expand_sources(sources)
    if not items:
        err.print("[bold red]error[/]: nothing to scan (no media files found)")
        raise typer.Exit(2)
    results: list[ScanResult] = [ScanResult(source=s) for s in items]
    json_fh = _open_json(json_out)
    store = LocalStore(evidence_dir) if evidence_dir else None

    with (
        Engine(settings) as engine,
        Fetcher(settings.fetch, embedded=True) as fetcher,
        tempfile.TemporaryDirectory(prefix="synthwatch-") as tmp,
    ):

        def one(res: ScanResult) -> ScanResult:
            downloaded: Path | None = None
            try:
                fetched = fetcher.fetch(res.source, Path(tmp))
                if fetched.path.is_relative_to(tmp):
                    downloaded = fetched.path  # a URL's bytes: ours to delete when done
                item = Item(
                    id=fetched.sha256[:32],
                    url=fetched.url,
                    source=res.source,
                    submitted_at=time.time(),
                    sha256=fetched.sha256,
                    media_type=fetched.media_type,
                    path=fetched.path,
                    blob=str(fetched.path),
                )
                analysis = engine.analyze(item)
                record: dict[str, Any] = _verdict_json(analysis.verdict)
                if store is not None:
                    decided = decide(
                        analysis.verdict,
                        functools.partial(sampled_evidence, analysis.sampled),
                        store,
                        evidence_prefix="",
                        policy=engine.policy,
                    )
                    if decided is not None:
                        alert, bundle = decided
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

        with (
            _progress() as progress,
            ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="scan") as pool,
        ):
            task = progress.add_task("scanning", total=len(results))
            for res in pool.map(one, results):
                progress.advance(task)
                if json_fh is not None:
                    line = (
                        res.record
                        if res.error is None
                        else {"source": res.source, "error": res.reason, "message": res.error}
                    )
                    json_fh.write(json.dumps(line, sort_keys=True) + "\n")
                    json_fh.flush()
    if json_fh is not None and json_fh is not sys.stdout:
        json_fh.close()
    _print_table(results, to_stderr=json_out == "-")
    alerted = sum(1 for r in results if "evidence" in r.record)
    if store is not None and alerted:
        err.print(f"evidence bundles for {alerted} item(s) in {evidence_dir}", highlight=False)
    if json_out not in (None, "-"):
        err.print(f"verdicts written to {json_out}", highlight=False)
    if any(r.error for r in results):
        raise typer.Exit(1)


def _verdict_json(verdict: Any) -> dict[str, Any]:
    from synthwatch.schemas import to_builtins

    record = to_builtins(verdict)
    record.pop("type", None)
    return record


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


_DECISION_STYLE = {"flag": "bold red", "review": "yellow", "pass": "green"}


def _print_table(results: list[ScanResult], *, to_stderr: bool) -> None:
    table = Table(title="synthwatch verdicts", title_justify="left")
    table.add_column("source", overflow="fold")
    table.add_column("type")
    table.add_column("score", justify="right")
    table.add_column("decision")
    table.add_column("faces", justify="right")
    table.add_column("notes / error", overflow="fold")
    for r in results:
        if r.error is not None:
            table.add_row(r.source, "-", "-", f"[red]error: {r.reason}[/]", "-", r.error)
            continue
        rec = r.record
        decision = rec["decision"]
        table.add_row(
            r.source,
            rec["media_type"],
            f"{rec['synthetic_score']:.3f}",
            f"[{_DECISION_STYLE[decision]}]{decision}[/]",
            str(rec["faces_found"]),
            "; ".join(rec.get("notes", [])),
        )
    (err if to_stderr else out).print(table)


Role = Literal["fetch", "detect", "decide", "all"]


@app.command()
@user_errors
def worker(
    role: Annotated[str, typer.Option(help="fetch | detect | decide | all")] = "all",
) -> None:
    """Run a streaming worker for one role (or all) against Kafka and S3."""
    from synthwatch.pipeline import logging as sw_logging
    from synthwatch.pipeline import topology

    if role not in ("fetch", "detect", "decide", "all"):
        err.print(f"[bold red]error[/]: unknown role {role!r}: use fetch, detect, decide or all")
        raise typer.Exit(2)
    settings = load_settings()
    sw_logging.configure(settings.log_level, settings.log_json)
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


def main() -> None:
    app()
