"""A TCP forwarder on 127.0.0.1 that can misbehave: the store far away, hung or restarting.

Used by the fault tests (tests/e2e/test_storage_faults.py) and by the benchmark of reads
from a distant store (scripts/bench/mount_read.py imports it through the checkout).

    proxy = Proxy(upstream_port)              # forwards as is
    Proxy(upstream_port, delay=0.02)          # each client block reaches the store 20 ms late
    proxy.stall = True                        # forward nothing, either way (a hung store)
    proxy.refuse()                            # reset open and new connections ...
    proxy.accept()                            # ... and forward again (a store restarting)
    proxy.refused                             # how many connections were reset on arrival
"""

from __future__ import annotations

import socket
import struct
import threading
import time


class Proxy:
    def __init__(self, upstream_port: int, *, delay: float = 0.0):
        self.upstream, self.delay = upstream_port, delay
        self.stall = False
        self.refused = 0
        self._refusing = False
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.endpoint_url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def refuse(self) -> None:
        """Reset every open connection, and each new one as it arrives, until `accept`
        (a store restarting behind its address)."""
        with self._lock:
            self._refusing = True
            conns, self._conns = self._conns, []
        for conn in conns:
            _reset(conn)

    def accept(self) -> None:
        with self._lock:
            self._refusing = False

    def close(self) -> None:
        self._sock.close()
        self.refuse()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return   # closed
            with self._lock:
                if self._refusing:
                    self.refused += 1
                    _reset(client)
                    continue
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream))
            except OSError:
                _reset(client)
                continue
            with self._lock:
                self._conns += [client, server]
            for src, dst, delay in ((client, server, self.delay), (server, client, 0.0)):
                threading.Thread(target=self._pump, args=(src, dst, delay),
                                 daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        try:
            while data := src.recv(1 << 20):
                if delay:
                    time.sleep(delay)   # the distance to the store, not synchronisation
                if not self.stall:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def _reset(sock: socket.socket) -> None:
    """Close with a reset (RST), as a store that went away leaves its connections."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.shutdown(socket.SHUT_RDWR)   # wakes a pump blocked on it
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass
