"""The dashboard's safety: the access token, CSRF tokens on actions, the same-origin check,
and the response headers that keep pages from running anything but the dashboard's own script.

* A per-process secret (random at start) signs two cookies: the session id (``omniq_session``,
  the CSRF token of a form is an HMAC of it) and, with a token configured, the proof of login
  (``omniq_auth``, an HMAC of the token: the token itself is never stored in the browser).
* Every action is a POST that must carry the form's CSRF token and, when the browser sends an
  ``Origin`` (every current browser does on a POST), come from the dashboard's own origin.
* With ``read_only`` every action is refused before anything is read.
* Without a token only loopback ``Host`` names are answered (``allowed_hosts`` widens it): a
  page whose name an attacker rebinds to 127.0.0.1 (DNS rebinding) is refused, so it can
  neither read a page nor fetch a CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Mapping, Sequence
from urllib.parse import urlsplit

SESSION_COOKIE = "omniq_session"
AUTH_COOKIE = "omniq_auth"
TOKEN_ENV = "OMNIQ_DASHBOARD_TOKEN"
#: The ``Host`` names a dashboard without a token answers by default (with any port).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")

#: No script but the dashboard's own file, no inline script or style, no framing.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Not "no-referrer": with it a browser sends "Origin: null" on the dashboard's own POSTs.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` serves this machine only (127.0.0.0/8, ::1, localhost)."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_matches(name: str, pattern: str) -> bool:
    """Whether host ``name`` (no port) is ``pattern``: a name, ``*.domain`` or ``*``."""
    if pattern == "*" or name == pattern:
        return True
    return pattern.startswith("*.") and name.endswith(pattern[1:])


class Guard:
    """Checks a request's access token, CSRF token and origin."""

    def __init__(
        self,
        *,
        token: str | None = None,
        read_only: bool = False,
        secret: bytes | None = None,
        allowed_hosts: Sequence[str] | None = None,
    ) -> None:
        if token is not None and len(token) < 8:
            raise ValueError("the dashboard token must have at least 8 characters")
        self.token = token
        self.read_only = read_only
        self._secret = secret or secrets.token_bytes(32)
        extra = [h.strip().lower() for h in allowed_hosts or () if h.strip()]
        for name in extra:
            if name.rsplit("]", 1)[-1].count(":") == 1:
                raise ValueError(f"allowed host {name!r}: give the name without a port")
            if "*" in name[1:] or (name.startswith("*") and name != "*" and name[1] != "."):
                raise ValueError(f"allowed host {name!r}: a wildcard must be like *.example.com")
        #: Origins of these names are the dashboard's own too (behind a proxy that rewrites
        #: ``Host``, the browser's origin names the proxy).
        self.extra_hosts = tuple(extra)
        self.hosts: tuple[str, ...] = (
            ("*",) if "*" in extra or (token is not None and not extra) else LOOPBACK_HOSTS
        )
        if self.hosts != ("*",):
            self.hosts += tuple(extra)

    def _sign(self, purpose: str, value: str) -> str:
        return hmac.new(self._secret, f"{purpose}|{value}".encode(), hashlib.sha256).hexdigest()

    # -- sessions and CSRF -------------------------------------------------------------------
    @staticmethod
    def new_session() -> str:
        return secrets.token_urlsafe(24)

    def csrf_token(self, session: str) -> str:
        return self._sign("csrf", session)

    def csrf_ok(self, session: str | None, sent: str | None) -> bool:
        if not session or not sent:
            return False
        return hmac.compare_digest(self.csrf_token(session), sent)

    def same_origin(self, headers: Mapping[str, str], scheme: str) -> bool:
        """A browser's POST names the page's origin; it must be the dashboard's own: the
        ``Host`` it was sent to, an ``X-Forwarded-Host`` (each of a comma-separated list, as
        proxies chain them), or a name in ``allowed_hosts``. A request without ``Origin``
        (not from a current browser) relies on the CSRF token."""
        origin = headers.get("origin")
        if origin is None:
            return True
        hosts = [headers.get("host", "")]
        hosts += [h.strip() for h in headers.get("x-forwarded-host", "").split(",") if h.strip()]
        allowed = {f"{s}://{h}" for h in hosts if h for s in (scheme, "http", "https")}
        if origin in allowed:
            return True
        try:
            parts = urlsplit(origin)
            name = parts.hostname
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not name:
            return False
        name = f"[{name}]" if ":" in name else name
        return any(host_matches(name, pattern) for pattern in self.extra_hosts)

    # -- access token ------------------------------------------------------------------------
    def auth_cookie(self) -> str:
        assert self.token is not None
        return self._sign("auth", self.token)

    def token_ok(self, sent: str | None) -> bool:
        return (
            self.token is not None
            and sent is not None
            and hmac.compare_digest(sent.encode(), self.token.encode())
        )

    def authorized(self, headers: Mapping[str, str], cookies: Mapping[str, str]) -> bool:
        """With no token configured, everyone that can reach the port; else the login cookie
        or ``Authorization: Bearer TOKEN`` (for scrapers and scripts)."""
        if self.token is None:
            return True
        cookie = cookies.get(AUTH_COOKIE)
        if cookie is not None and hmac.compare_digest(cookie, self.auth_cookie()):
            return True
        scheme, _, value = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(value.strip())
