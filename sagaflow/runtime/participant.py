"""Participants: typed handlers for a service's actions, and the worker that runs them.

The worker handles each command on its own, up to ``concurrency`` at once, so
a slow handler holds up only its own saga. A command gets one transaction on
one pooled connection: the worker claims the command id in the participant's
inbox (a concurrent duplicate waits on that claim, then is answered with what
the first one stored), runs the handler on the same connection, stores the
reply and commits. Only then does it publish the reply (confirmed) and
acknowledge the command: no reply goes out for a command that did not commit.

A handler runs once per delivery. It runs again only when its transaction
cannot commit for a reason that heals (the database restarts, or its SQL loses
a deadlock: ``StoreError``/``ConcurrencyConflict``, counted by the ``rerun``
hook) or when the broker delivers the message again (the process crashed
before acknowledging it). A handler's own exception is the command's outcome:
``BusinessFailure`` is a FAILURE reply, stored in the inbox in a second short
transaction after the handler's writes are rolled back; any other exception is
an ERROR reply, not stored, that the step's retry policy answers. Anything
else that raises (a hook, a bug) gives the command back to the queue: it is
dead-lettered with the error as its reason on its last delivery.

A compensation first records a tombstone for the command it undoes: if that
command never ran, it never will (a late delivery finds the tombstone), and
the compensation handler is skipped since there is nothing to undo.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from sagaflow.core.definition import Action, check_name
from sagaflow.core.errors import (
    BusinessFailure,
    ConcurrencyConflict,
    DefinitionError,
    MessageRejected,
)
from sagaflow.core.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Envelope,
    MessageKind,
    Outcome,
    command_id,
    decode,
)
from sagaflow.core.ports import Delivery, ParticipantStore, ParticipantTransaction, Transport
from sagaflow.logs import saga_fields
from sagaflow.runtime.batching import HEALING, give_back, retry_healing
from sagaflow.runtime.hooks import Hooks, carrying

log = logging.getLogger("sagaflow.worker")

C = TypeVar("C", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)

DEFAULT_CONCURRENCY = 16
"""Commands a worker handles at once unless told otherwise (see docs/workers.md)."""


@dataclass(frozen=True)
class HandlerContext:
    """What a handler knows besides its command.

    ``connection`` is the participant database connection, inside the
    transaction that also records the command id: write the business effect
    on it. It is ``None`` with the in-memory store.
    """

    saga_id: str
    saga_name: str
    step: str
    attempt: int
    command_id: str
    compensation: bool
    connection: Any


Handler = Callable[[C, HandlerContext], Awaitable[R]]


@dataclass(frozen=True)
class _Registration(Generic[C, R]):
    action: Action[C, R]
    handler: Handler[C, R]


class Participant:
    """A participant service: its name and the handlers of its actions.

    Example::

        inventory = Participant("inventory")

        @inventory.handler(reserve_stock)
        async def reserve(cmd: ReserveStock, ctx: HandlerContext) -> Reservation: ...
    """

    def __init__(
        self, service: str, *, setup: Callable[[Any], Awaitable[None]] | None = None
    ) -> None:
        """Args:
        service: The service name (its queue is named after it).
        setup: Called once when a worker starts, with the participant database
            connection inside a transaction (``None`` in memory): create the
            service's tables, seed data. It must be idempotent: every worker
            process of the service runs it.
        """
        check_name("service", service)
        self.service = service
        self.setup = setup
        self._handlers: dict[str, _Registration[Any, Any]] = {}

    def handler(self, action: Action[C, R]) -> Callable[[Handler[C, R]], Handler[C, R]]:
        """Register the handler of ``action`` (an action or a compensation).

        Raises:
            DefinitionError: the action belongs to another service, already has a
                handler, or the function is not ``async def f(command, ctx)``.
        """
        if not isinstance(action, Action):
            raise DefinitionError("Participant.handler takes an Action")
        if action.service != self.service:
            raise DefinitionError(
                f"{action.type} belongs to {action.service!r}, not {self.service!r}"
            )
        if action.type in self._handlers:
            raise DefinitionError(f"{action.type} already has a handler")

        def register(fn: Handler[C, R]) -> Handler[C, R]:
            if not inspect.iscoroutinefunction(fn):
                raise DefinitionError(f"handler of {action.type} must be an async function")
            if len(inspect.signature(fn).parameters) != 2:
                raise DefinitionError(f"handler of {action.type} must take (command, ctx)")
            self._handlers[action.type] = _Registration(action, fn)
            return fn

        return register

    def registration(self, action_type: str) -> _Registration[Any, Any] | None:
        return self._handlers.get(action_type)

    @property
    def actions(self) -> list[str]:
        return sorted(self._handlers)


class _Run:
    """What happened to the handler in one try at a command."""

    __slots__ = ("raised", "ran", "redelivered")

    def __init__(self, redelivered: bool) -> None:
        self.redelivered = redelivered
        self.ran = False
        self.raised: Exception | None = None


class Worker:
    """Runs a participant: consumes its service queue and answers every command.

    Args:
        participant: The handlers.
        transport: The broker.
        store: The participant's database (its inbox lives there). Each command
            in hand holds one of its connections: give its pool ``concurrency``
            connections.
        hooks: Tracing and metrics.
        prefetch: Commands taken from the broker ahead of being handled.
        concurrency: Commands handled at once, each in its own transaction.
        max_message_bytes: Larger commands are dead-lettered.
    """

    def __init__(
        self,
        participant: Participant,
        *,
        transport: Transport,
        store: ParticipantStore,
        hooks: Hooks | None = None,
        prefetch: int = 200,
        concurrency: int = DEFAULT_CONCURRENCY,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.participant = participant
        self.transport = transport
        self.store = store
        self.hooks = hooks or Hooks()
        self.prefetch = max(prefetch, concurrency)
        self.concurrency = concurrency
        self.max_message_bytes = max_message_bytes
        self._waiting: asyncio.Queue[Delivery] = asyncio.Queue()
        self._loops: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()  # loops handling a command
        self._stopping = False
        self._stopped = asyncio.Event()
        self._started = False
        self._queue = transport.topology.service_queue(participant.service)

    async def start(self) -> None:
        await retry_healing(self.store.start, what="store start")
        if self.participant.setup is not None:
            await retry_healing(self._setup, what=f"{self.participant.service} setup")
        await retry_healing(
            lambda: self.transport.start([self.participant.service]), what="transport start"
        )
        self._stopping = False
        self._loops = [
            asyncio.create_task(self._loop(), name=f"{self.participant.service}-{i}")
            for i in range(self.concurrency)
        ]
        await self.transport.consume(self._queue, self._waiting.put_nowait, prefetch=self.prefetch)
        self._started = True
        log.info(
            "worker %s started: actions=%s", self.participant.service, self.participant.actions
        )

    async def _setup(self) -> None:
        assert self.participant.setup is not None
        async with self.store.transaction() as tx:
            await self.participant.setup(tx.connection)

    async def stop(self) -> None:
        """Stop consuming, finish the commands in hand (commit, reply, ack), close."""
        self._stopped.set()
        if not self._started:
            return
        self._started = False
        self._stopping = True
        for loop in self._loops:
            if loop not in self._busy:  # a busy loop finishes its command, then stops
                loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        await self.transport.close()
        await self.store.close()
        log.info("worker %s stopped", self.participant.service)

    async def run(self) -> None:
        await self.start()
        try:
            await self._stopped.wait()
        finally:
            await self.stop()

    def request_stop(self) -> None:
        self._stopped.set()

    @property
    def idle(self) -> bool:
        return self._waiting.empty() and not self._busy

    async def _loop(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        while not self._stopping:
            delivery = await self._waiting.get()
            self._busy.add(task)
            try:
                await self._handle(delivery)
            finally:
                self._busy.discard(task)

    async def _handle(self, delivery: Delivery) -> None:
        """Settle one delivery: answer it, dead-letter it, or give it back."""
        try:
            envelope, registration, command = self._parse(delivery)
            run = _Run(delivery.redelivered)
            reply = await retry_healing(
                lambda: self._attempt(envelope, registration, command, run),
                what=f"{self.participant.service} command",
            )
            if reply is not None:
                await retry_healing(lambda: self._publish(reply), what="publishing a reply")
        except asyncio.CancelledError:
            raise
        except MessageRejected as exc:
            await self._reject(delivery, exc.reason)
            return
        except Exception as exc:
            log.exception("%s: a command could not be handled", self.participant.service)
            await self._give_back(delivery, exc)
            return
        try:
            await delivery.ack()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the channel is gone: redelivered, answered from the inbox
            log.warning("%s: acknowledging failed: %r", self.participant.service, exc)

    async def _publish(self, reply: Envelope) -> None:
        with self.hooks.publishing([reply]) as traced:
            await self.transport.publish(traced)

    async def _reject(self, delivery: Delivery, reason: str) -> None:
        log.warning("%s: dead-lettering a command: %s", self.participant.service, reason)
        self.hooks.dead_lettered(delivery.queue, reason)
        try:
            await self.transport.dead_letter(delivery, reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # not settled: redelivered and refused again
            log.warning("dead-lettering failed: %r", exc)

    async def _give_back(self, delivery: Delivery, exc: Exception) -> None:
        async def dead_letter(delivery: Delivery, reason: str) -> None:
            self.hooks.dead_lettered(delivery.queue, reason)
            await self.transport.dead_letter(delivery, reason)

        try:
            await give_back(
                delivery,
                exc,
                limit=self.transport.topology.delivery_limit,
                dead_letter=dead_letter,
            )
        except asyncio.CancelledError:
            raise
        except Exception as error:  # not settled: redelivered, and given back again
            log.warning("giving a command back failed: %r", error)

    def _parse(self, delivery: Delivery) -> tuple[Envelope, _Registration[Any, Any], BaseModel]:
        envelope = decode(delivery.body, dict(delivery.headers), self.max_message_bytes)
        if envelope.kind is MessageKind.REPLY:
            raise MessageRejected("not_a_command: a reply on a service queue")
        if envelope.service != self.participant.service:
            raise MessageRejected(
                f"wrong_service: {envelope.type} sent to {self.participant.service!r}"
            )
        registration = self.participant.registration(envelope.type)
        if registration is None:
            raise MessageRejected(f"unknown_action: {envelope.type}")
        try:
            command = registration.action.command.model_validate(envelope.payload)
        except ValidationError as exc:
            raise MessageRejected(f"invalid_command: {envelope.type}: {exc.errors()[:3]}") from None
        return envelope, registration, command

    async def _attempt(
        self,
        envelope: Envelope,
        registration: _Registration[Any, Any],
        command: BaseModel,
        run: _Run,
    ) -> Envelope | None:
        """One try at a command, inside its CONSUMER span; the reply to send."""
        started = time.perf_counter()
        with self.hooks.processing(envelope, self._queue) as trace:
            # replies carry the context of this handling (its CONSUMER span)
            traced = carrying(envelope, trace)
            try:
                reply = await self._transact(traced, registration, command, run)
            except BaseException:
                self.hooks.rolled_back(envelope)
                raise
        self.hooks.handled(envelope, reply, time.perf_counter() - started)
        return reply

    async def _transact(
        self,
        envelope: Envelope,
        registration: _Registration[Any, Any],
        command: BaseModel,
        run: _Run,
    ) -> Envelope | None:
        run.ran, run.raised = False, None
        try:
            with self.hooks.queries(own=True):
                async with self.store.transaction() as tx:
                    return await self._in_transaction(tx, envelope, registration, command, run)
        except Exception as exc:
            if exc is not run.raised:
                if run.ran and isinstance(exc, HEALING):
                    # rolled back after the handler ran: retry_healing runs it again
                    why = "deadlock" if isinstance(exc, ConcurrencyConflict) else "store"
                    self.hooks.rerun(envelope, why)
                    run.redelivered = False  # counted once
                raise
        # The handler raised: its writes and the claim are rolled back.
        exc = run.raised
        if isinstance(exc, BusinessFailure):
            if envelope.kind is MessageKind.COMPENSATION:
                # a compensation cannot refuse: retried until it succeeds
                return envelope.reply(Outcome.ERROR, reason=f"compensation refused: {exc.reason}")
            refusal = envelope.reply(Outcome.FAILURE, reason=exc.reason)  # definitive: stored
            return await retry_healing(
                lambda: self._store_refusal(refusal), what=f"{envelope.type} refusal"
            )
        if isinstance(exc, ValidationError):
            reason = f"handler returned an invalid reply: {exc.errors()[:3]}"
        else:
            reason = f"{type(exc).__name__}: {exc}"
            log.warning(
                "%s failed transiently (saga %s attempt %d): %r",
                envelope.type,
                envelope.saga_id,
                envelope.attempt,
                exc,
                extra=saga_fields(envelope),
            )
        return envelope.reply(Outcome.ERROR, reason=reason)

    async def _in_transaction(
        self,
        tx: ParticipantTransaction,
        envelope: Envelope,
        registration: _Registration[Any, Any],
        command: BaseModel,
        run: _Run,
    ) -> Envelope | None:
        forward_applied = True
        if envelope.kind is MessageKind.COMPENSATION:
            forward = await tx.tombstone(
                command_id(envelope.saga_id, envelope.step, MessageKind.COMMAND)
            )
            forward_applied = isinstance(forward, Envelope) and forward.outcome is Outcome.SUCCESS
        stored = await tx.claim(envelope.command_id)
        if isinstance(stored, Envelope):
            return stored  # a duplicate: answer as before, no second effect
        if stored is not None:
            return None  # tombstoned: compensated before it ran; the saga moved on
        if not forward_applied:
            reply = envelope.reply(
                Outcome.SUCCESS, reason="nothing to undo: the command never took effect"
            )
        else:
            if run.redelivered:  # delivered before: it may have run, uncommitted
                self.hooks.rerun(envelope, "redelivered")
            reply = envelope.reply(
                Outcome.SUCCESS, await self._call(tx, envelope, registration, command, run)
            )
        await tx.complete(envelope.command_id, reply)
        return reply

    async def _call(
        self,
        tx: ParticipantTransaction,
        envelope: Envelope,
        registration: _Registration[Any, Any],
        command: BaseModel,
        run: _Run,
    ) -> dict[str, Any]:
        """Run the handler; its reply as JSON. What it raises is noted in ``run``."""
        ctx = HandlerContext(
            saga_id=envelope.saga_id,
            saga_name=envelope.saga_name,
            step=envelope.step,
            attempt=envelope.attempt,
            command_id=envelope.command_id,
            compensation=envelope.kind is MessageKind.COMPENSATION,
            connection=tx.connection,
        )
        run.ran = True
        with self.hooks.queries(own=False):
            try:
                result = await registration.handler(command, ctx)
                payload: dict[str, Any] = registration.action.reply.model_validate(
                    result
                ).model_dump(mode="json")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                run.raised = exc
                raise
        return payload

    async def _store_refusal(self, refusal: Envelope) -> Envelope | None:
        """Store a refusal in a transaction of its own (the handler's was rolled back)."""
        with self.hooks.queries(own=True):
            async with self.store.transaction() as tx:
                stored = await tx.claim(refusal.command_id)
                if isinstance(stored, Envelope):
                    return stored  # a duplicate handled meanwhile: its outcome stands
                if stored is not None:
                    return None  # compensated meanwhile
                await tx.complete(refusal.command_id, refusal)
        return refusal
