"""The checks of the conformance kit (see :mod:`sagaflow.conformance`)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage
from pydantic import ValidationError

from sagaflow.conformance.hostile import HOSTILE, Hostile, hostile_messages
from sagaflow.conformance.model import Check, KitStep, Result, fill
from sagaflow.core.definition import Action
from sagaflow.core.errors import MessageRejected
from sagaflow.core.messages import (
    CONTENT_TYPE,
    Envelope,
    MessageKind,
    Outcome,
    decode,
    encode,
)
from sagaflow.core.schema import validate_payload
from sagaflow.core.signing import SIGNATURE_HEADER
from sagaflow.transport import wire
from sagaflow.transport.rabbitmq import RabbitMQTransport

__all__ = ["run_checks"]


class _Inbox:
    """Messages that arrived on one of the kit's queues, by message id."""

    def __init__(self, key: Callable[[AbstractIncomingMessage], str]) -> None:
        self._key = key
        self._seen: dict[str, list[AbstractIncomingMessage]] = defaultdict(list)
        self._changed = asyncio.Event()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        await message.ack()
        self._seen[self._key(message)].append(message)
        self._changed.set()

    async def wait(self, key: str, count: int, timeout: float) -> list[AbstractIncomingMessage]:
        deadline = time.monotonic() + timeout
        while len(self._seen[key]) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return list(self._seen[key])


def _headers(message: AbstractIncomingMessage) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in (message.headers or {}).items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            out[name] = value
    return out


class _Kit:
    def __init__(self, check: Check) -> None:
        self.c = check
        self.run = uuid.uuid4().hex[:8]
        self.count = 0
        self.results: list[Result] = []
        self.replies = _Inbox(lambda m: _reply_key(m))
        self.dead = _Inbox(lambda m: m.message_id or "")
        self.channel: aio_pika.abc.AbstractChannel | None = None

    # ------------------------------------------------------------------ reporting

    def report(self, obligation: str, subject: str, passed: bool, detail: str) -> bool:
        self.results.append(Result(obligation, subject, passed, detail))
        return passed

    # ------------------------------------------------------------------ sending

    async def key(self) -> str:
        """A fresh key for one check, prepared by the user's SQL if given."""
        self.count += 1
        key = f"kit-{self.run}-{self.count}"
        if self.c.prepare_sql:
            await self.sql("execute", self.c.prepare_sql, key)
        return key

    async def sql(self, method: str, query: str, key: str) -> Any:
        import asyncpg  # the kit's only database access: the user's own queries

        conn = await asyncpg.connect(self.c.database_url)
        try:
            return await getattr(conn, method)(query, key)
        finally:
            await conn.close()

    def envelope(
        self,
        step: KitStep,
        key: str,
        kind: MessageKind,
        attempt: int = 1,
        payload: Mapping[str, Any] | None = None,
    ) -> Envelope:
        action = step.action if kind is MessageKind.COMMAND else step.compensation
        assert action is not None
        saga_id = f"{key}-saga"
        cid = f"{saga_id}:{step.step}:{kind.value}"
        return Envelope(
            message_id=f"{cid}:{attempt}",
            command_id=cid,
            saga_id=saga_id,
            saga_name=step.saga,
            saga_version=step.version,
            step=step.step,
            step_index=step.index,
            kind=kind,
            attempt=attempt,
            type=action.type,
            payload=fill(self.c.samples[action.type] if payload is None else payload, key),
        )

    async def send(self, envelope: Envelope, *, redelivered: bool = False) -> None:
        body = encode(envelope)
        headers = wire.message_headers(envelope, body, self.c.keys)
        if redelivered:
            headers[wire.H_DELIVERY_COUNT] = "1"
        await self.publish_raw(body, headers, envelope.message_id, envelope.saga_id, envelope.type)

    async def publish_raw(
        self,
        body: bytes,
        headers: Mapping[str, str],
        message_id: str,
        correlation_id: str = "kit",
        type_: str = "",
    ) -> None:
        assert self.channel is not None
        exchange = await self.channel.get_exchange(self.c.topology.commands_exchange, ensure=False)
        message = aio_pika.Message(
            body,
            headers=dict(headers),
            message_id=wire.short_property(message_id),
            correlation_id=wire.short_property(correlation_id),
            type=type_ or None,
            content_type=CONTENT_TYPE,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        await exchange.publish(message, routing_key=self.c.service, mandatory=True)

    def sign(
        self, raw: dict[str, Any], headers: dict[str, str] | None = None
    ) -> tuple[bytes, dict[str, str]]:
        body = orjson.dumps(raw)
        headers = dict(headers or {})
        if self.c.keys:
            headers[SIGNATURE_HEADER] = self.c.keys.sign(self.c.service, body, headers)
        return body, headers

    # ------------------------------------------------------------------ replies

    async def answers(
        self, sent: Envelope, count: int = 1, timeout: float | None = None
    ) -> list[Envelope | str]:
        """The replies to ``sent`` (decoded, or why one could not be)."""
        wait = self.c.timeout if timeout is None else timeout
        got = await self.replies.wait(f"{sent.message_id}:reply", count, wait)
        out: list[Envelope | str] = []
        for message in got:
            try:
                out.append(decode(message.body, _headers(message), keys=self.c.keys))
            except MessageRejected as exc:
                out.append(f"the reply is refused as {exc.reason}")
        return out

    def judge(self, sent: Envelope, reply: Envelope | str, action: Action[Any, Any]) -> str | None:
        """Why ``reply`` does not answer ``sent`` as documented; ``None`` if it does."""
        if isinstance(reply, str):
            return reply
        expected = {
            "command_id": sent.command_id,
            "saga_id": sent.saga_id,
            "saga_name": sent.saga_name,
            "saga_version": sent.saga_version,
            "step": sent.step,
            "step_index": sent.step_index,
            "type": sent.type,
            "kind": MessageKind.REPLY,
            "for_kind": sent.kind,
        }
        for name, value in expected.items():
            if getattr(reply, name) != value:
                return f"{name} is {getattr(reply, name)!r}, not {value!r}"
        if reply.outcome is Outcome.ERROR:
            return f"answered error ({reply.reason}): the sample command should succeed"
        if reply.outcome is Outcome.SUCCESS and sent.kind is MessageKind.COMMAND:
            try:
                validate_payload(action.reply, reply.payload, strict=self.c.strict)
            except ValidationError as exc:
                return (
                    f"the success payload does not fit {action.reply.__name__}: {exc.errors()[:2]}"
                )
        return None

    async def first_reply(
        self, obligation: str, sent: Envelope, action: Action[Any, Any]
    ) -> Envelope | None:
        answers = await self.answers(sent)
        if not answers:
            why = await self.why_silent(sent)
            self.report(
                obligation,
                action.type,
                False,
                f"no reply to {sent.message_id} within {self.c.timeout:g}s{why}",
            )
            return None
        problem = self.judge(sent, answers[0], action)
        if problem is not None:
            self.report(obligation, action.type, False, problem)
            return None
        assert isinstance(answers[0], Envelope)
        return answers[0]

    async def why_silent(self, sent: Envelope) -> str:
        dead = await self.dead.wait(wire.short_property(sent.message_id), 1, 0.1)
        if dead:
            return f"; it was dead-lettered: {_dead_reason(dead[0])}"
        return ""

    async def effects(self, key: str, action: Action[Any, Any]) -> int | None:
        query = self.c.effects_queries.get(action.type, self.c.effects_query)
        if not query:
            return None
        return int(await self.sql("fetchval", query, key) or 0)

    # ------------------------------------------------------------------ the obligations

    async def check_step(self, step: KitStep) -> None:
        action = step.action
        key = await self.key()
        sent = self.envelope(step, key, MessageKind.COMMAND)
        await self.send(sent)
        first = await self.first_reply("reply", sent, action)
        if first is None:
            return
        self.report(
            "reply",
            action.type,
            True,
            f"{first.outcome.value if first.outcome else '?'} reply, fields as documented",
        )
        # the same message again, a retry, and copies together, one marked redelivered
        await self.send(sent)
        retry = self.envelope(step, key, MessageKind.COMMAND, attempt=2)
        await self.send(retry)
        again = await self.answers(sent, 3)
        # a participant that ran the retry anew answers it under its own message id
        later = await self.answers(retry, timeout=0)
        others = [*again[1:], *later]
        odd = [r for r in others if not (isinstance(r, Envelope) and _same(r, first))]
        if len(others) < 2:
            detail = f"a duplicate was not answered within {self.c.timeout:g}s"
        elif odd:
            detail = (
                f"a duplicate got another reply than the stored one: {_brief(odd[0])} instead"
                f" of {_brief(first)} (the same message_id and attempt as first sent)"
            )
        else:
            detail = "the same message and a later attempt got the stored reply"
        self.report("duplicate", action.type, len(others) >= 2 and not odd, detail)
        copies = 4
        for n in range(copies):
            await self.send(sent, redelivered=n == 0)
        together = await self.answers(sent, 3 + copies)
        alike = [r for r in together[3:] if isinstance(r, Envelope) and _same(r, first)]
        self.report(
            "redelivery",
            action.type,
            len(alike) == copies,
            f"{len(alike)} of {copies} copies sent together (one redelivered) answered with the stored reply",
        )
        if first.outcome is Outcome.SUCCESS:
            count = await self.effects(key, action)
            if count is not None:
                self.report(
                    "effects-once",
                    action.type,
                    count == 1,
                    f"the effects query counts {count} after {copies + 3} copies (1 expected)",
                )
        if step.compensation is not None:
            await self.check_compensation(step, key, first)
            await self.check_tombstone(step)

    async def check_refusal(self, step: KitStep, refusal: Mapping[str, Any]) -> None:
        """A command the participant must refuse: ``failure`` with the documented
        reason, stored (a duplicate gets the same refusal), no effect."""
        action, expected = step.action, str(refusal["reason"])
        key = await self.key()
        sent = self.envelope(step, key, MessageKind.COMMAND, payload=refusal["command"])
        await self.send(sent)
        first = await self.first_reply("refusal", sent, action)
        if first is None:
            return
        if first.outcome is not Outcome.FAILURE or first.reason != expected:
            got = f"{first.outcome.value if first.outcome else '?'} {first.reason!r}"
            self.report("refusal", action.type, False, f"answered {got}, not failure {expected!r}")
            return
        await self.send(sent)
        again = await self.answers(sent, 2)
        count = await self.effects(key, action)
        if len(again) < 2 or not (isinstance(again[1], Envelope) and _same(again[1], first)):
            self.report("refusal", action.type, False, "a duplicate did not get the stored refusal")
        elif count:
            self.report(
                "refusal", action.type, False, f"refused, yet the effects query counts {count}"
            )
        else:
            self.report("refusal", action.type, True, f"failure {expected!r}, stored, no effect")

    async def check_compensation(self, step: KitStep, key: str, forward: Envelope) -> None:
        assert step.compensation is not None
        comp = self.envelope(step, key, MessageKind.COMPENSATION)
        await self.send(comp)
        first = await self.first_reply("compensation", comp, step.compensation)
        if first is None:
            return
        if first.outcome is not Outcome.SUCCESS:
            self.report(
                "compensation",
                step.compensation.type,
                False,
                f"answered {first.outcome}: a compensation must succeed",
            )
            return
        await self.send(comp)
        again = await self.answers(comp, 2)
        ok = len(again) == 2 and isinstance(again[1], Envelope) and _same(again[1], first)
        self.report(
            "compensation",
            step.compensation.type,
            ok,
            "succeeded after its command, and a duplicate got the stored reply"
            if ok
            else "a duplicate compensation was not answered with the stored reply",
        )

    async def check_tombstone(self, step: KitStep) -> None:
        assert step.compensation is not None
        key = await self.key()
        comp = self.envelope(step, key, MessageKind.COMPENSATION)
        await self.send(comp)
        first = await self.first_reply("tombstone", comp, step.compensation)
        if first is None:
            return
        if first.outcome is not Outcome.SUCCESS:
            self.report(
                "tombstone",
                step.compensation.type,
                False,
                f"a compensation before its command was answered {first.outcome}, not success",
            )
            return
        late = self.envelope(step, key, MessageKind.COMMAND)
        await self.send(late)
        answered = await self.replies.wait(f"{late.message_id}:reply", 1, self.c.quiet)
        count = await self.effects(key, step.action)
        if answered:
            self.report(
                "tombstone",
                step.action.type,
                False,
                "the command that arrived after its compensation was answered: it must be tombstoned (no effect, no reply)",
            )
        elif count:
            self.report(
                "tombstone",
                step.action.type,
                False,
                f"the command that arrived after its compensation took effect: the effects query counts {count}",
            )
        else:
            self.report(
                "tombstone",
                step.action.type,
                True,
                "a compensation first: success, and the late command neither answered nor applied",
            )

    async def check_hostile(self, step: KitStep) -> None:
        good = self.envelope(step, await self.key(), MessageKind.COMMAND)
        hostile: list[Hostile] = hostile_messages(
            good,
            sign=self.sign,
            max_bytes=self.c.max_message_bytes,
            strict=self.c.strict,
            signed=bool(self.c.keys),
        )
        for code, body, headers, message_id in hostile:
            await self.publish_raw(body, headers, message_id, type_=step.action.type)
            dead = await self.dead.wait(wire.short_property(message_id), 1, self.c.timeout)
            answered = await self.replies.wait(f"{message_id}:reply", 1, 0)
            name = f"dead-letter {code}"
            subject = HOSTILE[message_id.rsplit(":", 1)[-1]]
            if answered:
                self.report(
                    name,
                    subject,
                    False,
                    f"answered ({_brief_raw(answered[0])}) instead of dead-lettered `{code}`",
                )
            elif not dead:
                self.report(
                    name,
                    subject,
                    False,
                    f"not dead-lettered within {self.c.timeout:g}s (docs/protocol.md#dead-letters)",
                )
            else:
                reason = _dead_reason(dead[0])
                self.report(
                    name,
                    subject,
                    reason.startswith(f"{code}:"),
                    f"reason {reason[:120]!r}"
                    + (
                        ""
                        if reason.startswith(f"{code}:")
                        else f", expected `{code}: ...` in x-sagaflow-reason"
                    ),
                )
        # and it goes on answering
        key = await self.key()
        sent = self.envelope(step, key, MessageKind.COMMAND)
        await self.send(sent)
        first = await self.first_reply("flows-on", sent, step.action)
        if first is not None:
            self.report(
                "flows-on",
                step.action.type,
                True,
                "answered a valid command after the hostile ones",
            )


def _reply_key(message: AbstractIncomingMessage) -> str:
    try:
        return str(orjson.loads(message.body).get("message_id", ""))
    except (orjson.JSONDecodeError, AttributeError):
        return ""


def _dead_reason(message: AbstractIncomingMessage) -> str:
    headers = _headers(message)
    if wire.H_REASON in headers:
        return headers[wire.H_REASON]
    return (
        f"(no {wire.H_REASON}; the broker's reason: {headers.get(wire.H_FIRST_DEATH_REASON, '?')})"
    )


def _same(a: Envelope, b: Envelope) -> bool:
    return encode(a) == encode(b)


def _brief(reply: Envelope | str) -> str:
    if isinstance(reply, str):
        return reply
    return (
        f"{reply.outcome.value if reply.outcome else '?'} attempt {reply.attempt} {reply.payload}"
    )


def _brief_raw(message: AbstractIncomingMessage) -> str:
    try:
        raw = orjson.loads(message.body)
        return f"outcome {raw.get('outcome')!r}, reason {str(raw.get('reason'))[:80]!r}"
    except orjson.JSONDecodeError:
        return "a reply"


async def run_checks(check: Check) -> list[Result]:
    """Run every check against the participant; the report's lines, in order.

    Raises:
        ValueError: a sample is missing for one of the actions.
    """
    missing = [
        action.type
        for step in check.steps
        for action in (step.action, step.compensation)
        if action is not None and action.type not in check.samples
    ]
    if missing:
        raise ValueError(f"no sample command for {', '.join(missing)}")
    kit = _Kit(check)
    # the topology, as a coordinator declares it (idempotent): the replies queue
    # and the dead-letter queue exist even if no coordinator ever ran here
    admin = RabbitMQTransport(
        check.amqp_url, check.topology, connection_name="sagaflow-participant-check"
    )
    await admin.start([check.service])
    await admin.close()
    connection = await aio_pika.connect(check.amqp_url)
    try:
        kit.channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        topology = check.topology
        replies = await kit.channel.declare_queue(topology.replies_queue, passive=True)
        consumers = replies.declaration_result.consumer_count or 0
        if consumers:
            kit.report(
                "setup",
                topology.replies_queue,
                False,
                f"{consumers} other consumer(s) (a coordinator?) take the replies: run the kit on a vhost or SAGAFLOW_PREFIX of its own",
            )
            return kit.results
        service_queue = await kit.channel.declare_queue(
            topology.service_queue(check.service), passive=True
        )
        if not service_queue.declaration_result.consumer_count:
            kit.report(
                "setup",
                topology.service_queue(check.service),
                False,
                "nobody consumes it: start the participant first",
            )
            return kit.results
        watch = await kit.channel.declare_queue(exclusive=True, auto_delete=True)
        await watch.bind(topology.dead_letter_exchange, routing_key="")
        await watch.consume(kit.dead.on_message)
        await replies.consume(kit.replies.on_message)
        if check.steps:
            await kit.check_hostile(check.steps[0])
        for step in check.steps:
            await kit.check_step(step)
            for refusal in check.refusals.get(step.action.type, ()):
                await kit.check_refusal(step, refusal)
    finally:
        await connection.close()
    return kit.results
