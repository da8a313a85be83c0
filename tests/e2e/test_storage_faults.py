"""Storage that dies mid-read: a repository on moto's S3 server, mounted, and the server
killed while a file is being read. Reads must fail with EIO within the retry bound (never
hang), the mount must stay up, and unmount must work."""

from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import pytest

from strata.catalog.repo import Repository
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
