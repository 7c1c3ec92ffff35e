"""`python -m shoal.cli`: the same as the `shoal` console script."""

from shoal.cli.main import app

if __name__ == "__main__":
    app(prog_name="shoal")
