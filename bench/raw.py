"""The raw ceiling: the same saga flow and guarantees with no framework at all.

What the guarantees need at the least, written by hand with aio-pika and
asyncpg:

* messages: persistent, to durable queues of the same type sagaflow declares
  (quorum, delivery limit, dead-letter exchange), published with ``mandatory``
  and awaited publisher confirms; a command and a reply per step;
* the driver (load generator and coordinator in one process): one INSERT per
  saga at start; per reply one transaction of an UPDATE (guarded by the
  expected step, which drops stale and duplicate replies) and, when a message
  follows, one outbox INSERT; then publish, then ack;
* each participant: per command one transaction writing its dedup row and its
  effect row; then reply, then ack.

Nothing is batched: one transaction per message, as a hand-written service
would do. Outbox rows are never deleted (a relay would, at extra cost).

Run by the harness as separate processes::

    python -m bench.raw participant --service inventory --dsn ... --amqp ...
    python -m bench.raw driver --dsn ... --amqp ... --sagas 2000 --inflight 200

Each prints one JSON line ``{"event": "ready"}`` when connected; the driver then
waits for ``go`` on its standard input and prints ``{"event": "done", ...}``
when every saga is terminal. All exit when their standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import asyncpg
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractRobustConnection,
)

from bench.workload import SERVICES, fail_step, fails, service_of

EXCHANGE = "raw.commands"
REPLIES = "raw.replies"
DLX = "raw.dlx"
DEAD = "raw.dead-letter"


def service_queue(service: str) -> str:
    return f"raw.service.{service}"


def queue_arguments(queue_type: str) -> dict[str, Any]:
    if queue_type == "classic":
        return {"x-dead-letter-exchange": DLX}
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": 5,
        "x-dead-letter-exchange": DLX,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS raw;
CREATE TABLE IF NOT EXISTS raw.sagas (
    saga_id    text        PRIMARY KEY,
    status     text        NOT NULL,
    step       integer     NOT NULL,
    kind       text        NOT NULL,
    fail_at    integer     NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
CREATE TABLE IF NOT EXISTS raw.outbox (
    id         bigserial   PRIMARY KEY,
    saga_id    text        NOT NULL,
    message    jsonb       NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""

PARTICIPANT_SQL = """
CREATE SCHEMA IF NOT EXISTS "{s}";
CREATE TABLE IF NOT EXISTS "{s}".inbox (command_id text PRIMARY KEY, ok boolean NOT NULL);
CREATE TABLE IF NOT EXISTS "{s}".bench_effects (
    command_id text PRIMARY KEY, saga_id text NOT NULL, step text NOT NULL,
    compensation boolean NOT NULL);
"""


async def _no_reset(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Skip asyncpg's reset query on release: nothing here changes session state,
    and the query costs a round trip and a transaction per use of the pool."""


async def create_pool(dsn: str, size: int) -> asyncpg.Pool[asyncpg.Record]:
    return await asyncpg.create_pool(dsn, min_size=2, max_size=size, reset=_no_reset)


async def setup(dsn: str) -> None:
    """Create the driver's and the participants' tables (run by the harness)."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(SCHEMA_SQL)
        for service in SERVICES:
            await conn.execute(PARTICIPANT_SQL.format(s=service))
    finally:
        await conn.close()


async def declare(channel: AbstractChannel, queue_type: str) -> AbstractExchange:
    dlx = await channel.declare_exchange(DLX, aio_pika.ExchangeType.FANOUT, durable=True)
    dead = await channel.declare_queue(DEAD, durable=True, arguments={"x-queue-type": queue_type})
    await dead.bind(dlx, routing_key="")
    exchange = await channel.declare_exchange(EXCHANGE, aio_pika.ExchangeType.DIRECT, durable=True)
    for service in SERVICES:
        queue = await channel.declare_queue(
            service_queue(service), durable=True, arguments=queue_arguments(queue_type)
        )
        await queue.bind(exchange, routing_key=service)
    await channel.declare_queue(REPLIES, durable=True, arguments=queue_arguments(queue_type))
    return exchange


CLOSING = asyncio.Event()  # set before closing on purpose


async def connect(url: str) -> AbstractRobustConnection | AbstractConnection:
    """Connect; a lost connection ends the process (the raw ceiling does not
    reconnect), so the harness sees the failure at once instead of waiting."""
    connection = await aio_pika.connect(url)

    def lost(_: object, exc: BaseException | None) -> None:
        if not CLOSING.is_set():
            sys.stderr.write(f"lost the broker connection: {exc!r}\n")
            sys.stderr.flush()
            os._exit(3)

    connection.close_callbacks.add(lost)
    return connection


def emit(event: str, **fields: Any) -> None:
    sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
    sys.stdout.flush()


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def message(body: dict[str, Any], message_id: str) -> aio_pika.Message:
    return aio_pika.Message(
        orjson.dumps(body),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=message_id,
        correlation_id=str(body["saga"]),
        content_type="application/json",
    )


# --------------------------------------------------------------------------- participant


async def participant(args: argparse.Namespace) -> None:
    service: str = args.service
    s = f'"{service}"'
    claim = f"INSERT INTO {s}.inbox (command_id, ok) VALUES ($1, $2) ON CONFLICT DO NOTHING RETURNING ok"
    stored = f"SELECT ok FROM {s}.inbox WHERE command_id = $1"
    effect = f"INSERT INTO {s}.bench_effects (command_id, saga_id, step, compensation) VALUES ($1, $2, $3, $4)"
    pool = await create_pool(args.dsn, args.pool)
    connection = await connect(args.amqp)
    publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
    consumer = await connection.channel()
    await consumer.set_qos(prefetch_count=args.prefetch)
    await declare(publisher, args.queue_type)
    queue = await consumer.get_queue(service_queue(service), ensure=False)
    stats = {"commands": 0, "duplicates": 0, "transactions": 0}

    async def on_command(msg: AbstractIncomingMessage) -> None:
        cmd = orjson.loads(msg.body)
        command_id = msg.message_id or ""
        compensation = cmd["kind"] == "comp"
        ok = compensation or not cmd.get("fail", False)
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(claim, command_id, ok)
            if row is None:
                stats["duplicates"] += 1
                ok = bool(await conn.fetchval(stored, command_id))
            elif ok:
                await conn.execute(effect, command_id, cmd["saga"], str(cmd["step"]), compensation)
        stats["transactions"] += 1
        stats["commands"] += 1
        reply = {**cmd, "ok": ok}
        await publisher.default_exchange.publish(
            message(reply, f"{command_id}:reply"), REPLIES, mandatory=True
        )
        await msg.ack()

    await queue.consume(on_command)
    emit("ready")
    reader = await stdin_reader()
    while await reader.readline():
        pass
    CLOSING.set()
    await consumer.close()
    await connection.close()
    await pool.close()
    emit("stopped", **stats)


# --------------------------------------------------------------------------- driver


@dataclass
class _Driver:
    args: argparse.Namespace
    pool: asyncpg.Pool[asyncpg.Record]
    exchange: AbstractExchange
    stats: dict[str, int] = field(
        default_factory=lambda: {
            "commands": 0,
            "replies": 0,
            "duplicates": 0,
            "transactions": 0,
            "completed": 0,
            "compensated": 0,
        }
    )
    started: int = 0
    running: int = 0
    deadline: float = 0.0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def publish(self, saga: str, step: int, kind: str, fail_at: int) -> None:
        body = {
            "saga": saga,
            "step": step,
            "kind": kind,
            "fail_at": fail_at,
            "fail": kind == "cmd" and step == fail_at,
        }
        await self.exchange.publish(
            message(body, f"{saga}:{step}:{kind}"), service_of(step), mandatory=True
        )
        self.stats["commands"] += 1

    def more(self) -> bool:
        if self.args.duration > 0:
            return time.monotonic() < self.deadline
        return bool(self.started < self.args.sagas)

    def top_up(self) -> None:
        while self.running < self.args.inflight and self.more():
            task = asyncio.create_task(self.start(self.started))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            self.started += 1
            self.running += 1
        if self.running == 0 and not self.more():
            self.done.set()

    async def start(self, index: int) -> None:
        saga = f"{self.args.run}-{index:07d}"
        fail_at = fail_step(self.args.steps) if fails(index, self.args.fail_rate) else -1
        now = time.time()
        await self.pool.execute(
            "INSERT INTO raw.sagas (saga_id, status, step, kind, fail_at, created_at, updated_at)"
            " VALUES ($1, 'RUNNING', 0, 'cmd', $2, to_timestamp($3), to_timestamp($3))",
            saga,
            fail_at,
            now,
        )
        self.stats["transactions"] += 1
        await self.publish(saga, 0, "cmd", fail_at)

    async def on_reply(self, msg: AbstractIncomingMessage) -> None:
        reply = orjson.loads(msg.body)
        saga, step, kind, fail_at = reply["saga"], reply["step"], reply["kind"], reply["fail_at"]
        nxt: tuple[int, str] | None
        if kind == "cmd" and reply["ok"]:
            last = step == self.args.steps - 1
            status, nxt = ("COMPLETED", None) if last else ("RUNNING", (step + 1, "cmd"))
        else:  # a refused command or a finished compensation: undo the step before
            status, nxt = (
                ("COMPENSATED", None) if step == 0 else ("COMPENSATING", (step - 1, "comp"))
            )
        async with self.pool.acquire() as conn, conn.transaction():
            updated = await conn.execute(
                "UPDATE raw.sagas SET status = $2, step = $3, kind = $4,"
                " updated_at = to_timestamp($5) WHERE saga_id = $1 AND step = $6 AND kind = $7",
                saga,
                status,
                nxt[0] if nxt else step,
                nxt[1] if nxt else kind,
                time.time(),
                step,
                kind,
            )
            fresh = updated != "UPDATE 0"
            if fresh and nxt is not None:
                body = {"saga": saga, "step": nxt[0], "kind": nxt[1], "fail_at": fail_at}
                await conn.execute(
                    "INSERT INTO raw.outbox (saga_id, message) VALUES ($1, $2::text::jsonb)",
                    saga,
                    orjson.dumps(body).decode(),
                )
        self.stats["transactions"] += 1
        self.stats["replies"] += 1
        if not fresh:
            self.stats["duplicates"] += 1
            await msg.ack()
            return
        if nxt is not None:
            await self.publish(saga, nxt[0], nxt[1], fail_at)
        await msg.ack()
        if nxt is None:
            self.stats["completed" if status == "COMPLETED" else "compensated"] += 1
            self.running -= 1
            self.top_up()


async def driver(args: argparse.Namespace) -> None:
    pool = await create_pool(args.dsn, args.pool)
    connection = await connect(args.amqp)
    publisher = await connection.channel(publisher_confirms=True, on_return_raises=True)
    consumer = await connection.channel()
    await consumer.set_qos(prefetch_count=args.inflight + 50)
    exchange = await declare(publisher, args.queue_type)
    state = _Driver(args, pool, exchange)
    replies = await consumer.get_queue(REPLIES, ensure=False)
    await replies.consume(state.on_reply)
    emit("ready")
    reader = await stdin_reader()
    await reader.readline()  # "go"
    state.deadline = time.monotonic() + args.duration
    state.top_up()
    await state.done.wait()
    emit("done", started=state.started, **state.stats)
    while await reader.readline():
        pass
    CLOSING.set()
    await consumer.close()
    await connection.close()
    await pool.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.raw")
    parser.add_argument("role", choices=["driver", "participant"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--amqp", required=True)
    parser.add_argument("--service", choices=SERVICES)
    parser.add_argument("--run", default="raw")
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--inflight", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fail-rate", type=float, default=0.1)
    parser.add_argument("--pool", type=int, default=10)
    parser.add_argument("--prefetch", type=int, default=200)
    parser.add_argument("--queue-type", choices=["quorum", "classic"], default="quorum")
    args = parser.parse_args(argv)
    if args.role == "participant" and not args.service:
        parser.error("participant needs --service")
    asyncio.run(driver(args) if args.role == "driver" else participant(args))


if __name__ == "__main__":
    main()
