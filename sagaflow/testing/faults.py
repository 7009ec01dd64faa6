"""Faults on demand: each one call, scoped to a step or an action.

The faults act on the messages between the coordinator and the participants,
as a broker or a crashing process would, and never on the code under test::

    env.faults.duplicate("reserve")              # the command is delivered twice
    env.faults.lose_reply("charge")              # the reply never arrives
    env.faults.delay_reply("charge", 45)         # it arrives 45 s (test time) late
    env.faults.crash_after_commit("reserve")     # committed, died before replying
    env.faults.fail_compensation("reserve", times=2)  # the undo fails twice
    await env.faults.redeliver_reply(saga_id, "reserve")  # an old reply comes back

``target`` is a step's name, or an :class:`~sagaflow.Action` (the message of
that action: pass the compensation's action for a compensation). A fault fires
on the first ``times`` matching messages; one that never fired fails the test
when the environment closes (a fault aimed at a step that never ran tests
nothing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sagaflow.core.definition import Action
from sagaflow.core.errors import SagaflowError
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import Clock, Topology
from sagaflow.transport.memory import InMemoryTransport

__all__ = ["Faults", "FaultyTransport", "InjectedCrash"]


class InjectedCrash(SagaflowError):
    """The participant "died" after its commit and before its reply (a fault)."""


@dataclass
class _Fault:
    name: str
    step: str | None
    action: str | None
    compensation: bool
    times: int
    seconds: float = 0.0
    reason: str = ""
    fired: int = 0

    def matches(self, envelope: Envelope) -> bool:
        if self.fired >= self.times:
            return False
        kind = envelope.for_kind if envelope.is_reply else envelope.kind
        wanted = MessageKind.COMPENSATION if self.compensation else MessageKind.COMMAND
        if kind is not wanted:
            return False
        if self.step is not None and envelope.step != self.step:
            return False
        return self.action is None or envelope.type == self.action

    def __str__(self) -> str:
        scope = repr(self.step) if self.step is not None else f"action {self.action}"
        of = " (compensation)" if self.compensation and self.name != "fail_compensation" else ""
        return f"{self.name}({scope}{of}, times={self.times})"


class Faults:
    """The faults of one :class:`~sagaflow.testing.SagaTestEnvironment` (``env.faults``)."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._faults: list[_Fault] = []
        self.replies: dict[tuple[str, str, MessageKind], Envelope] = {}
        self._transport: FaultyTransport | None = None

    # ------------------------------------------------------------------ the faults

    def duplicate(
        self, target: str | Action[Any, Any], *, times: int = 1, compensation: bool = False
    ) -> None:
        """Deliver the step's command (or compensation) twice, as a broker may."""
        self._add("duplicate", target, times, compensation)

    def lose_reply(
        self, target: str | Action[Any, Any], *, times: int = 1, compensation: bool = False
    ) -> None:
        """Drop the participant's reply: the effect committed, the saga never hears of
        it (until its step times out and retries)."""
        self._add("lose_reply", target, times, compensation)

    def delay_reply(
        self,
        target: str | Action[Any, Any],
        seconds: float,
        *,
        times: int = 1,
        compensation: bool = False,
    ) -> None:
        """Hold the reply back for ``seconds`` of test time (``advance()`` lets it
        through): past the step's timeout, it arrives after the saga moved on."""
        self._add("delay_reply", target, times, compensation, seconds=seconds)

    def crash_after_commit(
        self, target: str | Action[Any, Any], *, times: int = 1, compensation: bool = False
    ) -> None:
        """The participant commits the effect and dies before replying: the broker
        delivers the command again, and the inbox must answer it without a second
        effect."""
        self._add("crash_after_commit", target, times, compensation)

    def fail_compensation(
        self,
        target: str | Action[Any, Any],
        *,
        times: int = 1,
        reason: str = "injected fault: the compensation failed",
    ) -> None:
        """The step's compensation fails (transiently) ``times`` times before it
        reaches the participant: the compensation's retry policy answers."""
        self._add("fail_compensation", target, times, True, reason=reason)

    async def redeliver_reply(self, saga_id: str, step: str, *, compensation: bool = False) -> None:
        """Deliver again the reply the step last sent (an old message coming back
        late: after a retry, or after the saga ended). Then ``drain()``.

        Raises:
            SagaflowError: that step of that saga never replied.
        """
        kind = MessageKind.COMPENSATION if compensation else MessageKind.COMMAND
        reply = self.replies.get((saga_id, step, kind))
        if reply is None or self._transport is None:
            raise SagaflowError(f"saga {saga_id}: step {step!r} sent no {kind.value} reply")
        await self._transport.deliver([reply])

    # ------------------------------------------------------------------ bookkeeping

    @property
    def fired(self) -> list[str]:
        """The faults that fired, with how often."""
        return [f"{fault} fired {fault.fired}x" for fault in self._faults if fault.fired]

    def check_all_fired(self) -> None:
        """Raise if a fault never fired (no message matched it)."""
        idle = [str(fault) for fault in self._faults if fault.fired == 0]
        if idle:
            raise AssertionError(
                f"fault{'s' if len(idle) > 1 else ''} never fired: {', '.join(idle)}"
                " (no message of that step or action was sent)"
            )

    def _add(
        self,
        name: str,
        target: str | Action[Any, Any],
        times: int,
        compensation: bool,
        *,
        seconds: float = 0.0,
        reason: str = "",
    ) -> None:
        if times < 1:
            raise ValueError("times must be at least 1")
        step, action = (target, None) if isinstance(target, str) else (None, target.type)
        self._faults.append(
            _Fault(name, step, action, compensation, times, seconds=seconds, reason=reason)
        )

    def _take(self, name: str, envelope: Envelope) -> _Fault | None:
        for fault in self._faults:
            if fault.name == name and fault.matches(envelope):
                fault.fired += 1
                return fault
        return None


class FaultyTransport(InMemoryTransport):
    """The in-memory transport, with :class:`Faults` applied to what is published."""

    def __init__(self, topology: Topology, faults: Faults) -> None:
        super().__init__(topology, close_timeout=1.0)
        self.faults = faults
        faults._transport = self
        self._held: list[tuple[float, Envelope]] = []

    async def publish(self, envelopes: Sequence[Envelope]) -> None:
        faults = self.faults
        out: list[Envelope] = []
        for envelope in envelopes:
            if envelope.is_reply:
                kind = envelope.for_kind or MessageKind.COMMAND
                faults.replies[(envelope.saga_id, envelope.step, kind)] = envelope
                if faults._take("crash_after_commit", envelope):
                    raise InjectedCrash(
                        f"injected fault: {envelope.service} crashed after committing"
                        f" {envelope.type} for saga {envelope.saga_id}, before replying"
                    )
                if faults._take("lose_reply", envelope):
                    continue
                delayed = faults._take("delay_reply", envelope)
                if delayed:
                    self._held.append((faults._clock.now() + delayed.seconds, envelope))
                    continue
                out.append(envelope)
                continue
            failing = faults._take("fail_compensation", envelope)
            if failing:  # answered as the failing handler would have: an error
                out.append(envelope.reply(Outcome.ERROR, reason=failing.reason))
                continue
            out.append(envelope)
            if faults._take("duplicate", envelope):
                out.append(envelope)
        await super().publish(out)

    async def deliver(self, envelopes: Sequence[Envelope]) -> None:
        """Publish without faults."""
        await super().publish(envelopes)

    def next_release(self) -> float | None:
        """When the next held-back reply is due."""
        return min((due for due, _ in self._held), default=None)

    def held(self) -> int:
        return len(self._held)

    async def release_due(self) -> bool:
        """Let the held-back replies that are due through; whether there were any."""
        now = self.faults._clock.now()
        due = [envelope for at, envelope in self._held if at <= now]
        if not due:
            return False
        self._held = [(at, envelope) for at, envelope in self._held if at > now]
        await super().publish(due)
        return True
