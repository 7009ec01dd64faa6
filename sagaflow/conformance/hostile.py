"""The hostile messages of the conformance kit: one per documented dead-letter reason.

Each fails one check of docs/protocol.md ("What a receiver checks, in order")
and passes the ones before it (signed when messages are signed), so a
participant that checks in the documented order gives the documented code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from sagaflow.core.messages import Envelope, encode
from sagaflow.core.signing import SIGNATURE_HEADER

__all__ = ["HOSTILE", "Hostile", "hostile_messages"]

Hostile = tuple[str, bytes, dict[str, str], str]
"""The expected reason code, the body, the headers and the message id."""

Signer = Callable[[dict[str, Any]], tuple[bytes, dict[str, str]]]

HOSTILE = {
    "big": "a body over the size limit",
    "nul": "a body with \\u0000",
    "notjson": "a body that is not JSON",
    "envelope": "an envelope without attempt",
    "schema": "schema 2",
    "outcome": "a command carrying an outcome",
    "reply": "a reply on the service queue",
    "service": "another service's type",
    "action": "an action it does not serve",
    "payload": "a payload with an undeclared field",
    "unsigned": "an unsigned command",
    "badsig": "a wrong signature",
}
"""What each hostile message is, by the last part of its message id."""


def hostile_messages(
    good: Envelope, *, sign: Signer, max_bytes: int, strict: bool, signed: bool
) -> list[Hostile]:
    """The hostile variants of a valid command ``good``."""
    out: list[Hostile] = []
    service, action = good.service, good.type.split(".", 1)[1]

    def add(code: str, what: str, make: Callable[[dict[str, Any]], Any]) -> None:
        message_id = f"{good.message_id}:hostile-{len(out)}:{what}"
        raw = {**orjson.loads(encode(good)), "message_id": message_id}
        made = make(raw)
        body, headers = made if isinstance(made, tuple) else (made, {})
        out.append((code, body, headers, message_id))

    big = {"x": "a" * (max_bytes + 1)}
    add("too_large", "big", lambda r: sign({**r, "payload": big}))
    add("invalid", "nul", lambda r: sign({**r, "payload": {**r["payload"], "n": "a\u0000b"}}))
    add(
        "not_json", "notjson", lambda r: b'{"message_id": "' + r["message_id"].encode() + b'", oops'
    )
    add("invalid", "envelope", lambda r: sign({k: v for k, v in r.items() if k != "attempt"}))
    add("unsupported_schema", "schema", lambda r: sign({**r, "schema": 2}))
    add("invalid", "outcome", lambda r: sign({**r, "outcome": "success"}))
    reply = {"kind": "reply", "for_kind": "command", "outcome": "success"}
    add("not_a_command", "reply", lambda r: sign({**r, **reply}))
    other = f"zz-not-{service}.{action}"
    # signed, it carries our key, not that service's: refused at the signature (check 6)
    add(
        "bad_signature" if signed else "wrong_service",
        "service",
        lambda r: sign({**r, "type": other}),
    )
    unknown = f"{service}.zz-no-such-action"
    add("unknown_action", "action", lambda r: sign({**r, "type": unknown}))
    if strict:
        bad: Callable[[dict[str, Any]], Any] = lambda r: {**r["payload"], "zz_undeclared": 1}  # noqa: E731
    else:
        bad = lambda r: {"zz": 1}  # noqa: E731
    add("invalid_command", "payload", lambda r: sign({**r, "payload": bad(r)}))
    if signed:
        add("unsigned", "unsigned", lambda r: orjson.dumps(r))

        def forged(r: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
            body, headers = sign(r)
            headers[SIGNATURE_HEADER] = headers[SIGNATURE_HEADER][:-4] + "AAAA"
            return body, headers

        add("bad_signature", "badsig", forged)
    return out
