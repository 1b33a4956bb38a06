"""Property-based requests generated from the API's own OpenAPI schema (schemathesis).

Every operation of the schema is called with requests that follow it (positive mode) and with
requests that break it (negative mode: wrong types, out-of-range numbers, malformed bodies),
each with and without the admin token, against the populated store of ``api_builders``. No
response may be a server error, and every response must conform to the schema (documented
status code, content type and body schema).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import CheckFunction, GenerationMode
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import positive_data_acceptance

from coordinator.api import create_app
from coordinator.store import CoordinatorStore
from tests.unit.coordinator.api_builders import AUTH, NOW, TOKEN, Controls, make_config, populate

#: Generated requests per operation and mode (each sent twice: with and without the token):
#: many for operations that take parameters or a body, a few for the others (only their headers
#: vary).
EXAMPLES = 40
EXAMPLES_WITHOUT_INPUT = 5
#: A schema-valid key registration may still be refused with 422: whether 32 bytes are a usable
#: Ed25519 public key (a curve point not of small order) cannot be written in JSON Schema.
SEMANTIC_422 = {"POST /api/admin/keys"}


@pytest.fixture
def api_schema(tmp_path: Path) -> Iterator[schemathesis.BaseSchema]:
    config = make_config(tmp_path)
    store = CoordinatorStore(config.db)
    populate(store)
    app = create_app(
        config,
        store,
        Controls(),
        token=TOKEN,
        clock=lambda: NOW,
        allowed_hosts=["testserver", "127.0.0.1", "localhost"],
    )
    yield schemathesis.openapi.from_asgi("/api/openapi.json", app)
    store.close()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_generated_requests_never_get_a_server_error(
    api_schema: schemathesis.BaseSchema, mode: GenerationMode
) -> None:
    results = list(api_schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in results), "the schema has invalid operations"
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) == 15
    if mode is GenerationMode.NEGATIVE:
        # Only operations with parameters or a body can be sent data that breaks the schema.
        operations = [op for op in operations if op.path_parameters or op.query or op.body]
    seen: dict[str, set[int]] = {}
    for operation in operations:
        has_input = bool(operation.path_parameters or operation.query or operation.body)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES if has_input else EXAMPLES_WITHOUT_INPUT,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            for headers in (AUTH, None):
                response = case.call(headers=headers)
                seen.setdefault(case.operation.label, set()).add(response.status_code)
                assert response.status_code < 500, (case.method, case.path, response.text)
                excluded: list[CheckFunction] = (
                    [positive_data_acceptance] if case.operation.label in SEMANTIC_422 else []
                )
                case.validate_response(response, headers=headers, excluded_checks=excluded)

        check()
    assert len(seen) == len(operations) == (15 if mode is GenerationMode.POSITIVE else 7)
    statuses = set().union(*seen.values())
    assert not any(code >= 500 for code in statuses)
    if mode is GenerationMode.POSITIVE:
        assert {200, 401}.issubset(statuses)
    else:
        assert 422 in statuses
