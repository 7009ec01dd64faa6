"""TLS to RabbitMQ and PostgreSQL (issue 11), on throwaway servers of its own.

A session fixture makes a CA and certificates with openssl, starts a second
RabbitMQ node with only a TLS listener that requires client certificates, and
a PostgreSQL cluster that refuses plaintext (``tests/tls_servers.py``). The
machine's servers are not touched.

- sagaflow's own adapters connect with the URLs docs/security.md documents:
  ``amqps://...?cafile=&certfile=&keyfile=`` and
  ``postgresql://...?sslmode=verify-full&sslrootcert=``, built by ``Settings``
  with ``require_tls`` on: a publish/consume round trip and a started
  ``PostgresSagaStore``;
- a server certificate from an unknown CA, or no client certificate, fails;
- ``SAGAFLOW_REQUIRE_TLS`` refuses plaintext URLs at start-up.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from sagaflow import ConfigurationError, SagaflowError
from sagaflow.cli.app import app as cli
from sagaflow.config import Settings
from sagaflow.core.errors import TransportError
from sagaflow.core.messages import Envelope, MessageKind
from sagaflow.core.ports import Delivery, Topology
from sagaflow.store.migrate import migrate
from sagaflow.transport import RabbitMQTransport
from tests.tls_servers import (
    Certificates,
    TlsBroker,
    TlsPostgres,
    make_certificates,
    postgres_with_tls,
    rabbitmq_with_tls,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

TOPOLOGY = Topology(prefix="tls")


@pytest.fixture(scope="session")
def certificates() -> Iterator[Certificates]:
    # not pytest's tmp_path: the servers' users (rabbitmq, postgres) must read them
    base = Path(tempfile.mkdtemp(prefix="sagaflow-tls-certs-"))
    base.chmod(0o755)
    try:
        yield make_certificates(base / "certs")
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def tls_broker(certificates: Certificates) -> Iterator[TlsBroker]:
    with rabbitmq_with_tls(certificates) as broker:
        yield broker


@pytest.fixture(scope="session")
def tls_postgres(certificates: Certificates) -> Iterator[TlsPostgres]:
    with postgres_with_tls(certificates) as server:
        yield server


@pytest.fixture
def no_sagaflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings from the test's arguments only, not the environment running it."""
    import os

    for name in [n for n in os.environ if n.startswith(("SAGAFLOW_", "PGSSL"))]:
        monkeypatch.delenv(name)


def command() -> Envelope:
    saga = f"saga-{uuid.uuid4().hex[:8]}"
    return Envelope(
        message_id=f"{saga}:reserve:command:1",
        command_id=f"{saga}:reserve:command",
        saga_id=saga,
        saga_name="tls",
        step="reserve",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="inventory.reserve",
        payload={"sku": "A-1"},
    )


# --------------------------------------------------------------------------- it works


@pytest.fixture
async def tls_settings(
    tls_broker: TlsBroker, tls_postgres: TlsPostgres, no_sagaflow_env: None
) -> AsyncIterator[Settings]:
    settings = Settings(
        amqp_url=tls_broker.url(),
        database_url=tls_postgres.url(sslmode="verify-full"),
        prefix=TOPOLOGY.prefix,
        require_tls=True,
    )
    yield settings


async def test_publish_and_consume_over_amqps(tls_settings: Settings) -> None:
    transport = tls_settings.transport(connection_name="tls-test")
    started = time.monotonic()
    await transport.start(["inventory"])
    try:
        seen: asyncio.Queue[Delivery] = asyncio.Queue()
        await transport.consume(TOPOLOGY.service_queue("inventory"), seen.put_nowait, prefetch=1)
        sent = command()
        await transport.publish([sent])
        delivery = await asyncio.wait_for(seen.get(), 15)
        await delivery.ack()
        assert sent.message_id.encode() in delivery.body
        assert delivery.queue == TOPOLOGY.service_queue("inventory")
    finally:
        await transport.close()
    assert time.monotonic() - started < 15


async def test_saga_store_starts_over_verify_full(tls_settings: Settings) -> None:
    await migrate(tls_settings.database_url, "tls")
    store = tls_settings.model_copy(update={"db_schema": "tls"}).saga_store()
    await store.start()
    await store.close()
    conn = await asyncpg.connect(tls_settings.database_url)
    try:
        row = await conn.fetchrow(
            "SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )
    finally:
        await conn.close()
    assert row is not None and row["ssl"] is True, row
    assert str(row["version"]).startswith("TLSv1.")


# --------------------------------------------------------------------------- it refuses


async def test_a_broker_certificate_from_another_ca_is_refused_at_once(
    tls_broker: TlsBroker,
) -> None:
    transport = RabbitMQTransport(tls_broker.url(cafile=tls_broker.certs.other_ca), TOPOLOGY)
    started = time.monotonic()
    # a setting to fix, not a broker to wait for: start() does not retry it
    with pytest.raises((ConfigurationError, TransportError), match="CERTIFICATE_VERIFY_FAILED"):
        await transport.start([])
    assert time.monotonic() - started < transport.start_timeout / 2


async def test_the_broker_refuses_a_client_without_certificate(tls_broker: TlsBroker) -> None:
    transport = RabbitMQTransport(tls_broker.url(client_cert=False), TOPOLOGY, start_timeout=3)
    # TLS 1.3 checks the client's certificate after the client's side of the
    # handshake is done: the broker's "certificate required" alert and its close
    # of the socket race, so the client reads one or the other (seen under load)
    with pytest.raises(TransportError, match=r"(?i)certificate|reset by peer"):
        await transport.start([])


async def test_plaintext_amqp_to_the_tls_port_fails(tls_broker: TlsBroker) -> None:
    url = f"amqp://guest:guest@localhost:{tls_broker.port}/"
    transport = RabbitMQTransport(url, TOPOLOGY, start_timeout=3, connect_timeout=2)
    with pytest.raises(TransportError):
        await transport.start([])


async def test_a_database_certificate_from_another_ca_is_refused(
    tls_postgres: TlsPostgres,
) -> None:
    url = tls_postgres.url(sslmode="verify-full", rootcert=tls_postgres.certs.other_ca)
    store = Settings(database_url=url).saga_store()
    with pytest.raises(SagaflowError, match="CERTIFICATE_VERIFY_FAILED"):
        await store.start()


async def test_the_database_refuses_plaintext(tls_postgres: TlsPostgres) -> None:
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="no encryption"):
        await asyncpg.connect(tls_postgres.url(sslmode="disable"))


# --------------------------------------------------------------------------- SAGAFLOW_REQUIRE_TLS

TLS_AMQP = "amqps://app:pw-1@broker:5671/?cafile=/etc/sagaflow/ca.pem"
TLS_PG = "postgresql://app:pw-2@db/app?sslmode=verify-full&sslrootcert=/etc/sagaflow/ca.pem"


@pytest.mark.usefixtures("no_sagaflow_env")
@pytest.mark.parametrize(
    ("amqp", "database", "complaint"),
    [
        ("amqp://app:pw-1@broker/", TLS_PG, "SAGAFLOW_AMQP_URL is not amqps://"),
        (TLS_AMQP, "postgresql://app:pw-2@db/app", "sslmode=prefer"),
        (TLS_AMQP, "postgresql://app:pw-2@db/app?sslmode=prefer", "sslmode=prefer"),
        (TLS_AMQP, "postgresql://app:pw-2@db/app?sslmode=allow", "sslmode=allow"),
        (TLS_AMQP, "postgresql://app:pw-2@db/app?sslmode=disable", "sslmode=disable"),
    ],
)
def test_require_tls_refuses_plaintext_urls(amqp: str, database: str, complaint: str) -> None:
    with pytest.raises(ConfigurationError, match="SAGAFLOW_REQUIRE_TLS") as raised:
        Settings(amqp_url=amqp, database_url=database, require_tls=True)
    assert complaint in str(raised.value)
    assert "pw-1" not in str(raised.value) and "pw-2" not in str(raised.value)
    Settings(amqp_url=amqp, database_url=database)  # without it, allowed as before


@pytest.mark.usefixtures("no_sagaflow_env")
@pytest.mark.parametrize("mode", ["require", "verify-ca", "verify-full"])
def test_require_tls_accepts_encrypted_urls(mode: str) -> None:
    database = f"postgresql://app:pw@db/app?sslmode={mode}&sslrootcert=/ca.pem"
    settings = Settings(amqp_url=TLS_AMQP, database_url=database, require_tls=True)
    assert settings.require_tls


def test_require_tls_reads_pgsslmode_like_asyncpg(
    no_sagaflow_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGSSLMODE", "verify-full")
    Settings(amqp_url=TLS_AMQP, database_url="postgresql://app@db/app", require_tls=True)


def test_require_tls_fails_a_command_at_start_with_exit_code_2() -> None:
    env = {
        "SAGAFLOW_REQUIRE_TLS": "true",
        "SAGAFLOW_AMQP_URL": "amqp://app:hunter2@broker/",
        "SAGAFLOW_DATABASE_URL": "postgresql://app:hunter2@db/app",
    }
    done = CliRunner().invoke(cli, ["db", "migrate"], env=env)
    assert done.exit_code == 2, done.output
    assert "SAGAFLOW_REQUIRE_TLS" in done.output and "hunter2" not in done.output
