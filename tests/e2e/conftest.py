"""Fixtures for end-to-end tests: real FUSE mounts served by real mount processes, read by
real programs (find, cp, tar, cmp, sha256sum, python).

Every test gets its own data, cache and config dirs through XDG_* variables set before any
mount process starts, so the processes (which inherit the environment) use them too. The
`mounts` fixture remembers every mountpoint a test uses; at teardown it detaches whatever is
still mounted (`fusermount3 -uz`) and ends the servers of those mountpoints, by pid. Waiting
is always on a condition with a deadline (`wait_for`), never a bare sleep.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import isolate_home

from strata.catalog import config
from strata.catalog.dataset import Dataset
from strata.catalog.repo import Repository
from strata.vfs import mount as mount_mod

if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
    pytest.skip("real mounts need /dev/fuse and fusermount3", allow_module_level=True)

CHUNK = 256 * 1024          # small chunks, so a few MiB make a multi-chunk file
READY = 60.0                # seconds to wait for a mount to become ready (a loaded CI box)
EXIT = 30.0                 # seconds to wait for a server to exit after an unmount
ENV_VARS = ("STRATA_REPO", "STRATA_CACHE_DIR", "STRATA_CACHE_SIZE", "STRATA_CONFIG",
            "STRATA_RETRY_SECONDS")


# ---- isolation ---------------------------------------------------------------------
@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    yield from isolate_home(tmp_path, monkeypatch)


@pytest.fixture
def repo_url(tmp_path):
    url = str(tmp_path / "repo")
    Repository.open(url, create=True, chunk_size=CHUNK, pack_size=1 << 20)
    return url


# ---- waiting -----------------------------------------------------------------------
def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)  # polling interval of a condition with a deadline


def in_proc_mounts(mountpoint) -> bool:
    target = os.path.abspath(mountpoint)
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                return True
    return False


def server_pids(mountpoint) -> list[int]:
    """Pids of live mount server processes serving `mountpoint`: a server program
    (`python -m strata.vfs.mount ... MOUNTPOINT`), or a server forked by `strata mount`
    (named strata-mount, with the CLI's command line)."""
    target = os.path.abspath(mountpoint).encode()
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
            with open(f"/proc/{entry}/comm", "rb") as f:
                name = f.read().strip()
        except OSError:
            continue
        if (b"strata.vfs.mount" in args or name == b"strata-mount") and target in args:
            out.append(int(entry))
    return out


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


# ---- mounts ------------------------------------------------------------------------
class Mounts:
    """Mountpoints of one test; whatever is left mounted is detached at teardown."""

    def __init__(self, tmp_path: Path):
        self.tmp = tmp_path
        self.points: list[str] = []
        self.procs: list[subprocess.Popen] = []

    def folder(self, name: str = "mnt") -> Path:
        path = self.tmp / name
        path.mkdir(exist_ok=True)
        if str(path) not in self.points:
            self.points.append(str(path))
        return path

    def start(self, version_id: str, repo_url: str | None, name: str = "mnt",
              cache_size: int | None = None) -> mount_mod.MountInfo:
        """A background mount server process; returns once the mount is live."""
        path = self.folder(name)
        info, _ = mount_mod.start_background(repo_url, version_id, str(path),
                                             cache_size=cache_size, timeout=READY)
        wait_for(lambda: os.path.ismount(path), READY, f"{path} to be mounted")
        return info

    def foreground(self, version_id: str, repo_url: str, name: str = "mnt",
                   *extra: str) -> subprocess.Popen:
        """`strata mount --foreground` as a child process, waited on until live."""
        path = self.folder(name)
        proc = subprocess.Popen(
            [sys.executable, "-m", "strata.cli.main", "--repo", repo_url, "mount",
             "--id", version_id, "--foreground", *extra, str(path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.procs.append(proc)

        def live():
            if proc.poll() is not None:
                raise AssertionError(f"mount exited with {proc.returncode}: "
                                     f"{proc.stderr.read().decode(errors='replace')}")
            return in_proc_mounts(path) and os.path.ismount(path)
        wait_for(live, READY, f"{path} to be mounted")
        return proc

    def unmount(self, path) -> None:
        mount_mod.unmount(str(path))
        assert not in_proc_mounts(path)

    def cleanup(self) -> None:
        for point in self.points:
            pids = server_pids(point)
            if in_proc_mounts(point):
                subprocess.run(["fusermount3", "-uz", point], capture_output=True)
            deadline = time.monotonic() + EXIT
            for pid in pids:
                while alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.02)  # polling the server's exit, bounded
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=EXIT)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()


@pytest.fixture
def mounts(tmp_path):
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()
        left = [p for p in m.points if in_proc_mounts(p)]
        assert not left, f"still mounted after teardown: {left}"


def strata(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed CLI in a subprocess, with this test's environment."""
    return subprocess.run([sys.executable, "-m", "strata.cli.main", *map(str, args)],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)


# ---- building versions -------------------------------------------------------------
@dataclass(frozen=True)
class Link:
    target: str


@dataclass(frozen=True)
class File:
    data: bytes
    mode: int = 0o644


EMPTY_DIR = object()


class Builder:
    """Final versions from {dataset path: bytes | File | Link | EMPTY_DIR}, through the
    Dataset API (add_files from a real folder, remove_files, finalize with upload)."""

    def __init__(self, repo_url: str, tmp_path: Path):
        self.repo_url = repo_url
        self.tmp = tmp_path
        self._n = itertools.count()

    def version(self, spec: dict, *, parents=(), remove=(), project="p",
                name="n") -> str:
        src = self.tmp / f"src-{next(self._n)}"
        src.mkdir()
        for rel, value in spec.items():
            full = src / rel
            if value is EMPTY_DIR:
                full.mkdir(parents=True, exist_ok=True)
                continue
            full.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(value, Link):
                os.symlink(value.target, full)
                continue
            f = value if isinstance(value, File) else File(value)
            full.write_bytes(f.data)
            os.chmod(full, f.mode)
        ds = Dataset.create(name, project, parent_datasets=list(parents), repo=self.repo_url)
        if remove:
            ds.remove_files(list(remove))
        if spec:
            ds.add_files(str(src))
        ds.finalize(auto_upload=True)
        return ds.id

    def expected(self, version_id: str) -> dict:
        """The snapshot of `get_mutable_local_copy` of the version: the reference tree."""
        target = self.tmp / f"expected-{next(self._n)}"
        Dataset.get(version_id, repo=self.repo_url).get_mutable_local_copy(str(target))
        return snapshot(target)


@pytest.fixture
def build(repo_url, tmp_path) -> Builder:
    return Builder(repo_url, tmp_path)


# ---- comparing trees ---------------------------------------------------------------
def read_only(mode: int) -> int:
    """The permission bits a read-only mount shows for a file of mode `mode`."""
    return ((mode & 0o777) | 0o444) & ~0o222


def snapshot(root) -> dict:
    """{relative path: ('dir',) | ('link', target) | ('file', sha256, permissions)} of a
    folder, symlinks not followed. File permissions are shown as a read-only mount shows
    them, so a local copy and a mount compare equal."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", sha256_file(full), read_only(st.st_mode))
    return out


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- the cache ---------------------------------------------------------------------
def cache_dir() -> Path:
    return config.load().cache_dir


def cached_units() -> dict[str, int]:
    """{unit: size} of the unit files in the cache, asserting each hashes to its name, and
    {"file-<key>": size} of its whole files, asserting each is the file of chunk list
    `key` (the sha256 of its CHUNK-sized pieces' digests)."""
    out = {}
    for folder, prefix in (("units", ""), ("files", "file-")):
        base = cache_dir() / folder
        for sub in base.iterdir() if base.exists() else ():
            for f in sub.iterdir():
                if f.name.startswith("."):
                    continue  # a temp file being written
                data = f.read_bytes()
                if prefix:
                    digests = b"".join(hashlib.sha256(data[i:i + CHUNK]).digest()
                                       for i in range(0, len(data), CHUNK))
                    name = hashlib.sha256(digests).hexdigest()
                else:
                    name = hashlib.sha256(data).hexdigest()
                assert name == f.name, f"corrupt {folder[:-1]} in cache: {f}"
                assert sub.name == f.name[:2]
                out[prefix + f.name] = len(data)
    return out


def index_rows() -> dict[str, int]:
    """{unit: size} according to the cache index."""
    db = sqlite3.connect(str(cache_dir() / "index.db"), timeout=30)
    try:
        return dict(db.execute("SELECT id, size FROM units").fetchall())
    finally:
        db.close()


# ---- writable mounts ---------------------------------------------------------------
def start_writable(mounts: Mounts, version_id: str, repo_url: str,
                   name: str = "mnt") -> mount_mod.MountInfo:
    """A background writable mount server process; returns once the mount is live."""
    path = mounts.folder(name)
    info, _ = mount_mod.start_background(repo_url, version_id, str(path), writable=True,
                                         timeout=READY)
    wait_for(lambda: os.path.ismount(path), READY, f"{path} to be mounted")
    return info


def tree(root, *, mtimes: bool = False, skip=()) -> dict:
    """{relative path: ('dir', mode) | ('link', target) | ('file', sha256, mode[, mtime_ns])}
    of a folder with exact permission bits (a writable mount shows them as they are),
    symlinks not followed; names in `skip` (and what is below them) left out."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if os.path.relpath(os.path.join(dirpath, d), root) not in skip]
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            if rel in skip:
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", sha256_file(full), stat.S_IMODE(st.st_mode)) + \
                    ((st.st_mtime_ns,) if mtimes else ())
    return out


def copy_of(version_id: str, repo_url: str, target) -> Path:
    """`get_mutable_local_copy` of a version into `target` (the catalog's eager merge)."""
    Dataset.get(version_id, repo=repo_url).get_mutable_local_copy(str(target))
    return Path(target)


def run(*args, cwd, env=None, check: bool = True) -> subprocess.CompletedProcess:
    """A program, with a deadline; by default it must succeed."""
    r = subprocess.run([str(a) for a in args], cwd=str(cwd), capture_output=True, text=True,
                       env=env, timeout=120)
    if check:
        assert r.returncode == 0, (args, str(cwd), r.stdout, r.stderr)
    return r


class WritableEnv:
    """A writable mount of a version (`mnt`) and a plain local folder holding the same
    tree (`local`, its get_mutable_local_copy): the same actions applied to both must
    leave equal trees, before and after a commit."""

    def __init__(self, build: Builder, mounts: Mounts, tmp_path: Path, spec: dict):
        self.repo_url = build.repo_url
        self.vid = build.version(spec)
        self.tmp = tmp_path
        self.mnt = mounts.folder()
        self.info = start_writable(mounts, self.vid, self.repo_url)
        self.local = copy_of(self.vid, self.repo_url, tmp_path / "local")
        self._n = itertools.count()
        assert tree(self.mnt) == tree(self.local)

    def both(self, action) -> None:
        """`action(root)` on the mount, then on the local folder."""
        for root in (self.mnt, self.local):
            action(root)

    def run_both(self, *args, cwd: str = "", env=None) -> None:
        """A program in the mount and in the local folder (cwd relative to each)."""
        self.both(lambda root: run(*args, cwd=root / cwd, env=env))

    def pending(self) -> list[dict]:
        """`strata status --json` of the mount: its pending changes."""
        r = strata("status", "--json", self.mnt)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["changes"]

    def commit(self, message: str = "e2e") -> str:
        """`strata commit`; returns the child id (the last line of its output)."""
        r = strata("commit", self.mnt, "-m", message)
        assert r.returncode == 0, r.stderr
        child = r.stdout.strip().splitlines()[-1]
        assert Dataset.get(child, repo=self.repo_url).parents == [self.vid]
        return child

    def child_copy(self, child: str) -> Path:
        return copy_of(child, self.repo_url, self.tmp / f"child-{next(self._n)}")

    def check(self, *, mtimes: bool = False) -> str:
        """Mount equals local folder; commit; the child's copy and the mount (now showing
        the child, with nothing pending) equal it too. Returns the child id."""
        expected = tree(self.local, mtimes=mtimes)
        assert tree(self.mnt, mtimes=mtimes) == expected
        child = self.commit()
        assert tree(self.child_copy(child), mtimes=mtimes) == expected
        assert self.pending() == []
        assert tree(self.mnt, mtimes=mtimes) == expected
        return child
