"""The benchmark's Celery chain, run tiny against the real RabbitMQ and PostgreSQL."""

from __future__ import annotations

import pytest

from bench.harness import BenchFailure, Params, run_servers

celery_chain = pytest.importorskip("bench.celery_chain", reason="needs the bench extra")
psycopg = celery_chain.psycopg

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

PARAMS = Params(system="celery", mode="throughput", sagas=20, inflight=10)


async def test_a_tiny_celery_run_completes_and_compensates_as_the_workload_says() -> None:
    result = await run_servers(PARAMS)
    assert result["verified"] is True
    assert result["statuses"] == {"COMPLETED": 18, "COMPENSATED": 2}
    # reserve, charge, schedule; or reserve, charge (refused), release
    assert result["messages_per_saga"] == 3.0
    assert result["sagas_per_s"] > 0
    assert result["cpu_ms_per_saga"]["participants"] > 0
    assert result["latency_ms"]["p50"] > 0


async def test_a_compensation_that_leaves_no_effect_fails_the_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the inventory's database silently drops its compensation rows: every saga
    # still ends as expected, but the verification counts the effects too
    setup = celery_chain.setup

    def lossy_setup(dsn: str) -> None:
        setup(dsn)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(
                "CREATE FUNCTION inventory.drop_undo() RETURNS trigger LANGUAGE plpgsql AS"
                " $$ BEGIN IF NEW.compensation THEN RETURN NULL; END IF; RETURN NEW; END $$;"
                " CREATE TRIGGER drop_undo BEFORE INSERT ON inventory.bench_effects"
                " FOR EACH ROW EXECUTE FUNCTION inventory.drop_undo()"
            )

    monkeypatch.setattr(celery_chain, "setup", lossy_setup)
    with pytest.raises(BenchFailure, match=r"inventory: 20 effects and 0 compensations"):
        await run_servers(PARAMS)
