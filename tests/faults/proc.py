"""``python -m tests.faults.proc``: a coordinator or a worker with faults injected.

The fault suite's own entry point (``services.stack.Stack(launchers=...)``)::

    python -m tests.faults.proc coordinator MODULE:ATTR...
    python -m tests.faults.proc worker MODULE:ATTR

It builds the same process as ``sagaflow coordinator`` / ``sagaflow worker``
(through :func:`sagaflow.cli.run.run_coordinator` and
:func:`~sagaflow.cli.run.run_worker`: same settings, adapters, telemetry,
signals and exit codes) and wraps its parts as its environment says (see
``injection.py``): ``FAULTS_DUPLICATE=1``, ``FAULTS_KILL_AFTER_COMMIT``
(workers), ``FAULTS_POISON_SAGA``. With none set it is the plain process.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

import typer

from sagaflow import Hooks
from sagaflow.cli import common
from sagaflow.cli.common import EARLY_SIGNALS, UsageProblem, begin_invocation, guarded
from sagaflow.cli.resolve import load_participant, load_sagas, split_specs
from sagaflow.cli.run import TransportFactory, run_coordinator, run_worker
from sagaflow.config import Settings
from sagaflow.core.ports import ParticipantStore, Transport
from tests.faults.injection import (
    DUPLICATE_ENV,
    KILL_AFTER_COMMIT_ENV,
    POISON_ENV,
    DuplicatingTransport,
    KillAfterCommit,
    Poison,
    kill_rule,
)

log = logging.getLogger("tests.faults")
USAGE = "usage: python -m tests.faults.proc coordinator MODULE:ATTR... | worker MODULE:ATTR"


def _transport() -> TransportFactory | None:
    if os.environ.get(DUPLICATE_ENV, "").strip().lower() not in {"1", "true", "yes"}:
        return None
    log.warning("fault injection: every message is published twice (%s)", DUPLICATE_ENV)

    def duplicating(settings: Settings, *, name: str) -> Transport:
        return DuplicatingTransport(common.transport(settings, name=name))

    return duplicating


def _store() -> Callable[[Settings, str], ParticipantStore] | None:
    spec = os.environ.get(KILL_AFTER_COMMIT_ENV, "").strip()
    if not spec:
        return None
    try:
        rule = kill_rule(spec)
    except ValueError as exc:
        raise UsageProblem(str(exc)) from None
    log.warning("fault injection: armed to die after a commit (%s=%s)", KILL_AFTER_COMMIT_ENV, spec)

    def killing(settings: Settings, service: str) -> ParticipantStore:
        return KillAfterCommit(common.participant_store(settings, service), rule)

    return killing


def _hooks() -> Sequence[Hooks]:
    saga_id = os.environ.get(POISON_ENV, "").strip()
    if not saga_id:
        return ()
    log.warning("fault injection: the messages of saga %s are poisoned (%s)", saga_id, POISON_ENV)
    return (Poison(saga_id),)


@guarded
def coordinator(specs: Sequence[str]) -> None:
    settings = common.current_settings()
    if os.environ.get(KILL_AFTER_COMMIT_ENV, "").strip():
        raise UsageProblem(f"{KILL_AFTER_COMMIT_ENV} is for workers")
    sagas = load_sagas(split_specs(specs or [os.environ.get("SAGAFLOW_SAGAS", "")]))
    run_coordinator(settings, sagas, transport=_transport(), hooks=_hooks())


@guarded
def worker(spec: str) -> None:
    settings = common.current_settings()
    participant = load_participant(spec)
    run_worker(settings, participant, transport=_transport(), store=_store(), hooks=_hooks())


def _note_early_signal(signum: int, frame: object) -> None:
    EARLY_SIGNALS.append(signum)


def main(argv: Sequence[str]) -> int:
    """Run the process ``argv`` names; returns the exit code (as ``sagaflow`` would)."""
    # as sagaflow's own main: a stop while still starting is acted on once the loop runs
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _note_early_signal)
    begin_invocation(debug=False)
    command, *args = argv or [""]
    try:
        if command == "coordinator":
            coordinator(args)
        elif command == "worker" and len(args) == 1:
            worker(args[0])
        else:
            print(USAGE, file=sys.stderr)
            return common.EXIT_USAGE
    except typer.Exit as stop:
        return stop.exit_code
    return common.EXIT_OK


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
