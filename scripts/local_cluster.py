"""A throwaway cluster on this machine: three RabbitMQ nodes joined into one
cluster, and a PostgreSQL primary with a streaming standby. No Docker; Debian's
``rabbitmq-server`` and ``postgresql`` packages are enough.

Every server runs on its own free ports, node name and data directory under
one base directory; the machine's own RabbitMQ node and PostgreSQL cluster are
never touched. Run as root, the nodes run as the ``rabbitmq`` user (with its
Erlang cookie, so ``rabbitmqctl -n NODE`` reaches them) and PostgreSQL as
``postgres``.

From a shell::

    python -m scripts.local_cluster up --dir /tmp/sagaflow-cluster   # prints the URLs
    python -m scripts.local_cluster kill-node 1 --dir /tmp/sagaflow-cluster
    python -m scripts.local_cluster start-node 1 --dir /tmp/sagaflow-cluster
    python -m scripts.local_cluster promote --dir /tmp/sagaflow-cluster
    python -m scripts.local_cluster down --dir /tmp/sagaflow-cluster  # stops and removes all

From Python (the cluster fault scenarios and ``python -m bench --cluster``)::

    with RabbitCluster.started(base) as rabbit, PostgresPair.started(base) as pg:
        rabbit.amqp_url("vhost")     # amqp://guest:guest@127.0.0.1:P1,127.0.0.1:P2,.../vhost
        pg.database_url("db")        # postgresql://...:P1,...:P2/db?target_session_attrs=read-write

The nodes are kept small for a shared 2-core machine: one Erlang scheduler
each (``+S 1:1``), no busy-waiting schedulers, no plugins.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["PostgresPair", "RabbitCluster", "RabbitNode"]

RABBITMQ_BIN = Path(os.environ.get("SAGAFLOW_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
START_TIMEOUT = 120.0
ERL_ARGS = (
    "+S 1:1 +A 4 +sbwt none +sbwtdcpu none +sbwtdio none"
    " -kernel inet_dist_use_interface {127,0,0,1}"
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _as_user(user: str) -> list[str]:
    return ["runuser", "-u", user, "--"] if user and os.geteuid() == 0 else []


def _give(path: Path, user: str) -> None:
    if user and os.geteuid() == 0:
        shutil.chown(path, user, user)


def _run(argv: list[str], *, timeout: float = 120.0, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited {done.returncode}: {done.stderr or done.stdout}"
        )
    return done.stdout


# --------------------------------------------------------------------------- RabbitMQ


@dataclass
class RabbitNode:
    """One node of the cluster: its name, ports and directory."""

    index: int
    node: str
    port: int
    dist_port: int
    base: str
    user: str

    @property
    def dir(self) -> Path:
        return Path(self.base)

    def env(self) -> dict[str, str]:
        home = "/var/lib/rabbitmq" if self.user else str(Path.home())
        return {
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": home,  # the Erlang cookie every node and rabbitmqctl share
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "rabbitmq-env.conf"),  # not the machine's
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": ERL_ARGS,
            "ERL_CRASH_DUMP_SECONDS": "0",
        }

    def prepare(self) -> None:
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        (d / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\n"
            "vm_memory_high_watermark.absolute = 1GB\n"
            "disk_free_limit.absolute = 50MB\n"
            "log.console = false\n"
            "log.file.level = info\n"
        )
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq-env.conf").write_text("")
        for sub in ("mnesia", "log"):
            (d / sub).mkdir(exist_ok=True)
        for path in [d, *d.iterdir()]:
            _give(path, self.user)

    def ctl(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        """``rabbitmqctl -n NODE ARGS`` (or another tool: ``ctl(tool=...)``)."""
        return self.tool("rabbitmqctl", *args, timeout=timeout, check=check)

    def tool(self, name: str, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        home = self.env()["HOME"]
        argv = [*_as_user(self.user), "env", f"HOME={home}", str(RABBITMQ_BIN / name)]
        return _run([*argv, "-q", "-n", self.node, *args], timeout=timeout, check=check)

    def start(self) -> None:
        """Start the node in the background (its own session); returns at once."""
        out = (self.dir / "stdout").open("ab")
        subprocess.Popen(
            [*_as_user(self.user), str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self.env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.dir,
            start_new_session=True,
        )
        out.close()

    def wait_started(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            text = (self.dir / "stdout").read_text(errors="replace")
            if "BOOT FAILED" in text or time.monotonic() > deadline:
                raise RuntimeError(f"RabbitMQ node {self.node} did not start:\n{text[-3000:]}")
            time.sleep(0.3)
        self.ctl("await_startup", "--timeout", str(int(timeout)), timeout=timeout + 10)

    def pid(self) -> int | None:
        try:
            return int((self.dir / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: no goodbye to its peers or its clients."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        # the VM's helpers (erl_child_setup, inet_gethost) die with it; wait for the port
        deadline = time.monotonic() + 30
        while port_open(self.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(OSError):
            (self.dir / "pid").unlink()

    def stop(self) -> None:
        """A clean shutdown (``rabbitmqctl stop``), as a rolling upgrade does it."""
        self.ctl("stop", timeout=120, check=False)
        self.kill()  # whatever is left


@dataclass
class RabbitCluster:
    """Three (or ``size``) RabbitMQ nodes joined into one cluster."""

    nodes: list[RabbitNode] = field(default_factory=list)

    @classmethod
    def create(cls, base: Path, size: int = 3) -> RabbitCluster:
        user = "rabbitmq" if os.geteuid() == 0 else ""
        tag = uuid.uuid4().hex[:6]
        nodes = [
            RabbitNode(
                index=n,
                node=f"sagaflow{n}-{tag}@localhost",
                port=free_port(),
                dist_port=free_port(),
                base=str(base / f"rabbit{n}"),
                user=user,
            )
            for n in range(1, size + 1)
        ]
        return cls(nodes)

    @classmethod
    @contextlib.contextmanager
    def started(cls, base: Path | None = None, size: int = 3) -> Iterator[RabbitCluster]:
        """Start a cluster under ``base`` (a new temporary directory by default);
        stop and remove it after."""
        own = base is None
        root = Path(base or tempfile.mkdtemp(prefix="sagaflow-cluster-"))
        root.chmod(0o755)
        cluster = cls.create(root, size)
        try:
            cluster.start()
            yield cluster
        finally:
            cluster.destroy()
            if own:
                shutil.rmtree(root, ignore_errors=True)

    def start(self) -> None:
        """Start every node and join the others to the first."""
        for node in self.nodes:
            node.prepare()
            node.start()
        for node in self.nodes:
            node.wait_started()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.node)
            node.ctl("start_app")
        self.wait_members(len(self.nodes))

    def running(self, via: RabbitNode | None = None) -> list[str]:
        """The node names the cluster reports running."""
        for node in [via] if via else self.nodes:
            if not port_open(node.port):
                continue
            out = node.ctl("cluster_status", "--formatter", "json", check=False, timeout=60)
            with contextlib.suppress(ValueError):
                running: list[str] = json.loads(out).get("running_nodes", [])
                return running
        return []

    def wait_members(self, count: int, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while len(self.running()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster has {self.running()} running, not {count}")
            time.sleep(0.5)

    def node(self, name: str) -> RabbitNode:
        return next(n for n in self.nodes if n.node == name)

    def up(self) -> list[RabbitNode]:
        return [n for n in self.nodes if port_open(n.port)]

    def amqp_url(self, vhost: str = "", *, user: str = "guest", password: str = "guest") -> str:
        """One URL naming every node: ``amqp://user:pw@host1:p1,host2:p2,.../vhost``."""
        hosts = ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)
        return f"amqp://{user}:{password}@{hosts}/{vhost}"

    def add_vhost(self, vhost: str) -> None:
        node = self.up()[0]
        node.ctl("add_vhost", vhost)
        node.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")

    def queue_leaders(self, vhost: str) -> dict[str, str]:
        """Each quorum queue's leader node, by queue name."""
        out = self.up()[0].ctl(
            "list_queues", "-p", vhost, "name", "leader", "--formatter", "json", timeout=60
        )
        return {row["name"]: row["leader"] for row in json.loads(out) if row.get("leader")}

    def wait_not_quorum_critical(self, node: RabbitNode, timeout: float = 120.0) -> float:
        """Wait until ``node`` may be stopped without a queue losing its majority
        (its restarted peer has caught up); returns the seconds waited."""
        started = time.monotonic()
        while True:
            done = subprocess.run(
                [
                    *_as_user(node.user),
                    "env",
                    f"HOME={node.env()['HOME']}",
                    str(RABBITMQ_BIN / "rabbitmq-queues"),
                    "-q",
                    "-n",
                    node.node,
                    "check_if_node_is_quorum_critical",
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            if done.returncode == 0:
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"{node.node} still quorum critical: {done.stdout}{done.stderr}")
            time.sleep(0.5)

    def destroy(self) -> None:
        for node in self.nodes:
            node.kill()
            shutil.rmtree(node.dir, ignore_errors=True)


# --------------------------------------------------------------------------- PostgreSQL


def pg_bin() -> Path:
    given = os.environ.get("SAGAFLOW_TEST_PG_BIN")
    if given:
        return Path(given)
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    if initdb is None:
        raise RuntimeError("no initdb: install PostgreSQL or set SAGAFLOW_TEST_PG_BIN")
    return Path(initdb).parent


@dataclass
class PostgresPair:
    """A throwaway PostgreSQL primary and its streaming standby.

    Args:
        synchronous: the primary waits for the standby to have each commit
            (``synchronous_standby_names = '*'``, ``synchronous_commit = on``)
            before it acknowledges it: a failover loses nothing acknowledged.
            Off, a commit is acknowledged once on the primary's disk, and the
            last ones may be missing on the standby after a crash.
        standby: False: the primary alone (a throwaway server of one's own).
    """

    base: str
    primary_port: int
    standby_port: int
    synchronous: bool = True
    user: str = ""
    promoted: bool = False
    standby: bool = True

    @property
    def primary_dir(self) -> Path:
        return Path(self.base) / "primary"

    @property
    def standby_dir(self) -> Path:
        return Path(self.base) / "standby"

    @classmethod
    def create(cls, base: Path, *, synchronous: bool = True, standby: bool = True) -> PostgresPair:
        return cls(
            base=str(base / "postgres"),
            primary_port=free_port(),
            standby_port=free_port(),
            synchronous=synchronous and standby,
            user="postgres" if os.geteuid() == 0 else "",
            standby=standby,
        )

    @classmethod
    @contextlib.contextmanager
    def started(
        cls, base: Path | None = None, *, synchronous: bool = True, standby: bool = True
    ) -> Iterator[PostgresPair]:
        own = base is None
        root = Path(base or tempfile.mkdtemp(prefix="sagaflow-cluster-"))
        root.chmod(0o755)
        pair = cls.create(root, synchronous=synchronous, standby=standby)
        try:
            pair.start()
            yield pair
        finally:
            pair.destroy()
            if own:
                shutil.rmtree(root, ignore_errors=True)

    def _pg(self, tool: str, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        return _run(
            [*_as_user(self.user), str(pg_bin() / tool), *args], timeout=timeout, check=check
        )

    def start(self) -> None:
        base = Path(self.base)
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        _give(base, self.user)
        self._pg("initdb", "-A", "trust", "-U", "postgres", str(self.primary_dir), timeout=180)
        sync = "'*'" if self.synchronous else "''"
        with (self.primary_dir / "postgresql.conf").open("a") as conf:
            conf.write(
                "listen_addresses = '127.0.0.1'\n"
                f"port = {self.primary_port}\n"
                f"unix_socket_directories = '{base}'\n"
                "max_connections = 200\n"
                "shared_buffers = 64MB\n"
                "wal_level = replica\n"
                "max_wal_senders = 4\n"
                "wal_keep_size = 256MB\n"
                "hot_standby = on\n"
                f"synchronous_standby_names = {sync}\n"
                "synchronous_commit = on\n"
            )
        (self.primary_dir / "pg_hba.conf").write_text(
            "local all all trust\n"
            "host all all 127.0.0.1/32 trust\n"
            "host replication all 127.0.0.1/32 trust\n"
        )
        self._pg_ctl(self.primary_dir, "start")
        if not self.standby:
            return
        self._pg(
            "pg_basebackup",
            *("-h", "127.0.0.1", "-p", str(self.primary_port), "-U", "postgres"),
            *("-D", str(self.standby_dir), "-R", "-X", "stream", "-c", "fast"),
            timeout=180,
        )
        with (self.standby_dir / "postgresql.conf").open("a") as conf:
            # the last setting wins: its own port, and once promoted it waits for no standby
            conf.write(f"port = {self.standby_port}\nsynchronous_standby_names = ''\n")
        self._pg_ctl(self.standby_dir, "start")
        self.wait_streaming()

    def _pg_ctl(self, data: Path, *args: str, check: bool = True) -> str:
        log = Path(self.base) / f"{data.name}.log"
        return self._pg(
            "pg_ctl", "-D", str(data), "-l", str(log), "-w", "-t", "90", *args,
            timeout=120, check=check,
        )  # fmt: skip

    def _psql(self, port: int, sql: str) -> str:
        return self._pg(
            "psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres",
            "-Atc", sql, timeout=60,
        ).strip()  # fmt: skip

    def wait_streaming(self, timeout: float = 60.0) -> None:
        want = "sync" if self.synchronous else "async"
        deadline = time.monotonic() + timeout
        while True:
            state = self._psql(self.primary_port, "SELECT sync_state FROM pg_stat_replication")
            if state == want:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the standby is not streaming ({want}): {state!r}")
            time.sleep(0.3)

    def database_url(self, database: str = "postgres") -> str:
        """A URL naming both servers; only the one accepting writes is used."""
        if not self.standby:
            return self.primary_url(database)
        hosts = f"127.0.0.1:{self.primary_port},127.0.0.1:{self.standby_port}"
        return f"postgresql://postgres@{hosts}/{database}?target_session_attrs=read-write"

    def primary_url(self, database: str = "postgres") -> str:
        port = self.standby_port if self.promoted else self.primary_port
        return f"postgresql://postgres@127.0.0.1:{port}/{database}"

    def create_database(self, name: str) -> None:
        self._psql(self.primary_port, f'CREATE DATABASE "{name}"')

    def stop_primary(self, mode: str = "immediate") -> None:
        """Stop the primary: ``immediate`` is a crash (no checkpoint), ``fast`` a clean stop."""
        self._pg_ctl(self.primary_dir, "-m", mode, "stop")

    def promote(self) -> None:
        """Make the standby the primary (what a failover manager such as Patroni does)."""
        self._pg_ctl(self.standby_dir, "promote")
        self.promoted = True

    def destroy(self) -> None:
        for data in (self.primary_dir, self.standby_dir):
            if (data / "postmaster.pid").exists():
                self._pg_ctl(data, "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.base, ignore_errors=True)


# --------------------------------------------------------------------------- CLI


def _state_path(base: Path) -> Path:
    return base / "cluster.json"


def _load(base: Path) -> tuple[RabbitCluster | None, PostgresPair | None]:
    state = json.loads(_state_path(base).read_text())
    rabbit = (
        RabbitCluster([RabbitNode(**n) for n in state["rabbitmq"]]) if state["rabbitmq"] else None
    )
    pg = PostgresPair(**state["postgres"]) if state["postgres"] else None
    return rabbit, pg


def _save(base: Path, rabbit: RabbitCluster | None, pg: PostgresPair | None) -> None:
    state = {
        "rabbitmq": [asdict(n) for n in rabbit.nodes] if rabbit else [],
        "postgres": asdict(pg) if pg else None,
    }
    _state_path(base).write_text(json.dumps(state, indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.local_cluster", description=__doc__)
    p.add_argument(
        "command", choices=["up", "down", "status", "kill-node", "start-node", "promote"]
    )
    p.add_argument("node", nargs="?", type=int, help="kill-node / start-node: 1, 2 or 3")
    p.add_argument("--dir", type=Path, default=Path("/tmp/sagaflow-cluster"))
    p.add_argument("--no-rabbitmq", action="store_true")
    p.add_argument("--no-postgres", action="store_true")
    p.add_argument("--async-replication", action="store_true")
    args = p.parse_args(argv)
    base: Path = args.dir
    if args.command == "up":
        if _state_path(base).exists():
            print(f"{base} holds a cluster already: `down` first", file=sys.stderr)
            return 1
        base.mkdir(parents=True, exist_ok=True)
        base.chmod(0o755)
        rabbit = None if args.no_rabbitmq else RabbitCluster.create(base)
        pg = (
            None
            if args.no_postgres
            else PostgresPair.create(base, synchronous=not args.async_replication)
        )
        _save(base, rabbit, pg)
        began = time.monotonic()
        if rabbit:
            rabbit.start()
        if pg:
            pg.start()
        _save(base, rabbit, pg)
        print(f"# up in {time.monotonic() - began:.0f}s", file=sys.stderr)
        if rabbit:
            print(f"SAGAFLOW_AMQP_URL={rabbit.amqp_url()}")
        if pg:
            print(f"SAGAFLOW_DATABASE_URL={pg.database_url()}")
        return 0
    if not _state_path(base).exists():
        print(f"no cluster in {base}", file=sys.stderr)
        return 1
    rabbit, pg = _load(base)
    if args.command == "down":
        if rabbit:
            rabbit.destroy()
        if pg:
            pg.destroy()
        shutil.rmtree(base, ignore_errors=True)
        return 0
    if args.command == "status":
        if rabbit:
            print("rabbitmq running:", rabbit.running())
        if pg:
            print("postgres:", pg.database_url(), "promoted" if pg.promoted else "")
        return 0
    if args.command == "promote":
        if pg is None:
            return 1
        pg.stop_primary()
        pg.promote()
        _save(base, rabbit, pg)
        return 0
    if rabbit is None or args.node is None:
        p.error("kill-node/start-node need a RabbitMQ cluster and a node number")
    node = rabbit.nodes[args.node - 1]
    if args.command == "kill-node":
        node.kill()
    else:
        node.start()
        node.wait_started()
    return 0


if __name__ == "__main__":
    sys.exit(main())
