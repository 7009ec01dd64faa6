"""The dashboard and sagas that wait: the waiting and overdue filters, the drawing,
and sending a signal with a reason; invalid signal data changes nothing.

Against a real PostgreSQL; the sagas are run in memory to the point wanted and
copied into it with their logs.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from pydantic import BaseModel

from sagaflow import HandlerContext, Participant, Saga, SagaStatus, Step, Wait
from sagaflow.config import Settings
from sagaflow.core.ports import UnitOfWork
from sagaflow.core.state import LogEvent
from sagaflow.dashboard import DashboardSettings, create_app
from sagaflow.store import PostgresSagaStore
from sagaflow.store.migrate import migrate
from sagaflow.testing import SagaTestEnvironment
from tests.sample import COMP, FAST, Cmd, Data, Ok, charge, refund, release, reserve

pytestmark = pytest.mark.integration

TOKEN = "a-token-long-enough-for-tests"


class Approval(BaseModel):
    amount: int


def _cmd(d: Data) -> Cmd:
    return Cmd(order_id=d.order_id, amount=d.amount)


approval: Saga[Data] = Saga(
    "approval",
    data=Data,
    steps=[
        Step("reserve", reserve, _cmd, compensation=release, retry=FAST, compensation_retry=COMP),
        Wait("approve", model=Approval),
        Step("charge", charge, _cmd, compensation=refund, retry=FAST, compensation_retry=COMP),
    ],
)


def _participants() -> list[Participant]:
    inventory, payment = Participant("inventory"), Participant("payment")

    async def ok(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok()

    for participant, action in ((inventory, reserve), (inventory, release)):
        participant.handler(action)(ok)
    for participant, action in ((payment, charge), (payment, refund)):
        participant.handler(action)(ok)
    return [inventory, payment]


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresSagaStore]:
    """Two sagas at their wait (one past its deadline) and a completed one."""
    await migrate(pg_url)
    store = PostgresSagaStore(pg_url, min_size=1, max_size=2)
    await store.start()
    env = SagaTestEnvironment([approval], _participants())
    async with env:
        await env.start_saga(approval, {"order_id": "o-wait"}, saga_id="s-wait")
        await env.drain()
        waiting = await env.get("s-wait")
        log = list(await env.log("s-wait"))
    assert waiting.waiting_for == "approve" and waiting.status is SagaStatus.RUNNING
    late = waiting.model_copy(
        update={"saga_id": "s-late", "deadline_at": time.time() - 60, "version": 0}
    )
    async with store.transaction() as tx:
        await tx.write(
            UnitOfWork(
                inserts=[waiting.model_copy(update={"version": 0}), late],
                log=log,
            )
        )
    try:
        yield store
    finally:
        await store.close()


@pytest.fixture
async def client(pg_url: str, store: PostgresSagaStore) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        Settings(database_url=pg_url), sagas=[approval], dashboard=DashboardSettings(token=TOKEN)
    )
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://dash"
        ) as http:
            assert (await http.post("/login", data={"token": TOKEN})).status_code == 303
            yield http
    finally:
        await app.state.dashboard.aclose()


def _ids(html: str) -> list[str]:
    return re.findall(r'data-saga-id="([^"]+)"', html)


async def test_the_list_filters_waiting_and_overdue_sagas(client: httpx.AsyncClient) -> None:
    assert sorted(_ids((await client.get("/", params={"waiting": "1"})).text)) == [
        "s-late",
        "s-wait",
    ]
    overdue = (await client.get("/", params={"overdue": "1"})).text
    assert _ids(overdue) == ["s-late"]
    assert "overdue</span>" in overdue and "waiting for approve" in overdue


async def test_a_signal_is_sent_with_a_reason_and_invalid_data_changes_nothing(
    client: httpx.AsyncClient, store: PostgresSagaStore
) -> None:
    page = (await client.get("/sagas/s-wait")).text
    states = dict(re.findall(r'data-step="([^"]+)" data-state="([^"]+)"', page))
    assert states == {"reserve": "done", "approve": "waiting", "charge": "pending"}
    assert '<option value="approve">approve</option>' in page
    csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert csrf is not None
    form = {
        "csrf": csrf.group(1),
        "saga_id": "s-wait",
        "action": "signal",
        "signal": "approve",
        "reason": "manager said yes",
        "by": "dana",
        "confirmed": "yes",
    }

    async def unchanged_after(data: dict[str, str], status: int, message: str) -> None:
        before = await store.get("s-wait")
        assert before is not None
        response = await client.post("/actions/saga", data={**form, **data})
        assert response.status_code == status, response.text
        assert message in response.text, response.text
        after = await store.get("s-wait")
        assert after == before

    await unchanged_after({"data": "{not json"}, 400, "the signal&#39;s data is not valid JSON")
    await unchanged_after({"data": "[1, 2]"}, 400, "must be a JSON object")
    await unchanged_after({"signal": ""}, 400, "name the signal to send")
    await unchanged_after(
        {"data": '{"amount": "lots"}'},
        409,
        "refused: signal &#39;approve&#39; data does not fit Approval: amount:",
    )
    await unchanged_after({"signal": "nope", "data": "{}"}, 409, "refused:")

    asked = await client.post(
        "/actions/saga", data={**form, "data": '{"amount": 7}', "confirmed": ""}
    )
    assert "Confirm: send signal approve to saga s-wait" in asked.text
    assert "{&#34;amount&#34;:7}" in asked.text
    sent = await client.post("/actions/saga", data={**form, "data": '{"amount": 7}'})
    assert sent.status_code == 303, sent.text
    state = await store.get("s-wait")
    assert state is not None and state.data["amount"] == 7 and state.waiting_for is None
    (entry,) = [e for e in await store.log("s-wait") if e.event is LogEvent.SIGNAL_RECEIVED]
    assert (entry.detail["by"], entry.detail["reason"]) == ("dana (dashboard)", "manager said yes")
    assert entry.detail["data"] == {"amount": 7}
    again = await client.post("/actions/saga", data={**form, "data": '{"amount": 8}'})
    assert again.status_code == 409
    assert "was received already; nothing was changed" in again.text
