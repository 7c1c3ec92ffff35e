"""Settings come from SHOAL_* variables and fail fast with a message naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from services.billing.config import BillingSettings
from services.execution.config import ExecutionSettings
from shoal.config import ConfigError, SharedSettings
from tests.processes import REPO


def test_shared_names_reach_every_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_NATS_URL", "nats://10.0.0.1:4999")
    monkeypatch.setenv("SHOAL_BILLING_PORT", "6001")
    settings = BillingSettings.load()
    assert settings.nats_url == "nats://10.0.0.1:4999"
    assert settings.port == 6001


def test_service_prefix_wins_over_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_LOG_LEVEL", "WARNING")
    monkeypatch.setenv("SHOAL_EXECUTION_LOG_LEVEL", "DEBUG")
    assert ExecutionSettings.load().log_level == "DEBUG"


def test_bad_value_names_variable_and_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_EXECUTION_BATCH_SIZE", "0")
    monkeypatch.setenv("SHOAL_EXECUTION_LEASE_SECONDS", "soon")
    with pytest.raises(ConfigError) as err:
        ExecutionSettings.load()
    text = str(err.value)
    assert "SHOAL_EXECUTION_BATCH_SIZE" in text and "greater than or equal to 1" in text
    assert "SHOAL_EXECUTION_LEASE_SECONDS" in text and "'soon'" in text


def test_bad_shared_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_LOG_LEVEL", "LOUD")
    with pytest.raises(ConfigError, match="SHOAL_LOG_LEVEL"):
        SharedSettings.load()


def test_database_url_defaults_to_sqlite_under_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHOAL_DATA_DIR", "/var/shoal")
    assert BillingSettings.load().resolved_database_url("billing") == "sqlite:////var/shoal/billing.db"
    monkeypatch.setenv("SHOAL_BILLING_DATABASE_URL", "postgresql://db/billing")
    assert BillingSettings.load().resolved_database_url("billing") == "postgresql://db/billing"


def test_process_exits_with_the_message() -> None:
    env = {"PATH": "/usr/bin:/bin", "SHOAL_BILLING_PORT": "70000"}
    done = subprocess.run(
        [sys.executable, "-m", "services.billing"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "SHOAL_BILLING_PORT" in done.stderr and "less than or equal to 65535" in done.stderr
    assert "Traceback" not in done.stderr
