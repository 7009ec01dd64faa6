"""The rules of docs/protocol.md that a participant in another language relies on.

Each test pins one point the page states (issue 14's list: null fields, the
order of checks, generation ids, the inbox format, compensation payloads, the
kind of an action, step timeouts, queue argument types, orphan commands)
against what the Python implementation does. When one fails, code and page
disagree: fix whichever is wrong, never just the test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from sagaflow import HandlerContext, Participant, RetryPolicy, Step
from sagaflow.core import engine
from sagaflow.core.errors import MessageRejected
from sagaflow.core.messages import Envelope, MessageKind, Outcome, decode, encode
from sagaflow.core.signing import Key, Keys
from sagaflow.core.state import SagaStatus
from sagaflow.store.postgres_common import envelope_from_json, envelope_to_json
from sagaflow.testing import SagaTestEnvironment
from sagaflow.transport.rabbitmq import RabbitMQTransport
from tests.sample import Cmd, Ok, release, saga

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _table(doc: str, marker: str) -> list[list[str]]:
    match = re.search(rf"<!-- {marker} -->\n((?:\|.*\n)+)", doc)
    assert match, f"no table after <!-- {marker} -->"
    rows = [line.strip("|").split(" | ") for line in match.group(1).splitlines()[2:]]
    return [[cell.strip() for cell in row] for row in rows]


COMMAND: dict[str, Any] = {
    "schema": 1,
    "message_id": "s:reserve:command:1",
    "command_id": "s:reserve:command",
    "saga_id": "s",
    "saga_name": "sample",
    "saga_version": 1,
    "step": "reserve",
    "step_index": 0,
    "kind": "command",
    "attempt": 1,
    "type": "inventory.reserve",
    "payload": {"order_id": "o1"},
}


def _reason(body: bytes, headers: dict[str, str] | None = None, keys: Keys | None = None) -> str:
    with pytest.raises(MessageRejected) as caught:
        decode(body, headers, max_bytes=4096, keys=keys)
    return caught.value.reason.split(":", 1)[0]


# --------------------------------------------------------------------------- null is absent


def test_null_means_absent_for_every_field() -> None:
    raw = {**COMMAND, "schema": None, "payload": None, "outcome": None, "reason": None}
    envelope = decode(orjson.dumps(raw))
    assert envelope.schema_version == 1
    assert envelope.payload == {}
    assert envelope.outcome is None
    assert _reason(orjson.dumps({**COMMAND, "saga_id": None})) == "invalid"
    reply = {**COMMAND, "kind": "reply", "for_kind": None, "outcome": "success"}
    assert _reason(orjson.dumps(reply)) == "invalid"  # a reply needs for_kind


# --------------------------------------------------------------------------- order of checks


def _failing(check: int) -> tuple[bytes, dict[str, str]]:
    """A message that fails documented check ``check`` and as many later ones as
    it can (a receiver must report the first)."""
    bad_later = {**COMMAND, "schema": 2, "attempt": "one", "outcome": "success"}
    match check:
        case 1:
            return b"x" * 5000, {"traceparent": "\x00"}
        case 2:
            return b'{"message_id": "\\u0000", ' + b"not json", {"traceparent": "\x00"}
        case 3:
            return b"not json", {"x-saga-step": "a\x00b"}
        case 4:
            return b"{not json", {}
        case 5:
            return orjson.dumps({**bad_later, "trace": {"traceparent": "x"}}), {}
        case 6:
            return orjson.dumps(bad_later), {}  # signed deployments: no signature
        case 7:
            return orjson.dumps(bad_later), {}
        case 8:
            return orjson.dumps({**COMMAND, "attempt": "one", "outcome": "success"}), {}
    raise AssertionError(check)


def test_receivers_check_in_the_documented_order(doc: str) -> None:
    rows = _table(doc, "checks")
    assert [int(row[0]) for row in rows] == list(range(1, len(rows) + 1))
    codes = {int(row[0]): re.findall(r"`([a-z_]+)`", row[2]) for row in rows}
    keys = Keys([Key("inventory", "k1", b"0123456789abcdef")])
    for check in range(1, 9):
        body, headers = _failing(check)
        given = _reason(body, headers, keys if check == 6 else None)
        assert given in codes[check], f"check {check}: got {given}, doc says {codes[check]}"
        if check == 6:
            assert given == "unsigned"
    # the participant's own checks, through a worker
    assert [codes[n][0] for n in range(9, 13)] == [
        "not_a_command",
        "wrong_service",
        "unknown_action",
        "invalid_command",
    ]


async def test_a_worker_checks_in_the_documented_order() -> None:
    inventory = Participant("inventory")

    @inventory.handler(release)
    async def handle(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok()

    messages = {
        # each fails its check and every later one
        "not_a_command": {**COMMAND, "kind": "reply", "for_kind": "command", "outcome": "success",
                          "type": "payment.nothing", "payload": {"order_id": 5}},
        "wrong_service": {**COMMAND, "type": "payment.nothing", "payload": {"order_id": 5}},
        "unknown_action": {**COMMAND, "type": "inventory.nothing", "payload": {"order_id": 5}},
        "invalid_command": {**COMMAND, "type": "inventory.release", "payload": {"order_id": 5}},
    }  # fmt: skip
    async with SagaTestEnvironment([saga], [inventory]) as env:
        queue = env.transport.topology.service_queue("inventory")
        for code, raw in messages.items():
            env.transport.inject(queue, orjson.dumps({**raw, "message_id": code}))
        await env.drain()
        found = {
            orjson.loads(d.body)["message_id"]: d.reason.split(":", 1)[0]
            for d in await env.transport.dead_letters()
        }
    assert found == {code: code for code in messages}


# --------------------------------------------------------------------------- identifiers


def _run_to_refusal() -> engine.Decision:
    """The sample saga with its retriable last step refused: FAILED."""
    decision = engine.start(saga, "s-g", {"order_id": "o"}, now=0.0)
    now = 1.0
    while decision.messages:
        (sent,) = decision.messages
        refused = saga.steps[sent.step_index].retriable
        reply = (
            sent.reply(Outcome.FAILURE, reason="no")
            if refused
            else sent.reply(Outcome.SUCCESS, {"ref": "r"})
        )
        decision = engine.decide(saga, decision.state, engine.ReplyReceived(reply), now)
        now += 1
    return decision


def test_an_operator_retry_of_a_refused_step_uses_the_documented_generation_id(
    doc: str,
) -> None:
    failed = _run_to_refusal()
    assert failed.state.status is SagaStatus.FAILED
    retried = engine.decide(saga, failed.state, engine.RetryRequested("ops", "fixed"), 99.0)
    (command,) = retried.messages
    row = re.search(r"^\| `command_id` of an operator's retry[^|]*\| `([^`]+)`", doc, re.M)
    assert row, "the generation id is not in the identifiers table"
    pattern = re.escape(row.group(1)).replace(r"\{saga_id\}", "(?P<saga>.+)")
    pattern = pattern.replace(r"\{step\}", "(?P<step>[a-z0-9_-]+)").replace(r"\{N\}", "[1-9][0-9]*")
    match = re.fullmatch(pattern, command.command_id)
    assert match, f"{command.command_id} does not follow {row.group(1)}"
    assert match["saga"] == "s-g" and match["step"] == command.step
    assert command.command_id.endswith(":command:g1")
    assert command.message_id == f"{command.command_id}:{command.attempt}"
    assert not saga.steps[command.step_index].compensation  # never compensated


# --------------------------------------------------------------------------- compensations


@pytest.mark.parametrize("payload", [{}, {"ref": 1, "anything": ["goes"]}])
def test_a_compensation_success_payload_is_not_validated(doc: str, payload: dict[str, Any]) -> None:
    assert "the payload is\n  not validated or read" in doc
    decision = engine.start(saga, "s-c", {"order_id": "o"}, now=0.0)
    (first,) = decision.messages
    decision = engine.decide(
        saga, decision.state, engine.ReplyReceived(first.reply(Outcome.SUCCESS, {"ref": "r"})), 1
    )
    (second,) = decision.messages
    decision = engine.decide(
        saga, decision.state, engine.ReplyReceived(second.reply(Outcome.FAILURE, reason="no")), 2
    )
    (compensation,) = decision.messages
    assert compensation.kind is MessageKind.COMPENSATION
    done = compensation.reply(Outcome.SUCCESS, payload)
    decision = engine.decide(saga, decision.state, engine.ReplyReceived(done, True), 3)
    assert not decision.rejected
    assert decision.state.status is SagaStatus.COMPENSATED


async def test_a_command_of_a_compensation_type_for_an_unknown_saga_is_applied(
    doc: str,
) -> None:
    """Two documented non-checks: the kind against the action's role, and whether
    the saga exists; the coordinator dead-letters the orphan reply."""
    assert "runs a `command` of a compensation's type like any" in doc
    assert "is therefore\n**applied** like any other" in doc
    inventory = Participant("inventory")
    ran: list[str] = []

    @inventory.handler(release)
    async def handle(cmd: Cmd, ctx: HandlerContext) -> Ok:
        ran.append(ctx.command_id)
        return Ok()

    raw = {**COMMAND, "saga_id": "no-such-saga", "type": "inventory.release"}
    async with SagaTestEnvironment([saga], [inventory]) as env:
        env.transport.inject(env.transport.topology.service_queue("inventory"), orjson.dumps(raw))
        await env.drain()
        reasons = [d.reason for d in await env.transport.dead_letters()]
    assert ran == ["s:reserve:command"]
    assert [r.split(":", 1)[0] for r in reasons] == ["unknown_saga_id"]


# --------------------------------------------------------------------------- the inbox


def test_the_inbox_table_is_the_migrations(doc: str) -> None:
    rows = {row[0].strip("`"): row for row in _table(doc, "inbox")}
    sql = "\n".join(
        p.read_text()
        for p in sorted((ROOT / "sagaflow/store/migrations/participant").glob("*.sql"))
    )
    table = re.search(r"CREATE TABLE __SCHEMA__\.inbox \((.*?)\n\);", sql, re.S)
    assert table
    columns = re.findall(r"^\s+([a-z_]+)\s+(\w+)", table.group(1), re.M)
    assert {name for name, _ in columns} == set(rows)
    for name, sql_type in columns:
        assert f"`{sql_type}`" in rows[name][1], (name, sql_type)
    statuses = set(re.findall(r"'(\w+)'", re.search(r"CHECK \(status IN \(([^)]*)\)", sql)[1]))
    assert statuses == set(re.findall(r"`(\w+)`", rows["status"][2]))


def test_a_stored_reply_is_read_in_either_documented_form() -> None:
    command = decode(orjson.dumps(COMMAND))
    reply = command.reply(Outcome.SUCCESS, {"ref": "r"}).model_copy(
        update={"trace": {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"}}
    )
    as_python_stores = envelope_to_json(reply)
    assert '"trace"' in as_python_stores and '"reason":null' in as_python_stores
    assert envelope_from_json(as_python_stores) == reply
    as_body = encode(reply).decode()  # what a foreign worker sends and stores
    assert envelope_from_json(as_body) == reply.model_copy(update={"trace": {}})
    # re-sent, the body must lose `trace`: a body carrying it is refused
    with pytest.raises(MessageRejected, match="trace context travels in headers"):
        decode(as_python_stores.encode())


# --------------------------------------------------------------------------- timeouts, queues


def test_the_documented_step_defaults_and_example_values(doc: str) -> None:
    from services.order.saga import create_order

    default = Step("x", release, lambda d: Cmd(order_id="o"))
    assert default.retry == RetryPolicy()
    text = f"defaults are a {default.timeout:g} s timeout and {default.retry.max_attempts} attempts"
    assert text in " ".join(doc.split())
    steps = [s for s in create_order.steps if isinstance(s, Step)]  # waits send nothing
    compensated = [s for s in steps if s.compensation is not None]
    timeouts = {s.timeout for s in steps}
    attempts = {s.retry.max_attempts for s in steps}
    comp_attempts = {s.compensation_retry.max_attempts for s in compensated}
    assert len(timeouts) == len(attempts) == len(comp_attempts) == 1
    example = (
        f"create-order saga uses {timeouts.pop():g} s and {attempts.pop()} attempts,"
        f" and {comp_attempts.pop()} attempts for its compensations"
    )
    assert example in " ".join(doc.split())


def test_queue_argument_types_are_documented(doc: str) -> None:
    transport = RabbitMQTransport("amqp://guest:guest@127.0.0.1/")
    for name, value in transport.queue_arguments().items():
        row = re.search(rf"^\| `{re.escape(name)}` \| [^|]+ \| ([^|]+) \|", doc, re.M)
        assert row, name
        kind = row.group(1)
        expected = "integer" if isinstance(value, int) else "long string"
        assert expected in kind, f"{name}: doc says {kind!r}, the code sends {type(value)}"
    dead = transport.dead_letter_arguments()
    assert all(isinstance(dead[n], int) for n in ("x-max-length", "x-max-length-bytes"))
    assert "the two lengths are integers" in " ".join(doc.split())


def test_envelope_example_kinds_are_used_as_sent() -> None:
    sent = Envelope.model_validate(COMMAND)
    assert orjson.loads(encode(sent)) == COMMAND
