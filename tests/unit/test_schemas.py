"""The wire records: the committed JSON Schema files match the code, and bad records
become `SchemaInvalid` (which the topology routes to the DLQ with reason `schema`)."""

from __future__ import annotations

import json

import pytest

from synthwatch.operators.errors import SchemaInvalid
from synthwatch.schemas import RECORDS, MediaRef, Verdict, decode, encode
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
        assert isinstance(tag, str) and tag.endswith(".v1")


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
