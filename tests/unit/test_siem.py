"""SOC outputs as a SIEM sees them: OCSF Detection Findings that a maintained model library
accepts, Splunk HEC envelopes, byte-identical redeliveries, and `synthwatch alerts convert`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import msgspec
import pytest
from py_ocsf_models import OCSF_VERSION as LIBRARY_OCSF_VERSION
from py_ocsf_models.events.findings.activity_id import ActivityID
from py_ocsf_models.events.findings.category_uid import CategoryUID
from py_ocsf_models.events.findings.class_uid import ClassUID
from py_ocsf_models.events.findings.confidence_id import ConfidenceID
from py_ocsf_models.events.findings.detection_finding import DetectionFinding
from py_ocsf_models.events.findings.detection_finding_type_id import DetectionFindingTypeID
from py_ocsf_models.events.findings.severity_id import SeverityID
from py_ocsf_models.events.findings.status_id import StatusID
from py_ocsf_models.objects.fingerprint import AlgorithmID, FingerPrint
from py_ocsf_models.objects.observable import TypeID as ObservableTypeID
from pydantic import ValidationError
from typer.testing import CliRunner

import synthwatch
from synthwatch.operators import siem
from synthwatch.operators.alert import make_alert
from synthwatch.pipeline.cli import app
from synthwatch.schemas import Alert, Decision, Segment, Verdict, decode, encode

MEDIA_SHA = "a1" * 32
MANIFEST_SHA = "b2" * 32
DETECTED_AT = 1_712_345_678.1234
SUBMITTED_AT = 1_712_345_600.5
SIGNED_URL = (
    "https://uploader:hunter2pw@cdn.example.org/clips/v.mp4"
    "?X-Amz-Credential=AKIAEXAMPLEKEYID%2F20240101&X-Amz-Signature=deadbeefsig0123&w=640"
)
SECRET_PIECES = ("hunter2pw", "AKIAEXAMPLEKEYID", "deadbeefsig0123")

# Attributes of OCSF 1.5.0 that py-ocsf-models 0.10.0 does not model (its evidence
# object leaves `file` unmodelled), so its validation drops them; checked separately below.
SPEC_ONLY = {"evidences[0].file", "evidences[1].file"}


def _verdict(**kw: Any) -> Verdict:
    fields: dict[str, Any] = {
        "id": "media-1",
        "url": SIGNED_URL,
        "source": "newsdesk",
        "submitted_at": SUBMITTED_AT,
        "sha256": MEDIA_SHA,
        "media_type": "video",
        "synthetic_score": 0.91,
        "decision": "flag",
        "signals": [],
        "segments": [Segment(start_s=1.0, end_s=2.5, score=0.93)],
        "frames": [],
        "duration_s": 10.0,
        "faces_found": 1,
        "has_audio": False,
        "model_set": "0123456789abcdef",
        "policy_version": "policy.v1",
        "blob": "blobs/sha256/a1/a1/" + MEDIA_SHA,
        "decided_by": ["sbi_face"],
        "detected_at": DETECTED_AT,
    }
    fields.update(kw)
    return Verdict(**fields)


def _alert(**kw: Any) -> Alert:
    return make_alert(
        _verdict(**kw),
        evidence_uri="s3://synthwatch/evidence/x/manifest.json",
        manifest_sha256=MANIFEST_SHA,
    )


def _unknown_keys(sent: Any, kept: Any, path: str = "") -> set[str]:
    """Paths of what we sent that the validated model does not have (it ignores extras)."""
    if isinstance(sent, dict) and isinstance(kept, dict):
        out: set[str] = set()
        for key, value in sent.items():
            where = f"{path}.{key}" if path else key
            if key not in kept:
                out.add(where)
            elif key != "unmapped":  # free-form by definition
                out |= _unknown_keys(value, kept[key], where)
        return out
    if isinstance(sent, list) and isinstance(kept, list):
        return set().union(
            *(
                _unknown_keys(s, k, f"{path}[{i}]")
                for i, (s, k) in enumerate(zip(sent, kept, strict=True))
            )
        )
    return set()


def validate_finding(finding: dict[str, Any]) -> DetectionFinding:
    """py-ocsf-models' validation, plus what it leaves unchecked: it types class_uid and
    category_uid as plain ints and ignores unknown attributes."""
    model = DetectionFinding.model_validate(finding)
    assert model.class_uid == ClassUID.DetectionFinding, f"class_uid {model.class_uid}"
    assert model.category_uid == CategoryUID.Findings, f"category_uid {model.category_uid}"
    assert model.type_uid == model.class_uid * 100 + model.activity_id
    kept = model.model_dump(mode="json", exclude_unset=True)
    unknown = _unknown_keys(finding, kept) - SPEC_ONLY
    assert not unknown, f"attributes the OCSF model does not have: {sorted(unknown)}"
    for evidence in finding["evidences"]:
        file = evidence["file"]  # OCSF 1.5.0 file: name and type_id required
        assert file["name"] and file["type_id"] == 1
        for fingerprint in file["hashes"]:
            FingerPrint.model_validate(fingerprint)
    return model


# --- OCSF ------------------------------------------------------------------------------


@pytest.mark.parametrize("decision", ["flag", "review", "pass", "inconclusive"])
@pytest.mark.parametrize("media_type", ["video", "image", "audio"])
def test_ocsf_finding_validates_as_a_detection_finding(decision: Decision, media_type: str) -> None:
    score = None if decision == "inconclusive" else 0.9
    alert = _alert(decision=decision, media_type=media_type, synthetic_score=score)
    finding = json.loads(siem.format_alert(alert, "ocsf"))
    model = validate_finding(finding)
    assert (finding["class_uid"], finding["category_uid"]) == (2004, 2)
    assert (finding["activity_id"], finding["type_uid"]) == (1, 200401)
    assert model.status_id == StatusID.New
    assert finding["metadata"]["version"] == siem.OCSF_VERSION == LIBRARY_OCSF_VERSION == "1.5.0"
    assert finding["metadata"]["product"] == {
        "name": "synthwatch",
        "vendor_name": "synthwatch",
        "version": synthwatch.__version__,
    }
    info = finding["finding_info"]
    assert info["uid"] == finding["metadata"]["uid"] == alert.alert_id
    assert media_type in info["title"] and info["types"][0] == "Synthetic Media"
    assert info["analytic"]["uid"] == alert.model_set
    assert info["created_time"] == finding["time"] == round(DETECTED_AT * 1000)
    assert info["data_sources"] == [f"{media_type} media", "newsdesk"]
    assert finding["resources"][0]["uid"] == "media-1"
    unmapped = finding["unmapped"]
    assert unmapped["segments"] == [{"start_s": 1.0, "end_s": 2.5, "score": 0.93}]
    assert unmapped["decided_by"] == ["sbi_face"]
    assert (unmapped["model_set"], unmapped["policy_version"]) == (
        "0123456789abcdef",
        "policy.v1",
    )


def _broken(change: str) -> dict[str, Any]:
    finding = siem.ocsf_finding(_alert())
    if change == "no finding_info":
        del finding["finding_info"]
    elif change == "no time":
        del finding["time"]
    elif change == "no finding uid":
        del finding["finding_info"]["uid"]
    elif change == "type_uid of another class":
        finding["type_uid"] = 200301
    elif change == "severity_id out of the enum":
        finding["severity_id"] = 7
    elif change == "class_uid of another class":
        finding["class_uid"] = 2003
    elif change == "misspelt attribute":
        finding["finding_information"] = finding.pop("finding_info")
        finding["finding_info"] = {"uid": "x", "title": "x"}
    elif change == "fingerprint algorithm out of the enum":
        finding["evidences"][0]["file"]["hashes"][0]["algorithm_id"] = 42
    return finding


@pytest.mark.parametrize(
    "change",
    [
        "no finding_info",
        "no time",
        "no finding uid",
        "type_uid of another class",
        "severity_id out of the enum",
        "class_uid of another class",
        "misspelt attribute",
        "fingerprint algorithm out of the enum",
    ],
)
def test_validation_rejects_a_broken_finding(change: str) -> None:
    validate_finding(siem.ocsf_finding(_alert()))  # the unbroken one passes
    with pytest.raises((ValidationError, AssertionError)):
        validate_finding(_broken(change))


def test_the_model_library_alone_accepts_a_wrong_class_uid() -> None:
    # Why validate_finding checks class_uid itself: py-ocsf-models types it as any int.
    DetectionFinding.model_validate(_broken("class_uid of another class"))


def test_enum_ids_are_the_ocsf_ones() -> None:
    ours_and_theirs: list[tuple[object, object]] = [
        (siem.CLASS_UID, ClassUID.DetectionFinding),
        (siem.CATEGORY_UID, CategoryUID.Findings),
        (siem.ACTIVITY_ID, ActivityID.Create),
        (siem.TYPE_UID, DetectionFindingTypeID.Create),
        (siem.STATUS_ID, StatusID.New),
        (siem.SEVERITY["flag"], (SeverityID.High, "High")),
        (siem.SEVERITY["review"], (SeverityID.Medium, "Medium")),
        (siem.SEVERITY["pass"], (SeverityID.Informational, "Informational")),
        (siem.SEVERITY["inconclusive"], (SeverityID.Unknown, "Unknown")),
        (siem.CONFIDENCE_UNKNOWN, (ConfidenceID.Unknown, "Unknown")),
        (siem.SHA256_ALGORITHM_ID, AlgorithmID.SHA_256),
        (siem.OBSERVABLE_HASH[0], ObservableTypeID.Hash),
        (siem.OBSERVABLE_URL[0], ObservableTypeID.URL_String),
        (siem.OBSERVABLE_RESOURCE_UID[0], ObservableTypeID.Resource_UID),
    ]
    ours_and_theirs += [
        ((cid, caption), (ConfidenceID[caption], caption))
        for _, (cid, caption) in siem.CONFIDENCE_BANDS
    ]
    for ours, theirs in ours_and_theirs:
        assert ours == theirs
    # py-ocsf-models has no enum for analytic.type_id; OCSF 1.5.0 objects/analytic.json:
    # 0 Unknown, 1 Rule, 2 Behavioral, 3 Statistical, 4 Learning (ML/DL), 99 Other.
    assert (siem.ANALYTIC_TYPE_ID, siem.ANALYTIC_TYPE) == (4, "Learning (ML/DL)")


@pytest.mark.parametrize(
    ("decision", "score", "severity", "confidence", "percent"),
    [
        ("flag", 1.0, (4, "High"), (3, "High"), 100),
        ("flag", 0.8, (4, "High"), (3, "High"), 80),
        ("review", 0.795, (3, "Medium"), (3, "High"), 80),  # rounds to 80: High, as shown
        ("review", 0.7949, (3, "Medium"), (2, "Medium"), 79),
        ("review", 0.5, (3, "Medium"), (2, "Medium"), 50),
        ("pass", 0.4949, (1, "Informational"), (1, "Low"), 49),
        ("pass", 0.0, (1, "Informational"), (1, "Low"), 0),
        ("flag", 0.3, (4, "High"), (1, "Low"), 30),  # decided by a signal on its own
        ("flag", 1.7, (4, "High"), (3, "High"), 100),  # clamped
        ("pass", -0.2, (1, "Informational"), (1, "Low"), 0),
    ],
)
def test_severity_and_confidence_table(
    decision: Decision,
    score: float,
    severity: tuple[int, str],
    confidence: tuple[int, str],
    percent: int,
) -> None:
    finding = siem.ocsf_finding(_alert(decision=decision, synthetic_score=score))
    validate_finding(finding)
    assert (finding["severity_id"], finding["severity"]) == severity
    assert (finding["confidence_id"], finding["confidence"]) == confidence
    assert finding["confidence_score"] == percent


def test_a_score_that_is_not_a_number_has_unknown_confidence() -> None:
    finding = siem.ocsf_finding(_alert(synthetic_score=float("nan")))
    validate_finding(finding)
    assert (finding["confidence_id"], finding["confidence"]) == (0, "Unknown")
    assert "confidence_score" not in finding
    json.loads(siem.format_alert(_alert(synthetic_score=float("nan")), "ocsf"))  # valid JSON


def test_an_inconclusive_alert_says_nothing_was_measured() -> None:
    # Alerts on inconclusive items exist only where alert_on asks for them; a SOC then
    # sees severity Unknown and no confidence, never a low score read as "real".
    alert = _alert(decision="inconclusive", synthetic_score=None, decided_by=[])
    finding = siem.ocsf_finding(alert)
    validate_finding(finding)
    assert (finding["severity_id"], finding["severity"]) == (0, "Unknown")
    assert (finding["confidence_id"], finding["confidence"]) == (0, "Unknown")
    assert "confidence_score" not in finding
    assert finding["unmapped"]["synthetic_score"] is None
    assert finding["unmapped"]["record_type"] == "alert.v2"
    assert "inconclusive" in finding["finding_info"]["title"]
    assert "could score" in finding["finding_info"]["desc"]
    assert "synthetic score unknown" in finding["message"]
    hec = json.loads(siem.format_alert(alert, "splunk_hec"))
    assert hec["event"] == finding


@pytest.mark.parametrize("fmt", siem.FORMATS)
def test_a_redelivered_alert_gives_identical_bytes(fmt: siem.Format) -> None:
    alert = _alert()
    redelivered = decode(encode(alert), Alert)  # the same record read back off the topic
    again = _alert()  # or built again by another worker from the same verdict
    first = siem.format_alert(alert, fmt, index="soc")
    assert siem.format_alert(redelivered, fmt, index="soc") == first
    assert siem.format_alert(again, fmt, index="soc") == first


def test_different_alerts_get_different_uids() -> None:
    alerts = [
        _alert(),
        _alert(sha256="c3" * 32),
        _alert(policy_version="policy.v2"),
        _alert(model_set="fedcba9876543210"),
    ]
    uids = [siem.ocsf_finding(a)["finding_info"]["uid"] for a in alerts]
    assert uids == [a.alert_id for a in alerts]
    assert len(set(uids)) == len(alerts)


def test_the_time_falls_back_to_submission_then_to_unknown() -> None:
    detected = siem.ocsf_finding(_alert())
    assert detected["time"] == 1_712_345_678_123
    submitted = _alert(detected_at=0.0)
    assert siem.ocsf_finding(submitted)["time"] == round(SUBMITTED_AT * 1000)
    assert siem.splunk_hec_event(submitted)["time"] == SUBMITTED_AT
    unknown = _alert(detected_at=0.0, submitted_at=0.0)
    finding = siem.ocsf_finding(unknown)
    validate_finding(finding)
    assert finding["time"] == 0
    assert "time" not in siem.splunk_hec_event(unknown)  # Splunk stamps it on receipt


def test_media_and_manifest_sha256_are_sha256_fingerprints() -> None:
    finding = siem.ocsf_finding(_alert())
    media, bundle = finding["evidences"]
    for evidence, sha in [(media, MEDIA_SHA), (bundle, MANIFEST_SHA)]:
        (fingerprint,) = evidence["file"]["hashes"]
        model = FingerPrint.model_validate(fingerprint)
        assert model.algorithm_id == AlgorithmID.SHA_256
        assert (model.algorithm, model.value) == ("SHA-256", sha)
    assert media["file"]["name"] == "v.mp4"
    assert bundle["file"]["name"] == "manifest.json"
    assert bundle["url"]["url_string"] == "s3://synthwatch/evidence/x/manifest.json"
    hashes = [o["value"] for o in finding["observables"] if o["type_id"] == ObservableTypeID.Hash]
    assert hashes == [MEDIA_SHA, MANIFEST_SHA]


def test_a_local_evidence_bundle_is_a_file_path() -> None:
    alert = make_alert(
        _verdict(url="/data/in/clip.mp4"),
        evidence_uri="/srv/evidence/0123/manifest.json",
        manifest_sha256=MANIFEST_SHA,
    )
    finding = siem.ocsf_finding(alert)
    validate_finding(finding)
    media, bundle = finding["evidences"]
    assert media["file"] == {
        "name": "clip.mp4",
        "path": "/data/in/clip.mp4",
        "type": "Regular File",
        "type_id": 1,
        "hashes": [{"algorithm": "SHA-256", "algorithm_id": 3, "value": MEDIA_SHA}],
    }
    assert "url" not in media and "url" not in bundle
    assert bundle["file"]["path"] == "/srv/evidence/0123/manifest.json"
    assert all(o["type_id"] != ObservableTypeID.URL_String for o in finding["observables"])


@pytest.mark.parametrize("fmt", siem.FORMATS)
def test_outputs_add_nothing_secret_to_a_redacted_alert(fmt: siem.Format) -> None:
    alert = _alert()
    assert "REDACTED" in alert.url  # make_alert already stripped the signature
    body = siem.format_alert(alert, fmt, index="soc").decode()
    for piece in SECRET_PIECES:
        assert piece not in body
    if fmt != "native":
        finding = json.loads(body)
        finding = finding.get("event", finding)
        assert finding["evidences"][0]["url"]["url_string"] == alert.url  # shown as is
        assert finding["evidences"][0]["url"]["hostname"] == "cdn.example.org"


def test_an_unredacted_alert_from_elsewhere_is_redacted_in_ocsf() -> None:
    # e.g. a hand-written line given to `synthwatch alerts convert`
    raw = msgspec.structs.replace(_alert(), url=SIGNED_URL, source=SIGNED_URL)
    body = siem.format_alert(raw, "ocsf").decode()
    for piece in SECRET_PIECES:
        assert piece not in body
    assert "cdn.example.org/clips/v.mp4" in body


def test_native_is_the_alert_record_itself() -> None:
    alert = _alert()
    body = siem.format_alert(alert, "native")
    assert body == encode(alert)
    assert json.loads(body)["type"] == "alert.v2"
    assert decode(body, Alert) == alert


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown alert format 'cef'"):
        siem.format_alert(_alert(), "cef")  # type: ignore[arg-type]


# --- Splunk HEC ------------------------------------------------------------------------


def test_hec_envelope_wraps_the_ocsf_finding() -> None:
    alert = _alert()
    envelope = json.loads(siem.format_alert(alert, "splunk_hec"))
    assert set(envelope) == {"time", "source", "sourcetype", "event"}  # unset keys left out
    assert isinstance(envelope["time"], float)
    assert envelope["time"] == 1_712_345_678.123  # epoch seconds, millisecond precision
    assert envelope["source"] == "synthwatch"
    assert envelope["sourcetype"] == "synthwatch:alert"
    assert envelope["event"] == json.loads(siem.format_alert(alert, "ocsf"))
    validate_finding(envelope["event"])


def test_hec_envelope_takes_sourcetype_index_and_host() -> None:
    envelope = json.loads(
        siem.format_alert(
            _alert(), "splunk_hec", sourcetype="ocsf:detection", index="soc_findings", host="w1"
        )
    )
    assert envelope["sourcetype"] == "ocsf:detection"
    assert envelope["index"] == "soc_findings"
    assert envelope["host"] == "w1"


# --- synthwatch alerts convert ---------------------------------------------------------

runner = CliRunner()


def _lines(*alerts: Alert) -> list[str]:
    return [encode(a).decode() for a in alerts]


def test_convert_prints_one_record_per_line_and_reports_bad_lines(tmp_path: Path) -> None:
    first, second = _alert(), _alert(sha256="c3" * 32)
    bad_json = '{"type": "alert.v1", "alert_id": '
    wrong_schema = json.dumps({**json.loads(encode(first)), "manifest_sha256": "../../etc"})
    path = tmp_path / "alerts.jsonl"
    path.write_text("\n".join([_lines(first)[0], bad_json, "", wrong_schema, _lines(second)[0]]))
    result = runner.invoke(app, ["alerts", "convert", "--format", "ocsf", str(path)])
    assert result.exit_code == 1
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert [f["finding_info"]["uid"] for f in out] == [first.alert_id, second.alert_id]
    for finding in out:
        validate_finding(finding)
    assert "line 2" in result.stderr and "not JSON" in result.stderr
    assert "line 4" in result.stderr and "manifest_sha256" in result.stderr
    assert "line 1:" not in result.stderr and "line 5" not in result.stderr
    assert "2 line(s) not converted" in result.stderr
    assert "Traceback" not in result.output


def test_convert_reads_stdin_and_writes_hec_events_with_the_sink_settings() -> None:
    alert = _alert()
    result = runner.invoke(
        app,
        ["alerts", "convert", "--format", "splunk_hec", "-"],
        input="\n".join(_lines(alert, alert)) + "\n",
        env={"SYNTHWATCH_SINK__SPLUNK_INDEX": "soc", "SYNTHWATCH_SINK__SPLUNK_SOURCETYPE": "x:y"},
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 2 and lines[0] == lines[1]
    assert lines[0].encode() == siem.format_alert(
        alert, "splunk_hec", sourcetype="x:y", index="soc"
    )


def test_convert_native_round_trips() -> None:
    alert = _alert()
    result = runner.invoke(app, ["alerts", "convert", "--format", "native"], input=_lines(alert)[0])
    assert result.exit_code == 0, result.output
    assert decode(result.stdout.strip(), Alert) == alert


def test_convert_refuses_an_unknown_format_and_a_missing_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["alerts", "convert", "--format", "cef"], input="")
    assert result.exit_code == 2 and "unknown format 'cef'" in result.stderr
    missing = tmp_path / "nope.jsonl"
    result = runner.invoke(app, ["alerts", "convert", str(missing)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "nope.jsonl" in result.stderr
