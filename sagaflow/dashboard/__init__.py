"""The operator's dashboard: an ASGI app over the coordinator's tables.

``sagaflow dashboard`` serves it (docs/dashboard.md); to mount it in your own
Starlette or FastAPI service::

    from sagaflow.dashboard import DashboardSettings, create_app

    app.mount("/sagas", create_app(settings, sagas=SAGAS))

Needs the ``dashboard`` extra (``pip install 'sagaflow[dashboard]'``).
"""

from sagaflow.dashboard.access import DashboardSettings
from sagaflow.dashboard.app import Dashboard, create_app

__all__ = ["Dashboard", "DashboardSettings", "create_app"]
