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

The first held reply of a saga also opens its transaction at once when the
coordinator has none open for held replies yet (``together``): the saga is
locked while the siblings are on their way, and their replies join that
transaction, so after the last one only the decisions, the write and the
commit are left to do (no ``BEGIN``, no lock). One such transaction at a time
(``OPEN_HOLDS``): each keeps a pooled connection and its saga's row lock for
``linger`` at most; the other held replies wait unlocked, as above.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import Delivery
from sagaflow.runtime.writer import SagaRegistry

Event = tuple[Delivery, Envelope]
"""A parsed reply and the delivery it came in."""

DEFAULT_LINGER = 0.01
"""Seconds a group member's reply waits for its siblings' at most."""

OPEN_HOLDS = 1
"""Transactions a coordinator keeps open at once for held replies."""

Together = Callable[[list[Event], asyncio.Event], Coroutine[Any, Any, None]]
"""Decides a held saga's replies in one transaction: locks the saga at once,
waits for the event, then decides the list as it is then (siblings that
arrived meanwhile are in it) and settles every delivery in it."""

REMEMBERED = 10_000
"""Sagas whose group replies a coordinator remembers (to not wait for one
already decided)."""

__all__ = ["DEFAULT_LINGER", "OPEN_HOLDS", "Event", "Siblings", "Together"]


@dataclass
class _Held:
    events: list[Event]
    timer: asyncio.TimerHandle
    decide: asyncio.Event | None = None  # set: the open transaction decides ``events``


class Siblings:
    """Holds a group's early replies until their siblings arrive or ``linger`` passes.

    Args:
        registry: The definitions, which say which steps form a group.
        linger: Seconds a reply is held at most; 0 holds none.
        release: Takes a reply back when its time is up (the batcher's ``put``).
        together: Opens the transaction of a saga's held replies; without it
            none is opened before the siblings arrive.
        open_holds: How many such transactions at most at a time.
    """

    def __init__(
        self,
        registry: SagaRegistry,
        *,
        linger: float,
        release: Callable[[Delivery], None],
        together: Together | None = None,
        open_holds: int = OPEN_HOLDS,
    ) -> None:
        self._registry = registry
        self._linger = linger
        self._release_to = release
        self._together = together
        self._open_holds = open_holds
        self._open: dict[asyncio.Task[None], _Held] = {}
        self._held: dict[str, _Held] = {}
        # id() of the deliveries held or in an open transaction: a batch run again
        # after a failure brings them back, and they must not be decided twice
        self._taken: set[int] = set()
        self._released: set[int] = set()  # id() of deliveries given back: not held again
        # saga id -> indexes of group members whose success reply was decided here
        self._answered: OrderedDict[str, set[int]] = OrderedDict()

    @property
    def holding(self) -> int:
        """Replies held now, or being decided in a transaction opened for them."""
        held = {id(one): one for one in (*self._held.values(), *self._open.values())}
        return sum(len(one.events) for one in held.values())

    def gather(self, events: Sequence[Event]) -> list[Event]:
        """The replies to decide now, in order: those given and the held ones of
        their sagas, less those that go on waiting for a sibling."""
        if self._taken:
            events = [event for event in events if id(event[0]) not in self._taken]
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
                    self._hold(saga_id, together)
                else:
                    held.events.extend(arrived)
                self._taken.update(id(delivery) for delivery, _ in arrived)
                continue
            for delivery, envelope in together:
                self._released.discard(id(delivery))
                if self._member(envelope) is not None:
                    self._remember(saga_id, envelope.step_index)
            if held is not None:
                self._drop(saga_id)
                if held.decide is not None:  # they join the transaction open for them
                    held.events.extend(arrived)
                    self._taken.update(id(delivery) for delivery, _ in arrived)
                    held.decide.set()
                    continue
                self._taken.difference_update(id(delivery) for delivery, _ in held.events)
            now.extend(together)
        return now

    async def settle(self) -> None:
        """Let the open transactions decide what they hold now, and wait for them
        (a graceful stop)."""
        for saga_id, held in list(self._held.items()):
            if held.decide is not None:
                self._let_go(saga_id)
        await asyncio.gather(*self._open, return_exceptions=True)

    def close(self) -> None:
        """Forget the held replies, unacknowledged: the broker delivers them again
        (an open transaction still deciding some is cancelled: it rolls back)."""
        for held in self._held.values():
            held.timer.cancel()
        for task in self._open:
            task.cancel()
        self._held.clear()
        self._taken.clear()
        self._released.clear()

    def _hold(self, saga_id: str, events: list[Event]) -> None:
        timer = asyncio.get_running_loop().call_later(self._linger, self._let_go, saga_id)
        held = self._held[saga_id] = _Held(list(events), timer)
        if self._together is not None and len(self._open) < self._open_holds:
            held.decide = asyncio.Event()
            task = asyncio.create_task(self._run_open(saga_id, held), name=f"replies-{saga_id}")
            self._open[task] = held
            task.add_done_callback(self._open.pop)

    async def _run_open(self, saga_id: str, held: _Held) -> None:
        assert self._together is not None and held.decide is not None
        try:
            await self._together(held.events, held.decide)
        finally:
            # it failed before its siblings came (it gave back what it held): what
            # comes next for the saga is decided as if nothing were held
            if self._held.get(saga_id) is held:
                self._drop(saga_id)
            self._taken.difference_update(id(delivery) for delivery, _ in held.events)

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

    def _drop(self, saga_id: str) -> _Held | None:
        """Stop holding a saga's replies (and its timer); returns what was held."""
        held = self._held.pop(saga_id, None)
        if held is not None:
            held.timer.cancel()
        return held

    def _let_go(self, saga_id: str) -> None:
        """Its linger passed, or the coordinator stops: a plain hold's replies go
        back to the batcher, an open transaction decides its replies alone."""
        held = self._drop(saga_id)
        if held is None:
            return
        for delivery, envelope in held.events:
            self._remember(saga_id, envelope.step_index)
            if held.decide is None:
                self._taken.discard(id(delivery))
                self._released.add(id(delivery))
                self._release_to(delivery)
        if held.decide is not None:
            held.decide.set()  # its open transaction decides them alone
