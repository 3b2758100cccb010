"""Lists of known media: exchange formats, the local store, and the matcher's rules."""

from __future__ import annotations

import io
import json
import random

import numpy as np
import pytest

from synthwatch.errors import InvalidInput
from synthwatch.operators import calibrate, fuse, hashlists, matching
from synthwatch.operators.hashlists import Defaults, Entry, ListFrame, ListStore
from synthwatch.operators.matching import Matcher, MatchingSettings
from synthwatch.schemas import MediaHash

RNG = random.Random(20)


def rand_hex() -> str:
    return f"{RNG.getrandbits(256):064x}"


def flipped(h: str, bits: int) -> str:
    """`h` with its first `bits` bits inverted: exactly `bits` apart."""
    return f"{int(h, 16) ^ (((1 << bits) - 1) << (256 - bits)):064x}"


def pdq_entry(h: str, *, name: str = "desk", entry: str = "e1", label: str = "fake") -> Entry:
    return Entry(
        list=name,
        id=entry,
        label=label,  # type: ignore[arg-type]
        algorithm="pdq",
        frames=[ListFrame(h, 90)],
        source="AFP",
        reference="https://factcheck.example/e1",
        added_at=1.0,
    )


def still(h: str, quality: int = 90) -> MediaHash:
    return MediaHash(algorithm="pdq", hash=h, quality=quality)


def test_te_signal_file_round_trip_and_metadata_from_defaults() -> None:
    a, frames = rand_hex(), [ListFrame(rand_hex(), 80, float(i)) for i in range(3)]
    text = f"pdq {a}\n# a comment\n\nvpdq {hashlists.vpdq_signal(frames)}\nurl https://x.example\n"
    defaults = Defaults(list="afp", label="fake", source="AFP", reference="case-7")
    report = hashlists.read_entries(io.StringIO(text), "te", defaults)
    assert [e.algorithm for e in report.entries] == ["pdq", "vpdq"]
    assert report.skipped == {"signal type 'url'": 1}
    assert report.entries[0].frames[0].hash == a and report.entries[0].frames[0].quality is None
    assert report.entries[1].frames == frames
    assert {(e.list, e.label, e.source, e.reference) for e in report.entries} == {
        ("afp", "fake", "AFP", "case-7")
    }
    # Ids come from the hashes: the same file imported again is the same entries.
    again = hashlists.read_entries(io.StringIO(text), "te", defaults)
    assert [e.id for e in again.entries] == [e.id for e in report.entries]
    assert hashlists.dumps(report.entries, "te").splitlines() == [
        f"pdq {a}",
        f"vpdq {hashlists.vpdq_signal(frames)}",
    ]


def test_threatexchange_descriptors_give_id_label_source_and_reference() -> None:
    a, b = rand_hex(), rand_hex()
    doc = {
        "data": [
            {
                "id": "3046896738736542",
                "raw_indicator": a.upper(),
                "type": "HASH_PDQ",
                "status": "MALICIOUS",
                "description": "https://factcheck.example/flood-photo",
                "owner": {"id": "1", "name": "Partner Desk"},
                "tags": ["media_type_photo"],
                "added_on": "2020-06-03T01:38:01+0000",
            },
            {"id": "2", "raw_indicator": b, "type": "HASH_PDQ", "status": "NON_MALICIOUS"},
            {"id": "3", "raw_indicator": "c7dfd847207cbd54a8bb292525fc111d", "type": "HASH_MD5"},
        ]
    }
    report = hashlists.read_entries(io.StringIO(json.dumps(doc)), "te-json", Defaults(list="te"))
    first, second = report.entries
    assert (first.id, first.label, first.source) == ("3046896738736542", "fake", "Partner Desk")
    assert first.reference == "https://factcheck.example/flood-photo"
    assert first.frames[0].hash == a and first.tags == ["media_type_photo"]
    assert first.added_at == 1591148281.0
    assert second.label == "authentic"
    assert report.skipped == {"indicator type HASH_MD5": 1}
    # One descriptor per line reads the same.
    lines = "\n".join(json.dumps(d) for d in doc["data"])
    again = hashlists.read_entries(io.StringIO(lines), "te-json", Defaults(list="te")).entries
    assert [(e.id, e.label, e.frames, e.reference) for e in again] == [
        (e.id, e.label, e.frames, e.reference) for e in (first, second)
    ]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_full_formats_keep_every_field(fmt: hashlists.Format) -> None:
    entries = [
        pdq_entry(rand_hex(), entry="a"),
        Entry(
            list="desk",
            id="b",
            label="authentic",
            algorithm="vpdq",
            frames=[ListFrame(rand_hex(), 70, float(i)) for i in range(4)],
            source="Newsroom, Inc.",
            reference="https://example.org/orig?id=1",
            added_at=1700000000.0,
            tags=["video"],
        ),
    ]
    text = hashlists.dumps(entries, fmt)
    back = hashlists.read_entries(io.StringIO(text), fmt, Defaults(list="desk")).entries
    assert back == entries


def test_a_bad_row_names_its_line_and_imports_nothing(tmp_path) -> None:
    text = f"pdq {rand_hex()}\npdq not-a-hash\n"
    with pytest.raises(InvalidInput, match=r"line 2.*not a PDQ hash"):
        hashlists.read_entries(io.StringIO(text), "te", Defaults(list="desk"))
    with pytest.raises(InvalidInput, match="list name"):
        hashlists.read_entries(io.StringIO(""), "te", Defaults(list="../etc"))
    with pytest.raises(InvalidInput, match=r"line 1.*hash,quality,time"):
        hashlists.read_entries(io.StringIO('vpdq ["abc"]'), "te", Defaults(list="desk"))


def test_store_puts_replaces_lists_and_removes(tmp_path) -> None:
    with ListStore(tmp_path / "lists.sqlite3") as store:
        a, b = pdq_entry(rand_hex(), entry="a"), pdq_entry(rand_hex(), entry="b", label="authentic")
        assert store.put([a, b]) == (2, 0)
        assert store.put([a]) == (0, 1)
        assert store.put([pdq_entry(rand_hex(), name="other", entry="a")]) == (1, 0)
        summary = {s.name: s for s in store.lists()}
        assert (summary["desk"].entries, summary["desk"].fakes, summary["desk"].authentic) == (
            2,
            1,
            1,
        )
        assert [e.id for e in store.remove("desk", ["a", "zz"])] == ["a"]
        assert [e.key for e in store.entries()] == ["desk/b", "other/a"]
        store.remove("other")
        assert [s.name for s in store.lists()] == ["desk"]


def test_pdq_matches_within_31_bits_and_not_beyond() -> None:
    h = rand_hex()
    m = Matcher(MatchingSettings())
    m.put(pdq_entry(h))
    assert [x.distance for x in m.match([still(flipped(h, 31))])] == [31]
    assert m.match([still(flipped(h, 32))]) == []
    assert m.match([still(rand_hex())]) == []
    # A flat image's hash (quality under 50) is never matched on.
    assert m.match([still(h, quality=40)]) == []


def test_match_names_list_entry_distance_reference_and_decides_flag() -> None:
    h = rand_hex()
    m = Matcher(MatchingSettings())
    m.put(pdq_entry(h))
    frames = [
        MediaHash(algorithm="pdq", hash=rand_hex(), quality=90, time_s=0.5),
        MediaHash(algorithm="pdq", hash=flipped(h, 5), quality=90, time_s=2.5),
    ]
    (found,) = m.match(frames)
    assert (found.list, found.entry, found.distance, found.time_s) == ("desk", "e1", 5, 2.5)
    assert found.reference == "https://factcheck.example/e1" and found.source == "AFP"
    signals, notes = matching.match_signals([found])
    assert notes == []
    (signal,) = signals
    assert signal.decides == "flag" and "e1" in signal.note and "factcheck" in signal.note
    # The match alone flags, over a detector that reads the item as real.
    fused = fuse.combine(fuse.calibrate(signals, calibrate.EMPTY), prior=0.5)
    assert fused.minimum == "flag" and fused.decided_by == ["match"]


def test_a_known_original_adds_a_note_and_decides_nothing() -> None:
    h = rand_hex()
    m = Matcher(MatchingSettings())
    m.put(pdq_entry(h, label="authentic"))
    signals, notes = matching.match_signals(m.match([still(h)]))
    assert [s.name for s in signals] == ["match_authentic"]
    assert signals[0].decides == "" and signals[0].weight == 0
    assert len(notes) == 1 and "known authentic original" in notes[0]
    assert "does not show this copy authentic" in notes[0]


def video_entry(frames: list[str], entry: str = "v1") -> Entry:
    return Entry(
        list="desk",
        id=entry,
        label="fake",
        algorithm="vpdq",
        frames=[ListFrame(h, 90, float(i)) for i, h in enumerate(frames)],
    )


def video(frames: list[str]) -> list[MediaHash]:
    return [
        MediaHash(algorithm="vpdq", hash=h, quality=90, time_s=float(i))
        for i, h in enumerate(frames)
    ]


def test_vpdq_needs_80_percent_of_the_entry_frames() -> None:
    known = [rand_hex() for _ in range(10)]
    m = Matcher(MatchingSettings())
    m.put(video_entry(known))
    # 8 of 10 frames, each a little changed, inside a longer video: a match.
    item = [flipped(h, 20) for h in known[:8]] + [rand_hex() for _ in range(20)]
    (found,) = m.match(video(item))
    assert found.algorithm == "vpdq" and found.entry_match_percent == 80.0
    assert found.item_match_percent == round(100 * 8 / 28, 1)
    assert found.distance == 20
    # 7 of 10: not.
    assert m.match(video([flipped(h, 20) for h in known[:7]])) == []
    # Sampled (pdq) frames alone never make a vPDQ match.
    assert m.match([still(h) for h in known]) == []


def test_replacing_and_removing_entries_changes_what_matches() -> None:
    h, g = rand_hex(), rand_hex()
    m = Matcher(MatchingSettings())
    m.put(pdq_entry(h))
    m.put(pdq_entry(g))  # same list and id: replaces
    assert len(m) == 1
    assert m.match([still(h)]) == [] and len(m.match([still(g)])) == 1
    assert m.remove(["desk/e1", "desk/nope"]) == 1
    assert m.match([still(g)]) == []


def test_matcher_loads_a_store(tmp_path) -> None:
    hashes = [rand_hex() for _ in range(500)]
    with ListStore(tmp_path / "l.sqlite3") as store:
        store.put([pdq_entry(h, entry=f"e{i}") for i, h in enumerate(hashes)])
        m = Matcher(MatchingSettings())
        assert m.load(store) == 500
    (found,) = m.match([still(flipped(hashes[123], 3))])
    assert found.entry == "e123"


def test_matching_a_known_fake_and_a_known_original_asks_for_review() -> None:
    """A face swap keeps its source's hash: the lists disagree, a person decides."""
    source = rand_hex()
    m = Matcher(MatchingSettings())
    m.put(pdq_entry(flipped(source, 6), entry="swap"))
    m.put(pdq_entry(source, entry="orig", label="authentic"))
    matches = m.match([still(source)])
    assert [(x.entry, x.label) for x in matches] == [("swap", "fake"), ("orig", "authentic")]
    signals, notes = matching.match_signals(matches)
    assert [(s.name, s.decides) for s in signals] == [("match", "review"), ("match_authentic", "")]
    assert notes == [matching.CONFLICT_NOTE]
    fused = fuse.combine(fuse.calibrate(signals, calibrate.EMPTY), prior=0.5)
    assert fused.minimum == "review" and fused.score is None


def test_a_vpdq_that_cannot_be_made_never_fails_the_item(tmp_path, monkeypatch) -> None:
    from synthwatch.errors import LimitExceeded
    from synthwatch.operators import sandbox
    from synthwatch.pipeline.scan import scan_all
    from tests.api_harness import api_settings
    from tests.media_factory import make_video

    def too_slow(*_args: object, **_kwargs: object) -> object:
        raise LimitExceeded("decoding took 61.0 s, over the cap of 60 s")

    monkeypatch.setattr(sandbox, "vpdq_turned", too_slow)
    clip = make_video(tmp_path / "clip.mp4", seconds=2.0, width=320, height=240)
    (result,) = scan_all(api_settings(tmp_path), [str(clip)], workers=1)
    verdict = result.verdict
    assert verdict is not None and verdict.decision in ("pass", "review", "flag")
    assert [h.algorithm for h in verdict.hashes] == ["pdq"] * len(verdict.frames)
    assert any(n.startswith("vPDQ not computed (decoding took 61.0 s") for n in verdict.notes)


def test_the_alert_and_its_siem_finding_name_the_matched_entry() -> None:
    from msgspec.structs import replace

    from synthwatch.operators.alert import make_alert
    from synthwatch.operators.siem import ocsf_finding
    from synthwatch.schemas import HashMatch
    from tests.unit.test_decide import verdict

    match = HashMatch(
        list="afp",
        entry="case-2291",
        label="fake",
        algorithm="pdq",
        distance=12,
        threshold=31,
        reference="https://factcheck.example/case-2291",
        source="AFP",
    )
    flagged = replace(verdict(), matches=[match], decided_by=["match"])
    alert = make_alert(
        flagged, evidence_uri="s3://b/evidence/x/manifest.json", manifest_sha256="cd" * 32
    )
    assert alert.matches == [match]
    (found,) = ocsf_finding(alert)["unmapped"]["matches"]
    assert found["entry"] == "case-2291" and found["reference"].endswith("case-2291")
    assert ocsf_finding(alert)["unmapped"]["decided_by"] == ["match"]


def test_a_mirrored_copy_matches_through_its_flipped_hash_and_says_so() -> None:
    from synthwatch.operators import phash
    from synthwatch.operators.sample import Frame

    skdata = pytest.importorskip("skimage.data")
    photo = skdata.astronaut()
    listed, _ = phash.pdq(photo)
    m = Matcher(MatchingSettings())
    m.put(pdq_entry(listed))
    mirrored = [Frame(index=0, time_s=0.0, image=np.ascontiguousarray(photo[:, ::-1]))]
    hashes, variants = phash.hash_frames(mirrored, still=True)
    assert m.match(hashes) == []  # the plain hash is far: mirroring defeats it
    (found,) = m.match(hashes, variants)
    assert found.transform == "mirrored" and found.distance <= 31
    assert "mirrored" in matching.describe(found)
    # The unturned original matches as itself, not through a variant.
    hashes, variants = phash.hash_frames([Frame(0, 0.0, photo)], still=True)
    (same,) = m.match(hashes, variants)
    assert (same.transform, same.distance) == ("", 0)


def test_a_mirrored_video_matches_a_vpdq_entry_through_one_turn() -> None:
    from synthwatch.operators.phash import Variant

    known = [rand_hex() for _ in range(10)]
    m = Matcher(MatchingSettings())
    m.put(video_entry(known))
    # The item's plain frames are unrelated; its mirrored turns are the entry's frames.
    plain = video([rand_hex() for _ in range(10)])
    turns = [Variant(flipped(h, 12), 90, float(i), "mirrored", "vpdq") for i, h in enumerate(known)]
    noise = [Variant(rand_hex(), 90, float(i), "turned upside down", "vpdq") for i in range(10)]
    (found,) = m.match(plain, [*noise, *turns])
    assert (found.algorithm, found.transform, found.entry_match_percent) == (
        "vpdq",
        "mirrored",
        100.0,
    )
    # Frames split across two turns do not add up: each turn must reach 80% alone.
    half = turns[:5] + [
        Variant(flipped(h, 12), 90, float(i), "turned upside down", "vpdq")
        for i, h in enumerate(known[5:])
    ]
    assert m.match(plain, half) == []
    # A sampled (pdq) frame's turns never count for a vPDQ entry.
    pdq_turns = [Variant(v.hash, 90, v.time_s, "mirrored", "pdq") for v in turns]
    assert m.match(plain, pdq_turns) == []
    # ... but a sampled frame that is also a vPDQ frame (the same picture) does not hide
    # the vPDQ frame's turn.
    (again,) = m.match(plain, [*pdq_turns, *turns])
    assert (again.entry, again.transform) == ("v1", "mirrored")
