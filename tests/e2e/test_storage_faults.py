"""Storage that dies or hangs mid-read: a repository on moto's S3 server, mounted, and the
server killed while a file is being read, or a proxy in front of it going silent. Reads must fail with EIO within the retry bound (never
hang), the mount must stay up, and unmount must work."""

from __future__ import annotations

import errno
import os
import random
import socket
import threading
import time
from pathlib import Path

import pytest

from strata.catalog.repo import Repository
from strata.storage.retry import MIN_ATTEMPT_SECONDS
from tests.conftest import MotoServer, apply_s3_env
from tests.e2e.conftest import CHUNK, EXIT, Builder, alive, in_proc_mounts, wait_for

RETRY_SECONDS = 3
# A failed read waits out the retry bound once per FUSE request the kernel sends for it
# (a readahead request, then the page it needs): well under this.
BOUND = 8 * RETRY_SECONDS


def test_s3_server_killed_mid_read(monkeypatch, mounts, tmp_path):
    pytest.importorskip("moto.server")
    server = MotoServer().start()   # our own: this test kills it
    try:
        apply_s3_env(monkeypatch, server.env())
        monkeypatch.setenv("STRATA_RETRY_SECONDS", str(RETRY_SECONDS))
        url = f"s3://{server.make_bucket()}/repo"
        Repository.open(url, create=True, chunk_size=CHUNK)
        big = random.Random(9).randbytes(CHUNK * 48)
        files = {"big.bin": big, "small/a.txt": b"a\n", "small/b.txt": b"b\n"}
        vid = Builder(url, tmp_path).version(files)
        mnt = mounts.folder()
        info = mounts.start(vid, url)   # the server gets the same AWS_* environment
        assert sorted(os.listdir(mnt / "small")) == ["a.txt", "b.txt"]  # manifest fetched
        assert (mnt / "small/a.txt").read_bytes() == b"a\n"

        with open(mnt / "big.bin", "rb", buffering=0) as f:
            assert f.read(CHUNK) == big[:CHUNK]
            server.stop()   # SIGKILL: in-flight and later requests see no server
            start = time.monotonic()
            offset = CHUNK
            with pytest.raises(OSError) as e:
                while True:   # what readahead fetched still reads; then the first miss
                    block = f.read(CHUNK)
                    assert block == big[offset:offset + len(block)]
                    assert block, "read the whole file with the storage gone"
                    offset += len(block)
            elapsed = time.monotonic() - start
        assert e.value.errno == errno.EIO
        assert elapsed < BOUND, f"a read took {elapsed:.1f} s to fail"
        assert offset < len(big)

        start = time.monotonic()
        with pytest.raises(OSError) as e:
            (mnt / "small/b.txt").read_bytes()   # never fetched: needs the storage
        assert e.value.errno == errno.EIO
        assert time.monotonic() - start < BOUND
        assert (mnt / "small/a.txt").read_bytes() == b"a\n"   # cached: still served
        assert os.path.ismount(mnt)
        log = Path(info.log).read_text()
        assert "unreachable" in log and server.endpoint_url.split("//")[1] in log

        mounts.unmount(mnt)
        wait_for(lambda: not alive(info.pid), EXIT, "the mount server to exit")
        assert not in_proc_mounts(mnt)
    finally:
        server.close()


class StallingProxy:
    """Forwards 127.0.0.1 connections to `upstream` until `stall` is set; from then on
    it forwards nothing, in either direction, on new or open connections (a store that
    hangs, as opposed to one that is gone)."""

    def __init__(self, upstream_port: int):
        self.upstream = upstream_port
        self.stall = False
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.endpoint_url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                if not self.stall:
                    dst.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()
        for conn in self.conns:
            conn.close()


def test_a_stalled_store_fails_a_read_once_within_the_attempt_timeout(monkeypatch, mounts,
                                                                      tmp_path):
    server = MotoServer().start()
    proxy = StallingProxy(int(server.endpoint_url.rsplit(":", 1)[1]))
    try:
        apply_s3_env(monkeypatch, {**server.env(), "AWS_ENDPOINT_URL": proxy.endpoint_url})
        monkeypatch.setenv("STRATA_RETRY_SECONDS", "2")   # attempts of MIN_ATTEMPT_SECONDS
        url = f"s3://{server.make_bucket()}/repo"
        Repository.open(url, create=True, chunk_size=CHUNK)
        files = {"a.txt": b"a\n", "b.txt": b"b\n" * 1000}
        vid = Builder(url, tmp_path).version(files)
        mnt = mounts.folder()
        mounts.start(vid, url)
        assert (mnt / "a.txt").read_bytes() == b"a\n"
        proxy.stall = True
        start = time.monotonic()
        with pytest.raises(OSError) as e:
            (mnt / "b.txt").read_bytes()
        elapsed = time.monotonic() - start
        assert e.value.errno == errno.EIO
        # one attempt's socket timeout, not one per request the kernel sent for the read
        assert MIN_ATTEMPT_SECONDS - 0.5 < elapsed < 1.6 * MIN_ATTEMPT_SECONDS, elapsed
        proxy.stall = False
        mounts.unmount(mnt)
    finally:
        proxy.close()
        server.close()
