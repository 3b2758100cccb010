"""Export each record's JSON Schema to `synthwatch/schemas/<tag>.schema.json`.

Run `python -m synthwatch.schemas.export` after changing a record; the unit test
`test_committed_schemas_match_records` fails until the files are regenerated.
"""

from __future__ import annotations

import json
from pathlib import Path

import msgspec

from synthwatch.schemas.records import RECORDS

SCHEMA_DIR = Path(__file__).parent


def schema_files() -> dict[str, str]:
    """File name -> JSON text for every record, as it should be committed."""
    out: dict[str, str] = {}
    for rec in RECORDS:
        tag = rec.__struct_config__.tag
        assert isinstance(tag, str)
        schema = msgspec.json.schema(rec)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["title"] = tag
        out[f"{tag}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main() -> None:
    for name, text in schema_files().items():
        (SCHEMA_DIR / name).write_text(text)
        print(SCHEMA_DIR / name)


if __name__ == "__main__":
    main()
