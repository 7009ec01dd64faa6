"""``sagaflow broker users`` and ``sagaflow broker declare``: least-privilege RabbitMQ.

Each process gets a RabbitMQ user of its own that may touch only what its role
needs (``<p>`` is ``SAGAFLOW_PREFIX``)::

    role          configure  write                        read
    coordinator   nothing    <p>.commands, <p>.dlx        <p>.replies
    <service>     nothing    <p>.replies, <p>.dlx         <p>.service.<service>
    operator      nothing    <p>.commands, <p>.replies    <p>.dead-letter

No role configures anything: an administrator declares the exchanges, queues
and bindings once (``sagaflow broker declare``), and the processes run with
``SAGAFLOW_DECLARE_TOPOLOGY=false``, which only checks them with passive
declares (RabbitMQ asks no permission for those). Binding needs ``read`` on the
exchange, so a worker that could bind its own queue to the commands exchange
could also bind it with another service's routing key and read its commands.
``tests/integration/test_broker_users.py`` shows each grant is needed and that
nothing else is allowed; docs/security.md explains them.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import shlex
import subprocess
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import orjson
import typer
from rich.table import Table

from sagaflow.cli.common import (
    CliError,
    UsageProblem,
    current_settings,
    echo_json,
    guarded,
    run_async,
    stdout_console,
)
from sagaflow.cli.resolve import load_sagas, split_specs
from sagaflow.config import Settings
from sagaflow.core.ports import Topology

__all__ = [
    "BrokerUser",
    "app",
    "apply",
    "declare",
    "definitions",
    "password_hash",
    "read_password_file",
    "roles",
    "script",
    "user_url",
    "users",
    "with_passwords",
]

app = typer.Typer(
    name="broker",
    help="Provision RabbitMQ: least-privilege users per process, and the topology.",
    no_args_is_help=True,
)

_CONNECTION = "sagaflow-cli"
_NOTHING = "^$"
_RESERVED = frozenset({"coordinator", "operator"})


@dataclass(frozen=True)
class BrokerUser:
    """One RabbitMQ user and its permissions on one virtual host.

    Attributes:
        role: ``coordinator``, ``operator``, ``admin`` or ``service:<name>``.
        user: The RabbitMQ user name.
        configure: Regular expression of the resources it may declare and delete.
        write: ... it may publish to (exchanges) and bind to (queues).
        read: ... it may consume or get from (queues) and bind from (exchanges).
        tags: RabbitMQ user tags (``administrator`` for the admin only).
        password: Its password; empty until assigned.
    """

    role: str
    user: str
    configure: str
    write: str
    read: str
    tags: tuple[str, ...] = ()
    password: str = ""


def _only(*names: str) -> str:
    """A permission regex matching exactly ``names`` (RabbitMQ searches, so anchor it)."""
    if not names:
        return _NOTHING
    escaped = [re.escape(name) for name in names]
    return f"^{escaped[0]}$" if len(escaped) == 1 else f"^({'|'.join(escaped)})$"


def roles(
    topology: Topology,
    services: Iterable[str],
    *,
    user_prefix: str | None = None,
    admin: str | None = None,
) -> list[BrokerUser]:
    """The users of a deployment: coordinator, operator, one per service (and an admin).

    Args:
        topology: The broker namespace the processes use.
        services: The participant services (each gets a user and reads only its queue).
        user_prefix: User names are ``<user_prefix>-<role>``; the topology's prefix
            by default.
        admin: Also an administrator of this name: everything on the vhost and
            the ``administrator`` tag, for ``sagaflow broker declare`` and the
            management UI, never for a sagaflow process.

    Raises:
        ValueError: a service name would collide with another role's user.
    """
    t = topology
    prefix = user_prefix or t.prefix
    found = [
        BrokerUser(
            "coordinator",
            f"{prefix}-coordinator",
            configure=_NOTHING,
            # the relay publishes commands; a reply that cannot be handled is dead-lettered
            write=_only(t.commands_exchange, t.dead_letter_exchange),
            read=_only(t.replies_queue),
        ),
        BrokerUser(
            "operator",
            f"{prefix}-operator",
            configure=_NOTHING,
            # `sagaflow dlq replay` re-publishes to where a dead letter came from
            write=_only(t.commands_exchange, t.replies_exchange),
            read=_only(t.dead_letter_queue),
        ),
    ]
    for service in sorted(set(services)):
        if service in _RESERVED:
            raise ValueError(f"a service named {service!r} would share the {service}'s user")
        found.append(
            BrokerUser(
                f"service:{service}",
                f"{prefix}-{service}",
                configure=_NOTHING,
                write=_only(t.replies_exchange, t.dead_letter_exchange),
                read=_only(t.service_queue(service)),
            )
        )
    if admin:
        found.append(BrokerUser("admin", admin, ".*", ".*", ".*", tags=("administrator",)))
    return found


def with_passwords(
    found: Sequence[BrokerUser], known: dict[str, str], *, generate: Callable[[], str] | None = None
) -> list[BrokerUser]:
    """``found`` with passwords: from ``known`` (by user name), else generated."""
    make = generate or _new_password
    return [replace(user, password=known.get(user.user) or make()) for user in found]


def _new_password() -> str:
    while True:  # 192 random bits; a leading "-" would read as an option to rabbitmqctl
        password = secrets.token_urlsafe(24)
        if not password.startswith("-"):
            return password


def read_password_file(path: Path) -> dict[str, str]:
    """``user=password`` lines (``#`` comments and blank lines ignored).

    Raises:
        UsageProblem: a line is not ``user=password``.
    """
    known: dict[str, str] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, equals, password = line.partition("=")
        if not equals or not user.strip() or not password:
            raise UsageProblem(f"{path}:{number}: expected user=password")
        known[user.strip()] = password
    return known


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256`` of ``password``, for definitions.

    Base64 of a 4-byte salt followed by SHA-256(salt + password).
    """
    salt = os.urandom(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def definitions(found: Sequence[BrokerUser], vhost: str) -> dict[str, Any]:
    """A RabbitMQ definitions document with these users, their permissions and the vhost.

    Load it with ``load_definitions`` in ``rabbitmq.conf`` (the compose file does)
    or ``rabbitmqctl import_definitions``. It holds password hashes, not passwords.
    """
    return {
        "vhosts": [{"name": vhost}],
        "users": [
            {
                "name": user.user,
                "password_hash": password_hash(user.password),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": list(user.tags),
                "limits": {},
            }
            for user in found
        ],
        "permissions": [
            {
                "user": user.user,
                "vhost": vhost,
                "configure": user.configure,
                "write": user.write,
                "read": user.read,
            }
            for user in found
        ],
    }


def script(found: Sequence[BrokerUser], vhost: str, urls: dict[str, str]) -> str:
    """A bash script of ``rabbitmqctl`` commands making these users (idempotent)."""
    q = shlex.quote
    lines = [
        "#!/usr/bin/env bash",
        "# sagaflow's RabbitMQ users (`sagaflow broker users`). It holds passwords:",
        "# run it as root on the broker's host (rabbitmqctl must reach the node), then",
        "# delete it. Passwords go through stdin, never the process list.",
        "set -euo pipefail",
        "set_user() {  # user password tags...",
        "    local user=$1 password=$2",
        "    shift 2",
        "    if rabbitmqctl -q list_users --no-table-headers | awk '{print $1}' | grep -qxF -- \"$user\"; then",
        '        printf \'%s\' "$password" | rabbitmqctl -q change_password "$user" >/dev/null',
        "    else",
        '        printf \'%s\' "$password" | rabbitmqctl -q add_user "$user" >/dev/null',
        "    fi",
        '    rabbitmqctl -q set_user_tags "$user" "$@"',
        "}",
    ]
    for user in found:
        lines += [
            "",
            f"# {user.role}",
            f"set_user {q(user.user)} {q(user.password)} {' '.join(map(q, user.tags))}".rstrip(),
            f"rabbitmqctl -q set_permissions -p {q(vhost)} {q(user.user)} "
            f"{q(user.configure)} {q(user.write)} {q(user.read)}",
        ]
    lines += ["", "# SAGAFLOW_AMQP_URL of each process (SAGAFLOW_DECLARE_TOPOLOGY=false):"]
    lines += [f"#   {user.role}: {urls[user.user]}" for user in found if user.role != "admin"]
    return "\n".join(lines) + "\n"


def apply(
    found: Sequence[BrokerUser], vhost: str, *, rabbitmqctl: Sequence[str] = ("rabbitmqctl",)
) -> None:
    """Create or update the users, their tags and permissions (and the vhost).

    One ``rabbitmqctl import_definitions``, fed on stdin: the passwords travel as
    hashes and never show in the process list, and users that exist get the new
    password and permissions (their permissions on other vhosts stay).

    Raises:
        CliError: ``rabbitmqctl`` failed.
    """
    document = orjson.dumps(definitions(found, vhost)).decode()
    try:
        done = subprocess.run(
            [*rabbitmqctl, "-q", "import_definitions"],
            input=document,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CliError(f"rabbitmqctl import_definitions failed: {exc}") from exc
    if done.returncode != 0:
        why = (done.stderr or done.stdout).strip().splitlines()
        raise CliError(
            f"rabbitmqctl import_definitions failed: {why[-1] if why else done.returncode}"
        )


def user_url(amqp_url: str, user: BrokerUser) -> str:
    """``amqp_url`` (scheme, host, port, vhost, TLS options) with ``user``'s credentials."""
    scheme, _, rest = amqp_url.partition("://")
    host = rest[rest.rfind("@") + 1 :]  # a password may hold "@" or "/"
    return f"{scheme}://{quote(user.user, safe='')}:{quote(user.password, safe='')}@{host}"


def _vhost_of(amqp_url: str) -> str:
    rest = amqp_url.partition("://")[2]
    after = rest[rest.rfind("@") + 1 :].split("?", 1)[0]
    path = after.partition("/")[2]
    return path.replace("%2F", "/").replace("%2f", "/") or "/"


def _service_names(services: Sequence[str] | None, sagas: Sequence[str] | None) -> list[str]:
    names = set(services or [])
    for saga in load_sagas(split_specs(sagas)) if sagas else []:
        names.update(saga.services)
    if not names:
        raise UsageProblem("name the services (SERVICE...) or their sagas (--saga MODULE:ATTR)")
    return sorted(names)


_SERVICES = typer.Argument(
    metavar="SERVICE...", help="Participant services (each gets a user and a queue)."
)
_SAGAS = typer.Option(
    "--saga", metavar="MODULE:ATTR", help="Also the services of these sagas (repeatable)."
)


@app.command("users")
@guarded
def users(
    services: Annotated[list[str] | None, _SERVICES] = None,
    sagas: Annotated[list[str] | None, _SAGAS] = None,
    vhost: Annotated[
        str | None, typer.Option("--vhost", help="Default: the vhost of SAGAFLOW_AMQP_URL.")
    ] = None,
    user_prefix: Annotated[
        str | None,
        typer.Option("--user-prefix", help="Users are <prefix>-<role>; default SAGAFLOW_PREFIX."),
    ] = None,
    admin: Annotated[
        str | None,
        typer.Option("--admin", metavar="USER", help="Also this administrator (full rights)."),
    ] = None,
    password_file: Annotated[
        Path | None,
        typer.Option(
            "--password-file",
            exists=True,
            dir_okay=False,
            help="user=password lines; users not in it get a generated password.",
        ),
    ] = None,
    do_apply: Annotated[
        bool, typer.Option("--apply", help="Run rabbitmqctl here instead of printing a script.")
    ] = False,
    output: Annotated[
        str,
        typer.Option(
            "--format",
            help="script (rabbitmqctl commands), definitions (RabbitMQ JSON), json.",
        ),
    ] = "script",
) -> None:
    """A RabbitMQ user per process with only the permissions its role needs.

    Prints a script of rabbitmqctl commands (default), RabbitMQ definitions, or
    JSON; with --apply runs rabbitmqctl and prints each user's password and
    SAGAFLOW_AMQP_URL, once. Run the processes with SAGAFLOW_DECLARE_TOPOLOGY=false
    after `sagaflow broker declare`.
    """
    if output not in ("script", "definitions", "json"):
        raise UsageProblem(f"--format must be script, definitions or json, not {output!r}")
    if do_apply and output == "definitions":
        raise UsageProblem("--apply runs rabbitmqctl; --format definitions prints a file instead")
    settings = current_settings()
    target = vhost or _vhost_of(settings.amqp_url)
    try:
        found = roles(
            settings.topology(),
            _service_names(services, sagas),
            user_prefix=user_prefix,
            admin=admin,
        )
    except ValueError as exc:
        raise UsageProblem(str(exc)) from exc
    known = read_password_file(password_file) if password_file else {}
    found = with_passwords(found, known)
    urls = {user.user: user_url(settings.amqp_url, user) for user in found}
    if do_apply:
        apply(found, target)
    if output == "definitions":
        echo_json(definitions(found, target))
        # the file holds hashes only: say the generated passwords once, apart
        for user in found:
            if user.user not in known:
                typer.echo(f"{user.user}={user.password}", err=True)
    elif output == "json":
        echo_json([_document(user, target, urls[user.user]) for user in found])
    elif do_apply:
        _print_table(found, urls)
    else:
        typer.echo(script(found, target, urls), nl=False)


def _document(user: BrokerUser, vhost: str, url: str) -> dict[str, Any]:
    return {
        "role": user.role,
        "user": user.user,
        "password": user.password,
        "vhost": vhost,
        "configure": user.configure,
        "write": user.write,
        "read": user.read,
        "tags": list(user.tags),
        "amqp_url": url,
    }


def _print_table(found: Sequence[BrokerUser], urls: dict[str, str]) -> None:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in ("ROLE", "USER", "CONFIGURE", "WRITE", "READ", "SAGAFLOW_AMQP_URL"):
        table.add_column(column, no_wrap=True)
    for user in found:
        table.add_row(user.role, user.user, user.configure, user.write, user.read, urls[user.user])
    stdout_console().print(table)
    typer.echo("the passwords are shown once: store them now", err=True)


@app.command("declare")
@guarded
def declare(
    services: Annotated[list[str] | None, _SERVICES] = None,
    sagas: Annotated[list[str] | None, _SAGAS] = None,
) -> None:
    """Declare the exchanges, queues and bindings (as an administrator; safe to repeat).

    Processes with least-privilege users cannot declare them: run this first,
    and again when a service is added, with SAGAFLOW_AMQP_URL of a user allowed
    to configure the vhost.
    """
    settings = current_settings()
    names = _service_names(services, sagas)
    run_async(_declare(settings, names))
    t = settings.topology()
    typer.echo(f"declared {t.prefix}.* with queues for {', '.join(names)}")


async def _declare(settings: Settings, services: list[str]) -> None:
    # whatever SAGAFLOW_DECLARE_TOPOLOGY says: declaring is this command's job
    broker = settings.model_copy(update={"declare_topology": True}).transport(
        connection_name=_CONNECTION
    )
    try:
        await broker.start(services)
    finally:
        await broker.close()
