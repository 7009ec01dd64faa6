"""``sagaflow dashboard``: serve the operator's dashboard (docs/dashboard.md)."""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from sagaflow.cli.common import UsageProblem, current_settings, guarded, summarize_validation
from sagaflow.cli.resolve import load_sagas, split_specs

__all__ = ["dashboard"]

log = logging.getLogger("sagaflow.cli")


@guarded
def dashboard(
    module: Annotated[
        list[str] | None,
        typer.Option(
            "--module",
            "-m",
            metavar="MODULE:ATTR",
            envvar="SAGAFLOW_SAGAS",
            help="Saga definitions, to draw steps before they run and to retry or cancel"
            " (default: SAGAFLOW_SAGAS).",
            show_envvar=False,
        ),
    ] = None,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on; 0.0.0.0 exposes it.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8089,
    read_only: Annotated[
        bool,
        typer.Option("--read-only", help="Refuse every action (SAGAFLOW_DASHBOARD_READ_ONLY)."),
    ] = False,
) -> None:
    """Serve the dashboard: sagas, their steps and logs, dead letters, and actions.

    Actions (retry, cancel, replay) need SAGAFLOW_DASHBOARD_TOKEN, or
    SAGAFLOW_DASHBOARD_USER_HEADER behind a reverse proxy that sets it.
    """
    try:
        import uvicorn
        from pydantic import ValidationError

        from sagaflow.dashboard import DashboardSettings, create_app
    except ImportError as exc:
        raise UsageProblem(
            f"the dashboard needs the 'dashboard' extra: pip install 'sagaflow[dashboard]' ({exc})"
        ) from exc
    settings = current_settings()
    try:
        options = DashboardSettings()
    except ValidationError as exc:
        raise UsageProblem(f"invalid settings: {summarize_validation(exc)}") from exc
    if read_only:
        options = options.model_copy(update={"read_only": True})
    # without definitions it still reads everything (and draws from recorded shapes)
    sagas = load_sagas(split_specs(module)) if module else []
    app = create_app(settings, sagas=sagas, dashboard=options)
    log.info(
        "dashboard on http://%s:%d (actions %s)",
        host,
        port,
        "off: read-only"
        if options.read_only
        else "need the token or the proxy header"
        if app.state.dashboard.access.actions_enabled
        else "off: no SAGAFLOW_DASHBOARD_TOKEN",
    )
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False)
