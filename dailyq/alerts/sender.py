"""One alert POSTed to the webhook (also one outside heartbeat, heartbeat_ping.py):
standard library only (``urllib.request``).

A POST is answered by one of three outcomes:

* ``delivered``: a 2xx. ``on_accepted`` runs as soon as the status line is read,
  before the body, so the outbox forgets the alert at the earliest moment;
* ``retry``: the endpoint could not be reached, timed out, or answered 408, 429 or
  5xx (with its ``Retry-After``, if any): it may work later;
* ``refused``: any other answer (400 bad payload, 403, 404 or 410 webhook removed,
  a redirect): sending the same body again would not help.

Timeouts are short (``TIMEOUT_S`` per connect and per read) so a hanging endpoint
holds its sender briefly, and never the scheduler's tick (alerts.py sends from a
thread of its own). Redirects are not followed: urllib would turn the POST into a
GET without its body. Proxies come from the usual environment (``HTTPS_PROXY``...).

Nothing here shows the URL: reasons name the status or the network error only.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Mapping

from .. import __version__

TIMEOUT_S = 5.0
DELIVERED, RETRY, REFUSED = "delivered", "retry", "refused"
RETRYABLE_STATUSES = frozenset({408, 425, 429})


@dataclass(frozen=True)
class Delivery:
    outcome: str  # DELIVERED | RETRY | REFUSED
    reason: str  # "HTTP 200", "HTTP 503", "connection refused", ...
    retry_after_s: float | None = None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None  # urllib then raises HTTPError for the 3xx: a refusal, see above


_OPENER = urllib.request.build_opener(_NoRedirects)


def post_alert(url: str, body: str, alert_id: str, on_accepted: Callable[[], None],
               timeout_s: float = TIMEOUT_S) -> Delivery:
    """POST ``body`` (JSON) to ``url``; ``on_accepted()`` runs on a 2xx, before the
    response's body is read. Never raises for a network or HTTP problem."""
    # For receivers that can drop repeats (the one duplicate window, see alert_outbox.py).
    return post_json(url, body, {"X-Dailyq-Alert-Id": alert_id}, on_accepted, timeout_s)


def post_json(url: str, body: str, headers: Mapping[str, str] | None = None,
              on_accepted: Callable[[], None] | None = None, timeout_s: float = TIMEOUT_S) -> Delivery:
    """POST ``body`` (JSON) to ``url`` with ``headers`` besides dailyq's own: the one
    sender of alerts and of the outside heartbeat (heartbeat_ping.py). ``on_accepted()``
    runs on a 2xx, before the response's body is read. Never raises for a network or
    HTTP problem."""
    request = urllib.request.Request(url, data=body.encode("utf-8"), method="POST", headers={
        "Content-Type": "application/json; charset=utf-8",
        "User-Agent": f"dailyq/{__version__}",
        **(headers or {}),
    })
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            status = response.status
            if 200 <= status < 300:
                if on_accepted is not None:
                    on_accepted()
                return Delivery(DELIVERED, f"HTTP {status}")
            return Delivery(REFUSED, f"HTTP {status}")  # 1xx cannot end a request; anything else is odd
    except urllib.error.HTTPError as error:
        status = error.code
        error.close()
        if status in RETRYABLE_STATUSES or status >= 500:
            return Delivery(RETRY, f"HTTP {status}", _retry_after(error.headers.get("Retry-After")))
        return Delivery(REFUSED, f"HTTP {status}")
    except urllib.error.URLError as error:
        return Delivery(RETRY, _network_reason(error.reason))
    except (OSError, http.client.HTTPException) as error:  # a reset or a bad status line mid-response
        return Delivery(RETRY, _network_reason(error))


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is ignored: the backoff applies)."""
    try:
        seconds = float(value) if value else None
    except ValueError:
        return None
    return seconds if seconds is not None and 0 <= seconds <= 3600 else None


def _network_reason(reason: object) -> str:
    """A short reason that cannot echo the URL (urllib's messages sometimes hold it)."""
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused"
    if isinstance(reason, (socket.timeout, TimeoutError)):
        return f"no answer within {TIMEOUT_S:g}s"
    if isinstance(reason, socket.gaierror):
        return "host name not found"
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted ({reason.verify_message})"
    if isinstance(reason, ssl.SSLError):
        return f"TLS error ({reason.reason or 'handshake failed'})"
    if isinstance(reason, ConnectionResetError):
        return "connection reset"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror.lower()
    return type(reason).__name__
