"""`synthwatch hashes`: the lists of known media that scans are matched against.

Lists live in a local SQLite file (`matching.db`, what embedded mode and `serve` read at
start) or, with `--cluster`, on the compacted Kafka topic every detect worker follows
(`pipeline/listfeed.py`), so an import reaches running workers without a restart.
Registered on the main `synthwatch` app when `pipeline/cli.py` is imported.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any, cast

import typer
from rich.markup import escape
from rich.table import Table

from synthwatch.errors import InvalidInput
from synthwatch.operators import hashlists
from synthwatch.operators.hashlists import Defaults, Entry, Format, Label, ListFrame, ListStore
from synthwatch.pipeline.cli import app, err, load_settings, out, user_errors
from synthwatch.pipeline.settings import Settings
from synthwatch.schemas import HashAlgorithm

hashes_app = typer.Typer(
    no_args_is_help=True,
    help="Lists of known fakes and known originals: import, export, list, remove.",
)
app.add_typer(hashes_app, name="hashes")

ListName = Annotated[str, typer.Option("--list", "-l", help="The list's name, e.g. afp-debunked.")]
Cluster = Annotated[
    bool,
    typer.Option(
        "--cluster",
        help="Work on the lists topic on Kafka (kafka.topic_hashlists) that running "
        "workers follow, instead of this machine's list file (the default where "
        "SYNTHWATCH_MATCHING__LISTS=kafka).",
    ),
]
FormatOpt = Annotated[
    str | None,
    typer.Option(
        "--format",
        "-f",
        help="te (python-threatexchange signal file), te-json (ThreatExchange "
        "descriptors), jsonl or csv; default: from the file's suffix.",
    ),
]


def _format(value: str | None, path: Path | None) -> Format:
    if value is None:
        if path is None:
            return "jsonl"
        return hashlists.guess_format(path)
    if value not in hashlists.FORMATS:
        raise InvalidInput(f"--format {value!r}: one of {', '.join(hashlists.FORMATS)}")
    return cast(Format, value)


def _label(value: str) -> Label:
    if value not in hashlists.LABELS:
        raise InvalidInput(f"--label {value!r}: fake or authentic")
    return cast(Label, value)


def _store(settings: Settings) -> ListStore:
    return ListStore(settings.matching.db)


def _save(settings: Settings, entries: list[Entry], cluster: bool) -> str:
    if cluster:
        from synthwatch.pipeline.listfeed import publish

        publish(settings, entries)
        return f"published to {settings.kafka.topic_hashlists}"
    with _store(settings) as store:
        added, replaced = store.put(entries)
    return f"{added} added, {replaced} replaced in {settings.matching.db}"


def _all_entries(settings: Settings, cluster: bool, name: str | None) -> list[Entry]:
    if cluster:
        from synthwatch.pipeline.listfeed import read_all

        return [e for e in read_all(settings) if name is None or e.list == name]
    with _store(settings) as store:
        return list(store.entries(name))


@hashes_app.command("import")
@user_errors
def hashes_import(
    file: Annotated[Path, typer.Argument(help="The list file ('-' reads stdin).")],
    name: ListName,
    fmt: FormatOpt = None,
    label: Annotated[
        str, typer.Option(help="fake or authentic, for rows that do not say.")
    ] = "fake",
    source: Annotated[str, typer.Option(help="Who listed them, for rows that do not say.")] = "",
    reference: Annotated[
        str, typer.Option(help="A fact-check URL or case id, for rows that do not say.")
    ] = "",
    cluster: Cluster = False,
) -> None:
    """Import a list file into LIST: all rows or none (the first bad row is named)."""
    settings = load_settings()
    cluster = cluster or settings.matching.lists == "kafka"
    defaults = Defaults(
        list=hashlists.check_list_name(name),
        label=_label(label),
        source=source,
        reference=reference,
    )
    if str(file) == "-":
        report = hashlists.read_entries(sys.stdin, _format(fmt, None), defaults)
    else:
        try:
            with file.open(encoding="utf-8") as stream:
                report = hashlists.read_entries(stream, _format(fmt, file), defaults)
        except UnicodeDecodeError:
            raise InvalidInput(f"{file}: not UTF-8 text") from None
    if not report.entries:
        raise InvalidInput(f"{file}: no entry to import" + _skipped(report.skipped))
    where = _save(settings, report.entries, cluster)
    err.print(
        f"{len(report.entries)} entries into {escape(name)}: {escape(where)}"
        + escape(_skipped(report.skipped)),
        highlight=False,
    )


def _skipped(skipped: dict[str, int]) -> str:
    if not skipped:
        return ""
    return "; skipped " + ", ".join(f"{n} with {why}" for why, n in sorted(skipped.items()))


@hashes_app.command("add")
@user_errors
def hashes_add(
    media: Annotated[list[Path], typer.Argument(help="Media files to hash and list.")],
    name: ListName,
    label: Annotated[str, typer.Option(help="fake or authentic.")] = "fake",
    source: Annotated[str, typer.Option(help="Who found them.")] = "",
    reference: Annotated[str, typer.Option(help="A fact-check URL or case id.")] = "",
    entry_id: Annotated[
        str | None, typer.Option("--id", help="The entry's id (one file only); default: its hash.")
    ] = None,
    cluster: Cluster = False,
) -> None:
    """Hash media files (PDQ for a still, vPDQ for a video or animation) and add them to
    LIST: the way to list a fake you have the file of."""
    settings = load_settings()
    cluster = cluster or settings.matching.lists == "kafka"
    hashlists.check_list_name(name)
    if entry_id is not None and len(media) != 1:
        raise InvalidInput("--id names one entry: give one file")
    entries = []
    for path in media:
        if not path.is_file():
            raise InvalidInput(f"{path}: no such file")
        frames, algorithm = _hash_media(path, settings)
        if all(f.quality is not None and f.quality < settings.matching.min_quality for f in frames):
            err.print(
                f"[yellow]warning[/]: {escape(str(path))}: no hash of quality "
                f">= {settings.matching.min_quality} (a flat or nearly blank picture); "
                "this entry can never match",
                highlight=False,
            )
        entries.append(
            hashlists.checked(
                Entry(
                    list=name,
                    id=entry_id or hashlists.derived_id(algorithm, frames),
                    label=_label(label),
                    algorithm=algorithm,
                    frames=frames,
                    source=source,
                    reference=reference,
                    added_at=time.time(),
                    tags=[f"file:{path.name}"],
                )
            )
        )
        # Plain tab-separated lines: a script reads the entry ids back.
        typer.echo(f"{path}\t{algorithm}\t{len(frames)} hash(es)\t{entries[-1].id}")
    err.print(
        f"{len(entries)} entries into {escape(name)}: {escape(_save(settings, entries, cluster))}"
    )


def _hash_media(path: Path, settings: Settings) -> tuple[list[ListFrame], HashAlgorithm]:
    """(frames, algorithm) of a media file: vPDQ for what moves, PDQ for a still."""
    from synthwatch.operators import phash, sandbox

    ms = settings.matching
    sampled = sandbox.sample(path, settings.sample.model_copy(update={"frames": 1}))
    if sampled.media_type == "audio":
        raise InvalidInput(f"{path}: audio has no perceptual hash here (PDQ and vPDQ are visual)")
    moving = sampled.media_type == "video" or (
        sampled.media_type == "image" and sampled.strategy == "animated"
    )
    if moving:
        budget = settings.sample.model_copy(update={"max_decode_s": ms.vpdq_max_s})
        video = sandbox.vpdq(path, budget, max_hashes=ms.vpdq_max_hashes)
        frames = [ListFrame(h.hash, h.quality, h.time_s) for h in video]
        if frames:
            return frames, "vpdq"
    digest, quality = phash.pdq(sampled.frames[0].image)
    return [ListFrame(digest, quality)], "pdq"


@hashes_app.command("export")
@user_errors
def hashes_export(
    file: Annotated[Path, typer.Argument(help="Where to write ('-': stdout).")] = Path("-"),
    name: Annotated[
        str | None, typer.Option("--list", "-l", help="Only this list (default: all).")
    ] = None,
    fmt: FormatOpt = None,
    cluster: Cluster = False,
) -> None:
    """Write lists in an exchange format (te keeps only the signals: the format has no
    room for labels and references)."""
    settings = load_settings()
    cluster = cluster or settings.matching.lists == "kafka"
    entries = _all_entries(settings, cluster, name)
    if name is not None and not entries:
        raise InvalidInput(f"no list {name!r}")
    stdout = str(file) == "-"
    chosen = _format(fmt, None if stdout else file)
    if stdout:
        count = hashlists.write_entries(entries, chosen, sys.stdout)
    else:
        with file.open("w", encoding="utf-8", newline="") as stream:
            count = hashlists.write_entries(entries, chosen, stream)
    err.print(f"{count} entries written ({chosen})", highlight=False)


@hashes_app.command("list")
@user_errors
def hashes_list(
    name: Annotated[
        str | None, typer.Option("--list", "-l", help="Show this list's entries.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="JSON on stdout.")] = False,
    cluster: Cluster = False,
) -> None:
    """Show the lists with their counts, or one list's entries."""
    settings = load_settings()
    cluster = cluster or settings.matching.lists == "kafka"
    if name is None:
        if cluster:
            summaries = _summaries(_all_entries(settings, True, None))
        else:
            with _store(settings) as store:
                summaries = [s.__dict__ for s in store.lists()]
        if as_json:
            typer.echo(json.dumps(summaries, indent=2))
            return
        table = Table(title="lists of known media", title_justify="left")
        for col in ("name", "entries", "fakes", "authentic", "pdq", "vpdq"):
            table.add_column(col)
        for s in summaries:
            table.add_row(
                *(str(s[c]) for c in ("name", "entries", "fakes", "authentic", "pdq", "vpdq"))
            )
        out.print(table)
        return
    entries = _all_entries(settings, cluster, name)
    if not entries:
        raise InvalidInput(f"no list {name!r}")
    if as_json:
        typer.echo(hashlists.dumps(entries, "jsonl"), nl=False)
        return
    table = Table(title=f"list {name}", title_justify="left")
    for col in ("id", "label", "algorithm", "frames", "source", "reference"):
        table.add_column(col, overflow="fold")
    for e in entries:
        table.add_row(e.id, e.label, e.algorithm, str(len(e.frames)), e.source, e.reference)
    out.print(table)


def _summaries(entries: list[Entry]) -> list[dict[str, Any]]:
    by: dict[str, dict[str, Any]] = {}
    for e in entries:
        s = by.setdefault(
            e.list, {"name": e.list, "entries": 0, "fakes": 0, "authentic": 0, "pdq": 0, "vpdq": 0}
        )
        s["entries"] += 1
        s["fakes" if e.label == "fake" else "authentic"] += 1
        s[e.algorithm] += 1
    return [by[k] for k in sorted(by)]


@hashes_app.command("remove")
@user_errors
def hashes_remove(
    name: ListName,
    ids: Annotated[
        list[str] | None, typer.Argument(help="Entry ids to remove (none: see --all).")
    ] = None,
    whole: Annotated[bool, typer.Option("--all", help="Remove the whole list.")] = False,
    cluster: Cluster = False,
) -> None:
    """Remove entries from LIST, or the whole list with --all."""
    settings = load_settings()
    cluster = cluster or settings.matching.lists == "kafka"
    if not ids and not whole:
        raise InvalidInput("name the entry ids to remove, or pass --all for the whole list")
    if ids and whole:
        raise InvalidInput("give entry ids or --all, not both")
    chosen = None if whole else list(ids or [])
    if cluster:
        from synthwatch.pipeline.listfeed import publish

        present = {e.id for e in _all_entries(settings, True, name)}
        keys = [f"{name}/{i}" for i in (present if chosen is None else chosen) if i in present]
        publish(settings, [], keys)
        removed = len(keys)
    else:
        with _store(settings) as store:
            removed = len(store.remove(name, chosen))
    if removed == 0:
        raise InvalidInput(f"nothing to remove: no such entries in list {name!r}")
    not_found = 0 if chosen is None else len(set(chosen)) - removed
    err.print(
        f"{removed} entries removed from {escape(name)}"
        + (f" ({not_found} not found)" if not_found else ""),
        highlight=False,
    )
