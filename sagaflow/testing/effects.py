"""The effects-once check: a handler run again with the same command changes nothing.

The inbox keeps a command from running twice while its record is there; a
handler must still be idempotent on its own (the record was pruned, a
compensation and a late command crossed, a copy of the service ran without the
inbox). :func:`check_effects_once` runs the handler itself, without the inbox:

1. the command, then the same command again: the second run must change no row;
2. with a compensation: the compensation, then again: the second changes nothing;
3. the command once more after its compensation: it must not apply the effect again.

Each run is one transaction on the database, with a real ``ctx.connection``,
as in a worker. A refusal (``BusinessFailure``) rolls its run back, and must be
answered the same way every time.
"""

from __future__ import annotations

import copy
import difflib
import pprint
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from sagaflow.core.definition import Action
from sagaflow.core.errors import BusinessFailure, DefinitionError
from sagaflow.core.messages import MessageKind, command_id
from sagaflow.runtime.participant import HandlerContext, Participant
from sagaflow.testing.database import Rows, ThrowawayDatabase, snapshot

__all__ = ["EffectsNotOnce", "EffectsReport", "check_effects_once"]


class EffectsNotOnce(AssertionError):
    """A handler's second run changed something (the message shows the diff)."""


@dataclass(frozen=True)
class EffectsReport:
    """What the check saw: each run's answer (a reply or ``refused: reason``)."""

    answers: tuple[tuple[str, str], ...]
    changed_first: bool

    def __str__(self) -> str:
        return "\n".join(f"{what}: {answer}" for what, answer in self.answers)


async def check_effects_once(
    participant: Participant,
    action: Action[Any, Any],
    command: BaseModel | dict[str, Any],
    *,
    database: ThrowawayDatabase | str | None = None,
    compensation: Action[Any, Any] | None = None,
    compensation_command: BaseModel | dict[str, Any] | None = None,
    state: Callable[[], Any] | None = None,
    saga_id: str = "effects-once",
    step: str = "step",
) -> EffectsReport:
    """Run ``participant``'s handler of ``action`` twice (and its compensation,
    and the action once more after it) and fail if a second run changes anything.

    Args:
        participant: The participant whose handlers run.
        action: The action to check; ``command`` its command.
        database: Where the handlers' tables are (a ``ThrowawayDatabase`` or a
            URL): the participant's ``setup`` runs first, each run is a
            transaction with a real ``ctx.connection``, and every table but
            the framework's is compared.
        compensation: The action that undoes it (checked too); its command is
            ``compensation_command``, by default ``command``.
        state: Without a database: returns what to compare (the in-memory
            state the handlers write), e.g. ``lambda: (stock.stock, stock.reservations)``.
        saga_id, step: What the handler's ``ctx`` says.

    Raises:
        EffectsNotOnce: a second run changed rows (or state), or answered
            differently; the message holds the diff.
    """
    if (database is None) == (state is None):
        raise DefinitionError("check_effects_once needs a database or a state function")
    url = None if database is None else getattr(database, "url", database)
    conn = None if url is None else await _connect(str(url), participant)
    try:
        run = _Runner(participant, conn, state, saga_id, step)
        answers: list[tuple[str, str]] = []
        before = await run.snapshot()
        first = await run.call(action, command, attempt=1)
        answers.append((f"{action.type} #1", first))
        after_first = await run.snapshot()
        second = await run.call(action, command, attempt=2)
        answers.append((f"{action.type} #2", second))
        await run.expect_same(after_first, f"running {action.type} a second time", answers)
        if first != second:
            raise EffectsNotOnce(
                f"{action.type} answered the same command differently: first {first}, then {second}"
            )
        if compensation is not None:
            undo = command if compensation_command is None else compensation_command
            answers.append(
                (
                    f"{compensation.type} #1",
                    await run.call(compensation, undo, attempt=1, compensation=True),
                )
            )
            undone = await run.snapshot()
            answers.append(
                (
                    f"{compensation.type} #2",
                    await run.call(compensation, undo, attempt=2, compensation=True),
                )
            )
            await run.expect_same(undone, f"running {compensation.type} a second time", answers)
            answers.append((f"{action.type} after it", await run.call(action, command, attempt=3)))
            await run.expect_same(
                undone, f"running {action.type} again after {compensation.type}", answers
            )
        return EffectsReport(tuple(answers), changed_first=before != after_first)
    finally:
        if conn is not None:
            await conn.close()


async def _connect(url: str, participant: Participant) -> Any:
    import asyncpg

    conn = await asyncpg.connect(url)
    if participant.setup is not None:
        async with conn.transaction():
            await participant.setup(conn)
    return conn


class _Runner:
    def __init__(
        self,
        participant: Participant,
        conn: Any,
        state: Callable[[], Any] | None,
        saga_id: str,
        step: str,
    ) -> None:
        self.participant = participant
        self.conn = conn
        self.state = state
        self.saga_id = saga_id
        self.step = step

    async def snapshot(self) -> Any:
        if self.conn is not None:
            return await snapshot(self.conn)
        assert self.state is not None
        return copy.deepcopy(self.state())

    async def call(
        self,
        action: Action[Any, Any],
        command: BaseModel | dict[str, Any],
        *,
        attempt: int,
        compensation: bool = False,
    ) -> str:
        registration = self.participant.registration(action.type)
        if registration is None:
            raise DefinitionError(f"{self.participant.service} has no handler of {action.type}")
        payload = command.model_dump(mode="json") if isinstance(command, BaseModel) else command
        parsed = action.command.model_validate(payload)
        kind = MessageKind.COMPENSATION if compensation else MessageKind.COMMAND
        ctx = HandlerContext(
            saga_id=self.saga_id,
            saga_name="effects-once",
            step=self.step,
            attempt=attempt,
            command_id=command_id(self.saga_id, self.step, kind),
            compensation=compensation,
            db=self.conn,
            action=action.type,
        )
        try:
            if self.conn is None:
                result = await registration.handler(parsed, ctx)
            else:
                async with self.conn.transaction():
                    result = await registration.handler(parsed, ctx)
        except BusinessFailure as exc:
            return f"refused: {exc.reason}"
        reply = action.reply.model_validate(result).model_dump(mode="json")
        return f"replied {reply}"

    async def expect_same(self, expected: Any, what: str, answers: list[tuple[str, str]]) -> None:
        now = await self.snapshot()
        if now == expected:
            return
        runs = "\n".join(f"  {name}: {answer}" for name, answer in answers)
        raise EffectsNotOnce(
            f"{what} changed what the first run left:\n{_diff(expected, now)}\nruns:\n{runs}"
        )


def _diff(before: Any, after: Any) -> str:
    if isinstance(before, dict) and isinstance(after, dict) and _is_rows(before, after):
        return _rows_diff(before, after)
    lines = difflib.unified_diff(
        pprint.pformat(before).splitlines(),
        pprint.pformat(after).splitlines(),
        "after the first run",
        "after the second",
        lineterm="",
    )
    return "\n".join(lines)


def _is_rows(before: dict[Any, Any], after: dict[Any, Any]) -> bool:
    values = [*before.values(), *after.values()]
    return all(isinstance(v, list) and all(isinstance(r, dict) for r in v) for v in values)


def _rows_diff(before: Rows, after: Rows) -> str:
    lines: list[str] = []
    for table in sorted(set(before) | set(after)):
        old = [repr(row) for row in before.get(table, [])]
        new = [repr(row) for row in after.get(table, [])]
        if old == new:
            continue
        lines.append(f"table {table}:")
        for row in old:
            if row not in new:
                lines.append(f"  - {row}")
        for row in new:
            if row not in old:
                lines.append(f"  + {row}")
        if old != new and all(r in new for r in old) and all(r in old for r in new):
            lines.append(f"  (rows repeated: {len(old)} before, {len(new)} after)")
    return "\n".join(lines)
