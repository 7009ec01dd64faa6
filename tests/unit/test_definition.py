from __future__ import annotations

import pytest

from sagaflow import Action, DefinitionError, Participant, Saga, Step
from sagaflow.core.definition import StepKind, to_mermaid
from tests.sample import (
    Cmd,
    Data,
    Ok,
    _cmd,
    approve,
    charge,
    confirm,
    refund,
    release,
    reserve,
    saga,
)


def test_step_kinds_follow_the_pivot() -> None:
    kinds = [s.kind for s in saga.steps]
    assert kinds == [StepKind.COMPENSATABLE] * 3 + [StepKind.PIVOT, StepKind.RETRIABLE]
    assert saga.services == {"inventory", "payment", "shipping", "order"}


def test_duplicate_step_names_are_rejected() -> None:
    with pytest.raises(DefinitionError, match="duplicate step name 'a'"):
        Saga(
            "s",
            data=Data,
            steps=[Step("a", reserve, _cmd, release), Step("a", charge, _cmd, refund)],
        )


def test_compensatable_step_after_pivot_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="point of no return"):
        Saga("s", data=Data, steps=[Step("p", confirm, _cmd), Step("c", charge, _cmd, refund)])


def test_second_pivot_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="must be retriable"):
        Saga("s", data=Data, steps=[Step("p", confirm, _cmd), Step("q", approve, _cmd)])


def test_retriable_step_with_compensation_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="cannot have a compensation"):
        Saga("s", data=Data, steps=[Step("a", reserve, _cmd, release, retriable=True)])


def test_compensation_served_by_another_service_is_rejected() -> None:
    with pytest.raises(DefinitionError, match="must be served by 'inventory'"):
        Saga("s", data=Data, steps=[Step("a", reserve, _cmd, refund)])


@pytest.mark.parametrize("name", ["", "Upper", "1abc", "has space"])
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(DefinitionError):
        Saga(name, data=Data, steps=[Step("a", reserve, _cmd, release)])
    with pytest.raises(DefinitionError):
        Action(name or "X", "reserve", Cmd, Ok)


def test_data_and_models_must_be_pydantic() -> None:
    with pytest.raises(DefinitionError, match="pydantic"):
        Saga("s", data=dict, steps=[Step("a", reserve, _cmd, release)])  # type: ignore[type-var]
    with pytest.raises(DefinitionError, match="pydantic"):
        Action("svc", "act", dict, Ok)  # type: ignore[type-var]


def test_empty_saga_and_bad_timeout_are_rejected() -> None:
    with pytest.raises(DefinitionError, match="at least one step"):
        Saga("s", data=Data, steps=[])
    with pytest.raises(DefinitionError, match="timeout"):
        Saga("s", data=Data, steps=[Step("a", reserve, _cmd, release, timeout=0)])


def test_participant_validates_registration() -> None:
    inventory = Participant("inventory")

    @inventory.handler(reserve)
    async def ok(cmd: Cmd, ctx: object) -> Ok:
        return Ok()

    assert inventory.actions == ["inventory.reserve"]
    with pytest.raises(DefinitionError, match="already has a handler"):
        inventory.handler(reserve)
    with pytest.raises(DefinitionError, match="belongs to 'payment'"):
        inventory.handler(charge)
    with pytest.raises(DefinitionError, match="async"):
        inventory.handler(release)(lambda cmd, ctx: Ok())  # type: ignore[arg-type,return-value]
    with pytest.raises(DefinitionError, match=r"\(command, ctx\)"):

        @inventory.handler(release)
        async def wrong(cmd: Cmd) -> Ok:  # type: ignore[misc]
            return Ok()


def test_mermaid_lists_every_step_and_compensation_path() -> None:
    text = to_mermaid(saga)
    assert text.startswith("flowchart TD")
    for step in saga.steps:
        assert step.action.type in text
    assert "c2 -.-> c1" in text and "c1 -.-> c0" in text and "c0 -.-> compensated" in text
    assert "s3 -. fails .-> c2" in text
    assert "s4 -. fails" not in text  # retriable: never fails for good
