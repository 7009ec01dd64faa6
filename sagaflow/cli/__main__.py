"""``python -m sagaflow.cli``."""

from sagaflow.cli import main

main()
