"""What a dead letter may hold: a message over the size limit keeps only a prefix.

The dead-letter queue is for an operator to read, and a message refused for
its size would otherwise sit there whole (twenty 5 MB replies were 100 MB of
it). Both transports dead-letter such a message with the first
:data:`KEPT_BYTES` bytes of its body and two headers, its size and its SHA-256,
so it can still be recognised and matched with what its sender logged. It is
never replayed: the cut body is not the message.

``docs/protocol.md`` lists the headers for participants in other languages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from sagaflow.core.errors import MessageRejected

__all__ = [
    "H_ORIGINAL_SHA256",
    "H_ORIGINAL_SIZE",
    "KEPT_BYTES",
    "bounded_body",
    "is_cut",
    "refuse_cut",
]

H_ORIGINAL_SIZE = "x-sagaflow-original-size"
H_ORIGINAL_SHA256 = "x-sagaflow-original-sha256"
KEPT_BYTES = 4096
"""Bytes of an oversized body a dead letter keeps (fewer if the limit is lower)."""


def bounded_body(body: bytes, limit: int) -> tuple[bytes, dict[str, str]]:
    """``body`` as a dead letter holds it, and the headers to add.

    Args:
        body: The message body.
        limit: The largest body accepted (``max_message_bytes``).

    Returns:
        The body unchanged and no headers when it is within ``limit``; else its
        first ``min(KEPT_BYTES, limit)`` bytes, with its size and SHA-256.
    """
    if len(body) <= limit:
        return body, {}
    return body[: min(KEPT_BYTES, limit)], {
        H_ORIGINAL_SIZE: str(len(body)),
        H_ORIGINAL_SHA256: hashlib.sha256(body).hexdigest(),
    }


def is_cut(headers: Mapping[str, str]) -> bool:
    """Whether a dead letter holds only a prefix of its message."""
    return H_ORIGINAL_SHA256 in headers


def refuse_cut(headers: Mapping[str, str]) -> None:
    """Refuse to replay a dead letter that holds only a prefix of its message.

    Raises:
        MessageRejected: it is such a dead letter.
    """
    if is_cut(headers):
        size = headers.get(H_ORIGINAL_SIZE, "?")
        raise MessageRejected(f"too_large: only a prefix of its {size} bytes was kept")
