"""`synthwatch hashes`: what a fact-checker does with lists, through the command line."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from synthwatch.operators.hashlists import ListStore
from synthwatch.pipeline.cli import app
from tests.media_factory import make_image, make_video

RNG = random.Random(7)


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "lists.sqlite3"
    monkeypatch.setenv("SYNTHWATCH_MATCHING__DB", str(path))
    return path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["hashes", *args])
    return result.exit_code, result.stdout, result.stderr


def hexes(n: int) -> list[str]:
    return [f"{RNG.getrandbits(256):064x}" for _ in range(n)]


def test_import_list_export_remove(db: Path, tmp_path: Path) -> None:
    signals = tmp_path / "signals.txt"
    signals.write_text("".join(f"pdq {h}\n" for h in hexes(3)) + "md5 abc\n")
    code, _, err = run(
        "import", str(signals), "--list", "afp", "--source", "AFP", "--reference", "case-1"
    )
    assert code == 0, err
    assert "3 entries into afp" in err and "skipped 1 with signal type 'md5'" in err

    code, out, _ = run("list", "--json")
    assert json.loads(out) == [
        {"name": "afp", "entries": 3, "fakes": 3, "authentic": 0, "pdq": 3, "vpdq": 0}
    ]
    code, out, _ = run("list", "--list", "afp", "--json")
    ids = [json.loads(line)["id"] for line in out.splitlines()]
    assert len(ids) == 3 and all(
        json.loads(line)["reference"] == "case-1" for line in out.splitlines()
    )

    exported = tmp_path / "afp.json"
    assert run("export", str(exported), "--list", "afp", "--format", "te-json")[0] == 0
    descriptors = [json.loads(line) for line in exported.read_text().splitlines()]
    assert {d["type"] for d in descriptors} == {"HASH_PDQ"}
    assert {d["owner"]["name"] for d in descriptors} == {"AFP"}

    code, _, err = run("remove", "--list", "afp", ids[0], "nope")
    assert code == 0 and "1 entries removed from afp (1 not found)" in err
    assert run("remove", "--list", "afp", "--all")[0] == 0
    with ListStore(db) as store:
        assert store.lists() == []


def test_a_bad_list_file_imports_nothing_and_says_where(db: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    good = hexes(1)[0]
    bad.write_text(f"id,label,hash\na,fake,{good}\nb,maybe,{good}\n")
    code, _, err = run("import", str(bad), "--list", "desk")
    assert code == 2 and "line 3: label must be fake or authentic, not 'maybe'" in err
    assert not db.exists() or ListStore(db).lists() == []
    assert run("import", str(tmp_path / "missing.txt"), "--list", "desk")[0] == 2
    code, _, err = run("import", str(bad), "--list", "../x")
    assert code == 2 and "list name" in err
    code, _, err = run("import", str(bad), "--list", "desk", "--format", "xml")
    assert code == 2 and "one of te, te-json, jsonl, csv" in err
    code, _, err = run("remove", "--list", "desk")
    assert code == 2 and "--all" in err


def test_add_hashes_stills_and_videos_and_warns_about_flat_pictures(
    db: Path, tmp_path: Path
) -> None:
    photo = tmp_path / "photo.jpg"
    noise = np.random.default_rng(3).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).resize((640, 480), Image.BICUBIC).save(photo)
    clip = make_video(tmp_path / "clip.mp4", seconds=2.0, width=320, height=240)
    flat = make_image(tmp_path / "flat.png", width=300, height=200, fmt="PNG")

    code, out, err = run("add", str(photo), str(clip), "--list", "desk", "--reference", "r1")
    assert code == 0, err
    assert "\tpdq\t1 hash(es)\t" in out and "\tvpdq\t2 hash(es)\t" in out
    assert "warning" not in err

    code, _, err = run("add", str(flat), "--list", "desk", "--id", "flat")
    assert code == 0 and "can never match" in err
    with ListStore(db) as store:
        entries = {e.id: e for e in store.entries("desk")}
    assert entries["flat"].algorithm == "pdq"
    assert sorted(e.algorithm for e in entries.values()) == ["pdq", "pdq", "vpdq"]
    code, _, err = run("add", str(photo), str(clip), "--list", "desk", "--id", "x")
    assert code == 2 and "--id names one entry" in err
