"""LocalHandoff: media a `--role all` worker fetched, kept for its own detect stage."""

from __future__ import annotations

from pathlib import Path

from synthwatch.operators.store import LocalHandoff


def _file(directory: Path, name: str, size: int) -> Path:
    path = directory / name
    path.write_bytes(bytes([len(name) % 256]) * size)
    return path


def test_a_handed_over_file_is_taken_once_with_its_bytes(tmp_path: Path) -> None:
    handoff = LocalHandoff(tmp_path / "handoff", max_bytes=1000)
    src = _file(tmp_path, "a.bin", 100)
    data = src.read_bytes()
    assert handoff.put("aa" * 32, src)
    assert not src.exists()  # moved, not copied
    dest = tmp_path / "detect-a"
    assert handoff.take("aa" * 32, dest)
    assert dest.read_bytes() == data
    assert not handoff.take("aa" * 32, tmp_path / "again")  # the second reader uses the store
    assert handoff.held_bytes == 0


def test_only_hashes_handed_over_can_be_taken(tmp_path: Path) -> None:
    handoff = LocalHandoff(tmp_path / "handoff", max_bytes=1000)
    (tmp_path / "handoff" / "bb").write_bytes(b"planted")  # not put by the fetch stage
    assert not handoff.take("bb", tmp_path / "x")
    assert not handoff.take("../a.bin", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_beyond_its_allowance_the_oldest_files_go(tmp_path: Path) -> None:
    handoff = LocalHandoff(tmp_path / "handoff", max_bytes=250)
    for name in ("first", "second", "third"):
        assert handoff.put(name, _file(tmp_path, name, 100))
    assert handoff.held_bytes == 200
    assert sorted(p.name for p in (tmp_path / "handoff").iterdir()) == ["second", "third"]
    assert not handoff.take("first", tmp_path / "f")
    assert handoff.take("third", tmp_path / "t")
    big = _file(tmp_path, "big", 300)
    assert not handoff.put("big", big)  # larger than the whole allowance: left to the caller
    assert big.exists()


def test_the_same_media_fetched_twice_is_held_once(tmp_path: Path) -> None:
    handoff = LocalHandoff(tmp_path / "handoff", max_bytes=1000)
    handoff.put("cc", _file(tmp_path, "one", 100))
    handoff.put("cc", _file(tmp_path, "two", 100))
    assert handoff.held_bytes == 100
    assert len(list((tmp_path / "handoff").iterdir())) == 1
