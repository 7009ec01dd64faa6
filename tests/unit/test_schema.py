"""Exported action contracts (``sagaflow schema``) and strict payload validation.

A strict JSON Schema validator given the exported schema must decide every
payload exactly as sagaflow does, or a participant in another language that
validates with it disagrees with the coordinator (issue 14, items 1 and 8).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import jsonschema
import orjson
import pytest
from pydantic import BaseModel, Field, ValidationError
from typer.testing import CliRunner

from sagaflow.cli.app import app
from sagaflow.config import Settings
from sagaflow.core.definition import Action, Step
from sagaflow.core.schema import (
    DEFAULT_STRICT,
    DIALECT,
    action_schemas,
    payload_schema,
    saga_actions,
    validate_payload,
)
from sagaflow.examples.shop import contracts
from sagaflow.examples.shop.saga import create_order


class Line(BaseModel):
    sku: str
    quantity: int = Field(ge=1)


class Nested(BaseModel):
    order_id: str
    lines: list[Line]
    due: datetime | None = None
    tags: dict[str, int] = Field(default_factory=dict)
    paid: bool = False


CASES: list[tuple[type[BaseModel], dict[str, Any]]] = [
    (contracts.ReserveStock, {"order_id": "o1", "sku": "s", "quantity": 2}),
    (contracts.ReserveStock, {"order_id": "o1", "sku": "s", "quantity": "2"}),
    (contracts.ReserveStock, {"order_id": "o1", "sku": "s", "quantity": 2.0}),
    (contracts.ReserveStock, {"order_id": "o1", "sku": "s", "quantity": 2.5}),
    (contracts.ReserveStock, {"order_id": "o1", "sku": "s", "quantity": True}),
    (contracts.ReserveStock, {"order_id": "o1", "sku": "s", "quantity": 0}),
    (contracts.ReserveStock, {"order_id": "o1", "sku": "s", "quantity": 2, "note": "x"}),
    (contracts.ReserveStock, {"order_id": "o1", "sku": "s"}),
    (contracts.ReserveStock, {"order_id": 1, "sku": "s", "quantity": 2}),
    (contracts.Undone, {"undone": True}),
    (contracts.Undone, {"undone": 1}),
    (contracts.Undone, {"undone": "true"}),
    (contracts.Undone, {}),
    (Nested, {"order_id": "o", "lines": [{"sku": "a", "quantity": 1}]}),
    (Nested, {"order_id": "o", "lines": [{"sku": "a", "quantity": 1, "colour": "red"}]}),
    (Nested, {"order_id": "o", "lines": [{"sku": "a", "quantity": "1"}]}),
    (Nested, {"order_id": "o", "lines": [], "due": "2026-12-04T17:00:00Z"}),
    (Nested, {"order_id": "o", "lines": [], "due": None}),
    (Nested, {"order_id": "o", "lines": [], "tags": {"any-key": 3}}),
    (Nested, {"order_id": "o", "lines": [], "tags": {"k": "3"}}),
    (Nested, {"order_id": "o", "lines": [], "paid": "yes"}),
    (Nested, {"order_id": "o", "lines": {"sku": "a", "quantity": 1}}),
]
# JSON Schema's "integer" admits a number with a zero fraction; sagaflow does not
# (docs/protocol.md says so): the one documented difference.
ZERO_FRACTION = 2


def _valid(model: type[BaseModel], payload: dict[str, Any], strict: bool) -> bool:
    try:
        validate_payload(model, payload, strict=strict)
    except ValidationError:
        return False
    return True


@pytest.mark.parametrize(("index", "case"), list(enumerate(CASES)))
def test_a_strict_json_schema_validator_agrees_with_sagaflow(
    index: int, case: tuple[type[BaseModel], dict[str, Any]]
) -> None:
    model, payload = case
    schema = payload_schema(model, strict=True)
    validator = jsonschema.Draft202012Validator(schema, format_checker=None)
    by_schema = validator.is_valid(payload)
    if index == ZERO_FRACTION:
        assert by_schema and not _valid(model, payload, strict=True)
        return
    assert by_schema == _valid(model, payload, strict=True), (model.__name__, payload)


def test_lax_validation_coerces_and_drops_unknown_fields() -> None:
    lax = validate_payload(
        contracts.ReserveStock,
        {"order_id": "o", "sku": "s", "quantity": "2", "note": "x"},
        strict=False,
    )
    assert lax.quantity == 2
    with pytest.raises(ValidationError, match=r"extra_forbidden|Extra inputs"):
        validate_payload(
            contracts.ReserveStock,
            {"order_id": "o", "sku": "s", "quantity": 2, "note": "x"},
            strict=True,
        )


def test_strict_is_the_default_everywhere() -> None:
    assert DEFAULT_STRICT is True
    assert Settings().strict_payloads is DEFAULT_STRICT
    assert Settings(strict_payloads="false").strict_payloads is False  # type: ignore[arg-type]


def test_exported_schemas_are_draft_2020_12_and_closed_when_strict() -> None:
    strict = payload_schema(Nested, strict=True)
    lax = payload_schema(Nested, strict=False)
    assert strict["$schema"] == DIALECT == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(strict)
    assert strict["additionalProperties"] is False
    assert strict["$defs"]["Line"]["additionalProperties"] is False
    assert "additionalProperties" not in lax
    # dict fields keep their own value schema
    assert strict["properties"]["tags"]["additionalProperties"] == {"type": "integer"}


def test_action_schemas_list_every_action_with_its_steps() -> None:
    exported = action_schemas([create_order])
    assert exported["strict_payloads"] is True
    assert set(exported["actions"]) == set(saga_actions([create_order]))
    reserve = exported["actions"]["inventory.reserve"]
    assert reserve["service"] == "inventory"
    assert reserve["command"] == payload_schema(contracts.ReserveStock)
    assert reserve["reply"] == payload_schema(contracts.StockReserved)
    step = next(
        s
        for s in create_order.steps
        if isinstance(s, Step) and s.action.type == "inventory.reserve"
    )
    assert reserve["sent_by"] == [
        {
            "saga": create_order.name,
            "version": create_order.version,
            "step": step.name,
            "kind": "command",
            "timeout_seconds": step.timeout,
            "retry": step.retry.model_dump(mode="json"),
        }
    ]
    release = exported["actions"]["inventory.release"]
    assert release["sent_by"][0]["kind"] == "compensation"
    assert release["sent_by"][0]["retry"] == step.compensation_retry.model_dump(mode="json")
    only = action_schemas([create_order], service="payment")
    assert set(only["actions"]) == {"payment.charge", "payment.refund"}


def test_the_cli_prints_the_export(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = "sagaflow.examples.shop.saga:create_order"
    runner = CliRunner()
    result = runner.invoke(app, ["schema", spec, "--service", "inventory"])
    assert result.exit_code == 0, result.output
    assert orjson.loads(result.stdout) == action_schemas([create_order], service="inventory")
    monkeypatch.setenv("SAGAFLOW_STRICT_PAYLOADS", "false")
    lax = runner.invoke(app, ["schema", spec])
    assert orjson.loads(lax.stdout) == action_schemas([create_order], strict=False)
    missing = runner.invoke(app, ["schema", spec, "--service", "nobody"])
    assert missing.exit_code == 2
    assert "no action of service 'nobody'" in missing.output


def test_an_action_contract_round_trips_through_its_schema() -> None:
    """Every example action's schema accepts what its model dumps."""
    samples: dict[type[BaseModel], dict[str, Any]] = {
        contracts.ReserveStock: {"order_id": "o", "sku": "s", "quantity": 1},
        contracts.ChargePayment: {"order_id": "o", "customer_id": "c", "amount": 5},
        contracts.ScheduleShipment: {"order_id": "o", "destination": "US"},
        contracts.OrderRef: {"order_id": "o"},
    }
    for action in saga_actions([create_order]).values():
        assert isinstance(action, Action)
        sample = samples.get(action.command)
        if sample is None:
            continue
        dumped = action.command.model_validate(sample).model_dump(mode="json")
        jsonschema.validate(dumped, payload_schema(action.command))


@pytest.mark.parametrize("strict", [True, False])
def test_the_coordinator_validates_a_success_reply_as_set(strict: bool) -> None:
    from sagaflow.core import engine
    from sagaflow.core.messages import Outcome
    from tests.sample import saga

    started = engine.start(saga, "s-1", {"order_id": "o1"}, now=0.0)
    (command,) = started.messages
    reply = command.reply(Outcome.SUCCESS, {"ref": "r", "colour": "red"})
    decision = engine.decide(saga, started.state, engine.ReplyReceived(reply, strict), 1.0)
    if strict:
        assert decision.rejected and "colour" in decision.rejected
    else:
        assert not decision.rejected
        assert decision.state.step_index == 1


@pytest.mark.parametrize("strict", [True, False])
async def test_the_worker_validates_a_command_as_set(strict: bool) -> None:
    from sagaflow import HandlerContext, Participant
    from sagaflow.core.messages import Envelope, MessageKind, encode
    from sagaflow.testing import SagaTestEnvironment
    from tests.sample import Cmd, Ok, reserve, saga

    inventory = Participant("inventory")
    seen: list[int] = []

    @inventory.handler(reserve)
    async def handle(cmd: Cmd, ctx: HandlerContext) -> Ok:
        seen.append(cmd.amount)
        return Ok()

    async with SagaTestEnvironment([saga], [inventory]) as env:
        for worker in env.workers:
            worker.strict_payloads = strict
        command = Envelope(
            message_id="s:reserve:command:1",
            command_id="s:reserve:command",
            saga_id="s",
            saga_name="sample",
            step="reserve",
            step_index=0,
            kind=MessageKind.COMMAND,
            attempt=1,
            type="inventory.reserve",
            payload={"order_id": "o", "amount": "2"},
        )
        queue = env.transport.topology.service_queue("inventory")
        env.transport.inject(queue, encode(command))
        await env.drain()
        reasons = [d.reason for d in await env.transport.dead_letters()]
    if strict:
        assert seen == []
        assert reasons and reasons[0].startswith("invalid_command: inventory.reserve")
    else:
        assert seen == [2]
        assert not any(r.startswith("invalid_command") for r in reasons)


def test_the_node_participant_uses_the_exported_contracts() -> None:
    """services/inventory_node validates with files `sagaflow schema` wrote: they
    must be what sagaflow exports today (regenerate them when a contract changes:
    ``sagaflow schema services.order.saga:SAGAS --service inventory``: both
    versions of create-order send it commands)."""
    from pathlib import Path

    from sagaflow.core.messages import Envelope
    from services.order.saga import SAGAS

    folder = Path(__file__).resolve().parents[2] / "services" / "inventory_node"
    contracts_json = orjson.loads((folder / "contracts.json").read_bytes())
    assert contracts_json == action_schemas(SAGAS, service="inventory")
    envelope = orjson.loads((folder / "envelope.schema.json").read_bytes())
    assert envelope == Envelope.model_json_schema(by_alias=True)


def test_envelope_integers_are_strict() -> None:
    from sagaflow.core.errors import MessageRejected
    from sagaflow.core.messages import decode

    good = {
        "message_id": "s:a:command:1",
        "command_id": "s:a:command",
        "saga_id": "s",
        "saga_name": "n",
        "step": "a",
        "step_index": 0,
        "kind": "command",
        "attempt": 1,
        "type": "svc.act",
    }
    assert decode(orjson.dumps(good)).attempt == 1
    for field, value in [("attempt", "1"), ("attempt", 1.0), ("step_index", True)]:
        with pytest.raises(MessageRejected, match="invalid"):
            decode(orjson.dumps({**good, field: value}))


@pytest.mark.parametrize("signed", [False, True])
async def test_the_kits_hostile_messages_get_their_codes_from_sagaflow(signed: bool) -> None:
    """What the conformance kit expects of each hostile message is what the
    Python worker does (so the kit cannot fail a correct participant)."""
    from sagaflow.conformance.hostile import HOSTILE, hostile_messages
    from sagaflow.core.messages import Envelope, MessageKind, encode
    from sagaflow.core.signing import SIGNATURE_HEADER, Key, Keys
    from sagaflow.testing import SagaTestEnvironment
    from services.inventory.app import build

    keys = Keys([Key("inventory", "k1", b"0123456789abcdef")]) if signed else None
    good = Envelope(
        message_id="s:reserve:command:1",
        command_id="s:reserve:command",
        saga_id="s",
        saga_name="create-order",
        step="reserve",
        step_index=1,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="inventory.reserve",
        payload={"order_id": "o", "sku": "sku-widget", "quantity": 1},
    )
    assert encode(good)

    def sign(raw: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        body = orjson.dumps(raw)
        return body, ({SIGNATURE_HEADER: keys.sign("inventory", body, {})} if keys else {})

    hostile = hostile_messages(good, sign=sign, max_bytes=4096, strict=True, signed=signed)
    assert {m[3].rsplit(":", 1)[1] for m in hostile} <= set(HOSTILE)
    async with SagaTestEnvironment([create_order], [build()]) as env:
        if keys:
            env.transport.keys = keys
        for worker in env.workers:
            worker.max_message_bytes = 4096
        queue = env.transport.topology.service_queue("inventory")
        for _, body, headers, _ in hostile:
            env.transport.inject(queue, body, headers)
        await env.drain()
        reasons = [d.reason.split(":", 1)[0] for d in await env.transport.dead_letters()]
    assert reasons == [code for code, *_ in hostile]


def test_the_participants_page_names_real_options() -> None:
    import re
    from pathlib import Path

    page = Path(__file__).resolve().parents[2] / "docs" / "participants-in-other-languages.md"
    text = page.read_text(encoding="utf-8")
    runner = CliRunner()
    helps = {
        "participant-check": runner.invoke(app, ["participant-check", "--help"]).output,
        "schema": runner.invoke(app, ["schema", "--help"]).output,
    }
    for command, options in re.findall(r"sagaflow (participant-check|schema)([^\n`]*)", text):
        for option in re.findall(r"--[a-z-]+", options):
            assert option in helps[command], (command, option)
    for option in re.findall(r"`(--[a-z-]+)`", text):
        assert any(option in h for h in helps.values()), option


@pytest.mark.parametrize("strict", ["true", "false"])
def test_graph_json_and_schema_export_the_same_contracts(
    monkeypatch: pytest.MonkeyPatch, strict: str
) -> None:
    """One piece serves both exports, with the deployment's strictness."""
    monkeypatch.setenv("SAGAFLOW_STRICT_PAYLOADS", strict)
    spec = "sagaflow.examples.shop.saga:create_order"
    runner = CliRunner()
    graph = orjson.loads(runner.invoke(app, ["graph", spec, "--format", "json"]).stdout)
    schemas = orjson.loads(runner.invoke(app, ["schema", spec]).stdout)["actions"]
    compared = 0
    for step in graph["steps"]:
        for key in ("action", "compensation"):
            exported = step.get(key)
            if not exported:
                continue
            contract = schemas[exported["type"]]
            assert exported["command"] == contract["command"]
            assert exported["reply"] == contract["reply"]
            compared += 1
    assert compared >= 4
