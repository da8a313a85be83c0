"""Reading file bytes through real mounts: concurrent random readers, two mounts sharing one
cache, a corrupted blob, eviction under a small cache limit, and small files from S3
read in windows of their packs (requests counted)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import mmap
import os
import random
import time
import subprocess
import sys
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from strata.catalog.dataset import Dataset
from strata.catalog.repo import DEFAULT_PACK_SIZE, Repository
from strata.storage.cache import whole_key
from tests.conftest import apply_s3_env
from tests.e2e.conftest import (CHUNK, READY, Builder, cache_dir, cached_units, index_rows,
                                snapshot, strata, wait_for)
from tests.storage.emulators import FlakyProxy


def entry(repo_url, version_id, path):
    ds = Dataset.get(version_id, repo=repo_url)
    return ds.view().files[path]


def test_16_threads_read_random_offsets(build, mounts):
    rng = random.Random(5)
    files = {"a.bin": rng.randbytes(CHUNK * 12 + 333), "d/b.bin": rng.randbytes(CHUNK * 9),
             "small.txt": b"small\n" * 100}
    vid = build.version(files)
    mnt = mounts.folder()
    mounts.start(vid, build.repo_url)
    errors = []

    def reader(seed: int) -> int:
        r = random.Random(seed)
        done = 0
        fds = {p: os.open(mnt / p, os.O_RDONLY) for p in files}
        try:
            for _ in range(40):
                p = r.choice(list(files))
                data = files[p]
                size = r.choice([1, 4096, 65536, CHUNK, CHUNK + 4097, 3 * CHUNK])
                offset = r.randrange(0, len(data) + 100)   # some reads start past the end
                got = os.pread(fds[p], size, offset)
                if got != data[offset:offset + size]:
                    errors.append((p, offset, size, len(got)))
                done += len(got)
        finally:
            for fd in fds.values():
                os.close(fd)
        return done

    with ThreadPoolExecutor(16) as pool:
        total = sum(pool.map(reader, range(16)))
    assert not errors, errors[:5]
    assert total > 0
    # and whole files by real programs, against the source bytes
    for p, data in files.items():
        out = subprocess.run(["sha256sum", str(mnt / p)], capture_output=True, text=True,
                             check=True)
        assert out.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    cached_units()  # every unit in the cache hashes to its name


def test_two_mounts_share_one_cache(build, mounts):
    rng = random.Random(6)
    shared = rng.randbytes(CHUNK * 6 + 10)   # seven chunks
    v1 = build.version({"shared.bin": shared, "same.txt": b"in both versions\n",
                        "one.txt": b"only in v1\n"})
    v2 = build.version({"two.txt": b"only in v2\n", "one.txt": b"changed in v2\n"},
                       parents=[v1])
    m1, m2 = mounts.folder("m1"), mounts.folder("m2")
    mounts.start(v1, build.repo_url, "m1")
    mounts.start(v2, build.repo_url, "m2")
    assert os.path.ismount(m1) and os.path.ismount(m2)

    # read through m1, then through m2 with the blobs gone: m2 is served by the units m1
    # fetched, so a file present in both versions is fetched and cached once
    assert cached_units() == {}
    assert (m1 / "shared.bin").read_bytes() == shared
    assert (m1 / "same.txt").read_bytes() == b"in both versions\n"
    # shared.bin, read from start to end, is kept whole (its chunk units dropped)
    wanted = {"file-" + whole_key(entry(build.repo_url, v1, "shared.bin").chunks),
              entry(build.repo_url, v1, "same.txt").sha256}
    # units are served from memory first and reach the disk right after: wait for them
    deadline = time.monotonic() + 30
    while set(cached_units()) != wanted and time.monotonic() < deadline:
        time.sleep(0.01)
    fetched = cached_units()
    assert set(fetched) == wanted
    assert sorted(os.listdir(m2)) == ["one.txt", "same.txt", "shared.bin", "two.txt"]
    blobs = os.path.join(build.repo_url, "blobs")
    os.rename(blobs, blobs + ".away")
    try:
        assert (m2 / "shared.bin").read_bytes() == shared
        assert (m2 / "same.txt").read_bytes() == b"in both versions\n"
        with pytest.raises(OSError) as e:   # what was never cached needs the storage
            (m2 / "two.txt").read_bytes()
        assert e.value.errno == errno.EIO
    finally:
        os.rename(blobs + ".away", blobs)
    assert cached_units() == fetched
    assert (m2 / "two.txt").read_bytes() == b"only in v2\n"   # storage back: recovered

    # both mounts read everything at the same time: right bytes, a consistent cache
    with ThreadPoolExecutor(2) as pool:
        s1, s2 = pool.map(snapshot, [m1, m2])
    assert s1 == build.expected(v1) and s2 == build.expected(v2)
    deadline = time.monotonic() + 30
    while len(cached_units()) < len(fetched) + 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    units = cached_units()
    assert set(fetched) <= set(units) and len(units) == len(fetched) + 3
    assert index_rows() == units   # index and folder agree: one row per unit, same sizes


def corrupt(repo_url, blob_id, offset) -> None:
    path = os.path.join(repo_url, "blobs", blob_id[:2], blob_id)
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupted_blob_gives_eio_and_is_never_cached(build, mounts, tmp_path):
    rng = random.Random(7)
    big = rng.randbytes(CHUNK * 5 + 17)
    files = {"big.bin": big, "small/good.txt": b"good\n" * 10,
             "small/bad.txt": b"bad\n" * 10, "small/zz.txt": b"after the bad one\n"}
    vid = build.version(files)
    big_entry = entry(build.repo_url, vid, "big.bin")
    bad_chunk = big_entry.chunk_ids[3]
    corrupt(build.repo_url, bad_chunk, 1000)
    bad_small = entry(build.repo_url, vid, "small/bad.txt")
    corrupt(build.repo_url, bad_small.pack, bad_small.offset + 5)

    mnt = mounts.folder()
    info = mounts.start(vid, build.repo_url)
    for path in ("big.bin", "small/bad.txt"):
        with pytest.raises(OSError) as e:
            (mnt / path).read_bytes()
        assert e.value.errno == errno.EIO, path
    # cp of the whole file fails too, with EIO, rather than copying wrong bytes
    cp = subprocess.run(["cp", str(mnt / "big.bin"), str(tmp_path / "copy.bin")],
                        capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    assert cp.returncode != 0 and "Input/output error" in cp.stderr
    # the mount stays up: other files, and the good chunks of the damaged file, read fine
    assert os.path.ismount(mnt)
    assert (mnt / "small/good.txt").read_bytes() == files["small/good.txt"]
    assert (mnt / "small/zz.txt").read_bytes() == files["small/zz.txt"]
    with open(mnt / "big.bin", "rb") as f:
        f.seek(CHUNK)
        assert f.read(CHUNK) == big[CHUNK:2 * CHUNK]
        f.seek(4 * CHUNK)
        assert f.read() == big[4 * CHUNK:]
    # the log names the bad blobs; nothing corrupt is in the cache
    def log_names_both():
        text = Path(info.log).read_text()
        return bad_small.pack in text and bad_chunk in text and text
    log = wait_for(log_names_both, READY, "the log to name both bad blobs")
    assert "corrupt" in log
    good = hashlib.sha256(files["small/good.txt"]).hexdigest()
    def with_good():   # units reach the disk after they are served: wait for this one
        units = cached_units()   # (and every cached unit hashes to its name)
        return units if good in units else None
    units = wait_for(with_good, READY, "the good file's unit on disk")
    assert bad_chunk not in units and bad_small.sha256 not in units
    assert bad_chunk not in index_rows() and bad_small.sha256 not in index_rows()


def test_eviction_under_a_small_cache_limit(build, mounts):
    rng = random.Random(8)
    files = {f"f{i}.bin": rng.randbytes(CHUNK * 8 + i) for i in range(6)}   # ~12 MiB
    vid = build.version(files)
    mnt = mounts.folder()
    limit = 2 << 20
    run = strata("--repo", build.repo_url, "mount", "--id", vid, "--cache-size", "2M",
                 str(mnt))
    assert run.returncode == 0, run.stderr
    peak = 0
    done = threading.Event()

    def watch():   # the index size sampled while the mount reads, not only in between
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, sum(index_rows().values()))
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for attempt in range(2):   # the second mount refetches what was evicted
            for name, data in files.items():
                out = subprocess.run(["sha256sum", str(mnt / name)], capture_output=True,
                                     text=True, check=True)
                assert out.stdout.split()[0] == hashlib.sha256(data).hexdigest(), name
            assert strata("unmount", str(mnt)).returncode == 0
            if attempt == 0:   # a new mount: a cold page cache, the same strata cache
                run = strata("--repo", build.repo_url, "mount", "--id", vid,
                             "--cache-size", "2M", str(mnt))
                assert run.returncode == 0, run.stderr
    finally:
        done.set()
        watcher.join()
    # eviction runs every MiB stored; units being read (readahead included) are pinned
    slack = (1 << 20) + 10 * CHUNK
    assert peak <= limit + slack, peak
    units = cached_units()
    assert sum(units.values()) <= limit + slack
    assert set(index_rows()) == set(units)


def test_a_cached_file_is_handed_to_the_kernel(build, mounts):
    # a file read to its end is kept whole in the cache; from the next open on, the
    # kernel reads that copy itself (FUSE passthrough), so later reads are local reads
    rng = random.Random(9)
    big = rng.randbytes(CHUNK * 6 + 5)
    vid = build.version({"big.bin": big, "small.txt": b"tiny\n" * 3})
    mnt = mounts.folder()
    mounts.start(vid, build.repo_url)
    assert (mnt / "big.bin").read_bytes() == big
    key = whole_key(entry(build.repo_url, vid, "big.bin").chunks)
    wait_for(lambda: "file-" + key in cached_units(), READY, "a whole copy of big.bin")
    info = json.loads(strata("cache", "info", "--json").stdout)
    assert (info["whole_files"], info["whole_bytes"]) == (1, len(big))
    assert "1 file kept whole" in strata("cache", "info").stdout
    mounts.unmount(mnt)
    blobs = os.path.join(build.repo_url, "blobs")
    os.rename(blobs, blobs + ".away")   # what follows needs no storage
    try:
        info = mounts.start(vid, build.repo_url)

        def held():
            fds = f"/proc/{info.pid}/fd"
            return {os.path.realpath(os.path.join(fds, n)) for n in os.listdir(fds)}
        whole = str((cache_dir() / "files" / key[:2] / key).resolve())
        assert whole not in held()
        with open(mnt / "big.bin", "rb") as f:
            assert whole in held()    # opened for the kernel at open, before any read
            assert f.read() == big
            # the cache cleared under an open file: the kernel keeps reading its copy
            assert strata("cache", "clear").returncode == 0
            assert "file-" + key not in cached_units()
            assert json.loads(strata("cache", "info", "--json").stdout)["whole_files"] == 0
            f.seek(CHUNK * 3 + 1)
            assert f.read(CHUNK) == big[CHUNK * 3 + 1:CHUNK * 4 + 1]
            with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mm:
                assert mm[CHUNK - 7:CHUNK + 9] == big[CHUNK - 7:CHUNK + 9]
        # closed with the file (the kernel sends its release after close returns)
        wait_for(lambda: whole not in held(), READY, "the cached copy to be closed")
        # gone from the cache and the storage away: a new open must fail cleanly
        with pytest.raises(OSError) as e:
            (mnt / "big.bin").read_bytes()
        assert e.value.errno == errno.EIO
    finally:
        os.rename(blobs + ".away", blobs)
    assert (mnt / "big.bin").read_bytes() == big


@contextlib.contextmanager
def counted_s3_repo(s3_server, monkeypatch, pack_size: int = DEFAULT_PACK_SIZE):
    """A fresh repository on moto (chunks of CHUNK bytes), reached through a proxy that
    counts the requests (and fails none). Yields (repository URL, proxy)."""
    with FlakyProxy(s3_server.endpoint_url) as proxy:
        apply_s3_env(monkeypatch, {**s3_server.env(), "AWS_ENDPOINT_URL": proxy.endpoint})
        url = f"s3://{s3_server.make_bucket()}/repo"
        Repository.open(url, create=True, chunk_size=CHUNK, pack_size=pack_size)
        yield url, proxy


@contextlib.contextmanager
def counted_s3_mount(s3_server, monkeypatch, mounts, tmp_path, files: dict[str, bytes],
                     pack_size: int):
    """A version of `files` in a fresh repository on moto, mounted; moto is reached
    through a proxy that counts the requests (and fails none). Yields (mountpoint,
    proxy)."""
    with counted_s3_repo(s3_server, monkeypatch, pack_size=pack_size) as (url, proxy):
        vid = Builder(url, tmp_path).version(files)
        mnt = mounts.folder()
        mounts.start(vid, url)
        yield mnt, proxy
        mounts.unmount(mnt)


def test_tar_of_small_files_from_s3_reads_their_packs_in_windows(s3_server, monkeypatch,
                                                                  mounts, tmp_path):
    """`tar --sort=name` of 600 small files through a mount of an S3 repository: the
    bytes are the files', and the GETs that reach the store are a few per pack, not one
    per file (counted by a proxy in front of moto)."""
    rnd = random.Random(12)
    files = {f"imgs/{i // 100:02}/{i:04}.jpg": rnd.randbytes(rnd.randrange(2000, 9000))
             for i in range(600)}
    with counted_s3_mount(s3_server, monkeypatch, mounts, tmp_path, files,
                          4 << 20) as (mnt, proxy):
        assert sorted(os.listdir(mnt / "imgs")) == [f"{i:02}" for i in range(6)]
        before = proxy.requests
        out = subprocess.run(["tar", "--sort=name", "-cf", "-", "-C", str(mnt), "imgs"],
                             capture_output=True, check=True).stdout
        gets = proxy.requests - before
        with tarfile.open(fileobj=io.BytesIO(out)) as archive:
            got = {m.name: archive.extractfile(m).read() for m in archive if m.isfile()}
        assert got == files
        # manifest lookups of the six folders aside, windows of 512 KiB and more: without
        # them, one GET per file (600)
        assert gets <= 40, gets


def test_loader_processes_taking_every_nth_file_share_pack_windows(s3_server, monkeypatch,
                                                                   mounts, tmp_path):
    """Four processes, each reading every 4th of 800 small files through a mount of an
    S3 repository (a data loader's workers): every file's bytes, and far fewer GETs
    than files reach the store."""
    rnd = random.Random(13)
    files = {f"train/{i:04}.jpg": rnd.randbytes(rnd.randrange(30_000, 50_000))
             for i in range(800)}
    with counted_s3_mount(s3_server, monkeypatch, mounts, tmp_path, files,
                          8 << 20) as (mnt, proxy):
        assert len(os.listdir(mnt / "train")) == 800
        before = proxy.requests
        loader = (
            "import hashlib, os, sys\n"
            "root, k = sys.argv[1], int(sys.argv[2])\n"
            "names = sorted(os.listdir(root))[k::4]\n"
            "for n in names:\n"
            "    with open(os.path.join(root, n), 'rb') as f:\n"
            "        print(n, hashlib.sha256(f.read()).hexdigest())\n")
        workers = [subprocess.Popen([sys.executable, "-c", loader, str(mnt / "train"), str(k)],
                                    stdout=subprocess.PIPE, text=True) for k in range(4)]
        seen = {}
        for w in workers:
            out, _ = w.communicate(timeout=120)
            assert w.returncode == 0
            seen.update(line.split() for line in out.splitlines())
        gets = proxy.requests - before
        assert seen == {p.split("/")[1]: hashlib.sha256(d).hexdigest() for p, d in files.items()}
        # one GET per file without pack windows (800); 469 when only files at most 64 KiB
        # apart counted as in a row; 27-33 here, both cores busy or not (30-128 when a
        # pack kept 3 windows, so that lagging workers missed theirs)
        assert gets <= 100, gets


def test_a_child_version_that_appended_to_a_large_file_fetches_only_its_new_chunks(
        s3_server, monkeypatch, mounts, tmp_path):
    """A large file read with `cat` through a mount of its version is kept whole in the
    cache; a version that appended to it, mounted afterwards on the same cache, gives
    `cmp` exactly its bytes, and only its new chunks reach the store: the others are
    read from the parent's whole copy (counted by a proxy in front of moto)."""
    rnd = random.Random(14)
    base = rnd.randbytes(CHUNK * 8)
    grown = base + rnd.randbytes(CHUNK + 5)          # two new chunks
    (tmp_path / "expected").write_bytes(grown)
    with counted_s3_repo(s3_server, monkeypatch) as (url, proxy):
        build = Builder(url, tmp_path)
        parent = build.version({"data.bin": base})
        child = build.version({"data.bin": grown}, parents=[parent])
        a = mounts.folder("a")
        mounts.start(parent, url, name="a")
        subprocess.run(["cat", str(a / "data.bin")], stdout=subprocess.DEVNULL, check=True)
        mounts.unmount(a)            # its whole copy is complete by then
        b = mounts.folder("b")
        mounts.start(child, url, name="b")
        os.stat(b / "data.bin")
        before = proxy.requests
        subprocess.run(["cmp", str(b / "data.bin"), str(tmp_path / "expected")], check=True)
        gets = proxy.requests - before
        mounts.unmount(b)
    # the two new chunks: all ten without the parent's whole copy serving the others
    assert gets == 2, gets


def test_cache_verify_removes_damaged_units_and_whole_copies(build, mounts):
    rng = random.Random(10)
    big, small = rng.randbytes(CHUNK * 3 + 5), b"small file\n" * 10
    vid = build.version({"big.bin": big, "small.txt": small})
    mnt = mounts.folder()
    mounts.start(vid, build.repo_url)
    assert (mnt / "big.bin").read_bytes() == big and (mnt / "small.txt").read_bytes() == small
    key = whole_key(entry(build.repo_url, vid, "big.bin").chunks)
    wait_for(lambda: "file-" + key in cached_units(), READY, "a whole copy of big.bin")
    mounts.unmount(mnt)
    unit = entry(build.repo_url, vid, "small.txt").sha256
    assert strata("cache", "verify").returncode == 0
    for path in (cache_dir() / "files" / key[:2] / key, cache_dir() / "units" / unit[:2] / unit):
        raw = bytearray(path.read_bytes())   # bits rotted on the cache's disk
        raw[len(raw) // 2] ^= 1
        path.write_bytes(bytes(raw))
    r = strata("cache", "verify")
    assert r.returncode == 1 and "2 damaged" in r.stderr
    assert sorted(r.stdout.split()[2::3]) == sorted(["file-" + key, unit])
    assert "file-" + key not in cached_units() and unit not in cached_units()
    mounts.start(vid, build.repo_url)   # fetched and verified again
    assert (mnt / "big.bin").read_bytes() == big and (mnt / "small.txt").read_bytes() == small
