"""A parallel group's replies, decided in one transaction.

A group's commands go out together, so their replies come back close
together. Decided one by one, the second reply waits for the first's row lock
and then pays a commit of its own, though the first changed nothing anyone
waits for: the saga still waits for its other branches. So the coordinator
holds a success reply to a group member's command, unacknowledged, for at
most ``linger`` seconds, until the replies of the group's other members are in
hand too; then they are decided together (:class:`Siblings`).

Holding changes when a reply is decided, never what is decided: the engine
sees the same replies in the same order of arrival. Anything else for that
saga (a refusal, an error, another step's reply) is decided at once and takes
the held replies with it. A held reply is not acknowledged, so a coordinator
that dies holding one loses nothing: the broker delivers it again. A reply is
held once; when ``linger`` passes it goes back to the batcher and is decided
alone. What a sibling cannot be seen to have answered (it went to another
coordinator, or its condition skipped it) costs at most ``linger``.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import Delivery
from sagaflow.runtime.writer import SagaRegistry

Event = tuple[Delivery, Envelope]
"""A parsed reply and the delivery it came in."""

DEFAULT_LINGER = 0.01
"""Seconds a group member's reply waits for its siblings' at most."""

REMEMBERED = 10_000
"""Sagas whose group replies a coordinator remembers (to not wait for one
already decided)."""

__all__ = ["DEFAULT_LINGER", "Event", "Siblings"]


@dataclass
class _Held:
    events: list[Event]
    timer: asyncio.TimerHandle


class Siblings:
    """Holds a group's early replies until their siblings arrive or ``linger`` passes.

    Args:
        registry: The definitions, which say which steps form a group.
        linger: Seconds a reply is held at most; 0 holds none.
        release: Takes a reply back when its time is up (the batcher's ``put``).
    """

    def __init__(
        self, registry: SagaRegistry, *, linger: float, release: Callable[[Delivery], None]
    ) -> None:
        self._registry = registry
        self._linger = linger
        self._release_to = release
        self._held: dict[str, _Held] = {}
        self._released: set[int] = set()  # id() of deliveries given back: not held again
        # saga id -> indexes of group members whose success reply was decided here
        self._answered: OrderedDict[str, set[int]] = OrderedDict()

    @property
    def holding(self) -> int:
        """Replies held now."""
        return sum(len(held.events) for held in self._held.values())

    def gather(self, events: Sequence[Event]) -> list[Event]:
        """The replies to decide now, in order: those given and the held ones of
        their sagas, less those that go on waiting for a sibling."""
        if not self._held and (
            self._linger <= 0 or not any(self._member(envelope) for _, envelope in events)
        ):
            return list(events)  # nothing to hold: a straight line's batches pass through
        by_saga: dict[str, list[Event]] = {}
        for event in events:
            by_saga.setdefault(event[1].saga_id, []).append(event)
        now: list[Event] = []
        for saga_id, arrived in by_saga.items():
            held = self._held.get(saga_id)
            together = arrived if held is None else [*held.events, *arrived]
            if self._waits(saga_id, together):
                if held is None:
                    timer = asyncio.get_running_loop().call_later(
                        self._linger, self._give_back, saga_id
                    )
                    self._held[saga_id] = _Held(together, timer)
                else:
                    held.events = together
                continue
            if held is not None:
                held.timer.cancel()
                del self._held[saga_id]
            for delivery, envelope in together:
                self._released.discard(id(delivery))
                if self._member(envelope) is not None:
                    self._remember(saga_id, envelope.step_index)
            now.extend(together)
        return now

    def close(self) -> None:
        """Forget the held replies, unacknowledged: the broker delivers them again."""
        for held in self._held.values():
            held.timer.cancel()
        self._held.clear()
        self._released.clear()

    def _waits(self, saga_id: str, events: Sequence[Event]) -> bool:
        """Whether these replies, all of one saga, wait for a sibling's."""
        group: tuple[int, ...] | None = None
        arrived: set[int] = set()
        for delivery, envelope in events:
            members = self._member(envelope)
            if members is None or id(delivery) in self._released:
                return False
            if group is None:
                group = members
            elif members != group:
                return False
            arrived.add(envelope.step_index)
        if group is None:
            return False
        return not set(group) <= arrived | self._answered.get(saga_id, set())

    def _member(self, envelope: Envelope) -> tuple[int, ...] | None:
        """The group of the step a success reply to a command answers, if any."""
        if envelope.for_kind is not MessageKind.COMMAND or envelope.outcome is not Outcome.SUCCESS:
            return None
        saga = self._registry.get(envelope.saga_name, envelope.saga_version)
        if saga is None:
            return None
        members = saga.groups.get(envelope.step_index)
        return members if members is not None and len(members) > 1 else None

    def _remember(self, saga_id: str, index: int) -> None:
        answered = self._answered.get(saga_id)
        if answered is None:
            answered = self._answered[saga_id] = set()
            if len(self._answered) > REMEMBERED:
                self._answered.popitem(last=False)
        else:
            self._answered.move_to_end(saga_id)
        answered.add(index)

    def _give_back(self, saga_id: str) -> None:
        held = self._held.pop(saga_id, None)
        if held is None:
            return
        for delivery, envelope in held.events:
            self._released.add(id(delivery))
            self._remember(saga_id, envelope.step_index)
            self._release_to(delivery)
