"""``DAILYQ_ALERT_URL`` and ``DAILYQ_HEARTBEAT_URL``: checked at start, and never shown whole.

A webhook URL is a secret: Slack's and Mattermost's carry the token that lets anyone
post to the channel in their path, a healthchecks.io ping URL its check's UUID.
Messages, logs and ``status`` show it as ``scheme://host/…`` (``redact_webhook_url``);
a value that does not even parse as ``scheme://host`` shows as ``…``, since its token
could be anywhere in it.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..errors import ConfigError

ALERT_SCHEMES = ("http", "https")
_FORM = "use http(s)://host/path, e.g. a Slack incoming webhook's https://hooks.slack.com/services/..."
_HEARTBEAT_FORM = "use http(s)://host/path, e.g. a healthchecks.io ping URL https://hc-ping.com/<uuid>"


def redact_webhook_url(url: str) -> str:
    """``scheme://host[:port]/…``: path, query, fragment and any user:password hidden."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
    except ValueError:
        return "…"
    if not parts.scheme or "/" in parts.scheme:
        return "…"
    if not host:
        return f"{parts.scheme}://…"
    shown_host = f"[{host}]" if ":" in host else host
    try:
        if parts.port is not None:
            shown_host += f":{parts.port}"
    except ValueError:
        shown_host += ":?"  # not a port: its text is not shown, it could be a mistyped token
    hidden = parts.path not in ("", "/") or parts.query or parts.fragment or parts.username is not None
    return f"{parts.scheme}://{shown_host}/…" if hidden else f"{parts.scheme}://{shown_host}/"


def check_alert_url(raw: str) -> str:
    """``DAILYQ_ALERT_URL``, stripped, if it is ``http(s)://host...``; else ConfigError
    (one line, the URL redacted)."""
    return check_webhook_url(raw, "DAILYQ_ALERT_URL", _FORM)


def check_heartbeat_url(raw: str) -> str:
    """``DAILYQ_HEARTBEAT_URL`` (heartbeat_ping.py), checked as the alert URL is: a
    healthchecks.io ping URL holds its check's secret UUID in its path."""
    return check_webhook_url(raw, "DAILYQ_HEARTBEAT_URL", _HEARTBEAT_FORM)


def check_webhook_url(raw: str, name: str, form: str) -> str:
    """The URL, stripped, if it is ``http(s)://host...``; else ConfigError (one line
    naming the setting ``name``, the URL redacted, and ``form``: how to write one)."""
    url = raw.strip()
    shown = redact_webhook_url(url)
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ConfigError(f"bad {name} {shown!r}: it contains a space or a control character; {form}")
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        raise ConfigError(f"bad {name} {shown!r}: unreadable host or port; {form}") from None
    scheme = parts.scheme.lower()
    if scheme not in ALERT_SCHEMES:
        what = f"scheme {scheme!r}" if scheme else "no scheme"
        raise ConfigError(f"bad {name} {shown!r}: {what}, not http or https; {form}")
    if not parts.hostname:
        raise ConfigError(f"bad {name} {shown!r}: no host; {form}")
    return url
