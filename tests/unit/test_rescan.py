"""`synthwatch rescan`: which past verdicts flip under new settings, and why.

The check a newsroom relies on: after a calibration change, the diff names exactly the
items whose decision a fresh scan would now change, says which signal moved, and
reports an item whose media changed or vanished as that item's error only. The diff
itself is a pure function, checked on hand-built verdicts.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from synthwatch.errors import ConfigError, InvalidInput
from synthwatch.models.registry import DEFAULT_CALIBRATION
from synthwatch.operators.alert import alert_id, alert_with_evidence, alerts_on, make_alert
from synthwatch.operators.evidence import EvidenceFrame
from synthwatch.operators.policy import Policy
from synthwatch.operators.signing import Signer
from synthwatch.operators.store import LocalStore
from synthwatch.pipeline import rescan as rs
from synthwatch.schemas import Decision, FrameResult, Rescan, Signal, Verdict, encode
from tests.media_factory import make_image, make_video

# -- hand-built verdicts ---------------------------------------------------------------------


def sig(name: str, score: float, raw: float | None = None) -> Signal:
    return Signal(
        name=name,
        model=f"{name}@1",
        score=score,
        weight=1.0,
        raw_score=raw,
        calibrated=raw is not None,
    )


def verdict(
    vid: str = "m1",
    *,
    decision: Decision = "pass",
    score: float | None = 0.3,
    signals: list[Signal] | None = None,
    source: str = "feed-a",
    submitted_at: float = 1_000.0,
    model_set: str = "ms1",
    policy_version: str = "policy.v1",
    rescan: Rescan | None = None,
    decided_by: list[str] | None = None,
) -> Verdict:
    return Verdict(
        id=vid,
        url=f"https://example.org/media/{vid}.jpg?sig=secret",
        source=source,
        submitted_at=submitted_at,
        sha256="ab" * 32,
        media_type="image",
        synthetic_score=score,
        decision=decision,
        signals=signals if signals is not None else [sig("fingerprint", 0.3, 0.45)],
        segments=[],
        frames=[FrameResult(index=0, time_s=0.0, score=0.3, region="frame")],
        duration_s=0.0,
        faces_found=0,
        has_audio=False,
        model_set=model_set,
        policy_version=policy_version,
        blob="/media/x.jpg",
        decided_by=decided_by if decided_by is not None else ["fingerprint"],
        detected_at=submitted_at + 1,
        rescan=rescan,
    )


def test_diff_explains_each_flip_by_the_signals_that_moved_appeared_or_vanished() -> None:
    before = verdict(
        "a",
        decision="pass",
        score=0.3,
        signals=[sig("fingerprint", 0.39, 0.45), sig("ela", 0.5), sig("scene_probe", 0.2, 0.1)],
    )
    after = verdict(
        "a",
        decision="flag",
        score=0.95,
        model_set="ms2",
        signals=[
            sig("fingerprint", 0.88, 0.45),  # +0.49: calibration moved, raw did not
            sig("ela", 0.5),  # unchanged: not a reason
            sig("scene_probe", 0.1, 0.1),  # -0.10
            sig("match", 0.99),  # a new list of known fakes matched
        ],
        decided_by=["match", "fingerprint"],
    )
    steady = verdict("b", decision="review", score=0.6)
    steady_after = verdict("b", decision="review", score=0.61, model_set="ms2")
    went_down = verdict("c", decision="flag", score=0.9, signals=[sig("aasist", 0.9)])
    went_down_after = verdict("c", decision="pass", score=0.2, signals=[])
    d = rs.diff(
        [
            rs.Outcome(before, new=after),
            rs.Outcome(steady, new=steady_after),
            rs.Outcome(went_down, new=went_down_after),
            rs.Outcome(verdict("d"), reason="missing", error="cannot read /media/d.jpg"),
            rs.Outcome(verdict("e"), reason="pending", error="no new verdict within 5 s"),
        ],
        run="r1",
        mode="cluster",
    )
    a, b, c, missing, pending = d.items
    assert a.flipped and a.transition == "pass -> flag"
    assert a.score_change == pytest.approx(0.65)
    assert a.name == "a.jpg" and a.url.endswith("?sig=secret")  # shown as the verdict had it
    assert [(s.name, s.status) for s in a.signals] == [
        ("match", "appeared"),
        ("fingerprint", "moved"),
        ("scene_probe", "moved"),
    ]
    fp = a.signals[1]
    assert fp.before == 0.39 and fp.after == 0.88 and fp.change == pytest.approx(0.49)
    assert fp.raw_before == fp.raw_after == 0.45
    assert a.model_set is not None and (a.model_set.before, a.model_set.after) == ("ms1", "ms2")
    assert a.decided_by is not None and a.decided_by.after == ["match", "fingerprint"]
    assert not b.flipped and b.transition is None and b.score_change == pytest.approx(0.01)
    assert [(s.name, s.status, s.before) for s in c.signals] == [("aasist", "disappeared", 0.9)]
    assert (missing.status, missing.reason, missing.decision) == ("error", "missing", None)
    assert pending.status == "pending"
    assert d.summary == rs.Summary(
        items=5,
        rescanned=3,
        flipped=2,
        unchanged=1,
        errors=1,
        pending=1,
        transitions={"flag -> pass": 1, "pass -> flag": 1},
    )
    assert rs.summary_line(d) == (
        "5 item(s): 3 re-scanned, 2 flipped (flag -> pass: 1, pass -> flag: 1), "
        "1 error(s), 1 pending"
    )
    # The JSON a user keeps is plain data: it reads back with the same numbers.
    back = json.loads(rs.to_json(d))
    assert back["summary"]["transitions"] == {"flag -> pass": 1, "pass -> flag": 1}
    assert back["items"][0]["signals"][0] == {
        "name": "match",
        "status": "appeared",
        "before": None,
        "after": 0.99,
        "change": None,
        "raw_before": None,
        "raw_after": None,
    }


def test_a_verdict_without_a_score_has_no_score_change() -> None:
    before = verdict("a", decision="inconclusive", score=None, signals=[])
    after = verdict("a", decision="flag", score=0.9)
    (item,) = rs.diff([rs.Outcome(before, new=after)], run="r", mode="embedded").items
    assert item.flipped and item.score_change is None
    assert [(s.name, s.status) for s in item.signals] == [("fingerprint", "appeared")]


# -- reading and selecting ----------------------------------------------------------------


def test_scan_output_lines_are_read_as_verdicts_and_error_lines_are_skipped(
    tmp_path: Path,
) -> None:
    v = verdict("a")
    as_scan_writes = {k: val for k, val in json.loads(encode(v)).items() if k != "type"}
    as_scan_writes |= {"alert_id": "0" * 32, "evidence": "file:///e/manifest.json"}
    newer = verdict("a", decision="flag", submitted_at=2_000.0)
    path = tmp_path / "verdicts.jsonl"
    path.write_text(
        json.dumps(as_scan_writes)
        + "\n"
        + json.dumps({"source": "broken.mp4", "error": "corrupt_media", "message": "x"})
        + "\n\n"
        + encode(newer).decode()
        + "\n"
        + encode(verdict("b")).decode()
        + "\n"
    )
    loaded = rs.read_verdict_files([path])
    # One item per id, its latest verdict; scan's error line holds no verdict.
    assert [(x.id, x.decision) for x in loaded.verdicts] == [("a", "flag"), ("b", "pass")]
    assert (loaded.skipped, loaded.superseded) == (1, 1)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "verdicts.jsonl:2: not JSON"),
        ('{"id": "x"}', "verdicts.jsonl:2: not a verdict record"),
        ("[1, 2]", "verdicts.jsonl:2: not a verdict record"),
    ],
)
def test_a_line_that_is_not_a_verdict_is_bad_input_naming_file_and_line(
    tmp_path: Path, line: str, message: str
) -> None:
    path = tmp_path / "verdicts.jsonl"
    path.write_text(encode(verdict("a")).decode() + "\n" + line + "\n")
    with pytest.raises(InvalidInput, match=message):
        rs.read_verdict_files([path])
    with pytest.raises(InvalidInput, match="cannot read verdicts file"):
        rs.read_verdict_files([tmp_path / "absent.jsonl"])


def test_filters_select_by_submission_time_source_and_earlier_decision() -> None:
    day = 86_400.0
    jan1 = rs.parse_time("2025-01-01", "--since")
    assert jan1 == rs.parse_time("2025-01-01T00:00:00+00:00", "--since")  # no zone = UTC
    assert rs.parse_time("2025-01-01T01:00:00+01:00", "--since") == jan1
    assert rs.parse_time(str(jan1), "--since") == jan1
    items = [
        verdict("dec31", submitted_at=jan1 - 1, decision="flag"),
        verdict("jan1", submitted_at=jan1, decision="pass"),
        verdict("jan15", submitted_at=jan1 + 14 * day, decision="review", source="feed-b"),
        verdict("feb1", submitted_at=jan1 + 31 * day, decision="flag"),
        # A producer that predates submitted_at: the verdict's own time stands in.
        msgspec.structs.replace(
            verdict("old", submitted_at=0.0, decision="flag"), detected_at=jan1 + day
        ),
    ]

    def pick(**kw: Any) -> list[str]:
        f = rs.Filters(**kw)
        return [v.id for v in items if f.matches(v)]

    january = {"since": jan1, "until": rs.parse_time("2025-02-01", "--until")}
    assert pick(**january) == ["jan1", "jan15", "old"]
    assert pick(**january, decisions=("flag",)) == ["old"]
    assert pick(sources=("feed-b",)) == ["jan15"]
    assert pick(decisions=rs.check_decisions(["flag", "review"])) == [
        "dec31",
        "jan15",
        "feb1",
        "old",
    ]
    with pytest.raises(ConfigError, match="--decision: 'flagged'"):
        rs.check_decisions(["flagged"])
    with pytest.raises(ConfigError, match="--since: 'last week'"):
        rs.parse_time("last week", "--since")
    with pytest.raises(ConfigError, match="--until: 'nan'"):  # a float, but no time
        rs.parse_time("nan", "--until")
    with pytest.raises(ConfigError, match="--until must be later"):
        rs.Filters(since=jan1, until=jan1)


# -- the alert of a flipped re-scan -----------------------------------------------------------

POLICY = Policy(version="policy.v1", flag_threshold=0.8, review_threshold=0.5)


def _frames() -> list[EvidenceFrame]:
    return [EvidenceFrame(time_s=0.0, image=np.zeros((64, 64, 3), dtype=np.uint8))]


def test_a_flipped_rescan_alerts_whatever_its_decision_and_carries_the_marker(
    tmp_path: Path,
) -> None:
    was_flag = Rescan(
        run="r1", previous_decision="flag", previous_model_set="ms0", previous_policy_version="p0"
    )
    withdrawn = verdict("a", decision="pass", score=0.1, rescan=was_flag)
    store = LocalStore(tmp_path)
    decided = alert_with_evidence(
        withdrawn,
        _frames,
        store,
        evidence_prefix="",
        policy=POLICY,
        signer=Signer.generate(),
    )
    assert decided is not None, "a pass that withdraws a flag must reach the SIEM"
    alert, bundle = decided
    assert alert.decision == "pass" and alert.rescan == was_flag
    # New models and policy: the id is the ordinary one for this verdict.
    assert alert.alert_id == alert_id(withdrawn.sha256, "ms1", "policy.v1")
    report = json.loads((tmp_path / bundle.manifest_key).read_text())
    assert report["media_sha256"] == withdrawn.sha256

    # A re-scan that did not flip follows the policy: a pass stays silent, a flag alerts
    # as any flag does, without the marker.
    still_pass = Rescan(run="r1", previous_decision="pass")
    assert not alerts_on(verdict("b", decision="pass", rescan=still_pass), POLICY)
    still_flag = verdict(
        "c", decision="flag", score=0.9, rescan=Rescan(run="r1", previous_decision="flag")
    )
    assert alerts_on(still_flag, POLICY)
    assert make_alert(still_flag, evidence_uri="s3://b/k", manifest_sha256="0").rescan is None
    # Verdicts that are no re-scan behave exactly as before.
    plain = verdict("d", decision="flag", score=0.9)
    assert make_alert(plain, evidence_uri="s3://b/k", manifest_sha256="0").alert_id == (
        alert_id(plain.sha256, plain.model_set, plain.policy_version)
    )
    assert not alerts_on(verdict("e", decision="pass"), POLICY)


def test_a_flip_under_the_same_model_set_and_policy_gets_an_alert_id_of_its_own() -> None:
    # E.g. a new list of known fakes, or thresholds changed without a new version: the
    # ordinary id would be the earlier alert's, dropped by a SIEM as a duplicate.
    same = Rescan(
        run="r1",
        previous_decision="pass",
        previous_model_set="ms1",
        previous_policy_version="policy.v1",
    )
    flipped = verdict("a", decision="flag", score=0.9, rescan=same)
    first = make_alert(flipped, evidence_uri="s3://b/k", manifest_sha256="0")
    earlier_id = alert_id(flipped.sha256, "ms1", "policy.v1")
    assert first.alert_id != earlier_id
    # Still deterministic: a redelivered verdict gets the same id.
    assert make_alert(flipped, evidence_uri="s3://b/k", manifest_sha256="0").alert_id == (
        first.alert_id
    )


# -- the whole command, with the shipped models ---------------------------------------------


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "synthwatch", *args],
        env={**env, "PATH": "/usr/bin:/bin", "COLUMNS": "200"},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def model_env(shared_dir: Path, tmp_path: Path) -> dict[str, str]:
    return {
        "SYNTHWATCH_MODEL_DIR": str(shared_dir / "weights"),
        "HOME": str(tmp_path / "home"),
        "SYNTHWATCH_SAMPLE__FRAMES": "4",
    }


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _recalibrated(tmp_path: Path) -> Path:
    """The shipped calibration with `fingerprint` made to read every image as likely
    generated: its Platt intercept raised from about -0.45 to 2.0."""
    cal = json.loads(DEFAULT_CALIBRATION.read_text())
    (fp,) = [c for c in cal["calibrators"] if c["signal"] == "fingerprint"]
    fp["a"], fp["b"] = 0.0, 2.0
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps(cal))
    return path


@pytest.mark.shared
def test_rescan_after_a_calibration_change_lists_exactly_the_items_a_fresh_scan_flips(
    model_env: dict[str, str], shared_dir: Path, tmp_path: Path
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    make_image(media / "small.png", width=320, height=240, fmt="PNG")
    make_image(media / "large.jpg", width=600, height=600)
    make_video(media / "clip.mp4", seconds=1.0, faces=True)
    shutil.copy(shared_dir / "media/dev/fake/df00204.jpg", media / "face.jpg")
    shutil.copy(shared_dir / "media/dev/real/real00240.jpg", media / "real.jpg")
    before = tmp_path / "before.jsonl"
    proc = _cli(["scan", str(media), "--json", str(before)], model_env)
    assert proc.returncode == 0, proc.stderr

    new_env = {**model_env, "SYNTHWATCH_MODELS__CALIBRATION": str(_recalibrated(tmp_path))}
    fresh = tmp_path / "fresh.jsonl"
    proc = _cli(["scan", str(media), "--json", str(fresh)], new_env)
    assert proc.returncode == 0, proc.stderr
    old = {r["id"]: r for r in _lines(before)}
    now = {r["id"]: r for r in _lines(fresh)}
    should_flip = {i for i in old if old[i]["decision"] != now[i]["decision"]}
    # The new calibration must flip some items and leave others, or this proves little.
    assert should_flip and should_flip != set(old), (old, now)

    diff_path, new_verdicts = tmp_path / "diff.json", tmp_path / "new.jsonl"
    proc = _cli(
        ["rescan", str(before), "--out", str(diff_path), "--verdicts-out", str(new_verdicts)],
        new_env,
    )
    assert proc.returncode == 0, proc.stderr
    d = json.loads(diff_path.read_text())
    flipped = {i["id"] for i in d["items"] if i["flipped"]}
    assert flipped == should_flip
    assert d["summary"]["flipped"] == len(should_flip) and d["summary"]["errors"] == 0
    for item in d["items"]:
        assert item["decision"] == now[item["id"]]["decision"]
        if item["flipped"]:
            # Why: the recalibrated signal moved, the raw score did not.
            fp = next(s for s in item["signals"] if s["name"] == "fingerprint")
            assert fp["status"] == "moved" and fp["after"] > fp["before"]
            assert fp["raw_after"] == pytest.approx(fp["raw_before"])
            assert item["model_set"]["before"] != item["model_set"]["after"]
            # The table names every flipped item and its transition.
            assert item["name"] in proc.stdout
            assert f"{item['previous_decision']} -> {item['decision']}" in proc.stdout
    assert f"{len(should_flip)} flipped" in proc.stdout
    # The new verdicts carry the marker, with the earlier decision, and can be re-scanned.
    for rec in _lines(new_verdicts):
        assert rec["rescan"]["run"] == d["run"]
        assert rec["rescan"]["previous_decision"] == old[rec["id"]]["decision"]
    again = _cli(["rescan", str(new_verdicts), "--json"], new_env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["summary"]["flipped"] == 0

    # Filters: only the items whose earlier decision was `pass`, from one source.
    passed = {i for i in old if old[i]["decision"] == "pass"}
    only_pass = _cli(["rescan", str(before), "--json", "--decision", "pass"], new_env)
    assert {i["id"] for i in json.loads(only_pass.stdout)["items"]} == passed
    one = str(media / "clip.mp4")
    by_source = _cli(["rescan", str(before), "--json", "--source", one], new_env)
    assert [i["source"] for i in json.loads(by_source.stdout)["items"]] == [one]
    later = _cli(["rescan", str(before), "--json", "--since", "2999-01-01"], new_env)
    assert json.loads(later.stdout)["summary"]["items"] == 0


@pytest.mark.shared
def test_changed_or_missing_media_is_that_items_error_and_the_others_are_rescanned(
    model_env: dict[str, str], tmp_path: Path
) -> None:
    media = tmp_path / "media"
    media.mkdir()
    for n in range(3):
        make_image(media / f"img{n}.png", width=200 + 40 * n, height=200, fmt="PNG")
    before = tmp_path / "before.jsonl"
    proc = _cli(["scan", str(media), "--json", str(before)], model_env)
    assert proc.returncode == 0, proc.stderr
    (media / "img0.png").unlink()
    with (media / "img1.png").open("ab") as fh:  # same name, other bytes
        fh.write(b"\0")

    proc = _cli(["rescan", str(before), "--json"], model_env)
    assert proc.returncode == 0, proc.stderr  # it ran: per-item errors are findings too
    d = json.loads(proc.stdout)
    by_name = {i["name"]: i for i in d["items"]}
    assert by_name["img0.png"]["status"] == "error"
    assert by_name["img0.png"]["reason"] == "missing"
    assert by_name["img1.png"]["reason"] == "changed"
    assert "not re-scored" in by_name["img1.png"]["error"]
    assert by_name["img2.png"]["status"] == "rescanned"
    assert by_name["img2.png"]["decision"] == by_name["img2.png"]["previous_decision"]
    assert d["summary"] | {"transitions": None} == {
        "items": 3,
        "rescanned": 1,
        "flipped": 0,
        "unchanged": 1,
        "errors": 2,
        "pending": 0,
        "transitions": None,
    }
    # The table (without --json) lists the items it could not re-scan, and why.
    table = _cli(["rescan", str(before)], model_env)
    assert table.returncode == 0 and "not re-scanned" in table.stdout
    assert "missing" in table.stdout and "changed" in table.stdout


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    good = tmp_path / "v.jsonl"
    good.write_text(encode(verdict("a")).decode() + "\n")
    env = {"SYNTHWATCH_MODEL_DIR": str(tmp_path / "none"), "HOME": str(tmp_path)}
    for args, words in [
        ([str(tmp_path / "absent.jsonl")], "cannot read verdicts file"),
        ([str(good), "--decision", "maybe"], "--decision"),
        ([str(good), "--since", "soon"], "--since"),
        ([str(good), "--from-topic"], "--cluster"),
        ([], "name the verdict files"),
    ]:
        proc = _cli(["rescan", *args], env)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and words in lines[0] and "Traceback" not in proc.stderr
