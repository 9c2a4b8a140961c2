"""A webhook endpoint for the tests: http.server on 127.0.0.1, in a thread of the test.

It keeps every POST it accepted (parsed JSON body and headers). ``stop()`` closes the
listening socket, so senders get "connection refused" as from an endpoint that is
down; ``start()`` opens the same port again."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from dailyq.redis_server import free_port


class WebhookReceiver:
    def __init__(self, port: int | None = None, path: str = "/services/T000/B000/SECRETTOKEN") -> None:
        self.port = port or free_port()
        self.path = path
        self.status = 200  # what it answers; a test may set 404, 503...
        self.retry_after: str | None = None
        self.delay_s = 0.0  # how long it waits before answering: a slow endpoint
        self.received: list[dict[str, Any]] = []  # the JSON bodies, as sent
        self.paths: list[str] = []
        self.headers: list[dict[str, str]] = []
        self.times: list[float] = []  # time.time() of each POST
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def start(self) -> "WebhookReceiver":
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._lock:
                    receiver.received.append(json.loads(body))
                    receiver.paths.append(self.path)
                    receiver.headers.append(dict(self.headers))
                    receiver.times.append(time.time())
                time.sleep(receiver.delay_s)
                self.send_response(receiver.status)
                if receiver.retry_after is not None:
                    self.send_header("Retry-After", receiver.retry_after)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def events(self, event: str | None = None) -> list[dict[str, Any]]:
        """The bodies received (whatever was answered), of one event or all."""
        with self._lock:
            return [dict(r) for r in self.received if event is None or r.get("event") == event]
