"""Cluster scenarios: the example system on a three-node RabbitMQ cluster and a
PostgreSQL primary with a standby (``scripts/local_cluster.py``), with a node
lost mid-run. Same workload and invariants as every fault scenario (no saga
lost, effects once, compensations in reverse order), judged from the
services' own tables.

- C1: the node leading the command and reply queues is SIGKILLed, then
  started again (it rejoins the cluster).
- C2: a rolling restart of all three nodes, one at a time, each waiting until
  the others can lose it without a queue losing its majority.
- C3: the PostgreSQL primary crashes (immediate stop) and the standby is
  promoted; every process finds the new primary through the multi-host URL.

Each scenario's summary line reports sagas finished per second before,
during and after the fault, and the longest time no saga finished. These are
observations on a shared 2-core machine, not assertions.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from scripts.local_cluster import PostgresPair, RabbitCluster
from tests.faults.cluster.conftest import Rates, cluster_stack
from tests.faults.conftest import SERVICES
from tests.faults.harness import log_count, scenario, settle
from tests.faults.invariants import check
from tests.faults.workload import (
    http_placer,
    pace,
    place_all,
    plan,
    rng_for,
    scenario_timeout,
    workload_size,
)

pytestmark = [pytest.mark.faults, pytest.mark.timeout(scenario_timeout())]


def node_url(cluster: RabbitCluster, index: int, vhost: str) -> str:
    return f"amqp://guest:guest@127.0.0.1:{cluster.nodes[index].port}/{vhost}"


async def test_node_leading_the_queues_is_killed(
    rabbit_cluster: RabbitCluster, cluster_vhost: str, cluster_pg_url: str
) -> None:
    async with scenario("C1 RabbitMQ cluster: leader node SIGKILLed") as account:
        rng, seed = rng_for("cluster-kill")
        account.notes.append(f"seed={seed}")
        url = rabbit_cluster.amqp_url(cluster_vhost)
        first = node_url(rabbit_cluster, 0, cluster_vhost)
        async with cluster_stack(url, cluster_pg_url, declare_via=first) as stack:
            topology = stack.settings.topology()
            leaders = await asyncio.to_thread(rabbit_cluster.queue_leaders, cluster_vhost)
            ours = [topology.replies_queue, *(topology.service_queue(s) for s in SERVICES)]
            victim = rabbit_cluster.node(leaders[topology.replies_queue])
            assert {leaders[q] for q in ours} == {victim.node}, leaders
            orders = plan(workload_size(), seed=seed)
            account.sagas = len(orders)
            seconds = pace(len(orders), rate=20.0)
            rates = Rates(cluster_pg_url)
            rates.start()
            placing = asyncio.create_task(place_all(orders, http_placer(stack), seconds=seconds))
            await asyncio.sleep(seconds * rng.uniform(0.3, 0.45))
            await account.strike(stack, "SIGKILL of the node leading every queue")
            fault_start = time.monotonic()
            await asyncio.to_thread(victim.kill)
            down = rng.uniform(3.0, 8.0)
            await asyncio.sleep(down)
            fault_end = time.monotonic()  # the cluster ran on two nodes until now
            await asyncio.to_thread(victim.start)
            await asyncio.to_thread(victim.wait_started)
            await asyncio.to_thread(rabbit_cluster.wait_members, len(rabbit_cluster.nodes))
            rejoined = time.monotonic() - fault_start
            placed = await placing
            await settle(stack, placed)
            await rates.stop()
            after = await asyncio.to_thread(rabbit_cluster.queue_leaders, cluster_vhost)
            moved = sum(
                1 for name in stack.processes if log_count(stack, name, "lost the connection")
            )
            account.notes += [
                f"node down {down:.1f}s, back in the cluster {rejoined:.0f}s after the kill",
                rates.report(fault_start, fault_end, len(orders)),
                f"{moved} of {len(stack.processes)} processes were on it and moved",
                f"replies queue leader now {after.get(topology.replies_queue)}",
            ]
            account.verdict = await check(cluster_pg_url, placed=placed)
            account.verdict.raise_if_violated()


async def test_rolling_restart_of_every_node(
    rabbit_cluster: RabbitCluster, cluster_vhost: str, cluster_pg_url: str
) -> None:
    async with scenario("C2 RabbitMQ cluster: rolling restart") as account:
        rng, seed = rng_for("cluster-rolling")
        account.notes.append(f"seed={seed}")
        url = rabbit_cluster.amqp_url(cluster_vhost)
        async with cluster_stack(url, cluster_pg_url) as stack:
            orders = plan(workload_size(), seed=seed)
            account.sagas = len(orders)
            seconds = pace(len(orders), rate=6.0)
            rates = Rates(cluster_pg_url)
            rates.start()
            placing = asyncio.create_task(place_all(orders, http_placer(stack), seconds=seconds))
            await asyncio.sleep(rng.uniform(3.0, 6.0))
            fault_start = time.monotonic()
            took = []
            for node in rabbit_cluster.nodes:
                waited = await asyncio.to_thread(rabbit_cluster.wait_not_quorum_critical, node)
                await account.strike(stack, "node restart (rabbitmqctl stop, start)")
                began = time.monotonic()
                await asyncio.to_thread(node.stop)
                await asyncio.to_thread(node.start)
                await asyncio.to_thread(node.wait_started)
                await asyncio.to_thread(rabbit_cluster.wait_members, len(rabbit_cluster.nodes))
                took.append(f"{time.monotonic() - began:.0f}s (+{waited:.0f}s sync wait)")
            fault_end = time.monotonic()
            placed = await placing
            await settle(stack, placed)
            await rates.stop()
            account.notes += [
                f"restarts took {', '.join(took)}",
                rates.report(fault_start, fault_end, len(orders)),
            ]
            account.verdict = await check(cluster_pg_url, placed=placed)
            account.verdict.raise_if_violated()


async def test_postgres_primary_fails_over_to_the_standby(
    postgres_pair: PostgresPair, amqp_url: str
) -> None:
    async with scenario("C3 PostgreSQL failover to the standby") as account:
        rng, seed = rng_for("cluster-failover")
        account.notes.append(f"seed={seed}")
        await asyncio.to_thread(postgres_pair.create_database, "failover")
        database_url = postgres_pair.database_url("failover")
        async with cluster_stack(amqp_url, database_url) as stack:
            orders = plan(workload_size(), seed=seed)
            account.sagas = len(orders)
            seconds = pace(len(orders), rate=20.0)
            rates = Rates(database_url)
            rates.start()
            placing = asyncio.create_task(place_all(orders, http_placer(stack), seconds=seconds))
            await asyncio.sleep(seconds * rng.uniform(0.3, 0.45))
            await account.strike(stack, "primary crash (immediate stop), standby promoted")
            fault_start = time.monotonic()
            await asyncio.to_thread(postgres_pair.stop_primary, "immediate")
            detect = rng.uniform(1.0, 4.0)  # what a failover manager takes to decide
            await asyncio.sleep(detect)
            await asyncio.to_thread(postgres_pair.promote)
            fault_end = time.monotonic()
            placed = await placing
            await settle(stack, placed)
            await rates.stop()
            account.notes += [
                f"promoted {fault_end - fault_start:.1f}s after the crash",
                rates.report(fault_start, fault_end, len(orders)),
            ]
            # judged on the promoted standby: what was acknowledged survived there
            account.verdict = await check(postgres_pair.primary_url("failover"), placed=placed)
            account.verdict.raise_if_violated()
