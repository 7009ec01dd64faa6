"""Participants: typed handlers for a service's actions, and the worker that runs them.

The worker runs ``concurrency`` lanes, each with its own pooled connection, so
handlers of different sagas run at the same time. A free lane takes the
commands waiting, up to its fair share (what is waiting divided among the
lanes, at most ``max_batch``), and handles them in one transaction: for each
command, inside a savepoint, it claims the command id in the participant's
inbox (a concurrent duplicate waits on that claim, then is answered with what
the first one stored), runs the handler on the same connection and stores the
reply. Then the transaction commits, the lane publishes the replies (one
confirmed publish) and acknowledges the commands: no reply goes out for a
command that did not commit. Sharing the commit is most of the worker's
speed; the fair share keeps a slow handler from holding up more than a few
other commands.

A handler runs once per delivery. It runs again only when its transaction
cannot commit for a reason that heals (the database restarts, or SQL loses a
deadlock: ``StoreError``/``ConcurrencyConflict``; the lane's commands run
again, counted by the ``rerun`` hook) or when the broker delivers the message
again (the process crashed before acknowledging it). A handler's own
exception is the command's outcome, and undoes only its own savepoint:
``BusinessFailure`` is a FAILURE reply, stored in the inbox; any other
exception is an ERROR reply, not stored, that the step's retry policy answers.
Anything else that raises while a command is handled (a hook, a bug) undoes
that command's savepoint and gives it back to the queue: it is dead-lettered
with the error as its reason on its last delivery, and the rest of the lane's
commands commit.

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
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError

from sagaflow.core.definition import Action, check_name
from sagaflow.core.errors import (
    BusinessFailure,
    ConcurrencyConflict,
    DefinitionError,
    MessageRejected,
    NoConnection,
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
from sagaflow.core.schema import DEFAULT_STRICT, validate_payload
from sagaflow.logs import saga_fields
from sagaflow.runtime.batching import HEALING, Deadline, dead_letter, give_back, retry_healing
from sagaflow.runtime.hooks import Hooks, carrying
from sagaflow.runtime.retention import Retention, prune_inbox, repeat

log = logging.getLogger("sagaflow.worker")

C = TypeVar("C", bound=BaseModel)
R = TypeVar("R", bound=BaseModel)

DEFAULT_CONCURRENCY = 8
"""Lanes (handlers running at once, connections) of a worker unless told otherwise
(see docs/workers.md)."""
DEFAULT_MAX_BATCH = 16
"""Commands one lane takes into one transaction at most."""
DEADLOCK_CALM = 30.0
"""Seconds a worker takes one command per transaction after a lane lost a deadlock."""


@dataclass(frozen=True)
class HandlerContext:
    """What a handler knows besides its command.

    ``connection`` is the participant database connection, inside the
    transaction that also records the command id: write the business effect
    on it. A worker on the in-memory store has none: asking for it raises
    ``NoConnection`` (``has_connection`` says which it is).
    """

    saga_id: str
    saga_name: str
    step: str
    attempt: int
    command_id: str
    compensation: bool
    db: Any = field(default=None, repr=False)  # the connection, or None in memory
    action: str = ""

    @property
    def connection(self) -> Any:
        """The database connection of the handler's transaction.

        Raises:
            NoConnection: the worker runs on the in-memory participant store.
        """
        if self.db is None:
            raise NoConnection(
                f"ctx.connection: the handler of {self.action or self.step} (saga"
                f" {self.saga_id}) runs on the in-memory participant store, which has no"
                " database connection; give the test a database"
                " (SagaTestEnvironment(database=...), the saga_database fixture) or check"
                " ctx.has_connection first"
            )
        return self.db

    @property
    def has_connection(self) -> bool:
        """Whether :attr:`connection` is a database connection (not in memory)."""
        return self.db is not None


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


@dataclass
class _Command:
    """A parsed command of a lane's batch, and what became of it in the last try."""

    delivery: Delivery
    envelope: Envelope
    registration: _Registration[Any, Any]
    command: BaseModel
    run: _Run
    reply: Envelope | None = None
    store: bool = False  # the reply goes in the inbox (a success or a refusal)
    poison: Exception | None = None  # raised outside the handler: given back
    seconds: float = 0.0


class Worker:
    """Runs a participant: consumes its service queue and answers every command.

    Args:
        participant: The handlers.
        transport: The broker.
        store: The participant's database (its inbox lives there). Each lane
            holds one of its connections while it works: give its pool
            ``concurrency`` connections.
        hooks: Tracing and metrics.
        prefetch: Commands taken from the broker ahead of being handled.
        concurrency: Lanes: handlers running at once, each lane on its own
            connection and in its own transaction.
        max_batch: Commands one lane handles in one transaction at most.
        max_message_bytes: Larger commands are dead-lettered.
        strict_payloads: Validate commands strictly (see :mod:`sagaflow.core.schema`).
        retention: Inbox rows older than ``retention.inbox`` are deleted every
            ``retention.interval`` seconds; ``None`` keeps them all.
        start_timeout: Seconds :meth:`start` keeps retrying a database or broker
            it cannot reach before it raises ``NotReachable``; ``None``: until
            they answer.
        stop_timeout: Seconds :meth:`stop` lets the commands in hand finish
            before it cancels them (their transactions roll back, the broker
            delivers them again); ``None``: until they finish.
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
        max_batch: int = DEFAULT_MAX_BATCH,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        strict_payloads: bool = DEFAULT_STRICT,
        start_timeout: float | None = None,
        retention: Retention | None = None,
        stop_timeout: float | None = None,
    ) -> None:
        if concurrency < 1 or max_batch < 1:
            raise ValueError("concurrency and max_batch must be at least 1")
        self.participant = participant
        self.transport = transport
        self.store = store
        self.hooks = hooks or Hooks()
        self.prefetch = max(prefetch, concurrency)
        self.concurrency = concurrency
        self.max_batch = max_batch
        self.max_message_bytes = max_message_bytes
        self.strict_payloads = strict_payloads
        self.start_timeout = start_timeout
        self.retention = retention
        self.stop_timeout = stop_timeout
        self._waiting: asyncio.Queue[Delivery] = asyncio.Queue()
        self._loops: list[asyncio.Task[None]] = []
        self._busy: set[asyncio.Task[None]] = set()  # lanes handling commands
        self._stopping = False
        self._stopped = asyncio.Event()
        self._started = False
        self._queue = transport.topology.service_queue(participant.service)
        self._batching_from = 0.0  # monotonic time when lanes may batch again

    async def start(self) -> None:
        """Connect, run the participant's setup, declare, and start the lanes.

        Raises:
            ConfigurationError: messages are signed but not with this service's key;
                the database or the broker refused this process (credentials, a
                missing database or vhost, a schema it may not create); or
                ``NotReachable``: they did not answer within ``start_timeout``.
        """
        if self.transport.keys:
            service = self.participant.service
            self.transport.keys.require([service], f"the {service} worker")
        deadline = None if self.start_timeout is None else Deadline(self.start_timeout)
        await retry_healing(self.store.start, what="store start", deadline=deadline)
        if self.participant.setup is not None:
            await retry_healing(
                self._setup, what=f"{self.participant.service} setup", deadline=deadline
            )
        await retry_healing(
            lambda: self.transport.start([self.participant.service]),
            what="transport start",
            deadline=deadline,
        )
        await self.transport.consume(self._queue, self._waiting.put_nowait, prefetch=self.prefetch)
        # no await from here on: a start cancelled earlier leaves no lane behind
        self._stopping = False
        self._loops = [
            asyncio.create_task(self._loop(), name=f"{self.participant.service}-{i}")
            for i in range(self.concurrency)
        ]
        if self.retention is not None and self.retention.inbox is not None:
            # with the lanes: stop() cancels it (it is never busy) and waits for it
            self._loops.append(asyncio.create_task(self._prune_loop(), name="retention"))
        self._started = True
        log.info(
            "worker %s started: actions=%s", self.participant.service, self.participant.actions
        )

    async def _prune_loop(self) -> None:
        retention = self.retention
        assert retention is not None and retention.inbox is not None
        keep = retention.inbox
        await repeat(
            lambda: prune_inbox(self.store, keep, time.time(), batch=retention.batch),
            interval=retention.interval,
            what=f"{self.participant.service} inbox retention",
        )

    async def _setup(self) -> None:
        assert self.participant.setup is not None
        async with self.store.transaction() as tx:
            await self.participant.setup(tx.connection)

    async def stop(self) -> None:
        """Stop consuming, finish the commands in hand (commit, reply, ack), close.

        A lane still busy after ``stop_timeout`` is cancelled: its transaction
        rolls back and its commands go back to the queue unanswered."""
        self._stopped.set()
        if not self._started:
            return
        self._started = False
        self._stopping = True
        for loop in self._loops:
            if loop not in self._busy:  # a busy lane finishes its commands, then stops
                loop.cancel()
        if self._loops:
            _, late = await asyncio.wait(self._loops, timeout=self.stop_timeout)
            for loop in late:
                log.warning("%s: a handler did not finish in time: cancelled", loop.get_name())
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
            first = await self._waiting.get()
            self._busy.add(task)
            try:
                await self._handle(self._share(first))
            finally:
                self._busy.discard(task)

    def _share(self, first: Delivery) -> list[Delivery]:
        """``first`` and this lane's fair share of what is waiting: split among all
        the lanes (busy ones are free again soon), so that commands arriving
        together run side by side and none waits behind more than a few. For a
        while after a lost deadlock, one command per transaction (see _commit)."""
        most = self.max_batch if time.monotonic() >= self._batching_from else 1
        share = min(most, -(-(self._waiting.qsize() + 1) // self.concurrency))
        batch = [first]
        while len(batch) < share and not self._waiting.empty():
            batch.append(self._waiting.get_nowait())
        return batch

    async def _handle(self, deliveries: Sequence[Delivery]) -> None:
        """Settle a lane's deliveries: answer, dead-letter or give back each."""
        commands: list[_Command] = []
        for delivery in deliveries:
            try:
                envelope, registration, command = self._parse(delivery)
            except MessageRejected as exc:
                await self._reject(delivery, exc.reason)
                continue
            except Exception as exc:  # a bug in reading it: the lane lives on
                log.exception("%s: a command could not be read", self.participant.service)
                await self._give_back(delivery, exc)
                continue
            run = _Run(delivery.redelivered)
            commands.append(_Command(delivery, envelope, registration, command, run))
        if not commands:
            return
        try:
            await self._commit(commands)
            replies = [c.reply for c in commands if c.reply is not None and c.poison is None]
            if replies:
                await retry_healing(lambda: self._publish(replies), what="publishing replies")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug around the transaction: nothing was answered
            log.exception("%s: commands could not be handled", self.participant.service)
            for one in commands:
                await self._give_back(one.delivery, exc)
            return
        for one in commands:
            if one.poison is not None:
                await self._give_back(one.delivery, one.poison)
                continue
            try:
                await one.delivery.ack()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the channel is gone: redelivered, answered from the inbox
                log.warning("%s: acknowledging failed: %r", self.participant.service, exc)

    async def _publish(self, replies: Sequence[Envelope]) -> None:
        with self.hooks.publishing(replies) as traced:
            await self.transport.publish(traced)

    async def _reject(self, delivery: Delivery, reason: str) -> None:
        await dead_letter(
            delivery, reason, transport=self.transport, hooks=self.hooks, what="command"
        )

    async def _give_back(self, delivery: Delivery, exc: Exception) -> None:
        await give_back(
            delivery,
            exc,
            limit=self.transport.topology.delivery_limit,
            dead_letter=self._reject,
        )

    def _parse(self, delivery: Delivery) -> tuple[Envelope, _Registration[Any, Any], BaseModel]:
        envelope = decode(
            delivery.body, delivery.headers, self.max_message_bytes, self.transport.keys
        )
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
            command = validate_payload(
                registration.action.command, envelope.payload, strict=self.strict_payloads
            )
        except ValidationError as exc:
            raise MessageRejected(f"invalid_command: {envelope.type}: {exc.errors()[:3]}") from None
        return envelope, registration, command

    async def _commit(self, commands: Sequence[_Command]) -> None:
        """Handle and commit a lane's commands, retrying what heals.

        A lane that lost a deadlock to another (their handlers lock the same
        rows, as reservations of one product do, and a batch takes the rows of
        several commands in no particular order) tries again one transaction
        per command, and every lane takes one command per transaction for the
        next ``DEADLOCK_CALM`` seconds: each then holds only its own command's
        locks, so the lanes cannot keep deadlocking each other. That holds at
        any try: a batch retried because the database restarted splits too
        when it then deadlocks (scenario 4 found whole batches retried into
        ten seconds of deadlocks after a restart). Each deadlock
        stalls the lanes waiting on those rows for PostgreSQL's
        ``deadlock_timeout``; a backlog of batches that kept deadlocking would
        drain at about one batch a second."""
        what = f"{self.participant.service} transaction"
        try:
            await retry_healing(
                partial(self._transact, commands),
                what=what,
                unless=lambda exc: len(commands) > 1 and isinstance(exc, ConcurrencyConflict),
            )
        except ConcurrencyConflict as exc:
            log.warning("%s lost a deadlock, retrying one by one: %r", what, exc)
            for one in commands:
                await self._commit([one])

    async def _transact(self, commands: Sequence[_Command]) -> None:
        """One try at a lane's commands in one transaction: claim them all, run
        each handler in a savepoint of its own, store the replies, commit. The
        hooks hear of each outcome only once it committed."""
        ordered = sorted(commands, key=lambda c: c.envelope.command_id)
        for one in ordered:
            one.reply, one.store, one.poison = None, False, None
        tried: list[_Command] = []
        try:
            with self.hooks.queries(own=True):
                async with self.store.transaction() as tx:
                    stored = await tx.claim([one.envelope.command_id for one in ordered])
                    first: dict[str, _Command] = {}
                    for one in ordered:
                        cid = one.envelope.command_id
                        if cid in stored:  # answered before: as then, no second effect
                            found = stored[cid]
                            one.reply = found if isinstance(found, Envelope) else None
                        elif cid not in first:  # (a copy in the same lane waits for it)
                            first[cid] = one
                            tried.append(one)
                            await self._store_undone(tx, one, first)
                            await self._attempt(tx, one)
                    await tx.complete([one.reply for one in tried if one.store and one.reply])
        except BaseException as exc:
            if isinstance(exc, ConcurrencyConflict):  # see _commit
                self._batching_from = time.monotonic() + DEADLOCK_CALM
            for one in tried:
                self.hooks.rolled_back(one.envelope)
                if one.run.ran and isinstance(exc, HEALING):
                    # rolled back after the handler ran: retry_healing runs it again
                    why = "deadlock" if isinstance(exc, ConcurrencyConflict) else "store"
                    self.hooks.rerun(one.envelope, why)
                    one.run.redelivered = False  # counted once
            raise
        for one in ordered:
            copied = first.get(one.envelope.command_id)
            if copied is not None and copied is not one:
                one.reply, one.poison = copied.reply, copied.poison
            elif one.poison is None:
                self.hooks.handled(one.envelope, one.reply, one.seconds)
            else:
                self.hooks.rolled_back(one.envelope)  # its savepoint was undone

    @staticmethod
    async def _store_undone(
        tx: ParticipantTransaction, one: _Command, first: dict[str, _Command]
    ) -> None:
        """Before a compensation, store the reply of its command if this lane ran it
        in the same transaction (a command sorts before its compensation): the
        compensation then finds it done and undoes it, where a tombstone on the
        still pending command would say "nothing to undo" and make storing the
        command's reply fail on every retry."""
        envelope = one.envelope
        if envelope.kind is not MessageKind.COMPENSATION:
            return
        forward = first.get(command_id(envelope.saga_id, envelope.step, MessageKind.COMMAND))
        if forward is not None and forward.store and forward.reply is not None:
            await tx.complete([forward.reply])
            forward.store = False  # stored: not again at the end

    async def _attempt(self, tx: ParticipantTransaction, one: _Command) -> None:
        """One claimed command in its own savepoint, inside its CONSUMER span."""
        started = time.perf_counter()
        run = one.run
        run.ran, run.raised = False, None
        try:
            with self.hooks.processing(one.envelope, self._queue) as trace:
                # replies carry the context of this handling (its CONSUMER span)
                envelope = carrying(one.envelope, trace)
                try:
                    async with tx.savepoint():
                        one.reply = await self._in_savepoint(tx, envelope, one)
                    one.store = True
                except Exception as exc:
                    if exc is not run.raised or isinstance(exc, HEALING):
                        raise  # not the handler's outcome
                    # the handler raised: its writes were undone
                    one.reply, one.store = self._outcome(envelope, exc)
        except HEALING:
            raise  # the transaction is lost: the lane tries again
        except Exception as exc:  # not the handler: a hook, a bug (its savepoint undone)
            log.exception("%s: a command could not be handled", self.participant.service)
            one.poison = exc
            return
        one.seconds = time.perf_counter() - started

    async def _in_savepoint(
        self, tx: ParticipantTransaction, envelope: Envelope, one: _Command
    ) -> Envelope | None:
        if envelope.kind is MessageKind.COMPENSATION:
            forward = await tx.tombstone(
                command_id(envelope.saga_id, envelope.step, MessageKind.COMMAND)
            )
            if not (isinstance(forward, Envelope) and forward.outcome is Outcome.SUCCESS):
                return envelope.reply(
                    Outcome.SUCCESS, reason="nothing to undo: the command never took effect"
                )
        if one.run.redelivered:  # delivered before: it may have run, uncommitted
            self.hooks.rerun(envelope, "redelivered")
        return envelope.reply(Outcome.SUCCESS, await self._call(tx, envelope, one))

    async def _call(
        self, tx: ParticipantTransaction, envelope: Envelope, one: _Command
    ) -> dict[str, Any]:
        """Run the handler; its reply as JSON. What it raises is noted in ``one.run``."""
        ctx = HandlerContext(
            saga_id=envelope.saga_id,
            saga_name=envelope.saga_name,
            step=envelope.step,
            attempt=envelope.attempt,
            command_id=envelope.command_id,
            compensation=envelope.kind is MessageKind.COMPENSATION,
            db=tx.connection,
            action=envelope.type,
        )
        one.run.ran = True
        registration = one.registration
        with self.hooks.queries(own=False):
            try:
                result = await registration.handler(one.command, ctx)
                payload: dict[str, Any] = registration.action.reply.model_validate(
                    result
                ).model_dump(mode="json")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                one.run.raised = exc
                raise
        return payload

    def _outcome(self, envelope: Envelope, exc: Exception) -> tuple[Envelope, bool]:
        """The reply to a command whose handler raised ``exc``, and whether it is
        stored (a refusal is definitive; an error is retried by the step's policy)."""
        if isinstance(exc, BusinessFailure):
            if envelope.kind is MessageKind.COMPENSATION:
                # a compensation cannot refuse: retried until it succeeds
                reason = f"compensation refused: {exc.reason}"
                return envelope.reply(Outcome.ERROR, reason=reason), False
            return envelope.reply(Outcome.FAILURE, reason=exc.reason), True
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
        return envelope.reply(Outcome.ERROR, reason=reason), False
