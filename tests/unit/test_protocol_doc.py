"""docs/protocol.md cannot drift from the code.

The pasted JSON Schema must equal the generated one, the worked examples must
decode and follow the id rules, and every name the broker sees (exchanges,
queues, arguments, headers) must appear in the page. When a test here fails,
fix the page (or the code), not the test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import orjson
import pytest

from sagaflow.core import engine
from sagaflow.core.messages import (
    CONTENT_TYPE,
    DEFAULT_MAX_MESSAGE_BYTES,
    SCHEMA_VERSION,
    Envelope,
    MessageKind,
    Outcome,
    command_id,
    decode,
    encode,
)
from sagaflow.core.ports import Topology
from sagaflow.core.signing import Key, Keys
from sagaflow.transport import wire
from sagaflow.transport.rabbitmq import RabbitMQTransport

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text(encoding="utf-8")


def _block(doc: str, marker: str) -> Any:
    """The JSON of the fenced block right after ``<!-- marker -->``."""
    match = re.search(rf"<!-- {re.escape(marker)} -->\s*```json\n(.*?)\n```", doc, re.DOTALL)
    assert match, f"no ```json block after <!-- {marker} --> in {DOC}"
    return json.loads(match.group(1))


def _decode(raw: Any) -> Envelope:
    return decode(orjson.dumps(raw))


def test_pasted_schema_is_the_generated_one(doc: str) -> None:
    generated = Envelope.model_json_schema(by_alias=True)
    pasted = _block(doc, "schema:envelope")
    assert pasted == generated, (
        "docs/protocol.md's JSON Schema is stale; regenerate it with "
        "json.dumps(Envelope.model_json_schema(by_alias=True), indent=2)"
    )


def test_command_example_follows_the_rules(doc: str) -> None:
    raw = _block(doc, "example:command")
    command = _decode(raw)
    assert command.kind is MessageKind.COMMAND
    assert command.schema_version == SCHEMA_VERSION
    assert command.command_id == command_id(command.saga_id, command.step, command.kind)
    assert command.message_id == f"{command.command_id}:{command.attempt}"
    # exactly what sagaflow itself would put on the wire (no null fields)
    assert orjson.loads(encode(command)) == raw


@pytest.mark.parametrize(
    ("sent", "answer"),
    [("example:command", "example:reply"), ("example:compensation", "example:compensation-reply")],
)
def test_reply_examples_answer_their_message(doc: str, sent: str, answer: str) -> None:
    message = _decode(_block(doc, sent))
    raw = _block(doc, answer)
    reply = _decode(raw)
    assert reply.kind is MessageKind.REPLY
    assert reply.for_kind is message.kind
    assert reply.outcome is Outcome.SUCCESS
    expected = message.reply(Outcome.SUCCESS, reply.payload)
    assert reply == expected
    assert reply.message_id == f"{message.message_id}:reply"
    assert orjson.loads(encode(reply)) == raw


def test_compensation_example_names_its_forward_command(doc: str) -> None:
    command = _decode(_block(doc, "example:command"))
    compensation = _decode(_block(doc, "example:compensation"))
    assert compensation.kind is MessageKind.COMPENSATION
    assert compensation.command_id.removesuffix(":compensation") + ":command" == (
        command.command_id
    )
    assert compensation.service == command.service


def test_example_payloads_fit_the_order_services_contract(doc: str) -> None:
    contracts = pytest.importorskip("services.contracts")
    command = _decode(_block(doc, "example:command"))
    reply = _decode(_block(doc, "example:reply"))
    compensation = _decode(_block(doc, "example:compensation"))
    done = _decode(_block(doc, "example:compensation-reply"))
    assert command.type == contracts.reserve_stock.type
    contracts.reserve_stock.command.model_validate(command.payload)
    contracts.reserve_stock.reply.model_validate(reply.payload)
    assert compensation.type == contracts.release_stock.type
    contracts.release_stock.command.model_validate(compensation.payload)
    contracts.release_stock.reply.model_validate(done.payload)


def test_topology_names_are_documented(doc: str) -> None:
    t = Topology()
    names = [
        t.commands_exchange,
        t.replies_exchange,
        t.replies_queue,
        t.dead_letter_exchange,
        t.dead_letter_queue,
        t.service_queue("<service>"),
        wire.REPLY_ROUTING_KEY,
    ]
    for name in names:
        assert f"`{name}`" in doc, name


def test_queue_arguments_are_documented(doc: str) -> None:
    arguments = RabbitMQTransport("amqp://guest:guest@127.0.0.1/").queue_arguments()
    for name, value in arguments.items():
        row = re.search(rf"^\| `{re.escape(name)}` \| `([^`]+)`", doc, re.MULTILINE)
        assert row, f"queue argument {name} is not in the arguments table"
        assert row.group(1) == str(value), f"{name}: doc says {row.group(1)}, code uses {value}"


def test_headers_are_documented(doc: str) -> None:
    constants = {
        name: value
        for name, value in vars(wire).items()
        if name.startswith("H_") and isinstance(value, str)
    }
    assert constants
    for name, value in constants.items():
        assert f"`{value}`" in doc, f"header {value} ({name}) is not documented"
    sample = Envelope(
        message_id="s:a:command:1",
        command_id="s:a:command",
        saga_id="s",
        saga_name="n",
        step="a",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="svc.act",
        trace={"traceparent": "00-0-0-01"},
    )
    keys = Keys([Key("svc", "k1", b"0123456789abcdef")])
    for header in wire.message_headers(sample, encode(sample), keys):
        assert f"`{header}`" in doc, f"header {header} is sent but not documented"
    for header in (engine.TRACEPARENT, engine.LINK):  # trace context the engine sets
        assert f"`{header}`" in doc, f"header {header} is sent but not documented"


def test_properties_and_limits_match(doc: str) -> None:
    assert f"`{CONTENT_TYPE}`" in doc
    assert f"{DEFAULT_MAX_MESSAGE_BYTES // 1024} KiB" in doc
    assert f"{wire.MAX_REASON_CHARS} characters" in doc
    reason = Envelope.model_fields["reason"].metadata
    assert any(getattr(m, "max_length", None) == 2000 for m in reason)
    assert "2000 characters" in doc


def test_message_kinds_and_outcomes_are_documented(doc: str) -> None:
    for value in [*MessageKind, *Outcome]:
        assert f"`{value.value}`" in doc


def _reason_table(doc: str) -> set[str]:
    section = doc.split("Reason codes used by sagaflow", 1)[1].split("\n\n", 2)[1]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, re.MULTILINE))


def test_documented_reason_codes_exist_in_the_code(doc: str) -> None:
    sources = "\n".join(
        path.read_text(encoding="utf-8") for path in (DOC.parents[1] / "sagaflow").rglob("*.py")
    )
    codes = _reason_table(doc)
    assert {"too_large", "invalid", "unknown_action", "delivery_limit"} <= codes
    for code in codes:
        assert re.search(rf"[\"']{code}[:\"']", sources), f"reason {code} is not used anywhere"


def test_every_reason_the_code_gives_is_documented(doc: str) -> None:
    sources = "\n".join(
        path.read_text(encoding="utf-8") for path in (DOC.parents[1] / "sagaflow").rglob("*.py")
    )
    given = set(re.findall(r"MessageRejected\(\s*f?\"([a-z_]+):", sources))
    given |= set(re.findall(r"rejects\.append\(\(\s*delivery,\s*f?\"([a-z_]+):", sources))
    given |= set(re.findall(r"verdicts\[index\] = f?\"([a-z_]+):", sources))
    given |= set(re.findall(r"return f\"([a-z_]+): \{type\(exc\)", sources))
    assert {"not_json", "unhandled", "unknown_action", "not_a_reply", "unknown_saga_id"} <= given
    assert given <= _reason_table(doc), f"undocumented reasons: {given - _reason_table(doc)}"
