"""OpenAPI fuzzing: generated inputs for every operation never get a 5xx, and every answer matches the schema."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.harness import LEAKS


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("fuzz_schema")


# The default run tries a few derandomized (so repeatable) examples per operation; `pytest -m slow`
# (CI runs it after the default suite) goes deep.
FUZZ = settings(deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@schema.parametrize()
@settings(FUZZ, max_examples=12)
def test_openapi_fuzz(case) -> None:
    """Every operation, generated inputs: never a 5xx, and every answer matches the declared schema."""
    check_fuzz_case(case)


@pytest.mark.slow
@schema.parametrize()
@settings(FUZZ, max_examples=150)
def test_openapi_deep_fuzz(case) -> None:
    check_fuzz_case(case)


def check_fuzz_case(case) -> None:
    response = case.call_and_validate(
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_schema_conformance,
            response_headers_conformance,
        ],
        timeout=60,
    )
    assert not LEAKS.search(response.text)
