"""Settings of a sagaflow process, read from ``SAGAFLOW_*`` environment variables.

Nothing is read at import: build a :class:`Settings` explicitly (``Settings()``
reads the environment then; keyword arguments override it)::

    settings = Settings()                       # from the environment
    settings = Settings(database_url="postgresql://app@db/app", prefix="shop")

The object is frozen and has factories for the adapters a process needs, each
returning the concrete type::

    transport = settings.transport()            # RabbitMQTransport
    store = settings.saga_store()               # PostgresSagaStore
    inbox = settings.participant_store("inventory")

Secrets never belong in logs: print :meth:`Settings.redacted` (or ``repr``,
which is redacted too), never the raw URLs.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, unquote, unquote_plus

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sagaflow.core.errors import ConfigurationError
from sagaflow.core.messages import DEFAULT_MAX_MESSAGE_BYTES
from sagaflow.core.ports import Topology
from sagaflow.core.schema import DEFAULT_STRICT
from sagaflow.core.signing import Keys
from sagaflow.runtime.siblings import DEFAULT_LINGER

if TYPE_CHECKING:
    from sagaflow.runtime.retention import Retention
    from sagaflow.store.postgres import PostgresSagaStore
    from sagaflow.store.postgres_participant import PostgresParticipantStore
    from sagaflow.transport.rabbitmq import RabbitMQTransport

__all__ = [
    "MIN_INBOX_RETENTION",
    "LogFormat",
    "Settings",
    "broker_urls",
    "parse_duration",
    "redact_url",
]

LogFormat = Literal["json", "console"]

MASK = "******"
_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "secret", "token", "sslpassword"})
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://")


def _split_userinfo(url: str) -> tuple[str, str | None, str]:
    """``url`` as (``scheme://``, user info or ``None``, the rest).

    The user info ends at the *last* ``@``: a password may hold ``@``, ``/``,
    ``?`` or ``#`` unencoded, where ``urlsplit`` would cut it and call a piece of
    it the host. An ``@`` further on (in a query, say) only makes more masked.
    """
    scheme = _SCHEME.match(url)
    start = scheme.end() if scheme else 0
    at = url.rfind("@", start)
    if at < 0:
        return url[:start], None, url[start:]
    return url[:start], url[start:at], url[at + 1 :]


def _redact_query(rest: str) -> str:
    # everything after the first "?" is the query, "#" included: a secret may hold one
    before, mark, query = rest.partition("?")
    if not mark:
        return rest
    pairs = []
    for pair in query.split("&"):
        key, equals, _value = pair.partition("=")
        secret = equals and unquote_plus(key).strip().lower() in _SECRET_QUERY_KEYS
        pairs.append(f"{key}={MASK}" if secret else pair)
    return f"{before}?{'&'.join(pairs)}"


def redact_url(url: str) -> str:
    """``url`` with its password (in the user info or the query string) masked.

    A password is masked whole even when it holds unencoded ``/ ? # @`` (which
    make the URL misparse elsewhere); whatever else is unclear is masked too.

    Example:
        ``redact_url("amqp://guest:guest@host/")`` is ``"amqp://guest:******@host/"``.
    """
    head, userinfo, rest = _split_userinfo(url)
    if userinfo is not None:
        user, colon, _password = userinfo.partition(":")
        head += f"{user}:{MASK}@" if colon else f"{userinfo}@"
    return head + _redact_query(rest)


_PG_TLS_MODES = frozenset({"require", "verify-ca", "verify-full"})


def _after_userinfo(url: str) -> str:
    # what follows the last "@": a password may hold an unencoded "?" or "#"
    rest = url.partition("://")[2]
    return rest[rest.rfind("@") + 1 :]


def _plaintext(amqp_url: str, database_url: str) -> list[str]:
    """What would travel unencrypted, or may silently fall back to it, with these URLs."""
    problems = []
    if amqp_url.partition("://")[0].lower() != "amqps":
        problems.append("SAGAFLOW_AMQP_URL is not amqps://")
    query = dict(parse_qsl(_after_userinfo(database_url).partition("?")[2]))
    # asyncpg reads PGSSLMODE when the URL has no sslmode; its default, prefer,
    # falls back to plaintext when the server offers no TLS
    mode = query.get("sslmode") or os.environ.get("PGSSLMODE") or "prefer"
    if mode not in _PG_TLS_MODES:
        problems.append(
            f"SAGAFLOW_DATABASE_URL has sslmode={mode} "
            "(use require, verify-ca or, best, verify-full with sslrootcert)"
        )
    return problems


def _amqp_user(url: str) -> str:
    """The user an AMQP URL logs in as (aiormq's default is guest)."""
    rest = url.partition("://")[2]
    at = rest.rfind("@")
    return unquote(rest[:at].partition(":")[0]) if at > 0 else "guest"


_DAY = 86_400.0
MIN_INBOX_RETENTION = _DAY
"""The shortest inbox retention accepted: a command redelivered after its row is gone runs again."""
_UNITS = {"d": _DAY, "h": 3600.0, "m": 60.0, "s": 1.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_FOREVER = frozenset({"forever", "never", "none", "off"})


def parse_duration(text: str) -> float | None:
    """A duration in seconds: ``"30d"``, ``"12h"``, ``"1d12h"``, ``"90m"``, ``"45s"``,
    or plain seconds (``"3600"``); ``"forever"`` (or ``never``, ``none``, ``off``)
    is ``None``.

    Raises:
        ValueError: the text is none of these.
    """
    value = text.strip().lower().replace(" ", "")
    if value in _FOREVER:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts or "".join(n + unit for n, unit in parts) != value:
        raise ValueError(
            f"{text!r} is not a duration: write it like 30d, 12h, 1d12h, 90m, 45s or forever"
        )
    return sum(float(n) * _UNITS[unit] for n, unit in parts)


MAX_PREFETCH = 65535
"""AMQP's ``basic.qos`` carries the prefetch count in 16 bits: more is refused."""
MAX_MESSAGE_BYTES = 512 * 1024 * 1024
"""RabbitMQ refuses larger messages whatever its ``max_message_size``."""


def _usable_url(url: str, schemes: tuple[str, ...]) -> str:
    """``url`` if its scheme and ports can work, else a ``ValueError`` that
    quotes no part of it but a port (the rest may hold a password)."""
    scheme, sep, _ = url.partition("://")
    if not sep or scheme.lower() not in schemes:
        raise ValueError(f"must start with {' or '.join(f'{s}://' for s in schemes)}")
    hosts = re.split(r"[/?#]", _split_userinfo(url)[2], maxsplit=1)[0]
    for host in hosts.split(","):  # asyncpg takes several, host1:5432,host2:5433
        port = host.rpartition("]")[2] if host.startswith("[") else host  # [::1]:5432
        _, colon, number = port.rpartition(":")
        if colon and not (number.isdigit() and 1 <= int(number) <= 65535):
            raise ValueError(f"port {number[:10]!r} is not a number from 1 to 65535")
    return url


def broker_urls(url: str) -> list[str]:
    """One URL per node of a URL that names several hosts, as PostgreSQL's do:
    ``amqp://user:pw@host1:5672,host2:5673/vhost?heartbeat=10`` is the same
    user, vhost and options at ``host1:5672`` and at ``host2:5673``. A URL of
    one host is returned as it is.

    Example:
        ``broker_urls("amqp://u:p@a,b:5673/v")`` is
        ``["amqp://u:p@a/v", "amqp://u:p@b:5673/v"]``.
    """
    head, userinfo, rest = _split_userinfo(url)
    cut = re.search(r"[/?#]", rest)
    hosts, tail = (rest[: cut.start()], rest[cut.start() :]) if cut else (rest, "")
    if "," not in hosts:
        return [url]
    user = f"{userinfo}@" if userinfo is not None else ""
    return [f"{head}{user}{host.strip()}{tail}" for host in hosts.split(",") if host.strip()]


def _default_log_format() -> LogFormat:
    # people read a terminal; machines (log shippers) read everything else
    return "console" if sys.stdout.isatty() else "json"


class Settings(BaseSettings):
    """Everything a coordinator, worker or CLI invocation is configured with.

    Each field reads ``SAGAFLOW_<FIELD>`` (case-insensitive), except
    ``db_schema`` which reads ``SAGAFLOW_SCHEMA``.

    Attributes:
        amqp_url: The RabbitMQ URL, vhost included. A cluster's nodes go in
            its host part, comma-separated (``amqp://u:pw@rmq1:5672,rmq2:5672,
            rmq3:5672/vhost``): a process connects to one and moves to the next
            when it dies (docs/scaling.md).
        database_url: The PostgreSQL URL. A primary and its standbys go in its
            host part with ``target_session_attrs=read-write`` (``postgresql://
            u@pg1:5432,pg2:5432/db?target_session_attrs=read-write``): only the
            server accepting writes is used, also after a promotion.
        db_schema: The coordinator's schema (env ``SAGAFLOW_SCHEMA``).
        prefix: The broker namespace: exchanges and queues are ``<prefix>.*``.
        delivery_limit: Deliveries of one message before it is dead-lettered.
        quorum_initial_group_size: Replicas of each quorum queue when it is
            declared (``x-quorum-initial-group-size``); unset: RabbitMQ's
            default, every node of the cluster. Only a new queue takes it.
        max_message_bytes: Larger messages are refused or dead-lettered (at most
            512 MiB, RabbitMQ's limit).
        connect_timeout: Seconds a coordinator or worker keeps trying, at
            start, to reach a database or broker that does not answer, before
            it exits (code 2). A refusal (credentials, a missing database or
            vhost, an unmigrated schema) ends it at once.
        declare_topology: Declare the exchanges and queues at start (and repair
            them on every reconnect). Off, the process only checks that they
            exist (passive declares need no permission): for least-privilege
            broker users, once ``sagaflow broker declare`` has made them.
        amqp_user_id: Stamp the AMQP ``user_id`` property (the URL's user) on
            every published message; RabbitMQ refuses a publish whose
            ``user_id`` is not the connection's user.
        require_tls: Refuse a plaintext ``amqp://`` URL and a PostgreSQL URL
            without ``sslmode=require``, ``verify-ca`` or ``verify-full``.
        strict_payloads: Validate payloads strictly: exact JSON types, no
            undeclared fields (see :mod:`sagaflow.core.schema`); the same
            default in every language.
        coordinator_max_batch: Replies handled per coordinator transaction at most.
        coordinator_prefetch: Unacknowledged replies a coordinator holds at most
            (AMQP's limit: 65535).
        coordinator_concurrency: Reply batches a coordinator handles at once.
        coordinator_timer_interval: Seconds between scans for due timers.
        coordinator_group_linger: Seconds a parallel group member's success
            reply waits, at most, for its siblings' replies so that the group
            commits in one transaction (0: each reply on arrival).
        worker_prefetch: Unacknowledged commands a worker holds at most (AMQP's
            limit: 65535).
        worker_concurrency: A worker's lanes: handlers running at once, each lane
            in its own transaction on its own connection (the participant pool's
            size).
        worker_max_batch: Commands one lane takes into one transaction at most.
        signing_keys: ``service:key_id:secret`` entries, comma-separated: every
            message is signed and every receiver checks signatures (unset:
            messages are not authenticated; see docs/security.md).
        participant_schema: A worker's schema; by default its service name
            (with ``-`` turned into ``_``).
        jaeger_url: The Jaeger UI base URL, for links to a saga's trace.
        metrics_port: The port of the Prometheus endpoint (none when unset).
        metrics_host: The address that endpoint listens on: loopback unless
            set (``0.0.0.0`` for every interface, in a container say).
        log_format: ``json`` or ``console``; by default console on a terminal.
        log_level: A ``logging`` level name.
        retention: How long a COMPLETED, COMPENSATED or CANCELLED saga and its
            log are kept after they finished (``30d`` by default; ``forever``
            keeps them). Durations read ``30d``, ``12h``, ``90m``, ``45s``.
        failed_retention: The same for FAILED sagas, which wait for an
            operator: kept forever unless set.
        inbox_retention: How long a participant keeps a command's inbox row
            (``7d`` by default, at least ``1d``; ``forever`` keeps them). It
            must outlive every redelivery of the command (docs/operations.md).
        prune_interval: Time between two prune runs of a coordinator or worker.
        prune_batch: Rows deleted per prune transaction at most.
        dead_letter_max_messages: The dead-letter queue's length limit (``0``:
            none); when full, it refuses more (docs/operations.md).
        dead_letter_max_bytes: Its limit in body bytes (``0``: none).
    """

    model_config = SettingsConfigDict(
        env_prefix="SAGAFLOW_",
        frozen=True,
        extra="ignore",
        populate_by_name=True,
        case_sensitive=False,
    )

    amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    db_schema: str = Field(default="sagaflow", validation_alias="SAGAFLOW_SCHEMA")
    prefix: str = Field(default="sagaflow", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    delivery_limit: int = Field(default=5, ge=1)
    quorum_initial_group_size: int | None = Field(default=None, ge=1)
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024, le=MAX_MESSAGE_BYTES)
    connect_timeout: float = Field(default=60.0, ge=1, allow_inf_nan=False)
    declare_topology: bool = True
    amqp_user_id: bool = False
    require_tls: bool = False
    strict_payloads: bool = DEFAULT_STRICT

    coordinator_max_batch: int = Field(default=200, ge=1)
    coordinator_prefetch: int = Field(default=400, ge=1, le=MAX_PREFETCH)
    coordinator_concurrency: int = Field(default=2, ge=1)
    coordinator_timer_interval: float = Field(default=0.25, gt=0, allow_inf_nan=False)
    coordinator_group_linger: float = Field(default=DEFAULT_LINGER, ge=0, le=1, allow_inf_nan=False)

    worker_prefetch: int = Field(default=200, ge=1, le=MAX_PREFETCH)
    # a worker prefetches at least one command per lane
    worker_concurrency: int = Field(default=8, ge=1, le=MAX_PREFETCH)
    worker_max_batch: int = Field(default=16, ge=1, le=64)

    signing_keys: SecretStr | None = None
    participant_schema: str | None = None
    jaeger_url: str | None = None
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    metrics_host: str = Field(default="127.0.0.1", min_length=1)
    log_format: LogFormat = Field(default_factory=_default_log_format)
    log_level: str = "INFO"

    retention: float | None = Field(default=30 * _DAY, gt=0)
    failed_retention: float | None = Field(default=None, gt=0)
    inbox_retention: float | None = Field(default=7 * _DAY, gt=0)
    prune_interval: float = Field(default=300.0, gt=0)
    prune_batch: int = Field(default=1000, ge=1, le=100_000)
    dead_letter_max_messages: int = Field(default=10_000, ge=0)
    dead_letter_max_bytes: int = Field(default=256 * 1024 * 1024, ge=0)

    @field_validator(
        "retention", "failed_retention", "inbox_retention", "prune_interval", mode="before"
    )
    @classmethod
    def _duration(cls, value: object) -> object:
        return parse_duration(value) if isinstance(value, str) else value

    @field_validator("inbox_retention")
    @classmethod
    def _long_enough(cls, value: float | None) -> float | None:
        if value is not None and value < MIN_INBOX_RETENTION:
            raise ValueError(
                "must be at least 1d: a command redelivered after its inbox row is"
                " gone runs again (docs/operations.md)"
            )
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_url(cls, value: str) -> str:
        return _usable_url(value, ("amqp", "amqps"))

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, value: str) -> str:
        return _usable_url(value, ("postgresql", "postgres"))

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if level not in {"CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG"}:
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL")
        return level

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _tls_when_required(self) -> Settings:
        if self.require_tls:
            problems = _plaintext(self.amqp_url, self.database_url)
            if problems:
                found = "; ".join(problems)
                raise ConfigurationError(
                    f"SAGAFLOW_REQUIRE_TLS is set, but {found} (docs/security.md)"
                )
        return self

    # ------------------------------------------------------------------ display

    def redacted(self) -> dict[str, Any]:
        """All settings, with every password in a URL masked: safe to print or log."""
        values = self.model_dump()
        for key in ("amqp_url", "database_url", "jaeger_url"):
            if values.get(key):
                values[key] = redact_url(values[key])
        return values

    def secrets(self) -> list[str]:
        """The passwords these settings hold, so error messages can be scrubbed of them."""
        found: list[str] = []
        for url in (self.amqp_url, self.database_url, self.jaeger_url or ""):
            _head, userinfo, rest = _split_userinfo(url)  # as redact_url reads it
            password = userinfo.partition(":")[2] if userinfo else ""
            if password:
                found.extend({password, unquote(password)})
            pairs = parse_qsl(rest.partition("?")[2])
            found.extend(v for k, v in pairs if k.lower() in _SECRET_QUERY_KEYS and v)
        return found

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # repr() and str() end up in tracebacks and debug logs: keep them redacted
        yield from self.redacted().items()

    # ------------------------------------------------------------------ factories

    def topology(self) -> Topology:
        """The broker namespace and delivery limit."""
        return Topology(prefix=self.prefix, delivery_limit=self.delivery_limit)

    def keys(self) -> Keys | None:
        """The signing keys, or ``None`` when messages are not signed.

        Raises:
            ConfigurationError: ``signing_keys`` is malformed.
        """
        if self.signing_keys is None or not self.signing_keys.get_secret_value().strip():
            return None
        return Keys.parse(self.signing_keys.get_secret_value())

    def transport(self, *, connection_name: str = "sagaflow") -> RabbitMQTransport:
        """A RabbitMQ transport (not yet started) for ``amqp_url``.

        Args:
            connection_name: Shown in RabbitMQ's connection list.
        """
        from sagaflow.transport.rabbitmq import RabbitMQTransport

        return RabbitMQTransport(
            self.amqp_url,
            self.topology(),
            max_message_bytes=self.max_message_bytes,
            start_timeout=self.connect_timeout,
            connection_name=connection_name,
            keys=self.keys(),
            declare=self.declare_topology,
            user_id=_amqp_user(self.amqp_url) if self.amqp_user_id else None,
            dead_letter_max_messages=self.dead_letter_max_messages,
            dead_letter_max_bytes=self.dead_letter_max_bytes,
            quorum_initial_group_size=self.quorum_initial_group_size,
        )

    def amqp_urls(self) -> list[str]:
        """One URL per broker node named in ``amqp_url`` (see :func:`broker_urls`)."""
        return broker_urls(self.amqp_url)

    def retention_policy(self) -> Retention:
        """How long sagas and inbox rows are kept, for a coordinator or a worker."""
        from sagaflow.runtime.retention import Retention

        return Retention(
            finished=self.retention,
            failed=self.failed_retention,
            inbox=self.inbox_retention,
            interval=self.prune_interval,
            batch=self.prune_batch,
        )

    def saga_store(self) -> PostgresSagaStore:
        """The coordinator's PostgreSQL store (not yet started) in ``db_schema``."""
        from sagaflow.store.postgres import PostgresSagaStore

        return PostgresSagaStore(self.database_url, schema=self.db_schema)

    def participant_schema_for(self, service: str) -> str:
        """The schema a participant ``service`` keeps its inbox in."""
        return self.participant_schema or service.replace("-", "_")

    def participant_store(self, service: str) -> PostgresParticipantStore:
        """A participant's PostgreSQL store (not yet started), in its own schema,
        with a connection for each command its worker handles at once.

        Args:
            service: The participant's service name; the schema unless
                ``participant_schema`` is set.
        """
        from sagaflow.store.postgres_participant import PostgresParticipantStore

        return PostgresParticipantStore(
            self.database_url,
            schema=self.participant_schema_for(service),
            max_size=self.worker_concurrency,
        )
