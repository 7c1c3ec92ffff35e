"""Secrets never reach a log: every record logged during the test run is scanned.

A handler on the root logger (re-attached before each test, since services reconfigure logging)
formats each record, with its exception text, and looks for API keys by their shape and for the
exact secrets tests register with `watch` (callback and webhook secrets are random, so they are
looked for by value). A finding fails the session at its end, naming the logger and the record.
"""

from __future__ import annotations

import logging
import re

import pytest

# A full API key (its id alone is fine to log) and a bearer credential.
PATTERNS = [
    re.compile(r"shoal_k[a-z2-7]{16}_[A-Za-z0-9_-]{43}"),
    re.compile(r"Bearer\s+[A-Za-z0-9._~+/-]{20,}=*"),
]
_watched: set[str] = set()
findings: list[str] = []


def watch(secret: str) -> str:
    """Look for this exact value in every log record from now on; returns it."""
    if len(secret) >= 12:
        _watched.add(secret)
    return secret


def leaks(text: str) -> list[str]:
    """What in `text` is a secret: key-shaped strings and watched values."""
    found = [m.group(0) for p in PATTERNS for m in p.finditer(text)]
    return found + [s for s in _watched if s in text]


class SecretScanner(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record)
        except Exception:  # a record that cannot be formatted is not ours to judge
            return
        for secret in leaks(text):
            findings.append(f"{record.name}: {secret[:10]}... in {record.getMessage()[:200]!r}")


SCANNER = SecretScanner()


@pytest.fixture(autouse=True)
def _scan_logs() -> None:
    root = logging.getLogger()
    if SCANNER not in root.handlers:
        root.addHandler(SCANNER)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if findings:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line(f"SECRETS IN LOGS ({len(findings)}):", red=True)
            for finding in findings[:20]:
                reporter.write_line(f"  {finding}", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
