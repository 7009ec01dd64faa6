"""Users' strings are checked or cut where they enter, so no message a sender builds
is refused by its receiver (issue 17, item 1).

Before: a participant raising an exception with a 2,500-character message, or a
saga started with a 250-character id, produced a message that ``decode``
dead-lettered at the receiver, and the saga waited for its timeout.
"""

from __future__ import annotations

import pytest

from sagaflow import BusinessFailure, HandlerContext, Participant, SagaStatus
from sagaflow.core.messages import MAX_REASON, Envelope, MessageKind, Outcome, decode, encode
from sagaflow.testing import SagaTestEnvironment
from tests.sample import Cmd, Ok, approve, cancel, charge, confirm, refund, release, reserve, saga
from tests.sample import schedule as schedule_action

LONG = "x" * 2_500


def participants(charge_raises: BaseException) -> list[Participant]:
    inventory, payment = Participant("inventory"), Participant("payment")
    shipping, order = Participant("shipping"), Participant("order")

    async def ok(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok()

    async def charge_handler(cmd: Cmd, ctx: HandlerContext) -> Ok:
        raise charge_raises

    for participant, action in [
        (inventory, reserve),
        (inventory, release),
        (payment, refund),
        (shipping, schedule_action),
        (shipping, cancel),
        (order, confirm),
        (order, approve),
    ]:
        participant.handler(action)(ok)
    payment.handler(charge)(charge_handler)
    return [inventory, payment, shipping, order]


async def test_a_refusal_with_a_long_reason_compensates_and_keeps_the_reason_cut() -> None:
    async with SagaTestEnvironment([saga], participants(BusinessFailure(LONG))) as env:
        handle = await env.start_saga(saga, {"order_id": "o1"})
        await env.drain()
        state = await env.get(handle.saga_id)
        dead = await env.transport.dead_letters()
    assert dead == []
    assert state.status is SagaStatus.COMPENSATED
    assert state.failure is not None
    assert state.failure.reason.startswith("x" * 1_000)
    assert state.failure.reason.endswith("... [cut from 2500 characters]")
    assert len(state.failure.reason) == MAX_REASON


async def test_an_error_with_a_long_message_is_retried_not_dead_lettered() -> None:
    async with SagaTestEnvironment([saga], participants(RuntimeError(LONG))) as env:
        handle = await env.start_saga(saga, {"order_id": "o2"})
        await env.drain()
        for _ in range(5):  # the back-offs of the step's retry policy
            await env.advance(2)
        state = await env.get(handle.saga_id)
        dead = await env.transport.dead_letters()
    assert dead == []
    # three attempts failed transiently: retries exhausted, the saga compensated
    assert state.status is SagaStatus.COMPENSATED
    assert state.failure is not None and state.failure.cause == "retries_exhausted"


@pytest.mark.parametrize("saga_id", ["i" * 201, "", "tab\there"])
async def test_a_saga_id_the_wire_cannot_carry_is_refused_at_start(saga_id: str) -> None:
    async with SagaTestEnvironment([saga], participants(RuntimeError("unused"))) as env:
        with pytest.raises(ValueError, match="saga id"):
            await env.start_saga(saga, {"order_id": "o3"}, saga_id=saga_id)
        await env.drain()
        assert await env.store.list() == []


async def test_the_longest_saga_id_and_name_make_messages_the_receiver_accepts() -> None:
    async with SagaTestEnvironment([saga], participants(BusinessFailure("no"))) as env:
        handle = await env.start_saga(saga, {"order_id": "o4"}, saga_id="i" * 200)
        await env.drain()
        assert (await env.get(handle.saga_id)).status is SagaStatus.COMPENSATED
        assert await env.transport.dead_letters() == []


def test_a_reply_cuts_its_reason_to_what_decode_accepts() -> None:
    command = Envelope(
        message_id="s:step:command:1",
        command_id="s:step:command",
        saga_id="s",
        saga_name="sample",
        step="step",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="inventory.reserve",
    )
    reply = command.reply(Outcome.ERROR, reason=LONG)
    assert decode(encode(reply)).reason == reply.reason
