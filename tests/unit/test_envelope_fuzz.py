"""Fuzzing the wire envelope: ``decode`` never raises anything but ``MessageRejected``.

Whatever arrives on a queue (random bytes, any JSON, a valid envelope with a
field mangled), the coordinator and the workers call ``decode`` first and
dead-letter on ``MessageRejected``; any other exception would be a crash or a
message returned to the queue forever. Valid envelopes survive the trip.
"""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sagaflow.core.errors import MessageRejected
from sagaflow.core.messages import (
    DEFAULT_MAX_MESSAGE_BYTES,
    Envelope,
    MessageKind,
    Outcome,
    decode,
    encode,
)

FIELDS = (
    "schema",
    "message_id",
    "command_id",
    "saga_id",
    "saga_name",
    "saga_version",
    "step",
    "step_index",
    "kind",
    "attempt",
    "type",
    "payload",
    "for_kind",
    "outcome",
    "reason",
)

# JSON as orjson reads it: 64-bit integers, finite floats, any text
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=25,
)

# text that orjson can encode (no lone surrogates) and PostgreSQL can store (no NUL,
# which decode() refuses on purpose), as the engine's ids are
safe_text = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    min_size=1,
    max_size=40,
)


def _decodes_or_rejects(body: bytes, **kwargs: Any) -> Envelope | None:
    try:
        return decode(body, **kwargs)
    except MessageRejected as exc:
        assert exc.reason  # the reason goes into the dead letter's headers
        return None


def _valid_command() -> dict[str, Any]:
    return {
        "schema": 1,
        "message_id": "s-1:reserve:command:1",
        "command_id": "s-1:reserve:command",
        "saga_id": "s-1",
        "saga_name": "create-order",
        "saga_version": 1,
        "step": "reserve",
        "step_index": 1,
        "kind": "command",
        "attempt": 1,
        "type": "inventory.reserve",
        "payload": {"order_id": "o-1", "sku": "sku-widget", "quantity": 1},
    }


@given(st.binary(max_size=2048))
def test_random_bytes_are_rejected_or_decoded(body: bytes) -> None:
    _decodes_or_rejects(body)


@given(json_values)
def test_any_json_is_rejected_or_decoded(value: Any) -> None:
    _decodes_or_rejects(orjson.dumps(value))


@given(
    field=st.sampled_from(FIELDS),
    value=json_values,
    drop=st.sets(st.sampled_from(FIELDS), max_size=3),
    extra=st.dictionaries(st.text(max_size=10), json_scalars, max_size=2),
)
@settings(suppress_health_check=[HealthCheck.too_slow])
def test_mangled_envelopes_are_rejected_or_decoded(
    field: str, value: Any, drop: set[str], extra: dict[str, Any]
) -> None:
    raw = {**_valid_command(), **extra, field: value}
    for name in drop:
        raw.pop(name, None)
    envelope = _decodes_or_rejects(orjson.dumps(raw))
    if envelope is not None:
        # what decode lets through obeys the envelope's own rules
        assert envelope.attempt >= 1 and envelope.step_index >= 0
        assert (envelope.outcome is not None) == envelope.is_reply


@given(st.binary(min_size=0, max_size=64), st.integers(min_value=1, max_value=64))
def test_bodies_over_the_limit_are_rejected_before_parsing(prefix: bytes, limit: int) -> None:
    body = prefix + b" " * (limit + 1)
    with pytest.raises(MessageRejected, match="too_large"):
        decode(body, max_bytes=limit)


def test_a_huge_body_is_rejected() -> None:
    body = orjson.dumps({**_valid_command(), "payload": {"x": "y" * DEFAULT_MAX_MESSAGE_BYTES}})
    with pytest.raises(MessageRejected, match="too_large"):
        decode(body)


def test_deep_nesting_is_rejected() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(MessageRejected):
        decode(body, max_bytes=len(body))


payloads = st.dictionaries(
    safe_text,
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | safe_text,
    max_size=5,
)


@st.composite
def envelopes(draw: st.DrawFn) -> Envelope:
    kind = draw(st.sampled_from(list(MessageKind)))
    reply = kind is MessageKind.REPLY
    return Envelope(
        message_id=draw(safe_text),
        command_id=draw(safe_text),
        saga_id=draw(safe_text),
        saga_name=draw(safe_text),
        saga_version=draw(st.integers(min_value=1, max_value=2**31)),
        step=draw(safe_text),
        step_index=draw(st.integers(min_value=0, max_value=1000)),
        kind=kind,
        attempt=draw(st.integers(min_value=1, max_value=2**31)),
        type=draw(safe_text.filter(lambda t: len(t) >= 3)),
        payload=draw(payloads),
        for_kind=draw(st.sampled_from([MessageKind.COMMAND, MessageKind.COMPENSATION]))
        if reply
        else None,
        outcome=draw(st.sampled_from(list(Outcome))) if reply else None,
        reason=draw(st.none() | safe_text),
    )


trace_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=40)
"""What a trace header may hold: printable ASCII (W3C trace context is)."""


@given(envelopes(), st.dictionaries(st.sampled_from(["traceparent", "tracestate"]), trace_text))
def test_valid_envelopes_round_trip(envelope: Envelope, trace: dict[str, str]) -> None:
    decoded = decode(encode(envelope), trace)
    assert decoded == envelope.model_copy(update={"trace": trace})
    assert encode(decoded) == encode(envelope)  # the trace travels in headers, not the body
