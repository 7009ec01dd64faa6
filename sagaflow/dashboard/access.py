"""Who may act from the dashboard, and whether a form is one the dashboard made.

Reading needs nothing beyond reaching the port (127.0.0.1 by default). An
action (retry, cancel, replay) needs, unless the dashboard is read-only:

- the access token (``SAGAFLOW_DASHBOARD_TOKEN``), signed in once at
  ``/login`` (an HttpOnly, SameSite=Strict cookie) or sent as
  ``Authorization: Bearer``; the operator types the name recorded as who; or
- a user named by a trusted reverse proxy in ``SAGAFLOW_DASHBOARD_USER_HEADER``
  (``X-Forwarded-User``, say); that name is who. The proxy must drop the header
  from the requests it forwards, or anyone can claim any name.

Every action form carries a token derived from a secret of the dashboard
(``csrf``): a form posted from another page, or edited by hand, is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict
from starlette.requests import Request

__all__ = ["COOKIE", "Access", "DashboardSettings", "Refused"]

COOKIE = "sagaflow_dashboard_token"
MAX_REASON = 500
MAX_NAME = 100


class DashboardSettings(BaseSettings):
    """The dashboard's own settings, from ``SAGAFLOW_DASHBOARD_*`` variables.

    Args:
        token: The access token actions need (unset: only a proxy header grants them).
        read_only: Refuse every action, whoever asks.
        user_header: The request header a trusted reverse proxy sets to the
            signed-in user's name; that user may act.
        refresh: Seconds between live updates of an open page.
        page_size: Sagas per page of the list.
    """

    model_config = SettingsConfigDict(env_prefix="SAGAFLOW_DASHBOARD_", frozen=True)

    token: SecretStr | None = None
    read_only: bool = False
    user_header: str | None = None
    refresh: float = Field(default=2.0, gt=0.2, le=60.0)
    page_size: int = Field(default=50, ge=5, le=200)


class Refused(Exception):
    """An action the dashboard will not take, with the message to show and its status."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Access:
    """Decides who acts; makes and checks the forms' ``csrf`` tokens."""

    def __init__(self, settings: DashboardSettings) -> None:
        self.settings = settings
        token = settings.token.get_secret_value() if settings.token is not None else ""
        self._token = token
        # with a token, every process of a deployment makes the same form tokens
        self._secret = (
            hashlib.sha256(b"sagaflow-dashboard-csrf\n" + token.encode()).digest()
            if token
            else os.urandom(32)
        )

    @property
    def actions_enabled(self) -> bool:
        """Whether anyone at all may act here (shows or hides the action forms)."""
        return not self.settings.read_only and bool(self._token or self.settings.user_header)

    def proxy_user(self, request: Request) -> str | None:
        """The user a trusted proxy names, if it is configured and named one."""
        header = self.settings.user_header
        if not header:
            return None
        value = request.headers.get(header, "").strip()
        return value[:MAX_NAME] or None

    def signed_in(self, request: Request) -> bool:
        """Whether the request carries the access token (cookie or bearer)."""
        if not self._token:
            return False
        offered = request.cookies.get(COOKIE, "")
        authorization = request.headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            offered = authorization[7:].strip()
        return self.token_matches(offered)

    def token_matches(self, offered: str) -> bool:
        """Constant-time comparison with the access token."""
        return bool(self._token) and hmac.compare_digest(offered.encode(), self._token.encode())

    def who(self, request: Request, typed_name: str) -> str:
        """Who is acting, or why they may not.

        Raises:
            Refused: read-only, no credentials, or no name to record.
        """
        if self.settings.read_only:
            raise Refused("this dashboard is read-only (SAGAFLOW_DASHBOARD_READ_ONLY): no actions")
        user = self.proxy_user(request)
        if user is not None:
            return user
        if not self._token:
            raise Refused(
                "actions are off: set SAGAFLOW_DASHBOARD_TOKEN, or"
                " SAGAFLOW_DASHBOARD_USER_HEADER behind a reverse proxy"
            )
        if not self.signed_in(request):
            raise Refused("actions need the access token: sign in first (/login)", 401)
        name = typed_name.strip()
        if not name:
            raise Refused("say who you are: your name is recorded in the saga log", 400)
        if len(name) > MAX_NAME:
            raise Refused(f"the name is longer than {MAX_NAME} characters", 400)
        return name

    def form_token(self, purpose: str) -> str:
        """The ``csrf`` value of a form for ``purpose`` (``saga`` or ``dead-letters``)."""
        return hmac.new(self._secret, purpose.encode(), hashlib.sha256).hexdigest()

    def check_form(self, purpose: str, offered: str) -> None:
        """Refuse a form this dashboard did not make.

        Raises:
            Refused: the ``csrf`` field is missing or wrong.
        """
        if not hmac.compare_digest(offered.encode(), self.form_token(purpose).encode()):
            raise Refused(
                "this form was not made by this dashboard (or it restarted): reload the page"
                " and try again; nothing was changed"
            )


def checked_reason(text: str) -> str:
    """The operator's reason, required and bounded.

    Raises:
        Refused: empty or too long.
    """
    reason = text.strip()
    if not reason:
        raise Refused("a reason is required: it is recorded in the saga log", 400)
    if len(reason) > MAX_REASON:
        raise Refused(f"the reason is longer than {MAX_REASON} characters", 400)
    return reason
