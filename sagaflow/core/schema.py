"""Action contracts outside Python: JSON Schemas of payloads, and strict validation.

An action's command and reply are pydantic models; a participant in another
language reads them as JSON Schema (draft 2020-12, the dialect of the
envelope's schema in ``docs/protocol.md``), written by ``sagaflow schema``.

Payloads are validated **strictly** by default (``SAGAFLOW_STRICT_PAYLOADS``,
``true``), so that any strict JSON Schema validator agrees with sagaflow:

- JSON types are exact: the string ``"2"`` or the number ``2.0`` is not an
  integer, ``1`` is not a boolean;
- a field the model does not declare is refused (the exported schemas say
  ``additionalProperties: false``).

Lax validation (``false``) is pydantic's default: values are coerced and
unknown fields are dropped. Both sides of the wire use the setting: a worker
dead-letters a command whose payload does not validate (``invalid_command``),
the coordinator a success reply whose payload does not (``rejected``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails

from sagaflow.core.definition import Action, Saga, Step

__all__ = [
    "DEFAULT_STRICT",
    "DIALECT",
    "action_schemas",
    "payload_schema",
    "saga_actions",
    "validate_payload",
]

DIALECT = "https://json-schema.org/draft/2020-12/schema"
DEFAULT_STRICT = True
"""Payloads are validated strictly unless a deployment says otherwise."""

M = TypeVar("M", bound=BaseModel)


def validate_payload(model: type[M], payload: Mapping[str, Any], *, strict: bool) -> M:
    """``payload`` (decoded JSON) as ``model``; strictly, as its exported schema says.

    Raises:
        ValidationError: the payload does not validate; strictly, also a field
            the model does not declare (``extra_forbidden``).
    """
    if not strict:
        return model.model_validate(payload)
    # JSON mode: strings are accepted where JSON has no type (dates, enums), and
    # nothing else is coerced
    value = model.model_validate_json(orjson.dumps(payload), strict=True)
    extra = list(_extra(payload, value.model_dump(mode="json", by_alias=True), ()))
    if extra:
        raise ValidationError.from_exception_data(model.__name__, extra)
    return value


def _extra(given: object, known: object, loc: tuple[str | int, ...]) -> Iterable[InitErrorDetails]:
    """The keys of ``given`` that validating it did not keep (nested too)."""
    if isinstance(given, Mapping) and isinstance(known, Mapping):
        for key, value in given.items():
            if key not in known:
                yield InitErrorDetails(type="extra_forbidden", loc=(*loc, key), input=value)
            else:
                yield from _extra(value, known[key], (*loc, key))
    elif isinstance(given, list) and isinstance(known, list) and len(given) == len(known):
        for index, (one, kept) in enumerate(zip(given, known, strict=True)):
            yield from _extra(one, kept, (*loc, index))


def payload_schema(model: type[BaseModel], *, strict: bool = DEFAULT_STRICT) -> dict[str, Any]:
    """The JSON Schema of a command or reply model (draft 2020-12).

    Strict, every object that lists its properties admits no others
    (``additionalProperties: false``), as :func:`validate_payload` checks.
    """
    schema = model.model_json_schema(by_alias=True)
    if strict:
        _close(schema)
    return {"$schema": DIALECT, **schema}


def _close(node: object) -> None:
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            _close(value)
    elif isinstance(node, list):
        for value in node:
            _close(value)


def saga_actions(sagas: Iterable[Saga[Any]]) -> dict[str, Action[Any, Any]]:
    """Every action and compensation the sagas use, by type."""
    found: dict[str, Action[Any, Any]] = {}
    for saga in sagas:
        for step in saga.steps:
            if not isinstance(step, Step):
                continue  # a wait sends nothing
            for action in (step.action, step.compensation):
                if action is not None:
                    found[action.type] = action
    return dict(sorted(found.items()))


def action_schemas(
    sagas: Iterable[Saga[Any]], *, strict: bool = DEFAULT_STRICT, service: str | None = None
) -> dict[str, Any]:
    """The contract of every action of ``sagas`` (or of one ``service``'s), as JSON.

    For each action type: its service, whether it is a step's action or a
    compensation, the JSON Schemas of its command and its reply, and the steps
    that send it with their timeout and retry policy (a participant must answer
    within the timeout, see docs/protocol.md#participant-obligations).
    """
    sagas = list(sagas)
    actions: dict[str, dict[str, Any]] = {}
    for type_, action in saga_actions(sagas).items():
        if service is not None and action.service != service:
            continue
        actions[type_] = {
            "service": action.service,
            "command": payload_schema(action.command, strict=strict),
            "reply": payload_schema(action.reply, strict=strict),
            "sent_by": [],
        }
    for saga in sagas:
        for step in saga.steps:
            if not isinstance(step, Step):
                continue  # a wait sends nothing
            uses = [("command", step.action, step.retry)]
            if step.compensation is not None:
                uses.append(("compensation", step.compensation, step.compensation_retry))
            for kind, action, retry in uses:
                if action.type not in actions:
                    continue
                actions[action.type]["sent_by"].append(
                    {
                        "saga": saga.name,
                        "version": saga.version,
                        "step": step.name,
                        "kind": kind,
                        "timeout_seconds": step.timeout,
                        "retry": retry.model_dump(mode="json"),
                    }
                )
    return {"strict_payloads": strict, "actions": actions}
