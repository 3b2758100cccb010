"""The wire records: the committed JSON Schema files match the code, and bad records
become `SchemaInvalid` (which the topology routes to the DLQ with reason `schema`)."""

from __future__ import annotations

import json
import re

import pytest

from synthwatch.errors import SchemaInvalid
from synthwatch.schemas import RECORDS, Alert, MediaRef, Verdict, decode, encode
from synthwatch.schemas.export import SCHEMA_DIR, schema_files


def test_committed_schemas_match_records() -> None:
    expected = schema_files()
    assert len(expected) == len(RECORDS)
    for name, text in expected.items():
        committed = SCHEMA_DIR / name
        assert committed.exists(), (
            f"{name} is not committed: run python -m synthwatch.schemas.export"
        )
        assert committed.read_text() == text, (
            f"{name} drifted from the record: run python -m synthwatch.schemas.export"
        )


def test_every_record_carries_a_version_tag() -> None:
    for rec in RECORDS:
        tag = rec.__struct_config__.tag
        assert isinstance(tag, str) and re.fullmatch(r"[a-z_]+\.v[0-9]+", tag)


def _verdict_v1() -> dict[str, object]:
    """A verdict exactly as a v1 producer wrote it (before `inconclusive` existed)."""
    return {
        "type": "verdict.v1",
        "id": "a",
        "url": "file:///x.jpg",
        "sha256": "ab" * 32,
        "media_type": "image",
        "synthetic_score": 0.25,
        "decision": "pass",
        "signals": [],
        "segments": [],
        "frames": [],
        "duration_s": 0.0,
        "faces_found": 0,
        "has_audio": False,
        "model_set": "m",
        "policy_version": "policy.v1",
        "blob": "/x.jpg",
    }


def test_a_v1_verdict_from_an_older_producer_is_still_read_as_the_current_record() -> None:
    verdict = decode(json.dumps(_verdict_v1()).encode(), Verdict)
    assert type(verdict) is Verdict
    assert verdict.synthetic_score == 0.25 and verdict.decision == "pass"
    assert json.loads(encode(verdict))["type"] == "verdict.v2"


def test_a_v1_alert_line_is_still_read() -> None:
    v1 = {
        k: v
        for k, v in _verdict_v1().items()
        if k in ("id", "url", "sha256", "media_type", "synthetic_score", "segments")
    }
    line = {
        **v1,
        "type": "alert.v1",
        "alert_id": "0" * 32,
        "decision": "review",
        "model_set": "m",
        "policy_version": "policy.v1",
        "evidence_uri": "file:///ev/manifest.json",
        "manifest_sha256": "cd" * 32,
    }
    alert = decode(json.dumps(line).encode(), Alert)
    assert type(alert) is Alert and alert.decision == "review"


def test_an_inconclusive_verdict_has_a_null_score_on_the_wire() -> None:
    raw = {**_verdict_v1(), "type": "verdict.v2", "synthetic_score": None}
    raw["decision"] = "inconclusive"
    verdict = decode(json.dumps(raw).encode(), Verdict)
    assert verdict.synthetic_score is None
    assert json.loads(encode(verdict))["synthetic_score"] is None
    # Decisions stay a closed set: anything else is a schema error, routed to the DLQ.
    with pytest.raises(SchemaInvalid, match="decision"):
        decode(json.dumps({**raw, "decision": "maybe"}).encode(), Verdict)


def test_round_trip_and_unknown_fields_are_ignored() -> None:
    ref = MediaRef(id="abc", url="https://example.org/a.mp4", source="feed")
    raw = json.loads(encode(ref))
    assert raw["type"] == "media_ref.v1"
    raw["added_by_a_newer_producer"] = {"x": 1}
    assert decode(json.dumps(raw).encode(), MediaRef) == ref


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b'{"type": "media_ref.v1", "id": "a"}', "url"),
        (b"{not json", "not JSON"),
        (None, "null"),
        (b'{"type": "verdict.v1", "id": "a"}', "type"),
        (b'{"type": "media_ref.v1", "id": 5, "url": "u"}', "id"),
    ],
)
def test_bad_records_raise_schema_invalid(data: bytes | None, fragment: str) -> None:
    with pytest.raises(SchemaInvalid, match=fragment):
        decode(data, MediaRef)
    assert SchemaInvalid.reason == "schema"


def test_records_are_frozen() -> None:
    ref = MediaRef(id="a", url="u")
    with pytest.raises(AttributeError):
        ref.url = "other"  # type: ignore[misc]
    assert Verdict.__struct_config__.frozen
