"""The ``sagaflow`` command line (``sagaflow --help``); needs the ``cli`` extra.

``main`` is the console script; ``app`` is the Typer application (tests drive
it with ``typer.testing.CliRunner``). Without Typer and Rich installed there is
no ``app``, and ``main`` prints one line saying how to install them.
"""

from __future__ import annotations

import sys

__all__ = ["app", "main"]


def _missing_extra(exc: ImportError) -> bool:
    name = exc.name or ""
    return name.partition(".")[0] in ("typer", "rich")


try:
    from sagaflow.cli.app import app
except ImportError as _exc:
    if not _missing_extra(_exc):
        raise
    _MISSING: ImportError | None = _exc
else:
    _MISSING = None


def main() -> None:
    """The console script: run the ``sagaflow`` command."""
    if _MISSING is not None:
        print(
            "sagaflow: the command line needs the cli extra: pip install 'sagaflow[cli]' "
            f"({_MISSING.name} is not installed)",
            file=sys.stderr,
        )
        raise SystemExit(1)
    from sagaflow.cli.app import main as run

    run()
