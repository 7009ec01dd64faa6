"""Hooks the runtime calls at each transition: tracing and metrics plug in here.

The engine stays free of observability code; the coordinator and the worker
call these methods, and ``sagaflow.tracing`` / ``sagaflow.metrics`` implement
them. The default does nothing and costs a method call (its context managers
are ``nullcontext``: a generator-based one costs microseconds, dozens of times
per saga); ``CompositeHooks`` runs several.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
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

    def publishing(
        self, envelopes: Sequence[Envelope]
    ) -> AbstractContextManager[Sequence[Envelope]]:
        """Wrap a confirmed publish; enter to get the envelopes to send (e.g. with
        the trace context of a PRODUCER span in ``trace``). An exception raised
        in the block is the publish failing."""
        return nullcontext(envelopes)

    def processing(self, envelope: Envelope, queue: str) -> AbstractContextManager[dict[str, str]]:
        """Wrap the handling of one received message (a command in a worker, a
        reply in the coordinator); enter to get the trace context that messages
        sent because of it (a participant's reply) should carry."""
        return nullcontext(envelope.trace)

    def queries(self, *, own: bool) -> AbstractContextManager[None]:
        """Wrap database work in a worker: ``own=True`` its own (the transaction,
        inbox and savepoint statements), ``own=False`` a handler's inside it; an
        instrumentation may leave the worker's own out."""
        return _NOTHING

    def decided(self, saga: Saga[Any], before: SagaState | None, decision: Decision) -> None:
        """A transition committed (``before`` is None for a start)."""

    def dead_lettered(self, queue: str, reason: str) -> None:
        """A message was dead-lettered."""

    def handled(self, envelope: Envelope, reply: Envelope | None, seconds: float) -> None:
        """A participant handled a command and it committed (``reply`` None when
        nothing is sent)."""

    def rolled_back(self, envelope: Envelope) -> None:
        """A command's handling was rolled back (it runs again, or goes back to the queue)."""

    def rerun(self, envelope: Envelope, why: str) -> None:
        """A handler runs again for the same delivery (``why``: ``deadlock`` or
        ``store``, its transaction could not commit), or may run again (``redelivered``:
        the broker delivered the command before and no outcome was stored)."""


_NOTHING: AbstractContextManager[None] = nullcontext()


class CompositeHooks(Hooks):
    """Runs several hooks in order (tracing first, so metrics see its context).

    Each context-manager hook runs only through the hooks that override it: a
    message handled with logging alone enters one context manager, not an
    ``ExitStack`` of no-ops.
    """

    def __init__(self, hooks: Sequence[Hooks]) -> None:
        self.hooks = list(hooks)
        self._publishing = _overriding(self.hooks, "publishing")
        self._processing = _overriding(self.hooks, "processing")
        self._queries = _overriding(self.hooks, "queries")

    def saga_started(self, saga: Saga[Any], saga_id: str) -> dict[str, str]:
        trace: dict[str, str] = {}
        for hook in self.hooks:
            trace.update(hook.saga_started(saga, saga_id))
        return trace

    def publishing(
        self, envelopes: Sequence[Envelope]
    ) -> AbstractContextManager[Sequence[Envelope]]:
        if len(self._publishing) == 1:
            return self._publishing[0].publishing(envelopes)
        return self._publishing_all(envelopes)

    @contextmanager
    def _publishing_all(self, envelopes: Sequence[Envelope]) -> Iterator[Sequence[Envelope]]:
        with ExitStack() as stack:
            for hook in self._publishing:
                envelopes = stack.enter_context(hook.publishing(envelopes))
            yield envelopes

    def processing(self, envelope: Envelope, queue: str) -> AbstractContextManager[dict[str, str]]:
        if len(self._processing) == 1:
            return self._processing[0].processing(envelope, queue)
        return self._processing_all(envelope, queue)

    @contextmanager
    def _processing_all(self, envelope: Envelope, queue: str) -> Iterator[dict[str, str]]:
        with ExitStack() as stack:
            trace = envelope.trace
            for hook in self._processing:
                trace = stack.enter_context(hook.processing(envelope, queue))
                envelope = carrying(envelope, trace)
            yield trace

    def queries(self, *, own: bool) -> AbstractContextManager[None]:
        if len(self._queries) == 1:
            return self._queries[0].queries(own=own)
        return self._queries_all(own)

    @contextmanager
    def _queries_all(self, own: bool) -> Iterator[None]:
        with ExitStack() as stack:
            for hook in self._queries:
                stack.enter_context(hook.queries(own=own))
            yield

    def decided(self, saga: Saga[Any], before: SagaState | None, decision: Decision) -> None:
        for hook in self.hooks:
            hook.decided(saga, before, decision)

    def dead_lettered(self, queue: str, reason: str) -> None:
        for hook in self.hooks:
            hook.dead_lettered(queue, reason)

    def handled(self, envelope: Envelope, reply: Envelope | None, seconds: float) -> None:
        for hook in self.hooks:
            hook.handled(envelope, reply, seconds)

    def rolled_back(self, envelope: Envelope) -> None:
        for hook in self.hooks:
            hook.rolled_back(envelope)

    def rerun(self, envelope: Envelope, why: str) -> None:
        for hook in self.hooks:
            hook.rerun(envelope, why)


_BASE = Hooks()


def carrying(envelope: Envelope, trace: dict[str, str]) -> Envelope:
    """``envelope`` with the trace context ``trace`` (from ``processing``): no
    copy when a hook left it as it came, as with tracing off or a saga sampled out."""
    return envelope if trace is envelope.trace else envelope.model_copy(update={"trace": trace})


def _overriding(hooks: Sequence[Hooks], name: str) -> list[Hooks]:
    """The hooks whose class overrides ``name`` (the others' is a no-op), or the
    base class's no-op alone when none does."""
    base = getattr(Hooks, name)
    return [hook for hook in hooks if getattr(type(hook), name) is not base] or [_BASE]
