"""A saga definition as data: what ``sagaflow graph --format json`` prints.

Everything a tool needs to draw or check a saga without importing its Python:
the steps in order with their kind, condition, the action and compensation
each sends (with the JSON Schema of their command and reply models, as
``sagaflow schema`` gives them), the waits with their signal's schema and
timeout, the point of no return and the deadline.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from sagaflow.core.definition import Action, RetryPolicy, Saga, Step
from sagaflow.core.schema import DEFAULT_STRICT, payload_schema

__all__ = ["definition_document"]


def definition_document(saga: Saga[Any], *, strict: bool = DEFAULT_STRICT) -> dict[str, Any]:
    """The whole definition of ``saga`` as JSON-ready data."""
    return {
        "saga": saga.name,
        "version": saga.version,
        "fingerprint": saga.fingerprint,
        "deadline_seconds": saga.deadline,
        "point_of_no_return": saga.point_of_no_return,
        "data": payload_schema(saga.data_model, strict=False),
        "steps": [_step(index, step, strict) for index, step in enumerate(saga.steps)],
        "groups": [
            {"name": name, "steps": [saga.steps[i].name for i in saga.groups[first]]}
            for first, name in saga.group_names.items()
        ],
    }


def _step(index: int, step: Any, strict: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "index": index,
        "name": step.name,
        "kind": step.kind.value,
        "conditional": step.when is not None,
    }
    if isinstance(step, Step):
        out.update(
            {
                "action": _action(step.action, strict),
                "compensation": None
                if step.compensation is None
                else _action(step.compensation, strict),
                "timeout_seconds": step.timeout,
                "retry": _retry(step.retry),
                "compensation_retry": None
                if step.compensation is None
                else _retry(step.compensation_retry),
            }
        )
        return out
    default: BaseModel | None = step.on_timeout
    out.update(
        {
            "signal": step.signal_name,
            "model": payload_schema(step.model, strict=False),
            "timeout_seconds": step.timeout,
            "on_timeout": None
            if step.timeout is None
            else (
                "compensate" if default is None else {"default": default.model_dump(mode="json")}
            ),
        }
    )
    return out


def _action(action: Action[Any, Any], strict: bool) -> dict[str, Any]:
    return {
        "type": action.type,
        "service": action.service,
        "command": payload_schema(action.command, strict=strict),
        "reply": payload_schema(action.reply, strict=strict),
    }


def _retry(policy: RetryPolicy) -> dict[str, Any]:
    return policy.model_dump(mode="json")
