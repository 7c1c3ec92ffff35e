"""The log scanner finds what it must, so a leak anywhere in the run fails the session."""

from __future__ import annotations

import logging

from tests import secrets_scan
from tests.secrets_scan import SCANNER, leaks, watch

KEY = "shoal_kabcdefghijklmnop_" + "A1b2" * 10 + "xyz"


def test_key_shapes_bearer_tokens_and_watched_values_are_found() -> None:
    assert leaks(f"calling with {KEY}") == [KEY]
    assert leaks("Authorization: Bearer abcdefghijklmnopqrstuvwxyz012345")
    secret = watch("whsec-0123456789abcdef")
    assert leaks(f"signing with {secret}") == [secret]
    assert leaks("key id kabcdefghijklmnop refused") == []


def test_the_scanner_sees_records_of_any_logger() -> None:
    before = len(secrets_scan.findings)
    record = logging.LogRecord("shoal.test", logging.WARNING, __file__, 1, "key %s", (KEY,), None)
    SCANNER.handle(record)
    assert len(secrets_scan.findings) == before + 1
    # This leak was planted by the test: take it back so the session passes.
    del secrets_scan.findings[before:]
