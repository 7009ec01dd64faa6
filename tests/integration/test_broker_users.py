"""Least-privilege broker users (issue 11) on the real broker.

Each test gets a fresh vhost with the users of ``sagaflow.cli.broker.roles``
(imported as RabbitMQ definitions, the way the compose file loads them) and
the topology declared by the administrator (guest). Then:

- a coordinator and two workers run sagas to completion and to compensation
  with only those users, declaring nothing (``declare=False``) and stamping
  ``user_id``; the transport calls they make (publish, consume, dead_letter)
  and the operator's (peek, replay) all go through;
- every role is refused (ACCESS_REFUSED) what lies outside its grants;
- every grant is needed: with any one name taken out of a role's regex, the
  call that uses it is refused. Together: these permissions are the minimum.

``sagaflow broker users --apply`` (rabbitmqctl) and ``sagaflow broker declare``
are run as commands once. Users are global to the broker: every test removes
the ones it made.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import aio_pika
import pytest
from aiormq.exceptions import ChannelAccessRefused, ChannelPreconditionFailed
from pydantic import BaseModel
from typer.testing import CliRunner

from sagaflow import (
    Action,
    BusinessFailure,
    Coordinator,
    HandlerContext,
    Participant,
    RetryPolicy,
    Saga,
    SagaStatus,
    Step,
    Worker,
)
from sagaflow.cli.app import app as cli
from sagaflow.cli.broker import BrokerUser, definitions, roles, user_url, with_passwords
from sagaflow.core.errors import TransportError
from sagaflow.core.messages import Envelope, MessageKind, Outcome
from sagaflow.core.ports import Delivery, Topology
from sagaflow.store import PostgresParticipantStore, PostgresSagaStore
from sagaflow.store.migrate import migrate
from sagaflow.transport import RabbitMQTransport
from sagaflow.transport.amqp import RabbitMQDelivery

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

TOPOLOGY = Topology(prefix="lp", delivery_limit=3)
SERVICES = ("inventory", "payment")
WAIT = 15.0


def rabbitmqctl(*args: str, stdin: str | None = None) -> str:
    for attempt in range(3):  # a fault test may be restarting the broker: wait for it
        done = subprocess.run(
            ["rabbitmqctl", "-q", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        if done.returncode == 0 or attempt == 2:
            break
        subprocess.run(
            ["rabbitmqctl", "-q", "await_startup", "--timeout", "60"],
            capture_output=True,
            timeout=90,
            check=False,
        )
    assert done.returncode == 0, f"rabbitmqctl {args[0]}: {done.stderr}"
    return done.stdout


def delete_users(names: list[str]) -> None:
    for name in names:
        subprocess.run(["rabbitmqctl", "-q", "delete_user", name], capture_output=True, timeout=60)


def vhost_of(url: str) -> str:
    return unquote(urlsplit(url).path.lstrip("/"))


# --------------------------------------------------------------------------- fixtures


@dataclass
class Deployment:
    admin_url: str
    vhost: str
    users: dict[str, BrokerUser]  # by role
    urls: dict[str, str] = field(default_factory=dict)  # by role

    def transport(self, role: str, *, services: tuple[str, ...] = ()) -> RabbitMQTransport:
        user = self.users[role]
        return RabbitMQTransport(
            self.urls[role],
            TOPOLOGY,
            declare=False,
            user_id=user.user,
            publish_timeout=5,
            start_timeout=5,
            reconnect_delay=(0.1, 0.5),
            connection_name=f"lp-{role}",
        )

    def grant(self, role: str, configure: str, write: str, read: str) -> None:
        user = self.users[role].user
        rabbitmqctl("set_permissions", "-p", self.vhost, user, configure, write, read)


@pytest.fixture(scope="module")
def accounts() -> Iterator[list[BrokerUser]]:
    """The users, with passwords (global to the broker, so uniquely named)."""
    prefix = f"lp{uuid.uuid4().hex[:8]}"
    found = with_passwords(roles(TOPOLOGY, SERVICES, user_prefix=prefix), {})
    try:
        yield found
    finally:
        delete_users([user.user for user in found])


@pytest.fixture
async def deployment(amqp_url: str, accounts: list[BrokerUser]) -> AsyncIterator[Deployment]:
    vhost = vhost_of(amqp_url)
    document = json.dumps(definitions(accounts, vhost))
    await asyncio.to_thread(rabbitmqctl, "import_definitions", stdin=document)
    admin = RabbitMQTransport(amqp_url, TOPOLOGY)  # guest: the administrator declares
    await admin.start(list(SERVICES))
    await admin.close()
    yield Deployment(
        admin_url=amqp_url,
        vhost=vhost,
        users={user.role: user for user in accounts},
        urls={user.role: user_url(amqp_url, user) for user in accounts},
    )


# --------------------------------------------------------------------------- (a) it works


class Item(BaseModel):
    order: str
    amount: int


class Done(BaseModel):
    ref: str


reserve = Action("inventory", "reserve", Item, Done)
release = Action("inventory", "release", Item, Done)
charge = Action("payment", "charge", Item, Done)
refund = Action("payment", "refund", Item, Done)

inventory = Participant("inventory")
payment = Participant("payment")


@inventory.handler(reserve)
async def do_reserve(command: Item, ctx: HandlerContext) -> Done:
    return Done(ref=f"r-{command.order}")


@inventory.handler(release)
async def do_release(command: Item, ctx: HandlerContext) -> Done:
    return Done(ref=f"x-{command.order}")


@payment.handler(charge)
async def do_charge(command: Item, ctx: HandlerContext) -> Done:
    if command.amount > 100:
        raise BusinessFailure("over_limit")
    return Done(ref=f"c-{command.order}")


@payment.handler(refund)
async def do_refund(command: Item, ctx: HandlerContext) -> Done:
    return Done(ref=f"u-{command.order}")


ONCE = RetryPolicy(max_attempts=1)
order = Saga(
    "lp-order",
    data=Item,
    steps=[
        Step("reserve", reserve, lambda d: d, compensation=release, retry=ONCE, timeout=20),
        Step("charge", charge, lambda d: d, compensation=refund, retry=ONCE, timeout=20),
    ],
)


async def test_sagas_complete_and_compensate_with_least_privilege_users(
    deployment: Deployment, pg_url: str
) -> None:
    await migrate(pg_url)
    coordinator = Coordinator(
        [order],
        store=PostgresSagaStore(pg_url),
        transport=deployment.transport("coordinator"),
    )
    workers = [
        Worker(
            participant,
            transport=deployment.transport(f"service:{participant.service}"),
            store=PostgresParticipantStore(pg_url, schema=participant.service),
        )
        for participant in (inventory, payment)
    ]
    for worker in workers:
        await worker.start()
    await coordinator.start()
    try:
        ended = await asyncio.gather(
            coordinator.run_saga(order, Item(order="ok", amount=10), timeout=60),
            coordinator.run_saga(order, Item(order="no", amount=500), timeout=60),
        )
    finally:
        await coordinator.stop()
        for worker in workers:
            await worker.stop()
    assert [state.status for state in ended] == [SagaStatus.COMPLETED, SagaStatus.COMPENSATED]


def envelope(kind: MessageKind, service: str = "inventory") -> Envelope:
    saga = f"saga-{uuid.uuid4().hex[:8]}"
    command = Envelope(
        message_id=f"{saga}:reserve:command:1",
        command_id=f"{saga}:reserve:command",
        saga_id=saga,
        saga_name="lp-order",
        step="reserve",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type=f"{service}.reserve",
        payload={"order": "o", "amount": 1},
    )
    return command if kind is MessageKind.COMMAND else command.reply(Outcome.SUCCESS)


def user_id(delivery: Delivery) -> str | None:
    """The publisher's user as the broker validated it (see docs/security.md)."""
    assert isinstance(delivery, RabbitMQDelivery)
    return delivery.message.user_id


class Inbox:
    """A consumer callback that keeps what arrives, unsettled."""

    def __init__(self) -> None:
        self.seen: asyncio.Queue[Delivery] = asyncio.Queue()

    def __call__(self, delivery: Delivery) -> None:
        self.seen.put_nowait(delivery)

    async def next(self) -> Delivery:
        return await asyncio.wait_for(self.seen.get(), WAIT)


async def test_every_transport_call_of_each_role_is_allowed(deployment: Deployment) -> None:
    coordinator = deployment.transport("coordinator")
    worker = deployment.transport("service:inventory")
    operator = deployment.transport("operator")
    await coordinator.start(list(SERVICES))
    await worker.start(["inventory"])
    await operator.start([])
    try:
        replies, commands = Inbox(), Inbox()
        await coordinator.consume(TOPOLOGY.replies_queue, replies, prefetch=10)
        await worker.consume(TOPOLOGY.service_queue("inventory"), commands, prefetch=10)

        await coordinator.publish([envelope(MessageKind.COMMAND), envelope(MessageKind.COMMAND)])
        first, second = await commands.next(), await commands.next()
        assert user_id(first) == deployment.users["coordinator"].user
        await first.ack()
        await worker.dead_letter(second, "a poison command")

        await worker.publish([envelope(MessageKind.REPLY), envelope(MessageKind.REPLY)])
        reply, bad = await replies.next(), await replies.next()
        assert user_id(reply) == deployment.users["service:inventory"].user
        await reply.ack()
        await coordinator.dead_letter(bad, "a poison reply")

        letters = await operator.dead_letters()
        assert sorted(letter.source_queue for letter in letters) == sorted(
            [TOPOLOGY.service_queue("inventory"), TOPOLOGY.replies_queue]
        )
        await operator.replay_dead_letters()
        back = {(await commands.next()).queue, (await replies.next()).queue}
        assert back == {TOPOLOGY.service_queue("inventory"), TOPOLOGY.replies_queue}
    finally:
        for transport in (operator, worker, coordinator):
            await transport.close()


# --------------------------------------------------------------------------- (b) nothing else


Attempt = Callable[[aio_pika.abc.AbstractChannel], Awaitable[object]]


def publish_to(exchange: str, routing_key: str, **properties: str) -> Attempt:
    async def attempt(channel: aio_pika.abc.AbstractChannel) -> object:
        target = (
            channel.default_exchange
            if not exchange
            else await channel.get_exchange(exchange, ensure=False)
        )
        return await target.publish(
            aio_pika.Message(b"{}", **properties),  # type: ignore[arg-type]
            routing_key,
            mandatory=False,
        )

    return attempt


def consume(queue: str) -> Attempt:
    async def attempt(channel: aio_pika.abc.AbstractChannel) -> object:
        async def ignore(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            pass

        found = await channel.declare_queue(queue, passive=True)
        return await found.consume(ignore)

    return attempt


def get_from(queue: str) -> Attempt:
    async def attempt(channel: aio_pika.abc.AbstractChannel) -> object:
        found = await channel.declare_queue(queue, passive=True)
        return await found.get(fail=False)

    return attempt


def declare_exchange(name: str) -> Attempt:
    async def attempt(channel: aio_pika.abc.AbstractChannel) -> object:
        return await channel.declare_exchange(name, aio_pika.ExchangeType.DIRECT, durable=True)

    return attempt


def bind(queue: str, exchange: str, key: str) -> Attempt:
    async def attempt(channel: aio_pika.abc.AbstractChannel) -> object:
        found = await channel.declare_queue(queue, passive=True)
        return await found.bind(exchange, routing_key=key)

    return attempt


def delete_queue(queue: str) -> Attempt:
    async def attempt(channel: aio_pika.abc.AbstractChannel) -> object:
        return await channel.queue_delete(queue)

    return attempt


def purge(queue: str) -> Attempt:
    async def attempt(channel: aio_pika.abc.AbstractChannel) -> object:
        found = await channel.declare_queue(queue, passive=True)
        return await found.purge()

    return attempt


T = TOPOLOGY
INVENTORY, PAYMENT = T.service_queue("inventory"), T.service_queue("payment")
REFUSED: dict[str, list[tuple[str, Attempt]]] = {
    "service:inventory": [
        ("publish a command", publish_to(T.commands_exchange, "payment")),
        ("publish to another service's queue", publish_to("", PAYMENT)),
        ("publish to the replies queue directly", publish_to("", T.replies_queue)),
        ("consume another service's queue", consume(PAYMENT)),
        ("consume the replies queue", consume(T.replies_queue)),
        ("consume the dead letters", get_from(T.dead_letter_queue)),
        ("declare an exchange", declare_exchange(T.commands_exchange)),
        (
            "bind its queue to another service's commands",
            bind(INVENTORY, T.commands_exchange, "payment"),
        ),
        ("bind its queue to the replies", bind(INVENTORY, T.replies_exchange, "reply")),
        ("delete its queue", delete_queue(INVENTORY)),
        ("purge another service's queue", purge(PAYMENT)),
    ],
    "coordinator": [
        ("publish a reply", publish_to(T.replies_exchange, "reply")),
        ("publish to a service queue directly", publish_to("", INVENTORY)),
        ("consume a service queue", consume(INVENTORY)),
        ("consume the dead letters", get_from(T.dead_letter_queue)),
        ("declare an exchange", declare_exchange("lp.other")),
        ("delete the replies queue", delete_queue(T.replies_queue)),
    ],
    "operator": [
        ("consume a service queue", consume(INVENTORY)),
        ("consume the replies queue", consume(T.replies_queue)),
        ("publish to the dead-letter exchange", publish_to(T.dead_letter_exchange, "")),
        ("purge a service queue", purge(INVENTORY)),
    ],
}


@pytest.mark.parametrize("role", sorted(REFUSED))
async def test_each_role_is_refused_everything_else(deployment: Deployment, role: str) -> None:
    connection = await aio_pika.connect(deployment.urls[role])
    try:
        for what, attempt in REFUSED[role]:
            channel = await connection.channel(publisher_confirms=True)
            with pytest.raises(ChannelAccessRefused, match="ACCESS_REFUSED"):
                await attempt(channel)
                pytest.fail(f"{role} may {what}")
    finally:
        await connection.close()


async def test_the_broker_refuses_a_forged_user_id(deployment: Deployment) -> None:
    """What ``SAGAFLOW_AMQP_USER_ID`` relies on: a receiver may trust ``user_id``."""
    coordinator = deployment.users["coordinator"].user
    connection = await aio_pika.connect(deployment.urls["service:inventory"])
    try:
        channel = await connection.channel(publisher_confirms=True)
        with pytest.raises(ChannelPreconditionFailed, match="user_id property"):
            await publish_to(T.replies_exchange, "reply", user_id=coordinator)(channel)
    finally:
        await connection.close()


# --------------------------------------------------------------------------- (c) each grant is needed


@dataclass
class FakeDelivery:
    """Enough of a delivery for ``dead_letter`` (its non-RabbitMQ path)."""

    body: bytes
    queue: str
    headers: dict[str, str] = field(default_factory=dict)
    redelivered: bool = False

    async def ack(self) -> None:
        pass

    async def nack(self, requeue: bool = True) -> None:
        pass


async def consume_replies(d: Deployment) -> None:
    transport = d.transport("coordinator")
    await transport.start(list(SERVICES))
    try:
        await transport.consume(T.replies_queue, Inbox(), prefetch=1)
    finally:
        await transport.close()


async def publish_as(d: Deployment, role: str, kind: MessageKind) -> None:
    transport = d.transport(role)
    await transport.start([])
    try:
        await transport.publish([envelope(kind)])
    finally:
        await transport.close()


async def dead_letter_as(d: Deployment, role: str, source: str) -> None:
    transport = d.transport(role)
    await transport.start([])
    try:
        body = b'{"not": "an envelope"}'
        await transport.dead_letter(FakeDelivery(body, source), "poison")
    finally:
        await transport.close()


async def consume_commands(d: Deployment) -> None:
    transport = d.transport("service:inventory")
    await transport.start(["inventory"])
    try:
        await transport.consume(INVENTORY, Inbox(), prefetch=1)
    finally:
        await transport.close()


async def peek(d: Deployment) -> None:
    transport = d.transport("operator")
    await transport.start([])
    try:
        await transport.dead_letters()
    finally:
        await transport.close()


async def replay(d: Deployment, kind: MessageKind) -> None:
    admin = RabbitMQTransport(d.admin_url, TOPOLOGY)
    await admin.start([])
    try:  # a real dead letter, put there by the broker's own path
        source = INVENTORY if kind is MessageKind.COMMAND else T.replies_queue
        await admin.publish([envelope(kind)])
        inbox = Inbox()
        await admin.consume(source, inbox, prefetch=1)
        await admin.dead_letter(await inbox.next(), "poison")
    finally:
        await admin.close()
    transport = d.transport("operator")
    await transport.start([])
    try:
        await transport.replay_dead_letters()
    finally:
        await transport.close()


# (role, permission, resource): the call that needs exactly that grant
GRANTS: dict[tuple[str, str, str], Callable[[Deployment], Awaitable[None]]] = {
    ("coordinator", "read", T.replies_queue): consume_replies,
    ("coordinator", "write", T.commands_exchange): lambda d: publish_as(
        d, "coordinator", MessageKind.COMMAND
    ),
    ("coordinator", "write", T.dead_letter_exchange): lambda d: dead_letter_as(
        d, "coordinator", T.replies_queue
    ),
    ("service:inventory", "read", INVENTORY): consume_commands,
    ("service:inventory", "write", T.replies_exchange): lambda d: publish_as(
        d, "service:inventory", MessageKind.REPLY
    ),
    ("service:inventory", "write", T.dead_letter_exchange): lambda d: dead_letter_as(
        d, "service:inventory", INVENTORY
    ),
    ("operator", "read", T.dead_letter_queue): peek,
    ("operator", "write", T.commands_exchange): lambda d: replay(d, MessageKind.COMMAND),
    ("operator", "write", T.replies_exchange): lambda d: replay(d, MessageKind.REPLY),
}


def granted(role: str, permission: str) -> list[str]:
    return [name for (r, p, name) in GRANTS if (r, p) == (role, permission)]


def test_the_grants_listed_here_are_the_roles_permissions(accounts: list[BrokerUser]) -> None:
    """The table above is what ``roles`` grants, read the way RabbitMQ reads a regex."""
    names = {T.commands_exchange, T.replies_exchange, T.dead_letter_exchange, T.dead_letter_queue}
    names |= {INVENTORY, PAYMENT, "amq.default", "lp.other", "xlp.replies", "lp.replies.x"}
    for user in accounts:
        if user.role == "service:payment":
            continue  # the same as inventory's, for its own queue
        assert not any(re.search(user.configure, name) for name in names), user.role
        for permission in ("write", "read"):
            matched = {n for n in names if re.search(getattr(user, permission), n)}
            assert matched == set(granted(user.role, permission)), (user.role, permission)


@pytest.mark.parametrize(
    ("role", "permission", "resource"), list(GRANTS), ids=lambda v: str(v).replace(".", "_")
)
async def test_each_grant_is_needed(
    deployment: Deployment, role: str, permission: str, resource: str
) -> None:
    call = GRANTS[(role, permission, resource)]
    await call(deployment)  # allowed with the role's permissions
    user = deployment.users[role]
    kept = [name for name in granted(role, permission) if name != resource]
    narrowed = "^(" + "|".join(n.replace(".", r"\.") for n in kept) + ")$" if kept else "^$"
    perms = {"configure": user.configure, "write": user.write, "read": user.read}
    perms[permission] = narrowed
    await asyncio.to_thread(
        deployment.grant, role, perms["configure"], perms["write"], perms["read"]
    )
    with pytest.raises(TransportError, match="ACCESS_REFUSED"):
        await call(deployment)


# --------------------------------------------------------------------------- the commands


def test_broker_users_apply_and_declare_commands(amqp_url: str) -> None:
    prefix = f"lpcli{uuid.uuid4().hex[:6]}"
    env = {"SAGAFLOW_AMQP_URL": amqp_url, "SAGAFLOW_PREFIX": TOPOLOGY.prefix}
    args = ["broker", "users", *SERVICES, "--user-prefix", prefix, "--apply", "--format", "json"]
    names = [f"{prefix}-{role}" for role in ("coordinator", "operator", *SERVICES)]
    runner = CliRunner()
    try:
        done = runner.invoke(cli, args, env=env)
        assert done.exit_code == 0, done.output
        made = json.loads(done.stdout)
        again = runner.invoke(cli, args, env=env)  # idempotent: new passwords, same rights
        assert again.exit_code == 0, again.output
        remade = json.loads(again.stdout)
        assert [u["user"] for u in made] == [u["user"] for u in remade] == names
        vhost = vhost_of(amqp_url)
        listed = rabbitmqctl("list_permissions", "-p", vhost, "--no-table-headers")
        rows = {tuple(line.split("\t")) for line in listed.splitlines()}
        for old, new in zip(made, remade, strict=True):
            assert (new["user"], new["configure"], new["write"], new["read"]) in rows
            assert new["password"] != old["password"]
            assert new["amqp_url"].endswith(f"@127.0.0.1:5672/{vhost}")

        declared = runner.invoke(cli, ["broker", "declare", *SERVICES], env=env)
        assert declared.exit_code == 0, declared.output

        async def log_in(url: str) -> None:
            await (await aio_pika.connect(url, timeout=10)).close()

        for user in remade:  # the new passwords work (and the printed URLs)
            asyncio.run(log_in(user["amqp_url"]))
        for user in made:
            with pytest.raises(aio_pika.exceptions.ProbableAuthenticationError):
                asyncio.run(log_in(user["amqp_url"]))
    finally:
        delete_users(names)


def test_the_printed_script_runs_the_same_rabbitmqctl_commands(tmp_path: Path) -> None:
    """The script for an operator, run against a stand-in rabbitmqctl that records."""
    log = tmp_path / "calls"
    fake = tmp_path / "rabbitmqctl"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'{{ printf "%s\\t" "$@"; [[ " $* " == *" add_user "* || " $* " == *" change_password "* ]]'
        f' && printf "stdin=%s" "$(cat)"; echo; }} >> {log}\n'
        '[[ " $* " == *" list_users "* ]] && printf "existing-coordinator\\t[]\\n"\n'
        "exit 0\n"
    )
    fake.chmod(0o755)
    env = {"SAGAFLOW_AMQP_URL": "amqp://admin:secret@broker:5671/prod", "SAGAFLOW_PREFIX": "lp"}
    passwords = tmp_path / "passwords"
    passwords.write_text("# given\nexisting-coordinator=it's $(not) run\n")
    done = CliRunner().invoke(
        cli,
        [
            "broker",
            "users",
            "inventory",
            "--user-prefix",
            "existing",
            "--password-file",
            str(passwords),
        ],
        env=env,
    )
    assert done.exit_code == 0, done.output
    script = tmp_path / "users.sh"
    script.write_text(done.stdout)
    ran = subprocess.run(
        ["bash", str(script)],
        env={**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    calls = log.read_text().splitlines()
    sets = [c.split("\t")[3:8] for c in calls if "\tset_permissions\t" in c]
    users = {u.user: u for u in roles(TOPOLOGY, ["inventory"], user_prefix="existing")}
    assert sorted(sets) == sorted(
        ["prod", u.user, u.configure, u.write, u.read] for u in users.values()
    )
    changed = [c for c in calls if "\tchange_password\t" in c]
    assert changed == ["-q\tchange_password\texisting-coordinator\tstdin=it's $(not) run"]
    added = [c.split("\t")[2] for c in calls if "\tadd_user\t" in c]
    assert sorted(added) == sorted(set(users) - {"existing-coordinator"})
    assert not any("secret" in c or "$(not)" in c.split("stdin=")[0] for c in calls)
