"""Replaying dead letters for an operator, with who and why in each saga's log.

Shared by ``sagaflow dlq replay`` and the dashboard: the messages go back to
the queue they came from, then each one that belongs to a saga the store knows
gets a ``dead_letter_replayed`` entry (who, why, which letter) in its log.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from sagaflow.core.errors import SagaflowError
from sagaflow.core.ports import DeadLetter, SagaStore, Transport, UnitOfWork
from sagaflow.core.state import LogEntry, LogEvent

__all__ = ["Replayed", "dead_letter_document", "replay_dead_letters"]

log = logging.getLogger("sagaflow.dead_letters")

MAX_LETTERS = 10_000
"""The most dead letters looked at for one replay (to find their sagas)."""


def dead_letter_document(letter: DeadLetter) -> dict[str, Any]:
    """A dead letter as ``dlq list --json`` prints it and the dashboard shows it.

    When the body is a sagaflow envelope, its saga id, type and step are lifted
    out; the body is given as text when it is UTF-8, else base64.
    """
    envelope: dict[str, Any] = {}
    try:
        parsed = orjson.loads(letter.body)
        if isinstance(parsed, dict):
            envelope = parsed
    except orjson.JSONDecodeError:
        pass
    document: dict[str, Any] = {
        "id": letter.id,
        "reason": letter.reason,
        "source_queue": letter.source_queue,
        "saga_id": envelope.get("saga_id"),
        "type": envelope.get("type"),
        "step": envelope.get("step"),
        "kind": envelope.get("kind"),
        "headers": dict(letter.headers),
    }
    try:
        document["body"] = letter.body.decode("utf-8")
    except UnicodeDecodeError:
        document["body_base64"] = base64.b64encode(letter.body).decode("ascii")
    return document


@dataclass(frozen=True)
class Replayed:
    """What a replay did: the ids re-published, the sagas whose log records it,
    and why the record is missing when the store could not be written."""

    ids: list[str]
    recorded: int
    record_error: str | None = None


async def replay_dead_letters(
    transport: Transport,
    store: SagaStore,
    ids: Sequence[str] | None,
    *,
    by: str,
    reason: str,
    now: float,
) -> Replayed:
    """Re-publish dead letters (``ids``, or all with ``None``) and record each in its saga's log.

    The store must be started. Recording is best effort: the messages are
    already back in their queues, so a store failure is returned, not raised.
    """
    present = await transport.dead_letters(MAX_LETTERS)
    replayed = await transport.replay_dead_letters(None if ids is None else list(ids))
    done = set(replayed)
    chosen = [letter for letter in present if letter.id in done]
    try:
        recorded = await _record(store, chosen, by=by, reason=reason, now=now)
    except SagaflowError as exc:
        log.warning("replayed, but not recorded in the saga logs: %s", exc)
        return Replayed(replayed, 0, str(exc))
    return Replayed(replayed, recorded)


async def _record(
    store: SagaStore, letters: Sequence[DeadLetter], *, by: str, reason: str, now: float
) -> int:
    entries = []
    for letter in letters:
        doc = dead_letter_document(letter)
        saga_id = doc["saga_id"]
        if not isinstance(saga_id, str) or await store.get(saga_id) is None:
            continue
        entries.append(
            LogEntry(
                saga_id=saga_id,
                at=now,
                event=LogEvent.DEAD_LETTER_REPLAYED,
                step=doc["step"] if isinstance(doc["step"], str) else None,
                detail={
                    "by": by,
                    "reason": reason,
                    "dead_letter_id": letter.id,
                    "dead_letter_reason": letter.reason,
                    "type": doc["type"],
                    "kind": doc["kind"],
                },
            )
        )
    if entries:
        async with store.transaction() as tx:
            await tx.write(UnitOfWork(log=entries))
    return len(entries)
