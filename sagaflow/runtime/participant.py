"""Participants: typed handlers for a service's actions, and the worker that runs them.

Per batch of commands the worker opens one transaction. For each command it
claims the command id in the participant's inbox and runs the handler on the
same connection, inside a savepoint: the business effect and the dedup record
commit together. A redelivered command finds its id claimed and is answered
with the stored reply, with no second effect. After commit the worker
publishes the replies and then acknowledges the commands. When the
transaction fails (the database restarts, or a handler's SQL loses a deadlock
to another batch: ``ConcurrencyConflict``) the whole batch is rolled back and
run again; no reply goes out for a batch that did not commit.

A compensation first records a tombstone for the command it undoes: if that
command never ran, it never will (a late delivery finds the tombstone), and
the compensation handler is skipped since there is nothing to undo.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
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
from sagaflow.runtime.batching import Batcher, give_back, retry_healing
from sagaflow.runtime.hooks import Hooks, carrying

log = logging.getLogger("sagaflow.worker")

C = TypeVar("C", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)


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


_Command = tuple[Delivery, Envelope, "_Registration[Any, Any]", BaseModel]
_Replies = list[tuple[Delivery, Envelope | None]]
# (command, reply, seconds) of the commands handled in a transaction not yet committed
_Outcomes = list[tuple[Envelope, Envelope | None, float]]


class _Redo(Exception):
    """A handler raised in a batch run without savepoints: run it again with them."""


class _Transient(Exception):
    """Rolls back the claim of a command whose handler failed transiently."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Worker:
    """Runs a participant: consumes its service queue and answers every command.

    Args:
        participant: The handlers.
        transport: The broker.
        store: The participant's database (its inbox lives there).
        max_batch: Commands per transaction at most.
        after_commit: Called after each batch commits, before replies go out.
            Fault-injection tests use it to kill the process at the worst moment.
    """

    def __init__(
        self,
        participant: Participant,
        *,
        transport: Transport,
        store: ParticipantStore,
        hooks: Hooks | None = None,
        max_batch: int = 50,
        prefetch: int = 200,
        concurrency: int = 2,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        after_commit: Callable[[], None] | None = None,
    ) -> None:
        self.participant = participant
        self.transport = transport
        self.store = store
        self.hooks = hooks or Hooks()
        self.prefetch = prefetch
        self.max_message_bytes = max_message_bytes
        self.after_commit = after_commit
        self._batcher = Batcher(
            self._handle_batch,
            failed=self._give_back,
            max_batch=max_batch,
            concurrency=concurrency,
            name=participant.service,
        )
        self._stopped = asyncio.Event()
        self._started = False
        self._queue = transport.topology.service_queue(participant.service)
        self._refusing: set[str] = set()  # action types that refused: savepoint each

    async def start(self) -> None:
        await retry_healing(self.store.start, what="store start")
        if self.participant.setup is not None:
            await retry_healing(self._setup, what=f"{self.participant.service} setup")
        await retry_healing(
            lambda: self.transport.start([self.participant.service]), what="transport start"
        )
        self._batcher.start()
        await self.transport.consume(self._queue, self._batcher.put, prefetch=self.prefetch)
        self._started = True
        log.info(
            "worker %s started: actions=%s", self.participant.service, self.participant.actions
        )

    async def _setup(self) -> None:
        assert self.participant.setup is not None
        async with self.store.transaction() as tx:
            await self.participant.setup(tx.connection)

    async def stop(self) -> None:
        """Stop consuming, finish the batches in hand (commit, reply, ack), close."""
        self._stopped.set()
        if not self._started:
            return
        self._started = False
        await self._batcher.stop()
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
        return self._batcher.idle

    async def _handle_batch(self, deliveries: Sequence[Delivery]) -> None:
        commands: list[tuple[Delivery, Envelope, _Registration[Any, Any], BaseModel]] = []
        rejects: list[tuple[Delivery, str]] = []
        for delivery in deliveries:
            try:
                commands.append((delivery, *self._parse(delivery)))
            except MessageRejected as exc:
                rejects.append((delivery, exc.reason))
        replies: list[tuple[Delivery, Envelope | None]] = []
        if commands:
            replies = await retry_healing(
                lambda: self._transact(commands), what=f"{self.participant.service} transaction"
            )
            if self.after_commit is not None:
                self.after_commit()
        outgoing = [reply for _, reply in replies if reply is not None]
        if outgoing:
            try:
                with self.hooks.publishing(outgoing) as traced:
                    await self.transport.publish(traced)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # not acked: redelivered, then answered from the inbox
                log.warning("%s: publishing replies failed: %r", self.participant.service, exc)
                return
        for delivery, _ in replies:
            await delivery.ack()
        for delivery, reason in rejects:
            log.warning("%s: dead-lettering a command: %s", self.participant.service, reason)
            self.hooks.dead_lettered(delivery.queue, reason)
            try:
                await self.transport.dead_letter(delivery, reason)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("dead-lettering failed: %r", exc)

    async def _give_back(self, delivery: Delivery, exc: Exception) -> None:
        async def dead_letter(delivery: Delivery, reason: str) -> None:
            self.hooks.dead_lettered(delivery.queue, reason)
            await self.transport.dead_letter(delivery, reason)

        await give_back(
            delivery, exc, limit=self.transport.topology.delivery_limit, dead_letter=dead_letter
        )

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

    async def _transact(
        self, commands: Sequence[_Command]
    ) -> list[tuple[Delivery, Envelope | None]]:
        if self.store.atomic:
            try:
                return await self._settled(self._transact_at_once, commands)
            except _Redo:
                pass  # a handler raised: all of it was rolled back; again, carefully
        return await self._settled(self._transact_carefully, commands)

    async def _settled(
        self,
        transact: Callable[[Sequence[_Command], _Outcomes], Awaitable[_Replies]],
        commands: Sequence[_Command],
    ) -> _Replies:
        """Run a transaction; report each command's outcome only once it committed."""
        outcomes: _Outcomes = []
        try:
            replies = await transact(commands, outcomes)
        except BaseException:
            for envelope, _, _ in outcomes:
                self.hooks.rolled_back(envelope)
            raise
        for envelope, reply, seconds in outcomes:
            self.hooks.handled(envelope, reply, seconds)
        return replies

    async def _transact_carefully(
        self, commands: Sequence[_Command], outcomes: _Outcomes
    ) -> _Replies:
        """Every command in its own savepoint."""
        replies: _Replies = []
        with self.hooks.queries(own=True):
            async with self.store.transaction() as tx:
                for delivery, envelope, registration, command in commands:
                    reply = await self._traced(tx, envelope, registration, command, outcomes)
                    replies.append((delivery, reply))
        return replies

    async def _traced(
        self,
        tx: ParticipantTransaction,
        envelope: Envelope,
        registration: _Registration[Any, Any],
        command: BaseModel,
        outcomes: _Outcomes,
    ) -> Envelope | None:
        """One command in its own savepoint, inside its CONSUMER span."""
        started = time.perf_counter()
        with self.hooks.processing(envelope, self._queue) as trace:
            # replies carry the context of this handling (its CONSUMER span)
            traced = carrying(envelope, trace)
            reply = await self._handle_one(tx, traced, registration, command)
        outcomes.append((envelope, reply, time.perf_counter() - started))
        return reply

    async def _transact_at_once(
        self, commands: Sequence[_Command], outcomes: _Outcomes
    ) -> _Replies:
        """The fast path: run the handlers with no claim and no savepoint, then
        store every command id with its reply in one statement. A command already
        in the inbox (a duplicate, a tombstone) or a handler that raises (a
        refusal or an error) rolls the whole batch back (``_Redo``), to be run
        again one savepoint each, where duplicates are answered from the inbox;
        compensations always take that path.
        """
        replies: dict[str, Envelope | None] = {}
        with self.hooks.queries(own=True):
            async with self.store.transaction() as tx:
                for _, envelope, registration, command in commands:
                    if envelope.kind is MessageKind.COMPENSATION:
                        replies[envelope.message_id] = await self._traced(
                            tx, envelope, registration, command, outcomes
                        )
                done: dict[str, Envelope] = {}
                # A lone command that refuses costs one careful redo: cheaper than
                # a savepoint (two more round trips) around every one of them.
                isolate = len(commands) > 1
                for _, envelope, registration, command in commands:
                    if envelope.kind is MessageKind.COMMAND:
                        cid = envelope.command_id
                        if cid not in done:
                            done[cid] = await self._run_at_once(
                                tx, envelope, registration, command, outcomes, isolate=isolate
                            )
                        replies[envelope.message_id] = done[cid]
                if await tx.record_many(list(done.values())):
                    raise _Redo  # seen before: the careful path answers from the inbox
        return [(delivery, replies[envelope.message_id]) for delivery, envelope, _, _ in commands]

    async def _run_at_once(
        self,
        tx: ParticipantTransaction,
        envelope: Envelope,
        registration: _Registration[Any, Any],
        command: BaseModel,
        outcomes: _Outcomes,
        *,
        isolate: bool,
    ) -> Envelope:
        started = time.perf_counter()
        with self.hooks.processing(envelope, self._queue) as trace:
            traced = carrying(envelope, trace)
            # In a batch of several (``isolate``), an action that has refused before
            # runs in a savepoint of its own, so that a refusal undoes only itself
            # and not the whole batch: a 10% refusal rate would otherwise send
            # almost every batch of that action down the careful path.
            refuses = isolate and envelope.type in self._refusing
            try:
                ctx = self._context(traced, tx)
                if refuses:
                    async with tx.savepoint():
                        payload = await self._call(registration, command, ctx)
                else:
                    payload = await self._call(registration, command, ctx)
            except asyncio.CancelledError:
                raise
            except BusinessFailure as exc:
                if not refuses:
                    self._refusing.add(envelope.type)
                    raise _Redo from exc
                reply = traced.reply(Outcome.FAILURE, reason=exc.reason)  # definitive: stored
            except Exception as exc:
                raise _Redo from exc
            else:
                reply = traced.reply(Outcome.SUCCESS, payload)
        outcomes.append((envelope, reply, time.perf_counter() - started))
        return reply

    async def _call(
        self, registration: _Registration[Any, Any], command: BaseModel, ctx: HandlerContext
    ) -> dict[str, Any]:
        """Run the handler; its reply as JSON."""
        with self.hooks.queries(own=False):
            result = await registration.handler(command, ctx)
        payload: dict[str, Any] = registration.action.reply.model_validate(result).model_dump(
            mode="json"
        )
        return payload

    async def _handle_one(
        self,
        tx: ParticipantTransaction,
        envelope: Envelope,
        registration: _Registration[Any, Any],
        command: BaseModel,
    ) -> Envelope | None:
        compensation = envelope.kind is MessageKind.COMPENSATION
        try:
            async with tx.savepoint():
                forward_applied = True
                if compensation:
                    forward = await tx.tombstone(
                        command_id(envelope.saga_id, envelope.step, MessageKind.COMMAND)
                    )
                    forward_applied = (
                        isinstance(forward, Envelope) and forward.outcome is Outcome.SUCCESS
                    )
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
                    reply = await self._run_handler(tx, envelope, registration, command)
                await tx.complete(envelope.command_id, reply)
                return reply
        except asyncio.CancelledError:
            raise
        except _Transient as exc:
            return envelope.reply(Outcome.ERROR, reason=exc.reason)

    @staticmethod
    def _context(envelope: Envelope, tx: ParticipantTransaction) -> HandlerContext:
        return HandlerContext(
            saga_id=envelope.saga_id,
            saga_name=envelope.saga_name,
            step=envelope.step,
            attempt=envelope.attempt,
            command_id=envelope.command_id,
            compensation=envelope.kind is MessageKind.COMPENSATION,
            connection=tx.connection,
        )

    async def _run_handler(
        self,
        tx: ParticipantTransaction,
        envelope: Envelope,
        registration: _Registration[Any, Any],
        command: BaseModel,
    ) -> Envelope:
        ctx = self._context(envelope, tx)
        try:
            async with tx.savepoint():
                payload = await self._call(registration, command, ctx)
        except asyncio.CancelledError:
            raise
        except BusinessFailure as exc:
            if ctx.compensation:  # a compensation cannot refuse: retried until it succeeds
                raise _Transient(f"compensation refused: {exc.reason}") from exc
            return envelope.reply(Outcome.FAILURE, reason=exc.reason)  # definitive: stored
        except ValidationError as exc:
            raise _Transient(f"handler returned an invalid reply: {exc.errors()[:3]}") from exc
        except ConcurrencyConflict:
            # the batch's transaction lost a deadlock (or a serialization check) to
            # another: roll all of it back and run it again, not this step's failure
            raise
        except Exception as exc:
            log.warning(
                "%s failed transiently (saga %s attempt %d): %r",
                envelope.type,
                envelope.saga_id,
                envelope.attempt,
                exc,
                extra=saga_fields(envelope),
            )
            raise _Transient(f"{type(exc).__name__}: {exc}") from exc
        return envelope.reply(Outcome.SUCCESS, payload)
