"""Message signatures: who may send what, checked by every receiver.

Each service shares a secret key with the coordinator, and only with it. The
coordinator signs a command to ``payment`` with payment's key; the payment
worker signs its reply with the same key; the coordinator accepts a reply
about a ``payment.*`` action only when payment's key signed it. So a process
that can publish to the broker but holds no key can forge nothing, and a
compromised worker can forge only its own service's messages (it cannot
command another service, nor answer for one).

The signature is an HMAC-SHA256 over the body and the trace headers, sent in
the ``x-saga-signature`` header as ``v1:<key id>:<base64url MAC>``. A key id
names one secret; a service may have several (the first one listed signs,
all of them verify), which is how keys rotate without a stop: add the new key
everywhere second, then first, then remove the old one (docs/security.md).

Keys are configured as ``service:key_id:secret`` entries separated by commas
(``SAGAFLOW_SIGNING_KEYS``); the coordinator holds every service's entries, a
worker only its own.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from sagaflow.core.errors import ConfigurationError, MessageRejected

__all__ = ["SIGNATURE_HEADER", "Key", "Keys"]

SIGNATURE_HEADER = "x-saga-signature"
_VERSION = "v1"
_MIN_SECRET_BYTES = 16
_KEY_ID = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_SERVICE = re.compile(r"^[a-z][a-z0-9_-]{0,99}$")
# the headers the MAC covers besides the body: what a receiver reads from headers
_SIGNED_HEADERS = ("sagaflow-link", "traceparent", "tracestate")


@dataclass(frozen=True)
class Key:
    """One secret of one service."""

    service: str
    key_id: str
    secret: bytes

    def __repr__(self) -> str:  # never the secret
        return f"Key(service={self.service!r}, key_id={self.key_id!r})"


class Keys:
    """The keys a process signs with and accepts.

    Args:
        keys: Each service's keys; the first of a service signs.

    Raises:
        ConfigurationError: a key id appears twice, or a secret is shorter than
            16 bytes.
    """

    def __init__(self, keys: Iterable[Key]) -> None:
        self._by_id: dict[str, Key] = {}
        self._signing: dict[str, Key] = {}
        for key in keys:
            if key.key_id in self._by_id:
                raise ConfigurationError(f"signing key id {key.key_id!r} is listed twice")
            if len(key.secret) < _MIN_SECRET_BYTES:
                raise ConfigurationError(
                    f"signing key {key.key_id!r} is too short: at least {_MIN_SECRET_BYTES} bytes"
                )
            self._by_id[key.key_id] = key
            self._signing.setdefault(key.service, key)

    @classmethod
    def parse(cls, text: str) -> Keys:
        """Keys from ``service:key_id:secret`` entries separated by commas.

        Raises:
            ConfigurationError: an entry is malformed (the message never holds
                the secret).
        """
        keys: list[Key] = []
        for number, entry in enumerate(filter(None, (e.strip() for e in text.split(","))), 1):
            service, _, rest = entry.partition(":")
            key_id, _, secret = rest.partition(":")
            if not _SERVICE.match(service) or not _KEY_ID.match(key_id) or not secret:
                raise ConfigurationError(
                    f"signing key entry {number} is not service:key_id:secret "
                    "(service a saga service name, key_id letters, digits, '_.-')"
                )
            keys.append(Key(service, key_id, secret.encode()))
        return cls(keys)

    @property
    def services(self) -> list[str]:
        """The services these keys sign for."""
        return sorted(self._signing)

    def require(self, services: Iterable[str], who: str) -> None:
        """Check that ``who`` (a process) can sign for each of ``services``.

        Raises:
            ConfigurationError: a service has no key here.
        """
        missing = sorted(set(services) - set(self._signing))
        if missing:
            raise ConfigurationError(
                f"{who}: no signing key for {', '.join(missing)} in SAGAFLOW_SIGNING_KEYS"
            )

    def only(self, services: Iterable[str]) -> Keys:
        """These keys restricted to ``services`` (what a worker of them needs)."""
        wanted = set(services)
        return Keys(key for key in self._by_id.values() if key.service in wanted)

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def __repr__(self) -> str:
        return f"Keys({sorted(self._by_id)})"

    def sign(self, service: str, body: bytes, headers: Mapping[str, str]) -> str:
        """The signature header's value for a message about ``service``'s action.

        Raises:
            ConfigurationError: no key of ``service`` is known here.
        """
        key = self._signing.get(service)
        if key is None:
            raise ConfigurationError(f"no signing key for service {service!r}")
        return f"{_VERSION}:{key.key_id}:{_mac(key, body, headers)}"

    def verify(self, service: str, body: bytes, headers: Mapping[str, str]) -> None:
        """Check that one of ``service``'s keys signed this body and these headers.

        Raises:
            MessageRejected: unsigned, signed by an unknown key or by another
                service's key, or the signature does not match.
        """
        value = headers.get(SIGNATURE_HEADER)
        if not value:
            raise MessageRejected(f"unsigned: no {SIGNATURE_HEADER} header")
        version, _, rest = str(value).partition(":")
        key_id, _, mac = rest.partition(":")
        if version != _VERSION or not key_id or not mac:
            raise MessageRejected("bad_signature: malformed signature header")
        key = self._by_id.get(key_id)
        if key is None:
            raise MessageRejected(f"bad_signature: unknown key {key_id[:64]!r}")
        if key.service != service:
            raise MessageRejected(
                f"bad_signature: key {key_id!r} is {key.service}'s, the message is {service}'s"
            )
        if not mac.isascii() or not hmac.compare_digest(mac, _mac(key, body, headers)):
            raise MessageRejected("bad_signature: the signature does not match the message")


def _mac(key: Key, body: bytes, headers: Mapping[str, str]) -> str:
    mac = hmac.new(key.secret, digestmod=hashlib.sha256)
    mac.update(f"sagaflow-{_VERSION}\0{key.key_id}\0".encode())
    for name in _SIGNED_HEADERS:
        value = headers.get(name)
        if value is not None:
            mac.update(f"{name}={value}\0".encode("utf-8", "surrogatepass"))
    mac.update(b"\0")
    mac.update(body)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()
