"""Hooks the runtime calls at each transition: tracing and metrics plug in here.

The engine stays free of observability code; the coordinator and the worker
call these methods, and ``sagaflow.tracing`` / ``sagaflow.metrics`` implement
them. The default does nothing and costs a method call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sagaflow.core.messages import Envelope

if TYPE_CHECKING:
    from sagaflow.core.definition import Saga
    from sagaflow.core.engine import Decision
    from sagaflow.core.state import SagaState


class Hooks:
    """No-op base; override what you need. Hooks must not raise."""

    def saga_started(self, saga: Saga[Any], saga_id: str) -> dict[str, str]:
        """Return the trace context to store with a new saga (W3C headers)."""
        return {}

    def decided(self, saga: Saga[Any], before: SagaState | None, decision: Decision) -> None:
        """A transition committed (``before`` is None for a start)."""

    def published(self, envelopes: Sequence[Envelope]) -> None:
        """Messages were confirmed by the broker."""

    def dead_lettered(self, queue: str, reason: str) -> None:
        """A message was dead-lettered."""

    def handled(self, envelope: Envelope, reply: Envelope | None, seconds: float) -> None:
        """A participant handled a command (``reply`` None when nothing is sent)."""
