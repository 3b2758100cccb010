"""The served OpenAPI document, fuzzed with schemathesis against the ASGI app: no request
the spec allows makes the server fail, and every response matches what the spec says.
Real scans run behind it (uploads of whatever bytes schemathesis makes end in an error
state); examples are few, so the run stays well under a minute.

Each operation is drawn from its hypothesis strategy inside an ordinary test, rather
than through `schemathesis.pytest.from_fixture`: that loader sets `Function._nodeid`,
which pytest 9 no longer has.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from synthwatch.pipeline.api import Auth, create_app
from tests.api_harness import AUTH, KEYS, api_settings, lean_engine, running_service

OPERATIONS = [
    ("POST", "/v1/scans"),
    ("GET", "/v1/scans"),
    ("GET", "/v1/scans/{scan_id}"),
    ("GET", "/v1/scans/{scan_id}/report"),
    ("GET", "/v1/scans/{scan_id}/evidence/{name}"),
    ("POST", "/v1/scans/{scan_id}/review"),
]


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[schemathesis.BaseSchema]:
    tmp = Path(tmp_path_factory.mktemp("schemathesis"))
    # Loopback refused here: fuzzed URLs must not reach this machine's services.
    config = api_settings(tmp, allow_private=False)
    with lean_engine(tmp) as engine, running_service(config, engine) as service:
        yield schemathesis.openapi.from_asgi("/openapi.json", create_app(service, Auth(KEYS)))


def test_every_operation_of_the_spec_is_fuzzed(api_schema: schemathesis.BaseSchema) -> None:
    served = {
        (method.upper(), path)
        for path, item in api_schema.raw_schema["paths"].items()
        for method in item
    }
    assert served == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_the_api_keeps_its_documented_contract(
    api_schema: schemathesis.BaseSchema, method: str, path: str
) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy())
    @settings(
        max_examples=12, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    def check(case: schemathesis.Case) -> None:
        case.call_and_validate(
            headers=AUTH, checks=[not_a_server_error, response_schema_conformance]
        )

    check()
