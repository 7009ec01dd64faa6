"""CompositeHooks: each context-manager hook runs through the hooks that override it."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import pytest

from sagaflow.core.messages import Envelope, MessageKind
from sagaflow.runtime.hooks import CompositeHooks, Hooks


def envelope() -> Envelope:
    return Envelope(
        message_id="s:step:command:1",
        command_id="s:step:command",
        saga_id="s",
        saga_name="saga",
        step="step",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="svc.act",
        trace={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )


class Recording(Hooks):
    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events

    @contextmanager
    def processing(self, envelope: Envelope, queue: str) -> Iterator[dict[str, str]]:
        self.events.append(f"enter {self.name} {envelope.trace.get('by', '-')}")
        try:
            yield {**envelope.trace, "by": self.name}
        finally:
            self.events.append(f"exit {self.name}")

    @contextmanager
    def publishing(self, envelopes: Sequence[Envelope]) -> Iterator[Sequence[Envelope]]:
        self.events.append(f"publish {self.name}")
        yield envelopes


def test_hooks_that_override_run_in_order_and_exit_in_reverse() -> None:
    events: list[str] = []
    hooks = CompositeHooks([Recording("a", events), Hooks(), Recording("b", events)])
    with hooks.processing(envelope(), "q") as trace:
        events.append("body")
    # b sees the trace a handed over; the message's context is b's
    assert events == ["enter a -", "enter b a", "body", "exit b", "exit a"]
    assert trace["by"] == "b"


def test_one_overriding_hook_is_used_directly_and_none_costs_a_nullcontext() -> None:
    events: list[str] = []
    one = Recording("only", events)
    hooks = CompositeHooks([Hooks(), one, Hooks()])
    with hooks.processing(envelope(), "q") as trace:
        pass
    assert trace["by"] == "only"
    with hooks.publishing([envelope()]) as outgoing:
        assert len(outgoing) == 1
    assert events == ["enter only -", "exit only", "publish only"]

    nothing = CompositeHooks([Hooks(), Hooks()])
    message = envelope()
    with nothing.processing(message, "q") as trace:
        assert trace is message.trace
    with nothing.queries(own=True):
        pass


def test_an_error_in_the_block_reaches_every_hook() -> None:
    events: list[str] = []
    hooks = CompositeHooks([Recording("a", events), Recording("b", events)])
    with pytest.raises(RuntimeError), hooks.processing(envelope(), "q"):
        raise RuntimeError("handler failed")
    assert events[-2:] == ["exit b", "exit a"]
