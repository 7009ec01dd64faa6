"""``python -m sagaflow``: the same as the ``sagaflow`` command."""

from sagaflow.cli import main

main()
