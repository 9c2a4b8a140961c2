"""A small TCP proxy for partition and failover tests: a node reaches Redis through it,
and the test cuts the node off by making the proxy stop forwarding, or moves the address
to another server (``switch``), as a failover moves a virtual IP or a DNS name.

A cut behaves like a network that drops packets: connections stay open, bytes sent
either way are held (not refused, not reset), new connections are accepted but
carry nothing. When the cut heals, what was held is delivered, as TCP retransmission
would. It runs in threads of the test process, on 127.0.0.1 only.

``refuse_on(pattern, for_s)`` is a fault at one chosen moment: the first request that
carries ``pattern`` is dropped, and for ``for_s`` seconds every connection is closed and
every new one refused, as when Redis goes away right then (a client sees its command
fail, then its reconnects refused).
"""

from __future__ import annotations

import select
import socket
import threading
import time


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._forwarding = threading.Event()
        self._forwarding.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._trigger: tuple[bytes, float] | None = None  # refuse_on's pattern and seconds, until it fires
        self._refusing = threading.Event()
        self.refused_at: float | None = None  # time.monotonic() when refuse_on fired
        threading.Thread(target=self._accept_forever, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def cut(self) -> None:
        """Stop forwarding (both ways, every connection, new ones too)."""
        self._forwarding.clear()

    def heal(self) -> None:
        self._forwarding.set()

    def refuse_on(self, pattern: bytes, for_s: float) -> None:
        """Arm the one-shot fault described in the module's docstring."""
        with self._lock:
            self._trigger = (pattern, for_s)

    def _refuse_now(self, for_s: float) -> None:
        self.refused_at = time.monotonic()
        self._refusing.set()
        self._close_open()
        timer = threading.Timer(for_s, self._refusing.clear)
        timer.daemon = True  # the test process need not wait for it to end
        timer.start()

    def _close_open(self) -> None:
        with self._lock:
            opened, self._sockets = self._sockets, []
        for sock in opened:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes a pump blocked on it
            except OSError:
                pass
            try:
                sock.close()
            except OSError:
                pass

    @property
    def is_cut(self) -> bool:
        return not self._forwarding.is_set()

    def switch(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        """Send new connections to another server from now on, and end the open ones (both
        sides closed), as a failover that moves the address does: a client finds its
        connection gone and reconnects, reaching the new server."""
        with self._lock:
            self.target = (target_host, target_port)
        self._close_open()

    def close(self) -> None:
        self._closed.set()
        self._forwarding.set()
        with self._lock:
            for sock in [self._listener, *self._sockets]:
                try:
                    sock.close()
                except OSError:
                    pass

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _accept_forever(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._refusing.is_set():
                client.close()
                continue
            with self._lock:
                target = self.target
            try:
                upstream = socket.create_connection(target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                stale = target != self.target  # switched while connecting: not to the old server
                if not stale:
                    self._sockets += [client, upstream]
            if stale:
                client.close()
                upstream.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        peers = {client: upstream, upstream: client}
        try:
            while not self._closed.is_set():
                if not self._forwarding.is_set():
                    # Cut: read nothing, so bytes wait in the kernel's buffers (and the
                    # sender's), exactly as if the network dropped them for a while.
                    self._forwarding.wait(0.1)
                    continue
                readable, _, _ = select.select(list(peers), [], [], 0.1)
                for sock in readable:
                    if not self._forwarding.is_set():
                        break
                    data = sock.recv(65536)
                    if not data:
                        return
                    trigger = self._trigger
                    if trigger is not None and sock is client and trigger[0] in data:
                        with self._lock:
                            fired, self._trigger = self._trigger is not None, None
                        if fired:
                            self._refuse_now(trigger[1])  # the request is dropped, not forwarded
                            return
                    peers[sock].sendall(data)
        except (OSError, ValueError):  # ValueError: select() on a socket another thread closed (fd -1)
            return
        finally:
            for sock in peers:
                try:
                    sock.close()
                except OSError:
                    pass

