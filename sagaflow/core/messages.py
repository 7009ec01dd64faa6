"""The wire envelope: what travels between coordinator and participants.

Bodies are JSON (orjson) validated by pydantic on both sides. The same model
serves commands, compensations and replies; ``docs/protocol.md`` is the
language-neutral description of it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from sagaflow.core.errors import MessageRejected
from sagaflow.core.signing import Keys

SCHEMA_VERSION = 1
CONTENT_TYPE = "application/json"
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
MAX_REASON = 2000
"""The longest ``reason`` a message carries, in characters; longer ones are cut."""
# the headers that are trace context (W3C, plus the link from a compensation to its step)
TRACE_HEADERS = frozenset({"traceparent", "tracestate", "sagaflow-link"})


class MessageKind(StrEnum):
    """What a message is: a step's command, its compensation, or a reply."""

    COMMAND = "command"
    COMPENSATION = "compensation"
    REPLY = "reply"


class Outcome(StrEnum):
    """A reply's verdict."""

    SUCCESS = "success"  # the action (or compensation) took effect
    FAILURE = "failure"  # business refusal: the saga compensates
    ERROR = "error"  # transient: retried by the step's policy


class Envelope(BaseModel):
    """One message. ``message_id`` is deterministic; ``command_id`` is the dedup key.

    A command's id is the same for every attempt of a step, so a participant that
    already applied it answers a retry with the stored reply instead of applying
    it again. ``trace`` holds W3C trace context; it travels in AMQP headers, not
    in the body.
    """

    # integers are strict ("2" and 2.0 are refused), as the JSON Schema says
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    schema_version: int = Field(default=SCHEMA_VERSION, alias="schema", strict=True)
    message_id: str = Field(min_length=1, max_length=512)
    command_id: str = Field(min_length=1, max_length=512)
    saga_id: str = Field(min_length=1, max_length=200)
    saga_name: str = Field(min_length=1, max_length=200)
    saga_version: int = Field(default=1, ge=1, strict=True)
    step: str = Field(min_length=1, max_length=200)
    step_index: int = Field(ge=0, strict=True)
    kind: MessageKind
    attempt: int = Field(ge=1, strict=True)
    type: str = Field(min_length=3, max_length=400)
    payload: dict[str, Any] = Field(default_factory=dict)
    for_kind: MessageKind | None = None  # replies: the kind of message answered
    outcome: Outcome | None = None  # replies only
    reason: str | None = Field(default=None, max_length=MAX_REASON)
    trace: dict[str, str] = Field(default_factory=dict, exclude=True)

    @property
    def service(self) -> str:
        return self.type.split(".", 1)[0]

    @property
    def is_reply(self) -> bool:
        return self.kind is MessageKind.REPLY

    def reply(
        self, outcome: Outcome, payload: dict[str, Any] | None = None, reason: str | None = None
    ) -> Envelope:
        """The reply to this command or compensation.

        ``reason`` comes from a handler (a refusal's text, an exception's): one
        longer than :data:`MAX_REASON` is cut, with a note of how much was left out.
        """
        return Envelope(
            message_id=f"{self.message_id}:reply",
            command_id=self.command_id,
            saga_id=self.saga_id,
            saga_name=self.saga_name,
            saga_version=self.saga_version,
            step=self.step,
            step_index=self.step_index,
            kind=MessageKind.REPLY,
            attempt=self.attempt,
            type=self.type,
            payload=payload or {},
            for_kind=self.kind,
            outcome=outcome,
            reason=None if reason is None else shorten(reason),
            trace=self.trace,
        )


def shorten(reason: str, limit: int = MAX_REASON) -> str:
    """``reason`` cut to at most ``limit`` characters, saying how long it was."""
    if len(reason) <= limit:
        return reason
    note = f"... [cut from {len(reason)} characters]"
    return reason[: limit - len(note)] + note


def command_id(saga_id: str, step: str, kind: MessageKind) -> str:
    """The dedup key of a step's command or compensation: the same for every attempt."""
    return f"{saga_id}:{step}:{kind.value}"


def encode(envelope: Envelope) -> bytes:
    """The JSON body of an envelope (trace context excluded: it goes in headers)."""
    return orjson.dumps(envelope.model_dump(mode="json", by_alias=True, exclude_none=True))


def decode(
    body: bytes,
    headers: Mapping[str, str] | None = None,
    max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keys: Keys | None = None,
) -> Envelope:
    """Parse and validate a message: its body, the headers a receiver reads, and,
    when ``keys`` are given, its signature (see :mod:`sagaflow.core.signing`).

    Raises:
        MessageRejected: the body is too large, not JSON, or not a valid
            envelope; a header holds NUL, a lone surrogate or (trace context)
            anything but printable ASCII; or the signature is missing or wrong.
    """
    if len(body) > max_bytes:
        raise MessageRejected(f"too_large: {len(body)} bytes exceeds the limit of {max_bytes}")
    if b"\\u0000" in body:  # PostgreSQL's jsonb cannot hold it: refuse it here, not in a retry loop
        raise MessageRejected("invalid: NUL character in body")
    headers = headers or {}
    trace = check_headers(headers)
    try:
        raw = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MessageRejected(f"not_json: {exc}") from None
    if not isinstance(raw, dict):
        raise MessageRejected("invalid: body must be a JSON object")
    # null means absent, for every field: senders omit what would be null
    raw = {name: value for name, value in raw.items() if value is not None}
    if "trace" in raw:  # it would go out unchecked as the headers of the replies
        raise MessageRejected("invalid: trace context travels in headers, not in the body")
    if _depth(raw) > MAX_DEPTH:
        raise MessageRejected(f"invalid: the body nests deeper than {MAX_DEPTH} levels")
    if keys:
        action = raw.get("type")
        if not isinstance(action, str):
            raise MessageRejected("invalid: type: a string is required")
        keys.verify(action.split(".", 1)[0], body, headers)
    version = raw.get("schema", SCHEMA_VERSION)
    if version != SCHEMA_VERSION:
        raise MessageRejected(f"unsupported_schema: {version!r}")
    if trace:
        raw["trace"] = trace  # validated with the rest: no copy afterwards
    try:
        envelope = Envelope.model_validate(raw)
    except ValidationError as exc:
        raise MessageRejected(f"invalid: {_summary(exc)}") from None
    if envelope.is_reply and (envelope.outcome is None or envelope.for_kind is None):
        raise MessageRejected("invalid: a reply needs 'outcome' and 'for_kind'")
    if not envelope.is_reply and envelope.outcome is not None:
        raise MessageRejected("invalid: only replies carry an 'outcome'")
    return envelope


MAX_DEPTH = 64
"""The deepest nesting of objects and arrays a body may have, the envelope
itself being one level (orjson reads up to 1,024 levels but writes only 254,
and validating a deeper one can exhaust the stack: a receiver must not accept
what it cannot send on or store)."""


def _depth(value: object) -> int:
    """How deeply ``value`` nests objects and arrays (a scalar is 0)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children: Iterable[object]
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if level > deepest:
            deepest = level
            if deepest > MAX_DEPTH:
                return deepest
        stack.extend((child, level + 1) for child in children)
    return deepest


MAX_TRACE_HEADER = 512
"""The longest trace header value accepted (W3C ``tracestate`` is at most 512)."""


def check_headers(headers: Mapping[str, object]) -> dict[str, str]:
    """The trace context of a message's headers, after checking every text header.

    Raises:
        MessageRejected: a header holds NUL or a lone surrogate (no database
            column can store it, and a receiver that tried would retry for
            ever), or a trace header is not printable ASCII of at most
            :data:`MAX_TRACE_HEADER` characters.
    """
    trace: dict[str, str] = {}
    for name, value in headers.items():
        if not isinstance(value, str):
            continue
        if "\x00" in value or not _encodable(value):
            raise MessageRejected(f"invalid: header {name[:64]!r} holds NUL or a lone surrogate")
        if name in TRACE_HEADERS:
            if len(value) > MAX_TRACE_HEADER or not (value.isascii() and value.isprintable()):
                raise MessageRejected(f"invalid: trace header {name!r} is not printable ASCII")
            trace[name] = value
    return trace


def _encodable(value: str) -> bool:
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def _summary(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '<body>'}: {e['msg']}" for e in exc.errors()]
    return "; ".join(parts[:5])
