"""The dashboard's ASGI application: pages, live fragments and operator actions.

:func:`create_app` builds a Starlette app; ``sagaflow dashboard`` serves it
with uvicorn on 127.0.0.1, and a user can mount it in their own FastAPI or
Starlette service (``app.mount("/sagas", create_app(settings, sagas=SAGAS))``).
Its connections (a small PostgreSQL pool, one broker connection for the
dead-letter page) open on first use and close with the app's lifespan; a
mounted app's lifespan is not run by the parent, so call
:meth:`Dashboard.aclose` from the parent's own shutdown.

Every page renders on the server and reads without JavaScript. With it, the
live part of a page (``#live``) is fetched again every ``refresh`` seconds
(``X-Sagaflow-Live: 1`` asks for that fragment alone) and swapped in place.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
import orjson
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from sagaflow.cli.render import undoing
from sagaflow.config import Settings
from sagaflow.core.definition import Saga, Wait
from sagaflow.core.errors import ConfigurationError, SagaflowError
from sagaflow.core.ports import SagaStore, Transport
from sagaflow.core.state import SagaStatus
from sagaflow.dashboard.access import COOKIE, Access, DashboardSettings, Refused, checked_reason
from sagaflow.dashboard.queries import COUNT_CAP, FilterError, SagaFilter, SagaQueries
from sagaflow.dashboard.views import definition_of, saga_view
from sagaflow.runtime.client import SagaClient
from sagaflow.runtime.dead_letters import dead_letter_document, replay_dead_letters
from sagaflow.runtime.writer import SagaRegistry
from sagaflow.store.postgres import PostgresSagaStore

__all__ = ["Dashboard", "create_app"]

_HERE = Path(__file__).resolve().parent
_LIVE_HEADER = "x-sagaflow-live"
_PEEK = 1_000
_NOTICES = {
    "retry": "Retry requested: the saga resumes where it stopped.",
    "cancel": "Cancel requested: the saga compensates the steps done.",
    "replay": "Replayed.",
    "signal": "Signal sent: the saga takes it at its wait (or keeps it until it gets there).",
}


def search_keys(sagas: Sequence[Saga[Any]]) -> list[str]:
    """The text fields of the sagas' data models: where a bare search term is looked for."""
    keys: set[str] = set()
    for saga in sagas:
        for name, info in saga.data_model.model_fields.items():
            if info.annotation is str or "str" in str(info.annotation):
                keys.add(name)
    return sorted(keys)


class Dashboard:
    """The dashboard's state: settings, connections (opened on first use) and templates.

    Args:
        settings: Where the coordinator's database and the broker are.
        sagas: The saga definitions: needed to draw a saga's steps before they
            run and to retry or cancel (the engine decides with them).
        dashboard: Token, read-only mode, proxy header, refresh period.
    """

    def __init__(
        self,
        settings: Settings,
        sagas: Sequence[Saga[Any]] = (),
        dashboard: DashboardSettings | None = None,
    ) -> None:
        self.settings = settings
        self.options = dashboard or DashboardSettings()
        self.access = Access(self.options)
        self.registry = SagaRegistry(sagas)
        self.queries = SagaQueries(
            settings.database_url, schema=settings.db_schema, keys=search_keys(sagas)
        )
        self._store: SagaStore | None = None
        self._transport: Transport | None = None
        self._client: SagaClient | None = None
        self._lock = asyncio.Lock()
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,  # every value on a page is user data
            undefined=jinja2.StrictUndefined,
        )
        env.filters["ts"] = _timestamp
        self.templates = Jinja2Templates(env=env)

    async def store(self) -> SagaStore:
        """The coordinator's store (its pool opened once)."""
        async with self._lock:
            if self._store is None:
                await self.queries.start()
                # a reader and an occasional writer: a few connections, not a coordinator's ten
                store = PostgresSagaStore(
                    self.settings.database_url,
                    schema=self.settings.db_schema,
                    min_size=1,
                    max_size=3,
                )
                await store.start()
                self._store = store
            return self._store

    async def transport(self) -> Transport:
        """The broker connection the dead-letter page uses (opened once)."""
        async with self._lock:
            if self._transport is None:
                broker = self.settings.transport(connection_name="sagaflow-dashboard")
                await broker.start([])
                self._transport = broker
            return self._transport

    async def client(self) -> SagaClient:
        """The client that retries and cancels, over the same store."""
        store = await self.store()
        if self._client is None:
            self._client = SagaClient(self.registry, store=store)
        return self._client

    async def aclose(self) -> None:
        """Close what was opened."""
        store, self._store = self._store, None
        broker, self._transport = self._transport, None
        self._client = None
        await self.queries.close()
        if store is not None:
            await store.close()
        if broker is not None:
            await broker.close()

    # ------------------------------------------------------------------ rendering

    def render(
        self, request: Request, template: str, context: dict[str, Any], status: int = 200
    ) -> Response:
        live = request.headers.get(_LIVE_HEADER) == "1"
        base = {
            "root": request.scope.get("root_path", ""),
            "refresh": self.options.refresh,
            "read_only": self.options.read_only,
            "actions_enabled": self.access.actions_enabled,
            "signed_in": self.access.signed_in(request),
            "proxy_user": self.access.proxy_user(request),
            "needs_name": self.access.proxy_user(request) is None,
            "live_only": live,
            "error": None,
            "notice": _NOTICES.get(request.query_params.get("done", "")),
        }
        base.update(context)
        return self.templates.TemplateResponse(request, template, base, status_code=status)

    def problem(self, request: Request, message: str, status: int) -> Response:
        return self.render(request, "problem.html", {"error": message}, status)


def _timestamp(value: float | None) -> str:
    """Seconds since the epoch as ``2026-12-04 17:15:13`` (UTC)."""
    if value is None:
        return ""
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------- pages


def _dash(request: Request) -> Dashboard:
    dashboard: Dashboard = request.app.state.dashboard
    return dashboard


async def list_page(request: Request) -> Response:
    dash = _dash(request)
    try:
        where = SagaFilter.from_query(request.query_params)
        cursor = request.query_params.get("after") or None
        await dash.store()
        page = await dash.queries.page(where, cursor, dash.options.page_size)
    except FilterError as exc:
        return dash.problem(request, str(exc), 400)
    names = await dash.queries.step_names(page.sagas)
    rows = []
    for state in page.sagas:
        rows.append(
            {
                "saga_id": state.saga_id,
                "saga_name": state.saga_name,
                "saga_version": state.saga_version,
                "status": state.status.value,
                "step": names.get(state.saga_id, state.failure and state.failure.step)
                if state.status is not SagaStatus.COMPLETED
                else None,
                "undoing": undoing({"kind": state.kind.value, "status": state.status.value}),
                "reason": None if state.failure is None else state.failure.reason,
                "waiting_for": state.waiting_for if state.status is SagaStatus.RUNNING else None,
                "overdue": state.overdue
                or (
                    state.deadline_at is not None
                    and not state.status.terminal
                    and state.deadline_at < time.time()
                ),
                "failed_step": None if state.failure is None else state.failure.step,
                "updated_at": state.updated_at,
                "created_at": state.created_at,
            }
        )
    query = where.query()
    next_link = None
    if page.next_cursor is not None:
        next_link = "?" + urlencode({**query, "after": page.next_cursor})
    return dash.render(
        request,
        "list.html",
        {
            "rows": rows,
            "filter": query,
            "counts": page.counts,
            "total": sum(min(n, COUNT_CAP) for n in page.counts.values()),
            "capped": any(n > COUNT_CAP for n in page.counts.values()),
            "cap": COUNT_CAP,
            "statuses": [s.value for s in SagaStatus],
            "next_link": next_link,
            "first_link": "?" + urlencode(query) if cursor else None,
            "status_link": lambda status: "?" + urlencode({**query, "status": status}),
            "names": sorted({s.name for s in dash.registry}),
        },
    )


async def saga_page(request: Request) -> Response:
    dash = _dash(request)
    saga_id = request.path_params["saga_id"]
    store = await dash.store()
    state = await store.get(saga_id)
    if state is None:
        return dash.problem(request, f"no saga with id {saga_id!r}", 404)
    log = await store.log(saga_id)
    saga = dash.registry.of(state)
    shape = (
        None if saga is not None else await dash.queries.shape(state.saga_name, state.saga_version)
    )
    signals = [] if saga is None else [w.signal_name for w in saga.steps if isinstance(w, Wait)]
    doc = saga_view(
        definition_of(saga, shape),
        state,
        log,
        jaeger_url=dash.settings.jaeger_url,
        saga_signals=signals,
    )
    return dash.render(request, "saga.html", {"saga": doc, "csrf": dash.access.form_token("saga")})


async def dead_letters_page(request: Request) -> Response:
    dash = _dash(request)
    try:
        broker = await dash.transport()
        letters = await broker.dead_letters(_PEEK)
    except SagaflowError as exc:
        return dash.problem(request, f"the broker cannot be read: {exc}", 503)
    groups: dict[str, list[dict[str, Any]]] = {}
    for letter in letters:
        groups.setdefault(letter.reason, []).append(dead_letter_document(letter))
    return dash.render(
        request,
        "dead_letters.html",
        {
            "groups": sorted(groups.items(), key=lambda item: (-len(item[1]), item[0])),
            "count": len(letters),
            "capped": len(letters) >= _PEEK,
            "csrf": dash.access.form_token("dead-letters"),
        },
    )


# ---------------------------------------------------------------------------- actions


def _field(form: FormData, name: str) -> str:
    value = form.get(name)
    return value if isinstance(value, str) else ""


async def saga_action(request: Request) -> Response:
    """Retry, cancel or signal: asks for confirmation, then acts; refusals change nothing."""
    dash = _dash(request)
    form = await request.form()
    saga_id = _field(form, "saga_id")
    action = _field(form, "action")
    root = request.scope.get("root_path", "")
    try:
        dash.access.check_form("saga", _field(form, "csrf"))
        if action not in ("retry", "cancel", "signal"):
            raise Refused(f"unknown action {action!r}: retry, cancel or signal", 400)
        who = dash.access.who(request, _field(form, "by"))
        reason = checked_reason(_field(form, "reason"))
        signal, data = _signal_of(form) if action == "signal" else ("", {})
        client = await dash.client()
        state = await client.get(saga_id)
        if state is None:
            raise Refused(f"no saga with id {saga_id!r}; nothing was changed", 404)
        if _field(form, "confirmed") != "yes":
            fields = {
                "saga_id": saga_id,
                "action": action,
                "reason": reason,
                "by": _field(form, "by"),
                "csrf": _field(form, "csrf"),
            }
            what = f"{action} saga {saga_id}"
            if action == "signal":
                fields.update(signal=signal, data=_field(form, "data"))
                what = f"send signal {signal} to saga {saga_id}"
            return dash.render(
                request,
                "confirm.html",
                {
                    "what": what,
                    "target": "saga",
                    "fields": fields,
                    "status": state.status.value,
                    "who": who,
                    "reason": reason,
                    "data": orjson.dumps(data).decode() if action == "signal" else None,
                    "back": f"{root}/sagas/{saga_id}",
                },
            )
        by = f"{who} (dashboard)"
        if action == "retry":
            await client.retry_saga(saga_id, by=by, reason=reason)
        elif action == "cancel":
            await client.cancel_saga(saga_id, by=by, reason=reason)
        else:
            after = await client.signal_saga(saga_id, signal, data, by=by, reason=reason)
            if after == state:  # the engine ignored it: said, not hidden
                raise Refused(f"signal {signal!r} was received already; nothing was changed", 409)
    except Refused as exc:
        return dash.problem(request, exc.message, exc.status)
    except ConfigurationError as exc:  # the dashboard was not given this saga's definition
        return dash.problem(request, f"{exc}: start the dashboard with its definitions", 409)
    except SagaflowError as exc:  # the engine refused: its own words
        return dash.problem(request, f"refused: {exc}; nothing was changed", 409)
    return RedirectResponse(f"{root}/sagas/{saga_id}?done={action}", status_code=303)


def _signal_of(form: FormData) -> tuple[str, dict[str, Any]]:
    """The signal's name and data from the form; the data must be a JSON object.

    Raises:
        Refused: no name, or data that is not a JSON object.
    """
    name = _field(form, "signal").strip()
    if not name:
        raise Refused("name the signal to send", 400)
    text = _field(form, "data").strip() or "{}"
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise Refused(
            f"the signal's data is not valid JSON ({exc}); nothing was changed", 400
        ) from None
    if not isinstance(data, dict):
        raise Refused(
            "the signal's data must be a JSON object, such as {}; nothing was changed", 400
        )
    return name, data


async def replay_action(request: Request) -> Response:
    """Replay one dead letter or all of a reason's group, with confirmation."""
    dash = _dash(request)
    form = await request.form()
    ids = [value for value in form.getlist("id") if isinstance(value, str) and value]
    group = _field(form, "group")
    try:
        dash.access.check_form("dead-letters", _field(form, "csrf"))
        who = dash.access.who(request, _field(form, "by"))
        reason = checked_reason(_field(form, "reason"))
        broker = await dash.transport()
        present = await broker.dead_letters(_PEEK)
        if group:
            wanted = [letter.id for letter in present if letter.reason == group]
        else:
            known = {letter.id for letter in present}
            missing = [i for i in ids if i not in known]
            if missing:
                raise Refused(f"no dead letter with id {missing[0]!r}; nothing was replayed", 404)
            wanted = ids
        if not wanted:
            raise Refused("nothing to replay: choose a dead letter or a group", 400)
        if _field(form, "confirmed") != "yes":
            return dash.render(
                request,
                "confirm.html",
                {
                    "what": f"replay {len(wanted)} dead letter{'s' if len(wanted) != 1 else ''}"
                    + (f" of the group {group!r}" if group else ""),
                    "target": "dead-letters",
                    "fields": {
                        "group": group,
                        "reason": reason,
                        "by": _field(form, "by"),
                        "csrf": _field(form, "csrf"),
                    },
                    "ids": ids,
                    "status": None,
                    "who": who,
                    "reason": reason,
                    "back": f"{request.scope.get('root_path', '')}/dead-letters",
                },
            )
        store = await dash.store()
        result = await replay_dead_letters(
            broker, store, wanted, by=f"{who} (dashboard)", reason=reason, now=time.time()
        )
    except Refused as exc:
        return dash.problem(request, exc.message, exc.status)
    except SagaflowError as exc:
        return dash.problem(request, f"refused: {exc}", 409)
    root = request.scope.get("root_path", "")
    query = urlencode({"done": "replay", "replayed": len(result.ids)})
    return RedirectResponse(f"{root}/dead-letters?{query}", status_code=303)


async def login(request: Request) -> Response:
    dash = _dash(request)
    if request.method == "GET":
        return dash.render(request, "login.html", {})
    form = await request.form()
    if not dash.access.token_matches(_field(form, "token")):
        return dash.render(request, "login.html", {"error": "wrong token"}, 401)
    root = request.scope.get("root_path", "")
    response = RedirectResponse(f"{root}/", status_code=303)
    response.set_cookie(
        COOKIE,
        _field(form, "token"),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path=f"{root}/" if root else "/",
    )
    return response


async def logout(request: Request) -> Response:
    root = request.scope.get("root_path", "")
    response = RedirectResponse(f"{root}/", status_code=303)
    response.delete_cookie(COOKIE, path=f"{root}/" if root else "/")
    return response


async def health(request: Request) -> Response:
    return PlainTextResponse("ok")


def create_app(
    settings: Settings | None = None,
    *,
    sagas: Sequence[Saga[Any]] = (),
    dashboard: DashboardSettings | None = None,
) -> Starlette:
    """The dashboard as an ASGI app (``app.state.dashboard`` is its :class:`Dashboard`).

    Args:
        settings: The coordinator's settings (``SAGAFLOW_*`` by default).
        sagas: The saga definitions (to draw steps and to retry or cancel).
        dashboard: Token, read-only mode... (``SAGAFLOW_DASHBOARD_*`` by default).
    """
    dash = Dashboard(settings or Settings(), sagas, dashboard)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await dash.aclose()

    app = Starlette(
        routes=[
            Route("/", list_page),
            Route("/sagas/{saga_id:path}", saga_page),
            Route("/dead-letters", dead_letters_page),
            Route("/actions/saga", saga_action, methods=["POST"]),
            Route("/actions/dead-letters", replay_action, methods=["POST"]),
            Route("/login", login, methods=["GET", "POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/health", health),
            Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.dashboard = dash
    return app
