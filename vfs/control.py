"""The control channel of a mount server: a Unix socket in the workspace through which
`strata status / commit / discard` reach the live mount (one JSON request line, one JSON
reply line). Errors travel back as a message and are raised again on the client side."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from typing import Callable

from strata.storage.errors import StrataError
from strata.vfs.errors import MountError

log = logging.getLogger("strata.vfs")


def serve(path: str, handlers: dict[str, Callable[..., dict]]) -> socket.socket:
    """Listen on `path`; each connection is handled on its own thread."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    os.chmod(path, 0o600)
    server.listen(8)

    def handle(conn: socket.socket) -> None:
        with conn:
            try:
                request = json.loads(conn.makefile("rb").readline())
                op = handlers.get(request.pop("op", None))
                if op is None:
                    reply = {"error": "unknown control operation"}
                else:
                    reply = {"ok": op(**request)}
            except StrataError as e:
                reply = {"error": str(e)}
            except OSError as e:   # the machine's, not a bug: a full disk, a read-only one
                log.warning("control request failed: %s", e)
                where = f": {e.filename}" if e.filename else ""
                reply = {"error": f"{e.strerror or e}{where} (pending changes are kept; "
                                  f"run it again once this is resolved)"}
            except Exception as e:  # noqa: BLE001 - the boundary of the control channel
                log.exception("control request failed")
                reply = {"error": f"internal error in the mount server: {e!r}"}
            try:
                # MSG_NOSIGNAL: a client gone (Ctrl-C) must not SIGPIPE the server
                conn.sendall(json.dumps(reply).encode() + b"\n", socket.MSG_NOSIGNAL)
            except OSError:
                pass

    def loop() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return   # closed at shutdown
            threading.Thread(target=handle, args=(conn,), daemon=True,
                             name="strata-control").start()

    threading.Thread(target=loop, daemon=True, name="strata-control-accept").start()
    return server


def call(path: str, op: str, timeout: float | None = None, **args) -> dict:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as e:
        raise MountError(f"cannot reach the mount server ({e.strerror}); is it running?") \
            from None
    with s:
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        line = s.makefile("rb").readline()
    if not line:
        raise MountError("the mount server closed the connection without answering")
    reply = json.loads(line)
    if "error" in reply:
        raise MountError(reply["error"])
    return reply["ok"]
