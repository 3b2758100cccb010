"""LocalHandoff: media a `--role all` worker fetched, kept for its own detect stage."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

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


def test_when_full_the_newcomer_is_left_to_the_store(tmp_path: Path) -> None:
    # Detect takes files in the order fetch handed them over: the oldest are needed next.
    handoff = LocalHandoff(tmp_path / "handoff", max_bytes=250)
    assert handoff.put("first", _file(tmp_path, "first", 100))
    assert handoff.put("second", _file(tmp_path, "second", 100))
    third = _file(tmp_path, "third", 100)
    assert not handoff.put("third", third)
    assert third.exists()  # the caller keeps it (and its detect reads the store)
    assert handoff.held_bytes == 200
    assert handoff.take("first", tmp_path / "f")
    assert handoff.put("fourth", _file(tmp_path, "fourth", 100))  # room again
    assert sorted(p.name for p in (tmp_path / "handoff").iterdir()) == ["fourth", "second"]
    big = _file(tmp_path, "big", 300)
    assert not handoff.put("big", big)  # larger than the whole allowance
    assert big.exists()


def test_files_nobody_took_make_room_after_max_age(tmp_path: Path) -> None:
    # A partition moved to another worker: its files here would never be taken.
    now = [0.0]
    handoff = LocalHandoff(tmp_path / "handoff", max_bytes=250, max_age_s=600, clock=lambda: now[0])
    assert handoff.put("orphan", _file(tmp_path, "orphan", 100))
    now[0] = 300.0
    assert handoff.put("recent", _file(tmp_path, "recent", 100))
    assert not handoff.put("early", _file(tmp_path, "early", 100))  # orphan is 300 s old
    now[0] = 601.0
    assert handoff.put("late", _file(tmp_path, "late", 100))  # orphan is stale: dropped
    assert not handoff.take("orphan", tmp_path / "o")
    assert handoff.take("recent", tmp_path / "r")
    assert handoff.take("late", tmp_path / "l")
    assert handoff.held_bytes == 0


def test_the_same_media_fetched_twice_is_held_once_and_taken_twice(tmp_path: Path) -> None:
    # A viral file submitted twice: one copy on disk, and neither record's detect
    # reads it back from the store.
    handoff = LocalHandoff(tmp_path / "handoff", max_bytes=1000)
    one = _file(tmp_path, "one", 100)
    data = one.read_bytes()
    assert handoff.put("cc", one)
    assert handoff.put("cc", _file(tmp_path, "two", 100))
    assert handoff.held_bytes == 100
    assert len(list((tmp_path / "handoff").iterdir())) == 1
    assert handoff.take("cc", tmp_path / "detect-1")
    assert handoff.held_bytes == 100  # still held for the second record
    assert handoff.take("cc", tmp_path / "detect-2")
    assert handoff.held_bytes == 0
    assert not handoff.take("cc", tmp_path / "detect-3")
    assert (tmp_path / "detect-1").read_bytes() == data
    assert (tmp_path / "detect-2").read_bytes() == data
    assert list((tmp_path / "handoff").iterdir()) == []


def _holding(tmp_path: Path, max_bytes: int, *names: str) -> LocalHandoff:
    """A hand-off holding one 100-byte file per name."""
    handoff = LocalHandoff(tmp_path / "handoff", max_bytes=max_bytes)
    for name in names:
        assert handoff.put(name, _file(tmp_path, name, 100))
    return handoff


def _fetch_in_thread(
    handoff: LocalHandoff, wait_s: float
) -> tuple[threading.Thread, threading.Event]:
    """A fetch that waits for room, then signals that it went ahead."""
    went = threading.Event()

    def fetch() -> None:
        with handoff.room(wait_s):
            went.set()

    thread = threading.Thread(target=fetch, daemon=True)
    thread.start()
    return thread, went


@pytest.mark.parametrize("release", ["detect takes a file", "the pipeline closes"])
def test_a_fetch_waits_for_room_until(tmp_path: Path, release: str) -> None:
    handoff = _holding(tmp_path, 250, "first", "second")
    thread, went = _fetch_in_thread(handoff, wait_s=60)
    assert not went.wait(0.5)  # 200 held + a file of their average size > 250
    if release == "detect takes a file":
        assert handoff.take("first", tmp_path / "f")
    else:
        handoff.close()
    assert went.wait(10)
    thread.join(10)


def test_with_room_a_fetch_does_not_wait(tmp_path: Path) -> None:
    handoff = _holding(tmp_path, 1000, "first")
    thread, went = _fetch_in_thread(handoff, wait_s=60)
    assert went.wait(10)
    thread.join(10)


def test_files_nobody_takes_while_a_fetch_waits_are_dropped(tmp_path: Path) -> None:
    # Their partitions moved to another worker: waiting longer would stall fetching.
    handoff = _holding(tmp_path, 250, "first", "second")
    with handoff.room(0.2):
        assert handoff.held_bytes == 0
        assert handoff.put("third", _file(tmp_path, "third", 100))
    assert not handoff.take("first", tmp_path / "f")
    assert handoff.take("third", tmp_path / "t")


def test_promised_room_makes_the_next_fetch_wait(tmp_path: Path) -> None:
    # Four fetches woken by one take must not all start a download that cannot fit.
    handoff = _holding(tmp_path, 250, "first")
    with handoff.room(60):  # 100 held + 100 promised
        thread, went = _fetch_in_thread(handoff, wait_s=60)
        assert not went.wait(0.5)
        handoff.put("second", _file(tmp_path, "second", 100))
    assert not went.wait(0.5)  # 200 held now
    assert handoff.take("second", tmp_path / "s")
    assert went.wait(10)
    thread.join(10)


def test_repeats_are_copied_where_the_file_system_has_no_hard_links(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    def no_links(src: object, dest: object) -> None:
        raise PermissionError("hard links not permitted here")

    monkeypatch.setattr(os, "link", no_links)
    handoff = LocalHandoff(tmp_path / "handoff", max_bytes=1000)
    one = _file(tmp_path, "one", 100)
    data = one.read_bytes()
    assert handoff.put("dd", one)
    assert handoff.put("dd", _file(tmp_path, "two", 100))
    assert handoff.take("dd", tmp_path / "detect-1")
    assert handoff.take("dd", tmp_path / "detect-2")
    assert (tmp_path / "detect-1").read_bytes() == data == (tmp_path / "detect-2").read_bytes()
