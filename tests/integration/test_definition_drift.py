"""A definition edited in place is refused by the real coordinator (issue 12, item 6).

The first coordinator records ``sample`` v1's fingerprint; a coordinator started
on the same name and version with a step removed ends at start, exit code 2,
with one line naming the removed step and saying to bump the version, and
publishes nothing.
"""

from __future__ import annotations

import pytest

from sagaflow import Saga
from sagaflow.core.fingerprint import record_of
from sagaflow.store import PostgresSagaStore, migrate
from tests.integration.test_bad_configuration import _env, _run, assert_refused, sagaflow
from tests.sample import Data, saga

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

edited = Saga(saga.name, data=Data, steps=[*saga.steps[:1], *saga.steps[2:]])
"""``sample`` v1 with its ``charge`` step removed, still called v1."""


async def test_a_coordinator_on_an_edited_definition_refuses_to_start(
    pg_url: str, amqp_url: str
) -> None:
    migrated = pg_url
    await migrate(migrated)
    store = PostgresSagaStore(migrated, min_size=1, max_size=1)
    await store.start()
    try:  # what a coordinator on the original v1 recorded when it started
        await store.record_definitions([record_of(saga)])
    finally:
        await store.close()
    run = await _run(
        *sagaflow("coordinator", f"{__name__}:edited"),
        env=_env(SAGAFLOW_DATABASE_URL=migrated, SAGAFLOW_AMQP_URL=amqp_url),
    )
    assert "coordinator started" not in run.stderr
    assert_refused(
        run,
        "saga 'sample' v1 is not the definition its sagas were started with",
        "step 'charge' removed",
        "declare the change as version 2",
    )
