"""The dashboard's app against a real PostgreSQL (and RabbitMQ for dead letters).

Every action lands in the saga log with who and why; it is refused without the
token, in read-only mode, on a forged form, for an unknown saga and when the
engine refuses; a refusal says why and changes nothing.
"""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from html import unescape
from typing import Any

import aio_pika
import httpx
import pytest

from sagaflow import (
    BusinessFailure,
    HandlerContext,
    Hooks,
    Participant,
    Saga,
    SagaClient,
    SagaStatus,
)
from sagaflow.config import Settings
from sagaflow.core.fingerprint import record_of
from sagaflow.core.messages import Envelope, MessageKind
from sagaflow.core.ports import UnitOfWork
from sagaflow.core.state import LogEvent
from sagaflow.dashboard import DashboardSettings, create_app
from sagaflow.store import PostgresSagaStore
from sagaflow.store.migrate import migrate
from sagaflow.testing import SagaTestEnvironment
from sagaflow.transport.wire import H_REASON, H_SOURCE_QUEUE
from tests.sample import Cmd, Ok, charge, refund, release, reserve, saga

pytestmark = pytest.mark.integration

TOKEN = "a-token-long-enough-for-tests"


def _always_failing_release() -> list[Participant]:
    inventory, payment = Participant("inventory"), Participant("payment")

    @inventory.handler(reserve)
    async def do_reserve(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok(ref="r-1")

    @inventory.handler(release)
    async def do_release(cmd: Cmd, ctx: HandlerContext) -> Ok:
        raise ConnectionError("inventory db is read-only")

    @payment.handler(charge)
    async def do_charge(cmd: Cmd, ctx: HandlerContext) -> Ok:
        raise BusinessFailure("card_declined")

    @payment.handler(refund)
    async def do_refund(cmd: Cmd, ctx: HandlerContext) -> Ok:
        return Ok()

    return [inventory, payment]


TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


class _Traced(Hooks):
    def saga_started(self, saga: Saga[Any], saga_id: str) -> dict[str, str]:
        return {"traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}


async def _seed(store: PostgresSagaStore) -> tuple[str, str]:
    """A FAILED saga (its release kept failing) and a RUNNING one, with their logs."""
    env = SagaTestEnvironment([saga], _always_failing_release(), hooks=_Traced())
    async with env:
        failed = await env.start_saga(saga, {"order_id": "ord-failed-1"}, saga_id="s-failed")
        for _ in range(20):
            await env.drain()
            await env.advance(2)
        assert (await env.get(failed.saga_id)).status is SagaStatus.FAILED
        state, log = await env.get(failed.saga_id), list(await env.log(failed.saga_id))
    async with store.transaction() as tx:
        await tx.write(UnitOfWork(inserts=[state.model_copy(update={"version": 0})], log=log))
    client = SagaClient([saga], store=store)
    running = await client.start_saga(saga, {"order_id": "ord-running-1"}, saga_id="s-running")
    for n in range(11):
        await client.start_saga(saga, {"order_id": f"ord-bulk-{n}"}, saga_id=f"s-bulk-{n:02d}")
    return failed.saga_id, running.saga_id


@dataclass
class Setup:
    pg_url: str
    store: PostgresSagaStore
    failed: str
    running: str
    make: Callable[..., httpx.AsyncClient]


@pytest.fixture
async def setup(pg_url: str) -> AsyncIterator[Setup]:
    await migrate(pg_url)
    store = PostgresSagaStore(pg_url, min_size=1, max_size=2)
    await store.start()
    failed, running = await _seed(store)
    apps = []

    def make(
        *, token: str | None = TOKEN, read_only: bool = False, amqp_url: str | None = None
    ) -> httpx.AsyncClient:
        settings = Settings(
            database_url=pg_url,
            jaeger_url="http://jaeger.example:16686",
            **({"amqp_url": amqp_url} if amqp_url else {}),
        )
        options = DashboardSettings(token=token, read_only=read_only, page_size=5)
        app = create_app(settings, sagas=[saga], dashboard=options)
        apps.append(app)
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://dash")

    try:
        yield Setup(pg_url, store, failed, running, make)
    finally:
        for app in apps:
            await app.state.dashboard.aclose()
        await store.close()


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert match, "no action form on the page"
    return match.group(1)


async def _signed_in(client: httpx.AsyncClient) -> None:
    response = await client.post("/login", data={"token": TOKEN})
    assert response.status_code == 303


async def _unchanged(store: PostgresSagaStore, saga_id: str, before: tuple[int, int]) -> None:
    state = await store.get(saga_id)
    assert state is not None
    assert (state.version, len(await store.log(saga_id))) == before


async def _snapshot(store: PostgresSagaStore, saga_id: str) -> tuple[int, int]:
    state = await store.get(saga_id)
    assert state is not None
    return state.version, len(await store.log(saga_id))


# ---------------------------------------------------------------------------- reading


async def test_the_list_filters_searches_counts_and_pages_by_keyset(setup: Setup) -> None:
    async with setup.make() as client:
        page = await client.get("/")
        assert page.status_code == 200
        assert 'data-count="RUNNING">RUNNING <b>12</b>' in page.text
        assert 'data-count="FAILED">FAILED <b>1</b>' in page.text
        assert page.text.count("data-saga-id=") == 5  # page_size

        # keyset paging: follow "Next page" to the end, every saga once
        seen: list[str] = []
        url = "/"
        while url:
            html = (await client.get(url)).text
            seen += re.findall(r'data-saga-id="([^"]+)"', html)
            found = re.search(r'href="(\?[^"]*after=[^"]+)" rel="next"', html)
            url = "/" + found.group(1).replace("&amp;", "&") if found else ""
        assert sorted(seen) == sorted({*seen}) and len(seen) == 13

        failed = await client.get("/", params={"status": "FAILED"})
        assert re.findall(r'data-saga-id="([^"]+)"', failed.text) == [setup.failed]
        assert "inventory db is read-only" in failed.text  # the reason, in the list
        by_step = await client.get("/", params={"failed_step": "reserve", "reason": "RELEASE"})
        assert re.findall(r'data-saga-id="([^"]+)"', by_step.text) == [setup.failed]
        # search by a business key anywhere in the data, or by key=value, or by id
        for term in ("ord-failed-1", "order_id=ord-failed-1", "s-failed"):
            found = await client.get("/", params={"q": term})
            assert re.findall(r'data-saga-id="([^"]+)"', found.text) == [setup.failed], term
        none = await client.get("/", params={"q": "nothing-like-it"})
        assert "No saga matches." in none.text

        # the live fragment alone, for the page's script
        live = await client.get("/", headers={"X-Sagaflow-Live": "1"})
        assert "<html" not in live.text and "data-saga-id" in live.text


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"status": "NOPE"}, "unknown status &#39;NOPE&#39;"),
        ({"since": "yesterday"}, "since: &#39;yesterday&#39; is not a date and time"),
        ({"version": "x"}, "the version must be a whole number"),
        ({"after": "%%%"}, "this page link is damaged"),
    ],
)
async def test_bad_filters_get_a_clear_message(
    setup: Setup, query: dict[str, str], message: str
) -> None:
    async with setup.make() as client:
        response = await client.get("/", params=query)
        assert response.status_code == 400
        assert message in response.text


async def test_a_saga_page_shows_data_steps_timeline_and_drawing(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with setup.make() as client:
        page = await client.get(f"/sagas/{setup.failed}")
        assert page.status_code == 200
        html = page.text
        assert '"order_id": "ord-failed-1"' in unescape(html)
        # the drawing: reserve could not be undone (failed), charge refused, the rest not run
        states = dict(re.findall(r'data-step="([^"]+)" data-state="([^"]+)"', html))
        assert states == {
            "reserve": "failed",
            "charge": "failed",
            "schedule": "not run",
            "confirm": "not run",
            "approve": "not run",
        }
        assert f'href="http://jaeger.example:16686/trace/{TRACE_ID}" id="jaeger"' in html
        events = re.findall(r'data-event="([^"]+)"', html)
        assert events[0] == "saga_started" and events[-1] == "saga_failed"
        assert "compensation_started" in events
        missing = await client.get("/sagas/no-such-saga")
        assert missing.status_code == 404
        assert "no saga with id &#39;no-such-saga&#39;" in missing.text


async def test_without_the_code_the_drawing_comes_from_the_recorded_shape(setup: Setup) -> None:
    settings = Settings(database_url=setup.pg_url)
    app = create_app(settings, sagas=[], dashboard=DashboardSettings(token=TOKEN))
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://dash"
        ) as client:
            before = (await client.get(f"/sagas/{setup.failed}")).text
            # nothing recorded, no code: the steps the log names
            assert re.findall(r'data-step="([^"]+)" data-state', before) == ["reserve", "charge"]
            assert "was not given this saga" in before
            await setup.store.record_definitions([record_of(saga)])  # as a coordinator does
            after = (await client.get(f"/sagas/{setup.failed}")).text
            states = dict(re.findall(r'data-step="([^"]+)" data-state="([^"]+)"', after))
            assert states == {
                "reserve": "failed",
                "charge": "failed",
                "schedule": "not run",
                "confirm": "not run",
                "approve": "not run",
            }
            # reading needs no code; retrying does, and says so, changing nothing
            await _signed_in(client)
            before_retry = await _snapshot(setup.store, setup.failed)
            form = {
                "csrf": app.state.dashboard.access.form_token("saga"),
                "saga_id": setup.failed,
                "action": "retry",
                "reason": "fixed",
                "by": "alice",
                "confirmed": "yes",
            }
            refused = await client.post("/actions/saga", data=form)
            assert refused.status_code == 409
            assert "start the dashboard with its definitions" in refused.text
            await _unchanged(setup.store, setup.failed, before_retry)
    finally:
        await app.state.dashboard.aclose()


# ---------------------------------------------------------------------------- actions


async def test_retry_asks_for_confirmation_then_lands_in_the_log_with_who_and_why(
    setup: Setup,
) -> None:
    async with setup.make() as client:
        await _signed_in(client)
        csrf = _csrf((await client.get(f"/sagas/{setup.failed}")).text)
        form = {
            "csrf": csrf,
            "saga_id": setup.failed,
            "action": "retry",
            "reason": "inventory db is writable again",
            "by": "alice",
        }
        before = await _snapshot(setup.store, setup.failed)
        asked = await client.post("/actions/saga", data=form)
        assert asked.status_code == 200
        assert "Confirm: retry saga s-failed" in asked.text
        await _unchanged(setup.store, setup.failed, before)  # asking changes nothing

        done = await client.post("/actions/saga", data={**form, "confirmed": "yes"})
        assert done.status_code == 303
        assert done.headers["location"] == f"/sagas/{setup.failed}?done=retry"
        state = await setup.store.get(setup.failed)
        assert state is not None and state.status is SagaStatus.COMPENSATING
        (entry,) = [
            e for e in await setup.store.log(setup.failed) if e.event is LogEvent.RETRY_REQUESTED
        ]
        assert entry.detail == {
            "by": "alice (dashboard)",
            "reason": "inventory db is writable again",
        }
        shown = await client.get(done.headers["location"])
        assert "Retry requested" in shown.text and "by alice (dashboard)" in shown.text

        # cancel a running saga the same way
        cancel = {**form, "saga_id": setup.running, "action": "cancel", "reason": "customer asked"}
        assert (
            await client.post("/actions/saga", data={**cancel, "confirmed": "yes"})
        ).status_code == 303
        log = await setup.store.log(setup.running)
        (cancelled,) = [e for e in log if e.event is LogEvent.CANCEL_REQUESTED]
        assert cancelled.detail == {"by": "alice (dashboard)", "reason": "customer asked"}


async def test_actions_are_refused_and_change_nothing(setup: Setup) -> None:
    good = {"saga_id": "", "action": "retry", "reason": "why not", "by": "mallory"}

    async def refused(
        client: httpx.AsyncClient, form: dict[str, str], status: int, message: str
    ) -> None:
        before = await _snapshot(setup.store, setup.failed)
        for confirmed in ("", "yes"):
            response = await client.post("/actions/saga", data={**form, "confirmed": confirmed})
            assert response.status_code == status, response.text
            assert message in response.text, response.text
        await _unchanged(setup.store, setup.failed, before)

    async with setup.make() as anonymous:
        csrf = _csrf((await anonymous.get(f"/sagas/{setup.failed}")).text)
        form = {**good, "saga_id": setup.failed, "csrf": csrf}
        await refused(anonymous, form, 401, "actions need the access token")
        await anonymous.post("/login", data={"token": "wrong"})
        await refused(anonymous, form, 401, "actions need the access token")
        await _signed_in(anonymous)
        signed = anonymous
        # a forged form: no csrf, or someone else's
        await refused(signed, {**form, "csrf": ""}, 403, "this form was not made by this dashboard")
        await refused(signed, {**form, "csrf": "0" * 64}, 403, "not made by this dashboard")
        await refused(signed, {**form, "action": "delete"}, 400, "unknown action &#39;delete&#39;")
        await refused(signed, {**form, "reason": "  "}, 400, "a reason is required")
        await refused(signed, {**form, "by": ""}, 400, "say who you are")
        await refused(
            signed, {**form, "saga_id": "no-such"}, 404, "no saga with id &#39;no-such&#39;"
        )
        # the engine refuses: its own words
        before = await _snapshot(setup.store, setup.running)
        response = await signed.post(
            "/actions/saga", data={**form, "saga_id": setup.running, "confirmed": "yes"}
        )
        assert response.status_code == 409
        assert "only a FAILED saga can be retried; it is RUNNING" in response.text
        await _unchanged(setup.store, setup.running, before)

    async with setup.make(read_only=True) as read_only:
        await _signed_in(read_only)
        page = (await read_only.get(f"/sagas/{setup.failed}")).text
        assert 'id="retry"' not in page and "This dashboard is read-only." in page
        csrf = read_only._transport.app.state.dashboard.access.form_token("saga")  # type: ignore[attr-defined]
        form = {**good, "saga_id": setup.failed, "csrf": csrf}
        await refused(read_only, form, 403, "this dashboard is read-only")

    async with setup.make(token=None) as no_token:
        page = (await no_token.get(f"/sagas/{setup.failed}")).text
        assert "Actions are off" in page
        csrf = no_token._transport.app.state.dashboard.access.form_token("saga")  # type: ignore[attr-defined]
        await refused(
            no_token, {**good, "saga_id": setup.failed, "csrf": csrf}, 403, "actions are off"
        )


async def test_a_proxy_header_names_who_acts(setup: Setup) -> None:
    settings = Settings(database_url=setup.pg_url)
    options = DashboardSettings(user_header="X-Forwarded-User")
    app = create_app(settings, sagas=[saga], dashboard=options)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://dash") as client:
            csrf = app.state.dashboard.access.form_token("saga")
            form = {"csrf": csrf, "saga_id": setup.failed, "action": "retry", "reason": "fixed"}
            anonymous = await client.post("/actions/saga", data={**form, "confirmed": "yes"})
            assert anonymous.status_code == 403  # no header, no token configured
            done = await client.post(
                "/actions/saga",
                data={**form, "confirmed": "yes"},
                headers={"X-Forwarded-User": "bob@example.com"},
            )
            assert done.status_code == 303
        log = await setup.store.log(setup.failed)
        (entry,) = [e for e in log if e.event is LogEvent.RETRY_REQUESTED]
        assert entry.detail["by"] == "bob@example.com (dashboard)"
    finally:
        await app.state.dashboard.aclose()


# ---------------------------------------------------------------------------- dead letters


async def _dead_letter(amqp_url: str, saga_id: str, reason: str) -> None:
    topology = Settings(amqp_url=amqp_url).topology()
    message_id = f"dl-{saga_id}-{time.monotonic_ns()}"
    body = Envelope(
        message_id=message_id,
        command_id=f"{saga_id}:reserve:command",
        saga_id=saga_id,
        saga_name="sample",
        step="reserve",
        step_index=0,
        kind=MessageKind.COMMAND,
        attempt=1,
        type="inventory.reserve",
        payload={"order_id": "o"},
    ).model_dump_json(by_alias=True)
    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        await channel.default_exchange.publish(
            aio_pika.Message(
                body.encode(),
                message_id=message_id,
                headers={H_REASON: reason, H_SOURCE_QUEUE: topology.service_queue("inventory")},
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            ),
            routing_key=topology.dead_letter_queue,
        )


async def test_dead_letters_grouped_and_replayed_with_who_and_why(
    setup: Setup, amqp_url: str
) -> None:
    async with setup.make(amqp_url=amqp_url) as client:
        assert "The dead-letter queue is empty." in (await client.get("/dead-letters")).text
        # the service queue must exist for a replay to route back to it
        broker = await client._transport.app.state.dashboard.transport()  # type: ignore[attr-defined]
        await broker.start(["inventory"])
        await _dead_letter(amqp_url, setup.running, "unknown_action: inventory.reserve")
        await _dead_letter(amqp_url, setup.failed, "unknown_action: inventory.reserve")
        await _dead_letter(amqp_url, "s-bulk-00", "invalid: payload")
        page = (await client.get("/dead-letters")).text
        assert re.findall(r'data-reason="([^"]+)"', page) == [
            "unknown_action: inventory.reserve",
            "invalid: payload",
        ]
        csrf = _csrf(page)
        group = {"csrf": csrf, "group": "unknown_action: inventory.reserve", "reason": "fixed"}
        refused = await client.post("/actions/dead-letters", data={**group, "by": "carol"})
        assert refused.status_code == 401  # not signed in
        await _signed_in(client)
        unknown = await client.post(
            "/actions/dead-letters",
            data={"csrf": csrf, "id": "no-such-letter", "reason": "x", "by": "carol"},
        )
        assert unknown.status_code == 404 and "no dead letter with id" in unknown.text
        asked = await client.post("/actions/dead-letters", data={**group, "by": "carol"})
        assert "Confirm: replay 2 dead letters of the group" in asked.text
        done = await client.post(
            "/actions/dead-letters", data={**group, "by": "carol", "confirmed": "yes"}
        )
        assert done.status_code == 303, done.text
        after = (await client.get("/dead-letters")).text
        assert re.findall(r'data-reason="([^"]+)"', after) == ["invalid: payload"]
        for saga_id in (setup.running, setup.failed):
            (entry,) = [
                e
                for e in await setup.store.log(saga_id)
                if e.event is LogEvent.DEAD_LETTER_REPLAYED
            ]
            assert (entry.detail["by"], entry.detail["reason"]) == ("carol (dashboard)", "fixed")
