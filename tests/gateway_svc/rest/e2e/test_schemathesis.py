"""schemathesis against the live gateway, from the generated OpenAPI document: no 5xx, no response off the schema.

Requests carry a valid key, so they reach instance_svc and the agents (generated instance ids
mostly do not exist: 404 is a fine answer; what must never happen is a 5xx or a body the document
does not describe). The number of examples is bounded so the whole run stays well under a minute.
"""

from __future__ import annotations

import collections
import itertools
import json
from typing import Any

import httpx
import hypothesis
import schemathesis
from _pytest.assertion.rewrite import AssertionRewritingHook
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.gateway_svc.rest.e2e.conftest import RestStack

MAX_EXAMPLES = 15
# Not generated: the watch of all the tenant's instances never ends by itself (it waits for
# lifecycle events), so a generated request would only hit the client's timeout; it is covered
# by the gRPC tests. The PTY is a WebSocket (its plain-GET answer, 426, is covered by test_e2e).
SKIP = {"GET /v1/instances:watch"}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@schemathesis.serializer("application/x-ndjson")
def _ndjson(ctx: Any, value: Any) -> bytes:
    """A generated message as a one-line NDJSON request stream (StreamProcessInput)."""
    return json.dumps(value).encode() + b"\n"


def test_live_gateway_matches_its_document(rest_stack: RestStack) -> None:
    schema = schemathesis.openapi.from_url(f"{rest_stack.base_url}/openapi.json")
    headers = {"authorization": f"Bearer {rest_stack.keys['main']}"}
    # An instance of this run's own, so that generated requests also reach a real agent (and a
    # generated DELETE or pause cannot disturb the other tests' instance).
    created = httpx.post(f"{rest_stack.base_url}/v1/instances", json={}, headers=headers, timeout=60)
    assert created.status_code == 200, created.text
    live = created.json()["instance"]["instanceId"]
    flip = itertools.count()
    statuses: collections.Counter[int] = collections.Counter()
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1
        if operation.label in SKIP:
            continue

        @given(case=operation.as_strategy())
        @settings(
            max_examples=MAX_EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Any) -> None:
            if case.path_parameters and "instance_id" in case.path_parameters and next(flip) % 2 == 0:
                case.path_parameters["instance_id"] = live
            response = case.call(base_url=rest_stack.base_url, headers=headers, timeout=30)
            statuses[response.status_code] += 1
            case.validate_response(response, checks=CHECKS)

        try:
            run()
        except Exception as exc:  # every operation is checked; all failures are reported together
            failures.append(f"{operation.label}: {str(exc)[:1500]}")
    assert operations >= 40
    print(f"schemathesis: {sum(statuses.values())} requests, statuses {dict(sorted(statuses.items()))}")
    # Generated requests got past validation to real upstreams, not only 400s and 404s.
    assert statuses[200] >= 20, statuses
    assert not failures, "\n\n".join(failures)


def test_pytest_leaves_the_librarys_modules_to_their_bytecode() -> None:
    """pytest parses none of schemathesis's or hypothesis's modules itself (pyproject's addopts).

    Rewritten, they are parsed into ASTs as this file's test first imports them, and CPython
    3.11.7's AST builder can then fail with "SystemError: AST constructor recursion depth mismatch".
    """
    for module in (schemathesis, hypothesis, schemathesis.checks):
        assert not isinstance(module.__loader__, AssertionRewritingHook), module.__name__
