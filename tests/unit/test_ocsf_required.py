"""OCSF findings checked against the OCSF 1.5.0 schema's own required fields for Detection
Finding (class 2004), not only against py-ocsf-models (which, for one, lets class_uid and
category_uid default).

The facts live in `tests/data/ocsf_1.5.0_detection_finding_required.json`, written from the
ocsf/ocsf-schema v1.5.0 files (its `source` says which, and how `extends` inheritance and
`constraints` were resolved). `RequiredFields` walks a finding with them: every required
attribute of the class and of each nested object (arrays of objects included) must be
present and not null (a required string not empty), each object's `at_least_one` /
`just_one` constraint must hold, and a nested object the data file does not describe is
reported too, so that output growing past the facts cannot pass unchecked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import pytest
from typer.testing import CliRunner

from synthwatch.operators import siem
from synthwatch.operators.alert import make_alert
from synthwatch.pipeline.cli import app
from synthwatch.schemas import Alert, Decision, Segment, Verdict, encode

FACTS_PATH = (
    Path(__file__).resolve().parent.parent / "data" / "ocsf_1.5.0_detection_finding_required.json"
)
RULES = ("at_least_one", "just_one")


@dataclass(frozen=True)
class Problem:
    path: str
    """Where, e.g. `finding_info.uid` or `evidences[1].file.hashes[0]`; `(finding)` for the root."""
    rule: str
    """required | at_least_one | just_one | shape | unmodelled"""
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.path}: {self.rule}" + (f" ({self.detail})" if self.detail else "")


def _join(path: str, attr: str) -> str:
    return f"{path}.{attr}" if path else attr


def _lookup(obj: dict[str, Any], dotted: str) -> Any:
    value: Any = obj
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _present(value: Any) -> bool:
    return value is not None and value != ""


def _has_object(value: Any) -> bool:
    return isinstance(value, dict) or (
        isinstance(value, list) and any(isinstance(item, dict) for item in value)
    )


class RequiredFields:
    """The OCSF required-attribute and constraint facts of one class, as a checker."""

    def __init__(self, facts: dict[str, Any]) -> None:
        self.facts = facts
        self.version: str = facts["ocsf_version"]
        self.event_class: dict[str, Any] = facts["class"]
        self.objects: dict[str, dict[str, Any]] = facts["objects"]

    @classmethod
    def load(cls, path: Path = FACTS_PATH) -> RequiredFields:
        return cls(json.loads(path.read_text()))

    def check(self, finding: Any) -> list[Problem]:
        """Every problem found, in document order; [] when the finding is complete."""
        if not isinstance(finding, dict):
            return [Problem("(finding)", "shape", "not a JSON object")]
        return self._walk(finding, self.event_class, "")

    def missing(self, finding: Any) -> list[str]:
        """The paths of the required attributes that are absent, null or empty."""
        return [p.path for p in self.check(finding) if p.rule == "required"]

    def _walk(self, obj: dict[str, Any], spec: dict[str, Any], path: str) -> list[Problem]:
        problems: list[Problem] = []
        for attr in spec["required"]:
            value = obj.get(attr)
            if value is None:
                detail = "missing" if attr not in obj else "null"
                problems.append(Problem(_join(path, attr), "required", detail))
            elif value == "":
                problems.append(Problem(_join(path, attr), "required", "empty string"))
        for rule, attrs in spec["constraints"].items():
            count = sum(_present(_lookup(obj, a)) for a in attrs)
            if (rule == "at_least_one" and count == 0) or (rule == "just_one" and count != 1):
                where = path or "(finding)"
                problems.append(Problem(where, rule, f"{count} of {', '.join(attrs)}"))
        object_attrs: dict[str, dict[str, Any]] = spec["object_attributes"]
        for key, value in obj.items():
            if value is None:
                continue
            where = _join(path, key)
            attr = object_attrs.get(key)
            if attr is None:
                if key not in spec["free_form_attributes"] and _has_object(value):
                    problems.append(
                        Problem(where, "unmodelled", "a nested object the data file does not cover")
                    )
                continue
            child, kind = self.objects[attr["type"]], attr["type"]
            if not attr["is_array"]:
                if isinstance(value, dict):
                    problems += self._walk(value, child, where)
                else:
                    problems.append(Problem(where, "shape", f"expected a {kind} object"))
            elif not isinstance(value, list):
                problems.append(Problem(where, "shape", f"expected an array of {kind}"))
            else:
                for i, item in enumerate(value):
                    if isinstance(item, dict):
                        problems += self._walk(item, child, f"{where}[{i}]")
                    else:
                        problems.append(Problem(f"{where}[{i}]", "shape", f"expected a {kind}"))
        return problems


REQUIRED = RequiredFields.load()


def assert_complete(finding: Any, context: str = "") -> None:
    problems = REQUIRED.check(finding)
    assert not problems, f"{context}: " + "; ".join(map(str, problems))


# --- the facts themselves ----------------------------------------------------------------


def test_the_facts_are_for_the_version_and_class_siem_emits() -> None:
    assert REQUIRED.version == siem.OCSF_VERSION == "1.5.0"
    assert (REQUIRED.event_class["uid"], REQUIRED.event_class["category_uid"]) == (
        siem.CLASS_UID,
        siem.CATEGORY_UID,
    )
    assert "v1.5.0" in REQUIRED.facts["source"]["schema"]


def test_the_facts_are_consistent() -> None:
    specs = [REQUIRED.event_class, *REQUIRED.objects.values()]
    for spec in specs:
        for attr in spec["object_attributes"].values():
            assert attr["type"] in REQUIRED.objects, attr
            assert isinstance(attr["is_array"], bool)
        assert set(spec["constraints"]) <= set(RULES), spec["constraints"]
        assert not set(spec["object_attributes"]) & set(spec["free_form_attributes"])
        for source in spec["required"].values():
            assert source in REQUIRED.facts["source"]["files"]


def test_the_required_fields_of_a_detection_finding() -> None:
    # The summary a reader wants, pinned so that a change to the data file is deliberate.
    assert sorted(REQUIRED.event_class["required"]) == [
        "activity_id",
        "category_uid",
        "class_uid",
        "finding_info",
        "metadata",
        "severity_id",
        "time",
        "type_uid",
    ]
    required = {name: sorted(spec["required"]) for name, spec in REQUIRED.objects.items()}
    assert required["metadata"] == ["product", "version"]
    assert required["finding_info"] == ["uid"]
    assert required["analytic"] == ["type_id"]
    assert required["file"] == ["name", "type_id"]
    assert required["fingerprint"] == ["algorithm_id", "value"]
    assert required["observable"] == ["type_id"]
    assert required["product"] == required["evidences"] == required["url"] == []
    assert required["resource_details"] == []
    assert REQUIRED.objects["product"]["constraints"] == {"at_least_one": ["name", "uid"]}
    assert REQUIRED.objects["url"]["constraints"] == {"at_least_one": ["url_string", "path"]}
    assert REQUIRED.objects["file"]["constraints"] == {}


# --- every finding siem.py produces ----------------------------------------------------------

MEDIA_SHA = "a1" * 32
MANIFEST_SHA = "b2" * 32
MEDIA_URLS = {
    "signed https": (
        "https://uploader:hunter2pw@cdn.example.org/clips/v.mp4"
        "?X-Amz-Credential=AKIAEXAMPLEKEYID%2F20240101&X-Amz-Signature=deadbeefsig0123&w=640"
    ),
    "local path": "/data/in/clip.mp4",
}
EVIDENCE_URIS = {
    "s3": "s3://synthwatch/evidence/0123/manifest.json",
    "file": "file:///srv/evidence/0123/manifest.json",  # LocalStore.uri (Path.as_uri)
    "bare path": "/srv/evidence/0123/manifest.json",
}
TIMES = {"detected": (1_712_345_600.5, 1_712_345_678.1234), "zero": (0.0, 0.0)}
SEGMENTS = {
    "segments": [
        Segment(start_s=1.0, end_s=2.5, score=0.93),
        Segment(start_s=3.0, end_s=4.0, score=0.7),
    ],
    "no segments": [],
}


def _alert(
    decision: Decision = "flag",
    media_type: str = "video",
    *,
    url: str = MEDIA_URLS["signed https"],
    evidence_uri: str = EVIDENCE_URIS["s3"],
    times: tuple[float, float] = TIMES["detected"],
    segments: list[Segment] | None = None,
    source: str = "newsdesk",
) -> Alert:
    inconclusive = decision == "inconclusive"
    verdict = Verdict(
        id="media-1",
        url=url,
        source=source,
        submitted_at=times[0],
        sha256=MEDIA_SHA,
        media_type=media_type,  # type: ignore[arg-type]
        synthetic_score=None if inconclusive else 0.91,
        decision=decision,
        signals=[],
        segments=SEGMENTS["segments"] if segments is None else segments,
        frames=[],
        duration_s=10.0,
        faces_found=1,
        has_audio=False,
        model_set="0123456789abcdef",
        policy_version="policy.v1",
        blob="blobs/sha256/a1/a1/" + MEDIA_SHA,
        decided_by=[] if inconclusive else ["sbi_face"],
        detected_at=times[1],
    )
    return make_alert(verdict, evidence_uri=evidence_uri, manifest_sha256=MANIFEST_SHA)


def _variants(decision: Decision, media_type: str) -> list[tuple[str, Alert]]:
    return [
        (
            f"{decision}/{media_type}/{u}/{e}/{t}/{s}",
            _alert(
                decision,
                media_type,
                url=url,
                evidence_uri=uri,
                times=times,
                segments=segs,
            ),
        )
        for u, url in MEDIA_URLS.items()
        for e, uri in EVIDENCE_URIS.items()
        for t, times in TIMES.items()
        for s, segs in SEGMENTS.items()
    ]


@pytest.mark.parametrize("decision", ["flag", "review", "pass", "inconclusive"])
@pytest.mark.parametrize("media_type", ["video", "image", "audio"])
def test_every_finding_has_every_required_field(decision: Decision, media_type: str) -> None:
    for name, alert in _variants(decision, media_type):
        finding = json.loads(siem.format_alert(alert, "ocsf"))
        assert_complete(finding, name)
        hec = json.loads(siem.format_alert(alert, "splunk_hec"))
        assert_complete(hec["event"], f"{name} (HEC event)")


def test_zero_times_keep_the_required_time_at_zero() -> None:
    finding = siem.ocsf_finding(_alert(times=TIMES["zero"]))
    assert finding["time"] == 0  # present: 0 is a value, not a missing one
    assert_complete(finding)


def test_a_nan_score_and_no_source_still_complete() -> None:
    alert = msgspec.structs.replace(_alert(source=""), synthetic_score=float("nan"))
    assert_complete(json.loads(siem.format_alert(alert, "ocsf")))


def test_local_media_with_a_local_bundle_has_no_url_and_still_complete() -> None:
    finding = siem.ocsf_finding(
        _alert(url=MEDIA_URLS["local path"], evidence_uri=EVIDENCE_URIS["bare path"])
    )
    assert all("url" not in e for e in finding["evidences"])  # file alone meets at_least_one
    assert_complete(finding)


# --- the checker catches what is missing --------------------------------------------------


def _finding() -> dict[str, Any]:
    finding = siem.ocsf_finding(_alert())
    assert REQUIRED.check(finding) == []
    return finding


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.product", "metadata.product"),
        ("metadata.version", "metadata.version"),
        ("metadata", "metadata"),
        ("finding_info.uid", "finding_info.uid"),
        ("finding_info", "finding_info"),
        ("time", "time"),
        ("class_uid", "class_uid"),
        ("category_uid", "category_uid"),
        ("type_uid", "type_uid"),
        ("activity_id", "activity_id"),
        ("severity_id", "severity_id"),
        ("finding_info.analytic.type_id", "finding_info.analytic.type_id"),
        ("evidences.0.file.name", "evidences[0].file.name"),
        ("evidences.1.file.type_id", "evidences[1].file.type_id"),
        ("evidences.1.file.hashes.0.algorithm_id", "evidences[1].file.hashes[0].algorithm_id"),
        ("evidences.0.file.hashes.0.value", "evidences[0].file.hashes[0].value"),
        ("observables.2.type_id", "observables[2].type_id"),
    ],
)
def test_a_missing_required_field_is_reported_by_path(path: str, expected: str) -> None:
    finding = _finding()
    *parents, last = path.split(".")
    holder: Any = finding
    for part in parents:
        holder = holder[int(part)] if isinstance(holder, list) else holder[part]
    del holder[last]
    assert REQUIRED.missing(finding) == [expected]
    problem = REQUIRED.check(finding)[0]
    assert (problem.path, problem.rule, problem.detail) == (expected, "required", "missing")


def test_null_and_empty_required_values_are_reported() -> None:
    finding = _finding()
    finding["finding_info"]["uid"] = None
    finding["metadata"]["version"] = ""
    assert [str(p) for p in REQUIRED.check(finding)] == [
        "metadata.version: required (empty string)",
        "finding_info.uid: required (null)",
    ]


def test_every_missing_field_is_reported_not_only_the_first() -> None:
    finding = _finding()
    del finding["time"], finding["metadata"]["product"], finding["finding_info"]["uid"]
    del finding["evidences"][0]["file"]["name"]
    assert REQUIRED.missing(finding) == [
        "time",
        "metadata.product",
        "finding_info.uid",
        "evidences[0].file.name",
    ]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ("product with neither name nor uid", "metadata.product: at_least_one"),
        ("analytic with neither name nor uid", "finding_info.analytic: at_least_one"),
        ("url with neither url_string nor path", "evidences[0].url: at_least_one"),
        ("evidence with no artifact", "evidences[1]: at_least_one"),
        ("resource with neither name nor uid", "resources[0]: at_least_one"),
    ],
)
def test_a_broken_constraint_is_reported(change: str, expected: str) -> None:
    finding = _finding()
    if change == "product with neither name nor uid":
        del finding["metadata"]["product"]["name"]
    elif change == "analytic with neither name nor uid":
        del finding["finding_info"]["analytic"]["name"], finding["finding_info"]["analytic"]["uid"]
    elif change == "url with neither url_string nor path":
        del finding["evidences"][0]["url"]["url_string"], finding["evidences"][0]["url"]["path"]
    elif change == "evidence with no artifact":
        finding["evidences"][1] = {"name": "evidence_bundle"}
    elif change == "resource with neither name nor uid":
        finding["resources"][0]["name"] = ""
        del finding["resources"][0]["uid"]
    problems = [str(p).split(" (")[0] for p in REQUIRED.check(finding)]
    assert problems == [expected]


def test_a_just_one_constraint_counts_exactly_one() -> None:
    spec = {
        "required": {},
        "object_attributes": {},
        "free_form_attributes": {},
        "constraints": {"just_one": ["privileges", "group"]},
    }
    checker = RequiredFields({"ocsf_version": "1.5.0", "class": spec, "objects": {}})
    assert checker.check({"privileges": ["x"]}) == []
    assert [p.rule for p in checker.check({"privileges": ["x"], "group": {"name": "g"}})] == [
        "just_one",
        "unmodelled",
    ]
    assert [p.rule for p in checker.check({})] == ["just_one"]


def test_a_wrong_shape_is_reported() -> None:
    finding = _finding()
    finding["metadata"] = "1.5.0"
    finding["evidences"] = finding["evidences"][0]
    finding["observables"][0] = "a1"
    assert [(p.path, p.rule) for p in REQUIRED.check(finding)] == [
        ("metadata", "shape"),
        ("evidences", "shape"),
        ("observables[0]", "shape"),
    ]


def test_a_nested_object_the_facts_do_not_cover_is_reported() -> None:
    finding = _finding()
    finding["evidences"][0]["process"] = {"pid": 1}
    finding["device"] = {"type_id": 0}
    finding["unmapped"]["anything"] = {"goes": [{"here": 1}]}  # free-form by definition
    finding["resources"][0]["data"]["nested"] = {"also": "free"}  # json_t
    assert [(p.path, p.rule) for p in REQUIRED.check(finding)] == [
        ("evidences[0].process", "unmodelled"),
        ("device", "unmodelled"),
    ]


# --- end to end: scan --alerts lines through `synthwatch alerts convert` -------------------

runner = CliRunner()


def test_alerts_convert_prints_complete_findings(tmp_path: Path) -> None:
    alerts = [
        _alert("flag", "video"),
        _alert("review", "image", url=MEDIA_URLS["local path"], evidence_uri=EVIDENCE_URIS["file"]),
        _alert("pass", "audio", segments=[], times=TIMES["zero"]),
        _alert("inconclusive", "video", evidence_uri=EVIDENCE_URIS["file"], source=""),
    ]
    path = tmp_path / "alerts.jsonl"
    with path.open("wb") as fh:  # as `synthwatch scan --alerts FILE` writes them
        for alert in alerts:
            fh.write(encode(alert) + b"\n")

    result = runner.invoke(app, ["alerts", "convert", "--format", "ocsf", str(path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == len(alerts)
    for line, alert in zip(lines, alerts, strict=True):
        finding = json.loads(line)
        assert finding["finding_info"]["uid"] == alert.alert_id
        assert_complete(finding, alert.decision)

    result = runner.invoke(app, ["alerts", "convert", "--format", "splunk_hec", str(path)])
    assert result.exit_code == 0, result.output
    for line in result.stdout.splitlines():
        assert_complete(json.loads(line)["event"], "HEC event")
