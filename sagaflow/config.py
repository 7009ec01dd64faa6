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

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sagaflow.core.messages import DEFAULT_MAX_MESSAGE_BYTES
from sagaflow.core.ports import Topology
from sagaflow.core.signing import Keys

if TYPE_CHECKING:
    from sagaflow.store.postgres import PostgresSagaStore
    from sagaflow.store.postgres_participant import PostgresParticipantStore
    from sagaflow.transport.rabbitmq import RabbitMQTransport

__all__ = ["LogFormat", "Settings", "redact_url"]

LogFormat = Literal["json", "console"]

MASK = "******"
_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "secret", "token", "sslpassword"})


def redact_url(url: str) -> str:
    """``url`` with its password (in the user info or the query string) masked.

    Example:
        ``redact_url("amqp://guest:guest@host/")`` is ``"amqp://guest:******@host/"``.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return MASK  # unparseable: it may hold anything, show nothing
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        netloc = f"{user}:{MASK}@{hostinfo}" if colon else netloc
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in _SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode(
                [(k, MASK if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                safe="*",
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def _default_log_format() -> LogFormat:
    # people read a terminal; machines (log shippers) read everything else
    return "console" if sys.stdout.isatty() else "json"


class Settings(BaseSettings):
    """Everything a coordinator, worker or CLI invocation is configured with.

    Each field reads ``SAGAFLOW_<FIELD>`` (case-insensitive), except
    ``db_schema`` which reads ``SAGAFLOW_SCHEMA``.

    Attributes:
        amqp_url: The RabbitMQ URL, vhost included.
        database_url: The PostgreSQL URL.
        db_schema: The coordinator's schema (env ``SAGAFLOW_SCHEMA``).
        prefix: The broker namespace: exchanges and queues are ``<prefix>.*``.
        delivery_limit: Deliveries of one message before it is dead-lettered.
        max_message_bytes: Larger messages are refused or dead-lettered.
        coordinator_max_batch: Replies handled per coordinator transaction at most.
        coordinator_prefetch: Unacknowledged replies a coordinator holds at most.
        coordinator_concurrency: Reply batches a coordinator handles at once.
        coordinator_timer_interval: Seconds between scans for due timers.
        worker_prefetch: Unacknowledged commands a worker holds at most.
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
        log_format: ``json`` or ``console``; by default console on a terminal.
        log_level: A ``logging`` level name.
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
    max_message_bytes: int = Field(default=DEFAULT_MAX_MESSAGE_BYTES, ge=1024)

    coordinator_max_batch: int = Field(default=200, ge=1)
    coordinator_prefetch: int = Field(default=400, ge=1)
    coordinator_concurrency: int = Field(default=2, ge=1)
    coordinator_timer_interval: float = Field(default=0.25, gt=0)

    worker_prefetch: int = Field(default=200, ge=1)
    worker_concurrency: int = Field(default=8, ge=1)
    worker_max_batch: int = Field(default=16, ge=1, le=64)

    signing_keys: SecretStr | None = None
    participant_schema: str | None = None
    jaeger_url: str | None = None
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    log_format: LogFormat = Field(default_factory=_default_log_format)
    log_level: str = "INFO"

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
            try:
                parts = urlsplit(url)
                password = parts.password
                pairs = parse_qsl(parts.query)
            except ValueError:
                continue
            if password:
                found.extend({password, unquote(password)})
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
            connection_name=connection_name,
            keys=self.keys(),
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
