"""Headless Chromium for the tests: found (or the test skips, and fails under CI),
run once per page (``open_in_chromium``), or driven live over the DevTools protocol
(``Browser``) to watch a page that changes by itself.

``Browser`` speaks the protocol over a pipe (``--remote-debugging-pipe``: Chromium
reads commands on fd 3 and writes replies on fd 4, each message JSON ended by a NUL
byte), so it needs no websocket library and opens no port. Every read has a deadline.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

# Everything that would talk to the network on its own is off.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1400,900")


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install -y chromium) - needed to open pages in a browser")


def open_in_chromium(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess[str]:
    """Load ``page`` once with ``mode`` (``--dump-dom``, ``--screenshot=...``) and exit."""
    result = subprocess.run([chromium(), *FLAGS, f"--user-data-dir={profile}", *mode, page.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


class BrowserError(AssertionError):
    """Chromium answered a command with an error, or not in time."""


class Browser:
    """One headless Chromium, driven over the DevTools protocol; use as a context manager."""

    def __init__(self, profile: Path, log_path: Path) -> None:
        to_chromium_read, self._to_chromium = os.pipe()
        self._from_chromium, from_chromium_write = os.pipe()

        def give_chromium_its_pipes() -> None:  # in the child, before exec
            # Copied above fd 10 first, so that moving them to 3 and 4 cannot overwrite either.
            read_end = fcntl.fcntl(to_chromium_read, fcntl.F_DUPFD, 10)
            write_end = fcntl.fcntl(from_chromium_write, fcntl.F_DUPFD, 10)
            os.dup2(read_end, 3)
            os.dup2(write_end, 4)

        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [chromium(), *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, pass_fds=(3, 4),
                preexec_fn=give_chromium_its_pipes, start_new_session=True)
        os.close(to_chromium_read)
        os.close(from_chromium_write)
        self._buffer = b""
        self._last_id = 0

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 30) -> dict[str, Any]:
        """Send one command and return its result (events in between are dropped)."""
        self._last_id += 1
        message: dict[str, Any] = {"id": self._last_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_chromium, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next_message(deadline, method)
            if reply.get("id") == self._last_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open(self, url: str, headers: dict[str, str] | None = None) -> Page:
        """A new tab that sends ``headers`` with every request (say Authorization), at ``url``."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        if headers:
            self.call("Network.enable", session=session)
            self.call("Network.setExtraHTTPHeaders", {"headers": headers}, session=session)
        self.call("Page.navigate", {"url": url}, session=session)
        return page

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.call("Browser.close", timeout=5)
            except (BrowserError, OSError):
                pass
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(timeout=5)
        for fd in (self._to_chromium, self._from_chromium):
            try:
                os.close(fd)
            except OSError:
                pass

    def _next_message(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_chromium], [], [], left)[0]:
                raise BrowserError(f"no answer from Chromium to {waiting_for} in time")
            chunk = os.read(self._from_chromium, 1 << 20)
            if not chunk:
                raise BrowserError(f"Chromium closed its pipe (exit code {self.process.poll()})")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)


class Page:
    """A tab of a Browser."""

    def __init__(self, browser: Browser, session: str) -> None:
        self.browser = browser
        self.session = session

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (JSON-able values)."""
        result = self.browser.call("Runtime.evaluate", {"expression": expression, "returnByValue": True},
                                   session=self.session)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, predicate: Callable[[Any], bool], expression: str, timeout: float, what: str,
                 every: float = 0.2) -> Any:
        """Evaluate ``expression`` until ``predicate`` accepts its value; return that value.
        A page between two documents (a reload) cannot answer: that is tried again."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = self.evaluate(expression)
            except BrowserError:
                last = None
            if last is not None and predicate(last):
                return last
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last seen: {last!r}")

    def screenshot(self, path: Path) -> None:
        data = self.browser.call("Page.captureScreenshot", {"format": "png"}, session=self.session)["data"]
        path.write_bytes(base64.b64decode(data))
