"""Throwaway TLS servers for tests: a CA and certificates (openssl), a second
RabbitMQ node with only a TLS listener, and a PostgreSQL with ``ssl = on`` that
refuses plaintext.

Each runs on its own free ports, in its own temporary directory, with its own
node name; the machine's RabbitMQ and PostgreSQL are not touched. Run as root
(as the machine's servers do), the node runs as the ``rabbitmq`` user with
that user's Erlang cookie and PostgreSQL as ``postgres``; otherwise both run as
the current user.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Certificates", "make_certificates", "postgres_with_tls", "rabbitmq_with_tls"]

RABBITMQ_BIN = Path(os.environ.get("SAGAFLOW_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
START_TIMEOUT = 90.0


@dataclass(frozen=True)
class Certificates:
    """PEM files: a CA, a server certificate for localhost and 127.0.0.1, a client
    certificate, and a second CA that signed neither."""

    directory: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certificates(directory: Path) -> Certificates:
    """Create the CA and certificates in ``directory`` (readable by every user: the
    servers run as their own users, so it must not be under a private directory
    such as pytest's ``tmp_path``)."""
    d = directory
    d.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        _openssl(
            *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2"),
            *("-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-subj", f"/CN=sagaflow test {ca}"),
            cwd=d,
        )
    extensions = {
        "server": "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        "client": "extendedKeyUsage=clientAuth\n",
    }
    for name, ext in extensions.items():
        (d / f"{name}.ext").write_text(ext)
        _openssl(
            *("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key"),
            *("-out", f"{name}.csr", "-subj", f"/CN={'localhost' if name == 'server' else name}"),
            cwd=d,
        )
        _openssl(
            *("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key"),
            *("-CAcreateserial", "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext"),
            cwd=d,
        )
    d.chmod(0o755)
    for path in d.iterdir():
        path.chmod(0o644)  # test keys: the servers' users must read them
    return Certificates(
        directory=d,
        ca=d / "ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other-ca.pem",
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _as_user(user: str) -> list[str]:
    """The command prefix that runs as ``user`` when we are root (else nothing)."""
    return ["runuser", "-u", user, "--"] if os.geteuid() == 0 else []


def _give(path: Path, user: str) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, user, user)


# --------------------------------------------------------------------------- RabbitMQ


@dataclass(frozen=True)
class TlsBroker:
    """A running TLS-only RabbitMQ node."""

    node: str
    port: int
    certs: Certificates
    base: Path

    def url(self, *, cafile: Path | None = None, client_cert: bool = True, vhost: str = "") -> str:
        """``amqps://guest:guest@localhost:<port>/<vhost>?cafile=...&certfile=...&keyfile=...``."""
        query = [f"cafile={cafile or self.certs.ca}"]
        if client_cert:
            query += [f"certfile={self.certs.client_cert}", f"keyfile={self.certs.client_key}"]
        return f"amqps://guest:guest@localhost:{self.port}/{vhost}?{'&'.join(query)}"


@contextlib.contextmanager
def rabbitmq_with_tls(certs: Certificates) -> Iterator[TlsBroker]:
    """Start a second RabbitMQ node with only a TLS listener; stop and remove it after.

    The node requires a client certificate signed by the test CA
    (``fail_if_no_peer_cert``), as a production broker doing mutual TLS would.
    """
    user = "rabbitmq" if os.geteuid() == 0 else ""
    base = Path(tempfile.mkdtemp(prefix="sagaflow-tls-rabbitmq-"))
    base.chmod(0o755)
    node = f"sagaflowtls{uuid.uuid4().hex[:6]}@localhost"
    port, dist_port = free_port(), free_port()
    config = base / "rabbitmq.conf"
    config.write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.local = 127.0.0.1:{port}\n"
        f"ssl_options.cacertfile = {certs.ca}\n"
        f"ssl_options.certfile = {certs.server_cert}\n"
        f"ssl_options.keyfile = {certs.server_key}\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
    )
    (base / "enabled_plugins").write_text("[].\n")
    (base / "rabbitmq-env.conf").write_text("")
    for sub in ("mnesia", "log"):
        (base / sub).mkdir()
    home = Path("/var/lib/rabbitmq") if user else Path.home()
    env = {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),  # the Erlang cookie of the user running the node
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_NODE_PORT": str(free_port()),  # unused: no plaintext listener
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
        "RABBITMQ_LOG_BASE": str(base / "log"),
        "RABBITMQ_CONFIG_FILE": str(config),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(base / "advanced.config"),
        "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(base / "pid"),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "ERL_CRASH_DUMP_SECONDS": "0",  # a failed boot exits at once, leaving no dump
    }
    if user:
        for path in [base, *base.iterdir()]:
            _give(path, user)
    ctl = [*_as_user(user), "env", f"HOME={home}", str(RABBITMQ_BIN / "rabbitmqctl")]
    output = (base / "stdout").open("wb")
    process = subprocess.Popen(
        [*_as_user(user), str(RABBITMQ_BIN / "rabbitmq-server")],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
        cwd=base,
        start_new_session=True,  # its own process group: stopped whole below
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not _port_open(port):
            log = (base / "stdout").read_text(errors="replace")
            failed = "BOOT FAILED" in log or process.poll() is not None
            if failed or time.monotonic() > deadline:
                errors = [line for line in log.splitlines() if "[error]" in line][:12]
                raise RuntimeError(
                    "the TLS RabbitMQ node did not start:\n" + "\n".join(errors or [log[-2000:]])
                )
            time.sleep(0.3)
        yield TlsBroker(node=node, port=port, certs=certs, base=base)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run(
                [*ctl, "-q", "-n", node, "stop"], capture_output=True, timeout=60, check=False
            )
        _stop(process, base / "pid")
        output.close()
        shutil.rmtree(base, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes], pid_file: Path) -> None:
    """Make sure the node is gone (``rabbitmqctl stop`` did it, normally)."""
    with contextlib.suppress(OSError, ValueError):
        os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
    with contextlib.suppress(OSError):  # the group started for it: runuser, scripts, beam
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)


# --------------------------------------------------------------------------- PostgreSQL


def _pg_bin() -> Path:
    given = os.environ.get("SAGAFLOW_TEST_PG_BIN")
    if given:
        return Path(given)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version)
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("no initdb: install PostgreSQL or set SAGAFLOW_TEST_PG_BIN")
    return Path(initdb).parent


def _version(path: str) -> tuple[int, ...]:
    part = Path(path).parts[-3]
    return tuple(int(p) for p in part.split(".") if p.isdigit())


@dataclass(frozen=True)
class TlsPostgres:
    """A running PostgreSQL that takes TLS connections only."""

    port: int
    certs: Certificates

    def url(self, *, sslmode: str = "verify-full", rootcert: Path | None = None) -> str:
        """``postgresql://postgres@localhost:<port>/postgres?sslmode=...&sslrootcert=...``."""
        query = f"sslmode={sslmode}"
        if sslmode in ("verify-ca", "verify-full", "require"):
            query += f"&sslrootcert={rootcert or self.certs.ca}"
        return f"postgresql://postgres@localhost:{self.port}/postgres?{query}"


@contextlib.contextmanager
def postgres_with_tls(certs: Certificates) -> Iterator[TlsPostgres]:
    """``initdb`` a throwaway cluster with ``ssl = on`` (hostssl only); stop and remove it after."""
    user = "postgres" if os.geteuid() == 0 else ""
    bindir = _pg_bin()
    base = Path(tempfile.mkdtemp(prefix="sagaflow-tls-postgres-"))
    base.chmod(0o755)
    port = free_port()
    data = base / "data"
    # the server's key must belong to its user and be private, or PostgreSQL refuses it
    for name in ("server.pem", "server.key", "ca.pem"):
        shutil.copy(certs.directory / name, base / name)
    (base / "server.key").chmod(0o600)
    for path in [base, *base.iterdir()]:
        _give(path, user)
    as_pg = _as_user(user)
    subprocess.run(
        [*as_pg, str(bindir / "initdb"), "--no-sync", "-A", "trust", "-U", "postgres", str(data)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with (data / "postgresql.conf").open("a") as conf:
        conf.write(
            "listen_addresses = '127.0.0.1'\n"
            f"port = {port}\n"
            f"unix_socket_directories = '{base}'\n"
            "ssl = on\n"
            f"ssl_cert_file = '{base / 'server.pem'}'\n"
            f"ssl_key_file = '{base / 'server.key'}'\n"
            f"ssl_ca_file = '{base / 'ca.pem'}'\n"
            "fsync = off\n"
        )
    # TLS or nothing: a plaintext attempt (sslmode=disable, or prefer's fallback) is refused
    (data / "pg_hba.conf").write_text(
        "local all all trust\n"
        "hostssl all all 127.0.0.1/32 trust\n"
        "hostnossl all all 0.0.0.0/0 reject\n"
    )
    pg_ctl = [*as_pg, str(bindir / "pg_ctl"), "-D", str(data)]
    try:
        subprocess.run(
            [*pg_ctl, "-l", str(base / "log"), "-w", "-t", "60", "start"],
            check=True,
            capture_output=True,
            timeout=90,
        )
        yield TlsPostgres(port=port, certs=certs)
    finally:
        subprocess.run(
            [*pg_ctl, "-m", "immediate", "-w", "stop"], capture_output=True, timeout=90, check=False
        )
        shutil.rmtree(base, ignore_errors=True)
