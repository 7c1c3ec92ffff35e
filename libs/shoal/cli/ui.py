"""What the command prints and how it ends.

Text mode prints tables and sentences; JSON mode prints exactly one JSON document on stdout and
nothing else there (progress and notes go to stderr). Expected failures end the command with a
message on stderr and an exit code, never a traceback:

| exit | when |
|---|---|
| 0 | done |
| 1 | the API refused (401, 402, 403, 404, 409, 429, 5xx), or could not be reached |
| 2 | usage or validation: a bad option or input file, or the API answered 400 / 422 |
| 130 | interrupted (Ctrl-C) |
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import typer
from rich.console import Console

from shoal.cli.client import ApiError, ShoalClient, Unreachable
from shoal.cli.config import ENV_API_KEY, ENV_API_URL, Settings

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
PIPE_WIDTH = 200


class UsageProblem(Exception):
    """The command line or an input file is wrong (exit 2)."""


class Failure(Exception):
    """The command could not do its job for a reason already explained in the message (exit 1)."""


def exit_code_for(error: ApiError) -> int:
    # 400: the request did not validate; 422: a semantic rule of the input was broken.
    return EXIT_USAGE if error.status in (400, 422) else EXIT_FAILED


@dataclass
class UI:
    settings: Settings
    out: Console
    err: Console

    @classmethod
    def make(cls, settings: Settings) -> UI:
        # Created per command, so they write to whatever sys.stdout / sys.stderr are right now.
        out = Console(highlight=False, soft_wrap=True)
        if not out.is_terminal and "COLUMNS" not in os.environ:
            # Piped: tables as wide as they need, so ids are never cut ("grep" finds them whole).
            out = Console(highlight=False, soft_wrap=True, width=PIPE_WIDTH)
        return cls(settings=settings, out=out, err=Console(stderr=True, highlight=False, soft_wrap=True))

    @property
    def json_mode(self) -> bool:
        return self.settings.json

    def client(self) -> ShoalClient:
        try:
            url = httpx.URL(self.settings.api_url)
        except httpx.InvalidURL:
            url = None
        if url is None or url.scheme not in ("http", "https") or not url.host:
            raise UsageProblem(f"--api-url / {ENV_API_URL}: {self.settings.api_url!r} is not an http(s) URL")
        return ShoalClient(self.settings)

    def emit(self, data: Any) -> None:
        """The one JSON document of a command, on stdout."""
        typer.echo(json.dumps(data, indent=2, default=str))

    def say(self, message: str) -> None:
        """A sentence for people: stdout in text mode, stderr in JSON mode (stdout stays JSON)."""
        (self.err if self.json_mode else self.out).print(message, markup=False)

    def warn(self, message: str) -> None:
        self.err.print(message, markup=False)

    # ---- errors ------------------------------------------------------------------------------

    def report_api_error(self, error: ApiError, client_has_key: bool = True) -> None:
        if self.json_mode:
            self.err.print_json(json.dumps(error.as_json()))
            return
        where = f" ({error.method} {error.path})" if error.method else ""
        self.err.print(f"shoal: {error.status} {error.error}: {error.message}{where}", markup=False)
        for detail in error.details:
            field = detail.get("field") or "request"
            self.err.print(f"  - {field}: {detail.get('message', '')}", markup=False)
        if error.status == 401 and not client_has_key:
            self.err.print(f"  hint: pass --api-key or set {ENV_API_KEY}", markup=False)

    def report(self, code: str, message: str, **extra: Any) -> None:
        if self.json_mode:
            self.err.print_json(json.dumps({"error": code, "message": message, **extra}))
        else:
            self.err.print(f"shoal: {message}", markup=False)

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Turn the expected failures of a command into a message and an exit code."""
        try:
            yield
        except ApiError as exc:
            self.report_api_error(exc, bool(self.settings.api_key))
            raise typer.Exit(exit_code_for(exc)) from None
        except Unreachable as exc:
            self.report("unreachable", str(exc), url=exc.url)
            raise typer.Exit(EXIT_FAILED) from None
        except UsageProblem as exc:
            self.report("usage", str(exc))
            raise typer.Exit(EXIT_USAGE) from None
        except Failure as exc:
            self.report("failed", str(exc))
            raise typer.Exit(EXIT_FAILED) from None
        except KeyboardInterrupt:
            self.report("interrupted", "interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
