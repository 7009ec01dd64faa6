"""What the conformance kit checks, and the steps it checks them on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sagaflow.core.definition import Action, Saga, Step
from sagaflow.core.messages import DEFAULT_MAX_MESSAGE_BYTES
from sagaflow.core.ports import Topology
from sagaflow.core.signing import Keys

__all__ = ["KEY", "Check", "KitStep", "Result", "fill", "steps_of"]

KEY = "{key}"
"""Replaced in every string of a sample command by a key unique to one check."""


@dataclass(frozen=True)
class KitStep:
    """A step of a saga that one of the participant's actions serves."""

    saga: str
    version: int
    step: str
    index: int
    action: Action[Any, Any]
    compensation: Action[Any, Any] | None


def steps_of(sagas: Sequence[Saga[Any]], service: str) -> list[KitStep]:
    """The steps whose action belongs to ``service``, once per action type."""
    found: dict[str, KitStep] = {}
    for saga in sagas:
        for index, step in enumerate(saga.steps):
            if not isinstance(step, Step):
                continue  # a wait sends nothing
            if step.action.service == service and step.action.type not in found:
                found[step.action.type] = KitStep(
                    saga.name, saga.version, step.name, index, step.action, step.compensation
                )
    return list(found.values())


@dataclass(frozen=True)
class Result:
    """One line of the report: an obligation, what it was checked on, the verdict."""

    obligation: str
    subject: str
    passed: bool
    detail: str

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'FAIL'}  {self.obligation:<28} {self.subject}: {self.detail}"


@dataclass
class Check:
    """What to check and how.

    Args:
        amqp_url: The broker, vhost included.
        service: The participant's service name.
        steps: Its actions, with their saga and compensation (:func:`steps_of`).
        samples: A valid command payload per action type (compensations too);
            ``{key}`` in a string is replaced by a fresh key per check.
        topology: The deployment's prefix and delivery limit.
        keys: Signing keys when messages are signed (the service's key signs).
        strict: Whether payloads are validated strictly (the deployment's setting).
        effects_query: SQL counting the effects of the command with key ``$1``.
        effects_queries: The same for some action types, where they differ.
        refusals: Commands the participant must refuse, by action type: each
            ``{"command": {...}, "reason": "out_of_stock"}``.
        prepare_sql: SQL run with each fresh key as ``$1`` before it is used
            (an order row for the order service's actions, say).
        database_url: Where ``effects_query`` and ``prepare_sql`` run.
        timeout: Seconds to wait for a reply or a dead letter.
        quiet: Seconds of silence that show a message was not answered.
        max_message_bytes: The deployment's body size limit.
    """

    amqp_url: str
    service: str
    steps: list[KitStep]
    samples: Mapping[str, Mapping[str, Any]]
    topology: Topology = field(default_factory=Topology)
    keys: Keys | None = None
    strict: bool = True
    effects_query: str | None = None
    effects_queries: Mapping[str, str] = field(default_factory=dict)
    prepare_sql: str | None = None
    refusals: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)
    database_url: str | None = None
    timeout: float = 10.0
    quiet: float = 1.5
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES


def fill(value: Any, key: str) -> Any:
    """``value`` with :data:`KEY` replaced by ``key`` in every string."""
    if isinstance(value, str):
        return value.replace(KEY, key)
    if isinstance(value, Mapping):
        return {k: fill(v, key) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, key) for v in value]
    return value
