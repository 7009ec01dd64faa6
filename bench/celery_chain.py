"""What a Python team would write instead: a Celery chain with ``link_error`` compensation.

The same saga as the others (steps cycling through inventory, payment and
shipping, the same sagas failing at the same payment step) as a careful Celery
user would set it up, on the same RabbitMQ (a vhost of its own) and the same
PostgreSQL:

* the broker: py-amqp (kombu's ``pyamqp`` transport), publisher confirms
  (``confirm_publish``), persistent messages, one durable quorum queue per
  service (``x-delivery-limit`` 5, as the raw ceiling), JSON bodies, no result
  backend, no remote-control queue;
* ``task_acks_late`` and ``task_reject_on_worker_lost``: a task is acked after
  it ran and after the chain's next task was published (at least once per
  task);
* one worker process per service queue (``--pool threads`` by default, so a
  worker overlaps its tasks' database round trips as sagaflow's and the
  ceiling's asyncio workers do);
* each task (psycopg 3, one connection per worker thread; retried with
  back-off when the database is away) does the ceiling
  participant's work in one transaction: its dedup row keyed by the task id
  and its effect row; the last step also marks the saga COMPLETED in that
  transaction;
* a business failure (``BusinessFailure``, declared in ``throws``) stops the
  chain; the chain's ``link_error`` errback, run in the failing worker, sends
  the compensations of the completed steps as a chain of its own in reverse
  order; the last compensation marks the saga COMPENSATED.

There is no saga log: the driver inserts one row per saga when it starts it,
and the row is updated once, by the task that ends the saga. What this does not
recover from (a worker lost between steps, a failed compensation...) is in
docs/performance.md.

Run by the harness as separate processes::

    python -m bench.celery_chain worker --service inventory --dsn ... --amqp ...
    python -m bench.celery_chain driver --dsn ... --amqp ... --sagas 2000 --inflight 200

They speak the ``bench.raw`` protocol: ``{"event": "ready"}``; the driver waits
for ``go``, starts the sagas (at most ``--inflight`` unfinished, learning of
terminal ones by polling the saga table) and prints ``{"event": "done", ...}``
with the number of polling queries; all exit when their standard input closes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.raw import PARTICIPANT_SQL, emit
from bench.workload import SERVICES, fail_step, fails, service_of

try:
    import psycopg
    from celery import Celery, chain, signals
    from kombu import Exchange, Queue
except ImportError as exc:  # pragma: no cover - the bench extra is not installed
    raise ImportError(
        f"the Celery comparison needs the bench extra: pip install 'sagaflow[bench]' ({exc})"
    ) from exc

SCHEMA_SQL = """
CREATE SCHEMA IF NOT EXISTS celery;
CREATE TABLE IF NOT EXISTS celery.sagas (
    saga_id    text        PRIMARY KEY,
    status     text        NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL
);
"""
SAGAS = "celery.sagas"
EXCHANGE = "celery.commands"
_FORWARD = {"inventory": "reserve", "payment": "charge", "shipping": "schedule"}
_UNDO = {"inventory": "release", "payment": "refund", "shipping": "cancel"}


# A database that is away (or out of connections) is retried, with back-off, as a
# careful user would; anything else fails the task, and the chain's errback runs.
RETRY: dict[str, Any] = {
    "bind": True,
    "autoretry_for": (psycopg.OperationalError,),
    "retry_backoff": 0.5,
    "retry_backoff_max": 5,
    "max_retries": 5,
}


class BusinessFailure(Exception):
    """A step refused (payment declined): the chain stops and compensates."""


def setup(dsn: str) -> None:
    """Create the saga table and the participants' tables (run by the harness)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(SCHEMA_SQL)
        for service in SERVICES:
            conn.execute(PARTICIPANT_SQL.format(s=service))


def broker_url(amqp_url: str) -> str:
    """The harness's ``amqp://`` URL for Celery's py-amqp transport."""
    return "pyamqp://" + amqp_url.split("://", 1)[1]


class _Connections(threading.local):
    """One PostgreSQL connection per thread (a worker's pool threads, the driver's)."""

    def __init__(self, dsn: str) -> None:  # run again in each thread, with these arguments
        self.dsn = dsn
        self.conn: psycopg.Connection[Any] | None = None

    def get(self) -> psycopg.Connection[Any]:
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.dsn, autocommit=True)
        return self.conn


@dataclass(frozen=True)
class ChainApp:
    """The Celery application and the saga's tasks."""

    app: Celery
    forwards: dict[str, Any]  # service -> its forward task
    compensate: Any  # the chain's errback

    def saga(self, order: dict[str, Any]) -> Any:
        """One saga's chain of forward steps, each linked to the compensating errback."""
        steps = [self.forwards[service_of(0)].s(order, step=0)]
        steps += [self.forwards[service_of(i)].s(step=i) for i in range(1, order["steps"])]
        return chain(*steps).on_error(self.compensate.s())


def make_app(amqp_url: str, dsn: str, *, prefetch: int = 16) -> ChainApp:
    """The Celery application: configuration, queues and the saga's tasks."""
    app = Celery("bench_chain", set_as_current=False)
    # topic: what Celery's native delayed delivery (set up for quorum queues) supports
    exchange = Exchange(EXCHANGE, type="topic", durable=True)
    app.conf.update(
        broker_url=broker_url(amqp_url),
        broker_transport_options={"confirm_publish": True},
        broker_connection_retry_on_startup=True,
        task_queues=[
            Queue(
                service,
                exchange,
                routing_key=service,
                durable=True,
                queue_arguments={"x-queue-type": "quorum", "x-delivery-limit": 5},
            )
            for service in SERVICES
        ],
        task_routes={
            f"{service}.*": {"queue": service, "exchange": EXCHANGE, "routing_key": service}
            for service in SERVICES
        },
        task_default_delivery_mode="persistent",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        worker_prefetch_multiplier=prefetch,
        worker_enable_remote_control=False,
        worker_redirect_stdouts=False,
        worker_hijack_root_logger=False,
    )
    db = _Connections(dsn)

    def forward(service: str) -> Any:
        @app.task(name=f"{service}.{_FORWARD[service]}", throws=(BusinessFailure,), **RETRY)
        def run(self: Any, order: dict[str, Any], step: int) -> dict[str, Any]:
            fail = order["fail_at"] == step
            conn = db.get()
            with conn.transaction():
                claimed = conn.execute(
                    f'INSERT INTO "{service}".inbox (command_id, ok) VALUES (%s, %s)'
                    " ON CONFLICT DO NOTHING RETURNING ok",
                    (self.request.id, not fail),
                ).fetchone()
                if claimed is not None and not fail:
                    conn.execute(
                        f'INSERT INTO "{service}".bench_effects'
                        " (command_id, saga_id, step, compensation) VALUES (%s, %s, %s, false)",
                        (self.request.id, order["saga"], str(step)),
                    )
                    if step == order["steps"] - 1:
                        _finish(conn, order["saga"], "COMPLETED")
            if fail:
                raise BusinessFailure(f"declined at step {step}")
            return order

        return run

    def undo(service: str) -> Any:
        @app.task(name=f"{service}.{_UNDO[service]}", **RETRY)
        def run(self: Any, order: dict[str, Any], step: int) -> None:
            conn = db.get()
            with conn.transaction():
                claimed = conn.execute(
                    f'INSERT INTO "{service}".inbox (command_id, ok) VALUES (%s, true)'
                    " ON CONFLICT DO NOTHING RETURNING ok",
                    (self.request.id,),
                ).fetchone()
                if claimed is not None:
                    conn.execute(
                        f'INSERT INTO "{service}".bench_effects'
                        " (command_id, saga_id, step, compensation) VALUES (%s, %s, %s, true)",
                        (self.request.id, order["saga"], str(step)),
                    )
                    if step == 0:
                        _finish(conn, order["saga"], "COMPENSATED")

        return run

    forwards = {service: forward(service) for service in SERVICES}
    undos = {service: undo(service) for service in SERVICES}

    # Called in the failing worker with the failed task's request (Celery's
    # "new-style" errback); it sends the compensations of the steps before.
    @app.task(name="saga.compensate")
    def compensate(request: Any, exc: BaseException, traceback: Any) -> None:
        order, step = request.args[0], request.kwargs["step"]
        if step == 0:
            with db.get().transaction():
                _finish(db.get(), order["saga"], "COMPENSATED")
            return
        chain(
            *(undos[service_of(i)].si(order, step=i) for i in reversed(range(step)))
        ).apply_async()

    return ChainApp(app, forwards, compensate)


def _finish(conn: psycopg.Connection[Any], saga: str, status: str) -> None:
    conn.execute(
        f"UPDATE {SAGAS} SET status = %s, updated_at = to_timestamp(%s) WHERE saga_id = %s",
        (status, time.time(), saga),
    )


# --------------------------------------------------------------------------- processes


def _stop_on_stdin_eof() -> None:
    """The harness closes stdin to stop a worker: Celery's warm shutdown (SIGTERM)."""

    def wait() -> None:
        while sys.stdin.readline():
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="stdin", daemon=True).start()


def worker(args: argparse.Namespace) -> None:
    app = make_app(args.amqp, args.dsn, prefetch=args.prefetch).app
    stats = {"commands": 0}

    @signals.worker_ready.connect(weak=False)
    def ready(**_: Any) -> None:
        emit("ready", pid=os.getpid())

    @signals.task_prerun.connect(weak=False)
    def count(**_: Any) -> None:
        stats["commands"] += 1

    _stop_on_stdin_eof()
    node = app.Worker(
        hostname=f"{args.service}@bench",
        queues=[args.service],
        pool_cls=args.pool,
        concurrency=args.concurrency,
        loglevel="WARNING",
        quiet=True,
        without_gossip=True,
        without_mingle=True,
        without_heartbeat=True,
    )
    node.start()
    emit("stopped", **stats)


def driver(args: argparse.Namespace) -> None:
    chains = make_app(args.amqp, args.dsn)
    db = _Connections(args.dsn)
    fail_at = fail_step(args.steps)
    poll = psycopg.connect(args.dsn, autocommit=True)
    emit("ready", pid=os.getpid())
    if not sys.stdin.readline():  # "go"
        return
    interval = 0.02 if args.inflight > 4 else 0.002
    deadline = time.monotonic() + args.duration
    give_up = time.monotonic() + args.timeout
    started = finished = queries = 0
    futures: set[Future[None]] = set()

    def start(index: int) -> None:
        saga = f"{args.run}-{index:07d}"
        order = {
            "saga": saga,
            "steps": args.steps,
            "fail_at": fail_at if fails(index, args.fail_rate) else -1,
        }
        now = time.time()
        db.get().execute(
            f"INSERT INTO {SAGAS} (saga_id, status, created_at, updated_at)"
            " VALUES (%s, 'RUNNING', to_timestamp(%s), to_timestamp(%s))",
            (saga, now, now),
        )
        chains.saga(order).apply_async()

    def more() -> bool:
        return time.monotonic() < deadline if args.duration > 0 else started < args.sagas

    # a web application starts sagas from many requests at once: several threads
    with ThreadPoolExecutor(max_workers=max(1, min(args.inflight, args.starters))) as pool:
        while True:
            while more() and started - finished < args.inflight:
                futures.add(pool.submit(start, started))
                started += 1
            for future in [f for f in futures if f.done()]:
                futures.discard(future)
                future.result()  # a failed start fails the run
            if not more() and finished >= started:
                break
            if time.monotonic() > give_up:
                raise SystemExit(f"timed out: {finished} of {started} sagas finished")
            time.sleep(interval)
            row = poll.execute(f"SELECT count(*) FROM {SAGAS} WHERE status <> 'RUNNING'").fetchone()
            finished = int(row[0]) if row else 0
            queries += 1
    emit("done", started=started, commands=started, queries=queries)
    while sys.stdin.readline():
        pass
    poll.close()
    emit("stopped")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.celery_chain")
    parser.add_argument("role", choices=["driver", "worker"])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--amqp", required=True)
    parser.add_argument("--service", choices=SERVICES)
    parser.add_argument("--run", default="cel")
    parser.add_argument("--sagas", type=int, default=2000)
    parser.add_argument("--duration", type=float, default=0.0)
    parser.add_argument("--inflight", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--fail-rate", type=float, default=0.1)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--starters", type=int, default=8, help="driver threads starting sagas")
    parser.add_argument("--pool", choices=["threads", "solo"], default="threads")
    parser.add_argument("--concurrency", type=int, default=8, help="worker threads")
    parser.add_argument("--prefetch", type=int, default=16, help="prefetch per worker thread")
    args = parser.parse_args(argv)
    if args.role == "worker" and not args.service:
        parser.error("worker needs --service")
    if args.role == "worker":
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
