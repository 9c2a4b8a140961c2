"""A small TCP proxy for partition and failover tests: a node reaches Redis through it,
and the test cuts the node off by making the proxy stop forwarding, or moves the address
to another server (``switch``), as a failover moves a virtual IP or a DNS name.

A cut behaves like a network that drops packets: connections stay open, bytes sent
either way are held (not refused, not reset), new connections are accepted but
carry nothing. When the cut heals, what was held is delivered, as TCP retransmission
would. It runs in threads of the test process, on 127.0.0.1 only.
"""

from __future__ import annotations

import select
import socket
import threading


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
        threading.Thread(target=self._accept_forever, daemon=True).start()

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def cut(self) -> None:
        """Stop forwarding (both ways, every connection, new ones too)."""
        self._forwarding.clear()

    def heal(self) -> None:
        self._forwarding.set()

    @property
    def is_cut(self) -> bool:
        return not self._forwarding.is_set()

    def switch(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        """Send new connections to another server from now on, and end the open ones (both
        sides closed), as a failover that moves the address does: a client finds its
        connection gone and reconnects, reaching the new server."""
        with self._lock:
            self.target = (target_host, target_port)
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
                    peers[sock].sendall(data)
        except OSError:
            return
        finally:
            for sock in peers:
                try:
                    sock.close()
                except OSError:
                    pass

