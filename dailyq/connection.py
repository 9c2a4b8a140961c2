"""The Redis connection made from ``REDIS_URL``: plain, TLS, unix socket, ACL user,
or Sentinel (``redis+sentinel://``), with one-line errors that say what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from redis import Redis
from redis.exceptions import AuthenticationError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.sentinel import Sentinel, SentinelManagedConnection

from .errors import ConfigError, RedisUnavailable
from .redact import redact_url

if TYPE_CHECKING:
    from .settings import Settings

SENTINEL_SCHEME = "redis+sentinel"
DEFAULT_SENTINEL_PORT = 26379
URL_FORMS = ("redis://[user:password@]host:port/db, rediss://...?ssl_ca_certs=/path/ca.crt, "
             "unix:///path/to/redis.sock, or redis+sentinel://[user:password@]host:port[,host:port]/service[/db]")


@dataclass(frozen=True)
class SentinelUrl:
    """``redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]``; the
    credentials are for the master Sentinel names, not for the Sentinels."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = None


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parsed by hand: urllib cannot read a comma-separated host list, and redis-py has
    no URL form for Sentinel. Raises ConfigError naming what is wrong."""
    shown = redact_url(url)
    form = f"use {SENTINEL_SCHEME}://[user:password@]host:port[,host:port]/service_name[/db]"
    scheme, sep, rest = url.partition("://")
    if scheme != SENTINEL_SCHEME or not sep:
        raise ConfigError(f"bad REDIS_URL {shown!r}: not a {SENTINEL_SCHEME}:// URL; {form}")
    rest, _, query = rest.partition("?")
    if query:
        raise ConfigError(f"bad REDIS_URL {shown!r}: {SENTINEL_SCHEME}:// takes no ?options; {form}")
    netloc, _, path = rest.partition("/")
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    sentinels = []
    for item in hosts.split(","):
        host, port_text = _split_host_port(item)
        if not host:
            raise ConfigError(f"bad REDIS_URL {shown!r}: empty Sentinel host in {hosts!r}; {form}")
        try:
            port = int(port_text) if port_text else DEFAULT_SENTINEL_PORT
        except ValueError:
            raise ConfigError(f"bad REDIS_URL {shown!r}: Sentinel port {port_text!r} is not a number; {form}") from None
        if not 0 < port < 65536:
            raise ConfigError(f"bad REDIS_URL {shown!r}: Sentinel port {port} is out of range; {form}")
        sentinels.append((host, port))
    parts = [unquote(p) for p in path.split("/")] if path else []
    if not parts or not parts[0]:
        raise ConfigError(f"bad REDIS_URL {shown!r}: no service name (the name in 'sentinel monitor'); {form}")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise ConfigError(f"bad REDIS_URL {shown!r}: after the service name only a db number may follow; {form}")
    return SentinelUrl(tuple(sentinels), parts[0], int(parts[1]) if len(parts) == 2 else 0, username, password)


def _split_host_port(item: str) -> tuple[str, str]:
    if item.startswith("["):  # [IPv6]:port
        host, _, tail = item[1:].partition("]")
        return host, tail.removeprefix(":")
    host, _, port = item.partition(":")
    return host, port


# Replies meaning "this node is no longer the master to write to" (besides READONLY,
# which redis-py handles itself): a master cut off from its replicas refuses writes
# with NOREPLICAS (``min-replicas-to-write``), and a master being demoted answers
# blocked clients with UNBLOCKED.
_MASTER_GONE_REPLIES = ("NOREPLICAS", "UNBLOCKED")


class SentinelMasterConnection(SentinelManagedConnection):
    """A connection to the master Sentinel names that treats NOREPLICAS/UNBLOCKED like
    redis-py treats READONLY: drop the connection and raise ConnectionError, so the
    caller's outage handling retries and the next connect asks Sentinel again.

    Why: after ``SENTINEL FAILOVER`` the old master keeps taking writes from clients
    still connected to it until Sentinel demotes it (about 10 s later), and those
    writes are lost when it resyncs from the new master. With ``min-replicas-to-write
    1`` it refuses them instead; this class turns that refusal into a move to the new
    master rather than an error.

    Also, unlike redis-py's Sentinel connection and like its plain one, a read cut
    short by an exception (RQ's SIGTERM handler raises inside an idle worker's
    blocking pop) drops the connection: otherwise the pop's late reply is read as the
    answer to the next command, and the worker's warm shutdown hangs.
    """

    def read_response(self, disable_decoding: Any = False, *, disconnect_on_error: bool | None = True,
                      **kwargs: Any) -> Any:
        try:
            return super().read_response(disable_decoding, disconnect_on_error=disconnect_on_error, **kwargs)
        except ResponseError as error:
            if str(error).startswith(_MASTER_GONE_REPLIES):
                self.disconnect()
                raise RedisConnectionError(
                    f"{error} (the master changed?); asking Sentinel for the master again") from None
            raise


def _sentinel_client(url: str) -> Redis:
    spec = parse_sentinel_url(url)
    # Short timeouts to the Sentinels: an unreachable one must not hold up asking the next.
    sentinel = Sentinel(list(spec.sentinels), sentinel_kwargs={"socket_connect_timeout": 2, "socket_timeout": 5})
    return sentinel.master_for(spec.service, db=spec.db, username=spec.username, password=spec.password,
                               connection_class=SentinelMasterConnection, socket_connect_timeout=5,
                               socket_timeout=30)


def connect(settings: Settings, check: bool = True) -> Redis:
    """A client for ``REDIS_URL``; with ``check``, proven to answer before returning.

    ``redis+sentinel://`` gives a client of the master the Sentinels name, which
    follows failovers (see ``SentinelMasterConnection``).

    Raises ConfigError for a malformed URL and RedisUnavailable when the server cannot
    be reached or refuses us, each with one line that says what to fix.
    """
    url = settings.redis_url
    shown = settings.redacted_url()
    try:
        if url.startswith(f"{SENTINEL_SCHEME}://"):
            connection = _sentinel_client(url)
        else:
            # A finite socket timeout: a half-open connection must not hang a loop forever.
            # No health_check_interval: redis-py would PING ahead of the handshake of every
            # new connection (one more round trip per forked work-horse, i.e. per run),
            # and its default retry already reconnects a connection found dead on use.
            connection = Redis.from_url(url, socket_connect_timeout=5, socket_timeout=30)
    except ValueError as exc:
        raise ConfigError(f"bad REDIS_URL {shown!r}: {exc} (use {URL_FORMS})") from None
    if check:
        try:
            connection.ping()
        except TypeError as exc:  # an unknown ?option reaches the connection class only now
            raise ConfigError(f"bad REDIS_URL {shown!r}: unsupported ?option ({exc}); use {URL_FORMS}") from None
        except AuthenticationError as exc:
            reason = str(exc).rstrip(".")
            if _has_credentials(url):
                raise RedisUnavailable(f"Redis at {shown} refused the credentials: {reason}; "
                                       "fix the user/password in REDIS_URL") from None
            raise RedisUnavailable(f"Redis at {shown} refused us: {reason} and REDIS_URL has no credentials; "
                                   "use redis://user:password@host:port/db") from None
        except ResponseError as exc:
            raise RedisUnavailable(
                f"Redis at {shown} refused us: {exc}; check REDIS_URL's user, password and db") from None
        except RedisError as exc:
            if "SSL" in str(exc):  # e.g. [SSL: CERTIFICATE_VERIFY_FAILED]: say where the CA is set
                raise RedisUnavailable(
                    f"TLS to Redis at {shown} failed: {str(exc).rstrip('.')}; point ssl_ca_certs= in REDIS_URL "
                    "at the CA that signed the server's certificate (and use rediss:// only for a TLS port)") from None
            raise RedisUnavailable(
                f"cannot reach Redis at {shown}: {exc}; start Redis or point REDIS_URL at it") from None
    return connection


def _has_credentials(url: str) -> bool:
    """Whether REDIS_URL carries a user or password (for the right advice when Redis refuses us)."""
    return bool(url.partition("://")[2].partition("/")[0].rpartition("@")[0])
