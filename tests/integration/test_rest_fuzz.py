"""Schemathesis against the OpenAPI document the gateway serves, over the real mesh.

Every documented operation gets generated requests (valid and invalid shapes) with an admin key;
each answer must be documented (status code, content type, body schema) and none may be a 5xx.
`SHOAL_FUZZ_EXAMPLES` sets the cases per operation: a bounded number in `make test`, more in
`make fuzz`, which also runs schemathesis' coverage phase (`SHOAL_FUZZ_COVERAGE=1`).
"""

from __future__ import annotations

import asyncio
import copy
import os
import sys
import threading
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks
from schemathesis.config import SchemathesisConfig

from gateway.openapi import document
from tests.e2e.rest import rest_mesh

# Schemathesis' own strategies call `random` inside generation in some code paths, which
# Hypothesis flags with a deprecation warning (an error under this suite's warning filter); it
# is theirs, not ours.
pytestmark = pytest.mark.filterwarnings("ignore::hypothesis.errors.HypothesisDeprecationWarning")
EXAMPLES = int(os.environ.get("SHOAL_FUZZ_EXAMPLES", "8"))
# Segment filters and flows are recursive schemas; generating from them goes deeper than Python's
# default recursion limit.
sys.setrecursionlimit(max(sys.getrecursionlimit(), 20_000))


def fuzzable(doc: dict[str, Any]) -> dict[str, Any]:
    """The served document, with one concession to the generator: schemathesis recurses without
    end on the PATCH segment body (a recursive filter union that may also be null), so that
    body's filter is fuzzed with the leaf filters only. POST /v1/segments keeps the full tree."""
    doc = copy.deepcopy(doc)
    patch = doc["components"]["schemas"]["SegmentPatch"]["properties"]["filter"]
    patch["anyOf"] = [
        option for option in patch["anyOf"] if not option.get("$ref", "").split("/")[-1].endswith("-Input")
    ]
    return doc


# The coverage phase walks every schema combination (tens of thousands of requests for the
# recursive filter bodies): `make fuzz` runs it, `make test` keeps to the bounded examples.
COVERAGE = os.environ.get("SHOAL_FUZZ_COVERAGE", "") == "1"
schema = schemathesis.openapi.from_dict(
    fuzzable(document()),
    config=SchemathesisConfig.from_dict({"phases": {"coverage": {"enabled": COVERAGE}}}),
)
# (method path) -> status code -> answers seen.
ANSWERS: dict[str, Counter[int]] = defaultdict(Counter)
CHECKS = [
    checks.not_a_server_error,
    checks.status_code_conformance,
    checks.content_type_conformance,
    checks.response_schema_conformance,
    checks.response_headers_conformance,
]


class Served:
    """The mesh and the gateway running on an event loop of their own thread, for sync callers."""

    def __init__(self, nats_url: str, tmp_path: Path) -> None:
        self.nats_url = nats_url
        self.tmp_path = tmp_path
        self.ready = threading.Event()
        self.stop: asyncio.Event | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.base_url = ""
        self.headers: dict[str, str] = {}
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fuzz-mesh", daemon=True)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test thread
            self.error = exc
            self.ready.set()

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        # A generous rate limit: the fuzzer is one key sending as fast as it can.
        async with rest_mesh(self.nats_url, self.tmp_path, rate_limit="100000/second") as (m, rest):
            self.headers = await rest.key(m.workspace_id, "admin")
            self.base_url = str(rest.client.base_url).rstrip("/")
            self.ready.set()
            await self.stop.wait()

    def __enter__(self) -> Served:
        self.thread.start()
        assert self.ready.wait(timeout=60), "the mesh did not start within 60 s"
        if self.error is not None:
            raise self.error
        return self

    def __exit__(self, *exc: object) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def served(nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with Served(nats_url, tmp_path_factory.mktemp("fuzz")) as running:
        yield running


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_as_documented(case: schemathesis.Case, served: Served) -> None:
    response = case.call_and_validate(
        base_url=served.base_url, headers=served.headers, checks=CHECKS, timeout=30
    )
    ANSWERS[f"{case.method} {case.path}"][response.status_code] += 1


def test_the_fuzzer_reached_every_operation() -> None:
    """Runs after the fuzz (file order): every documented operation was called and answered."""
    operations = {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}
    assert operations <= set(ANSWERS), f"never called: {sorted(operations - set(ANSWERS))}"
