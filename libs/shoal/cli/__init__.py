"""The `shoal` command line (`shoal --help`); `app` is the console script's entry point."""

from shoal.cli.main import app

__all__ = ["app"]
