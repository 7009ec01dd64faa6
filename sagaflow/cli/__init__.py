"""The ``sagaflow`` command line (``sagaflow --help``).

``main`` is the console script; ``app`` is the Typer application (tests drive
it with ``typer.testing.CliRunner``).
"""

from sagaflow.cli.app import app, main

__all__ = ["app", "main"]
