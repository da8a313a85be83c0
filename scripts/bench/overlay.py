#!/usr/bin/env python3
"""Writable-mount benchmark (issue 4): writes, copy-up, commit and reads through a writable
strata mount, against baselines measured in the same run.

    python scripts/bench/overlay.py --quick                  # scaled down (200 MiB), ~30 s
    python scripts/bench/overlay.py --out overlay.json       # full run (2 GiB), ~2 min (root)
    python scripts/bench/overlay.py --pyspy /tmp/prof        # the mount server profiled

Everything runs in a private work folder: XDG_DATA_HOME, XDG_CACHE_HOME, XDG_CONFIG_HOME and
XDG_RUNTIME_DIR point under it before strata is imported and STRATA_* variables are
cleared, so nothing of the user's own repository, workspace, cache or config is read or
touched. The repository is a local folder (work/repo) with the default 8 MiB chunks. The
overlay (workspace), the repository and every local-disk baseline live in the same work
folder, hence on the same file system. Page caches are dropped with
`echo 3 > /proc/sys/vm/drop_caches` (root only; without root those rows say so).

Figures (docs/performance.md, "Writable mounts (issue 4)"):
  0. a mixed tree of 2 GiB (--quick: 200 MiB): 70% in 20 large files (8 MiB-chunked),
     30% in small files of 1-63 KiB in 200 folders; unique pseudo-random bytes. It becomes
     version v1 (Dataset.create + add_files + finalize), mounted with
     `strata mount --writable`.
  1. sequential write of a 1 GiB file (--quick: 200 MiB) into the writable mount: open,
     1 MiB writes, fsync, close; vs the same code on local disk in the work folder.
     Runs alternate (local, mount, local, mount); the best of each counts. Target >= 0.5x.
  2. a child where 1% of the bytes changed, made through the mount and mirrored on the
     local tree with the same bytes:
     - 0.2% in whole small files replaced (open O_TRUNC, write new bytes);
     - 0.8% as one region of 0.4% of the tree, at a random unaligned offset, rewritten in
       place in each of 2 large files (open r+b: the first write-open copies the whole
       file up through the strata cache, timed on its own; then seek + write);
     then `strata commit MOUNTPOINT` (the CLI, end to end). Rows: the child record's
     uploaded_bytes / version bytes (target <= 2%), growth of the repository's blobs/,
     and the commit time vs re-adding the whole tree (Dataset.create + add_files +
     finalize(auto_upload=True) of the local copy of the child tree, into the same
     repository under a fresh name, page cache warm; target <= 10% of that time).
  3. a commit of renames only (a folder of small files, a large file, a few small files
     moved to another folder): uploaded_bytes == 0 and blobs/ does not grow.
  4. reading files after copy-up (4 large files opened r+b and closed: their bytes now live
     in the overlay's upper folder) vs reading the same files on local disk: page cache
     dropped (target >= 0.7x) and page cache warm (best of 3; target >= 0.7x).
  B. the FUSE binding: a minimal read-write passthrough file system (this script's
     --passthrough mode: mfusepy on libfuse3, the options of strata's writable mounts) of
     the local tree: figure 1's write, and figure 4's warm read without keep_cache (what
     strata's writable mounts do) and with it. The ceiling any mfusepy server has here.

--pyspy DIR records the mount server with py-spy during the strata phases (raw collapsed
stacks, DIR/<phase>.txt) and prints the hottest functions; timings taken while profiling
are inflated, use them for where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1e6
IO_BS = 1 * MiB
ROOT = Path(__file__).resolve().parents[2]
PROJECT = "bench"


# ---- results ---------------------------------------------------------------------------
@dataclass
class Row:
    figure: str
    strata: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    ok: bool | None = None          # None: informational, no target
    values: dict = field(default_factory=dict)


class Results:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.meta: dict = {}

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        mark = {True: "PASS", False: "FAIL", None: "info"}[row.ok]
        print(f"  [{mark}] {row.figure}: {row.strata}"
              + (f" | baseline {row.baseline}" if row.baseline else "")
              + (f" | {row.ratio}" if row.ratio else ""), flush=True)
        return row

    def markdown(self) -> str:
        out = ["| figure | strata | baseline | ratio | target | result |",
               "| --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            result = {True: "pass", False: "**FAIL**", None: "info"}[r.ok]
            out.append(f"| {r.figure} | {r.strata} | {r.baseline} | {r.ratio} | {r.target} "
                       f"| {result} |")
        return "\n".join(out)


def secs(t: float) -> str:
    return f"{t * 1000:.0f} ms" if t < 1 else f"{t:.2f} s"


def mbps(nbytes: int, t: float) -> str:
    return f"{nbytes / MB / t:.0f} MB/s" if t > 0 else "-"


def human(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ---- environment -----------------------------------------------------------------------
def isolate(work: Path) -> None:
    """Point strata at private folders (before importing strata)."""
    for k in list(os.environ):
        if k.startswith("STRATA_"):
            del os.environ[k]
    run = work / "run"
    run.mkdir(mode=0o700)
    os.environ.update(XDG_DATA_HOME=str(work / "xdg-data"),
                      XDG_CACHE_HOME=str(work / "xdg-cache"),
                      XDG_CONFIG_HOME=str(work / "xdg-config"), XDG_RUNTIME_DIR=str(run))


CAN_DROP = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_caches() -> bool:
    if not CAN_DROP:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def read_files(files: list[str], bs: int = IO_BS) -> tuple[int, float]:
    """Read files one after the other with `bs`-sized reads; (bytes, seconds)."""
    buf = bytearray(bs)
    view = memoryview(buf)
    total = 0
    t0 = time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(view)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - t0


def sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(8 * MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


def tree_bytes(folder: Path) -> tuple[int, int]:
    """(files, bytes) of every regular file under `folder`."""
    n = size = 0
    for dirpath, _, files in os.walk(folder):
        for fn in files:
            st = os.lstat(os.path.join(dirpath, fn))
            n += 1
            size += st.st_size
    return n, size


def warm_tree(folder: Path) -> None:
    for dirpath, _, files in os.walk(folder):
        read_files([os.path.join(dirpath, fn) for fn in files], 8 * MiB)


def mounted(mp: str) -> bool:
    mp = os.path.abspath(mp)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mp for line in f)


def force_unmount(mp: str) -> None:
    if mounted(mp):
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
        if mounted(mp):
            subprocess.run(["umount", "-l", mp], capture_output=True)


def loadavg() -> str:
    try:
        return str(open("/proc/loadavg").read().split(" ", 3)[:3])
    except OSError:
        return "?"


# ---- data ------------------------------------------------------------------------------
class Bytes:
    """Unique pseudo-random bytes fast: a 64 MiB random pool XOR a key that differs for
    every block (so no two 1 MiB blocks, hence no two chunks or small files, are equal)."""

    def __init__(self, seed: int):
        import numpy as np
        self.np = np
        gen = np.random.Generator(np.random.SFC64(seed))
        self.pool = gen.integers(0, 2**63, size=(64 * MiB) // 8, dtype=np.uint64)
        self.counter = seed * 1_000_003

    def block(self, n: int) -> bytes:
        np = self.np
        self.counter += 1
        words = (n + 7) // 8
        off = (self.counter * 104_729) % (len(self.pool) - words)
        key = np.uint64((self.counter * 0x9E3779B97F4A7C15) & (2**64 - 1))
        return (self.pool[off:off + words] ^ key).tobytes()[:n]

    def write_file(self, path: Path, size: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left:
                n = min(left, MiB)
                f.write(self.block(n))
                left -= n


def write_seq(path: str, data: list[bytes], total: int) -> float:
    """open(O_CREAT|O_TRUNC) + `total` bytes in 1 MiB os.write calls (cycling over the
    prepared blocks) + fsync + close; seconds."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left, i = total, 0
        while left:
            b = data[i % len(data)]
            n = os.write(fd, b if len(b) <= left else b[:left])
            left -= n
            i += 1
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def blob_usage(repo: Path) -> tuple[int, int]:
    """(files, bytes) under the repository's blobs/ folder."""
    return tree_bytes(repo / "blobs")


# ---- strata through its CLI and the mount registry -------------------------------------
class Strata:
    def __init__(self, work: Path, repo: str, pyspy: Path | None):
        self.work = work
        self.repo = repo
        self.pyspy = pyspy
        self.mountpoints: set[str] = set()

    def cli(self, *args: str) -> tuple[float, str]:
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "strata.cli.main", "--quiet", "--repo",
                            self.repo, *args], capture_output=True, text=True)
        t = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"strata {' '.join(args)} failed: {p.stderr.strip()[-800:]}")
        return t, p.stdout

    def mount(self, vid: str, mp: Path) -> float:
        mp.mkdir(parents=True, exist_ok=True)
        self.mountpoints.add(str(mp))
        return self.cli("mount", "--id", vid, "--writable", str(mp))[0]

    def pid(self, mp: Path) -> int:
        from strata.vfs.mount import registered
        info = registered(str(mp))
        if info is None:
            raise RuntimeError(f"{mp} is not a registered strata mount")
        return info.pid

    def status(self, mp: Path) -> dict:
        from strata.vfs.mount import control_call
        return control_call(str(mp), "status")

    def commit(self, mp: Path, *args: str) -> tuple[float, str]:
        t, out = self.cli("commit", str(mp), *args)
        return t, out.strip().splitlines()[-1]

    def unmount(self, mp: Path) -> None:
        if mounted(str(mp)):
            pid = self.pid(mp)
            subprocess.run([sys.executable, "-m", "strata.cli.main", "--quiet", "unmount",
                            str(mp)], capture_output=True)
            deadline = time.monotonic() + 20
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
        force_unmount(str(mp))

    @contextmanager
    def profiled(self, mp: Path, name: str):
        """py-spy record of the mount server while the block runs (if --pyspy)."""
        if not self.pyspy or not shutil.which("py-spy"):
            yield
            return
        self.pyspy.mkdir(parents=True, exist_ok=True)
        out = self.pyspy / f"{name}.txt"
        p = subprocess.Popen(["py-spy", "record", "--pid", str(self.pid(mp)), "--rate", "200",
                              "--format", "raw", "--threads", "--nonblocking",
                              "-o", str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        try:
            yield
        finally:
            p.send_signal(signal.SIGINT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
            summarise_pyspy(out)

    def cleanup(self) -> None:
        for mp in sorted(self.mountpoints):
            try:
                self.unmount(Path(mp))
            except Exception:  # noqa: BLE001 - best effort on the way out
                force_unmount(mp)


def summarise_pyspy(path: Path, top: int = 14) -> None:
    """Own-time (leaf) and inclusive sample counts per function from py-spy's raw output."""
    if not path.exists():
        print(f"    (no py-spy output at {path})")
        return
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        n = int(n)
        frames = stack.split(";")
        total += n
        own[frames[-1]] += n
        for fr in set(frames):
            incl[fr] += n
    if not total:
        print(f"    py-spy {path.name}: no samples")
        return
    print(f"    py-spy {path.name}: {total} samples; top own time:")
    for fr, n in own.most_common(top):
        print(f"      {n / total:6.1%}  {fr[:150]}")
    print("    top inclusive (strata frames):")
    shown = 0
    for fr, n in incl.most_common():
        if any(f"({layer}/" in fr for layer in ("vfs", "storage", "catalog")):
            print(f"      {n / total:6.1%}  {fr[:150]}")
            shown += 1
            if shown >= top:
                break


# ---- figures ---------------------------------------------------------------------------
@dataclass
class Sizes:
    tree: int               # version bytes
    large_files: int        # 70% of the tree in this many files
    small_max: int          # small files are 1 KiB .. small_max
    folders: int            # small files spread over this many folders
    write_file: int         # figure 1
    read_files: int         # figure 4: large files copied up and read


FULL = Sizes(2 * GiB, 20, 63 * KiB, 200, 1 * GiB, 4)
QUICK = Sizes(200 * MiB, 10, 63 * KiB, 40, 200 * MiB, 4)


class Bench:
    def __init__(self, args, work: Path, res: Results):
        self.args = args
        self.work = work
        self.res = res
        self.sizes = QUICK if args.quick else FULL
        self.gen = Bytes(args.seed)
        self.rnd = random.Random(args.seed)
        self.repo_dir = work / "repo"
        self.strata = Strata(work, str(self.repo_dir), Path(args.pyspy) if args.pyspy else None)
        self.src = work / "tree"                  # v1's source, then the child's local copy
        self.mp = work / "mnt"
        self.note_drop = "" if CAN_DROP else " (page cache NOT dropped: not root)"
        self.large: list[str] = []                # relative paths of the large files
        self.small: list[str] = []
        self.v1 = ""

    # -- 0: the tree and its version ------------------------------------------------------
    def make_tree(self) -> None:
        from strata.catalog import Dataset
        sz = self.sizes
        print(f"\n0. tree of {human(sz.tree)} and version v1", flush=True)
        t0 = time.perf_counter()
        large_total = int(sz.tree * 0.7)
        each = large_total // sz.large_files
        for i in range(sz.large_files):
            rel = f"large/big{i:02d}.bin"
            self.gen.write_file(self.src / rel, each + self.rnd.randrange(0, 4096))
            self.large.append(rel)
        left = sz.tree - large_total
        i = 0
        while left > 0:
            n = min(left, self.rnd.randint(1 * KiB, sz.small_max))
            rel = f"small/d{i % sz.folders:03d}/f{i:06d}.bin"
            p = self.src / rel
            if i < sz.folders:
                p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "wb") as f:
                f.write(self.gen.block(n))
            self.small.append(rel)
            left -= n
            i += 1
        t_gen = time.perf_counter() - t0
        files, size = tree_bytes(self.src)
        self.tree_size = size
        t0 = time.perf_counter()
        ds = Dataset.create("tree", PROJECT, repo=str(self.repo_dir))
        ds.add_files(str(self.src))
        ds.finalize(auto_upload=True)
        t_build = time.perf_counter() - t0
        self.v1 = ds.id
        self.res.add(Row("0. tree generated; version v1 built (Dataset.create + add_files + "
                         "finalize)",
                         f"{files} files, {human(size)}: {sz.large_files} large (70%), "
                         f"{len(self.small)} small in {sz.folders} folders; generated in "
                         f"{secs(t_gen)}, v1 built in {secs(t_build)}",
                         values={"files": files, "bytes": size, "build_s": t_build}))
        t_mount = self.strata.mount(self.v1, self.mp)
        self.res.add(Row("0. `strata mount --writable` of v1 (CLI start to mount ready)",
                         secs(t_mount), values={"mount_s": t_mount}))

    # -- 1: sequential write ------------------------------------------------------------
    def fig1(self) -> None:
        n = self.sizes.write_file
        print(f"\n1. sequential write of {human(n)} (1 MiB writes + fsync)", flush=True)
        data = [self.gen.block(IO_BS) for _ in range(64)]
        local = str(self.work / "local-write.bin")
        target = str(self.mp / "bench-write.bin")
        t_local, t_mount = [], []
        for rep in range(self.args.reps):
            os.sync()
            t_local.append(write_seq(local, data, n))
            os.unlink(local)
            os.sync()
            with self.strata.profiled(self.mp, f"fig1-write-{rep}"):
                t_mount.append(write_seq(target, data, n))
            assert os.path.getsize(target) == n
            os.unlink(target)
        st = self.strata.status(self.mp)
        assert not st["changes"], f"pending changes after fig 1: {st['changes']}"
        tl, tm = min(t_local), min(t_mount)
        r = tl / tm
        self.res.add(Row(f"1. sequential write of {human(n)} into the writable mount "
                         "(1 MiB writes, fsync; best of "
                         f"{self.args.reps})",
                         f"{mbps(n, tm)} ({secs(tm)}; runs "
                         + ", ".join(secs(t) for t in t_mount) + ")",
                         f"local disk, same fs: {mbps(n, tl)} ({secs(tl)}; runs "
                         + ", ".join(secs(t) for t in t_local) + ")",
                         f"{r:.2f}x", ">= 0.5x", r >= 0.5,
                         {"mount_s": t_mount, "local_s": t_local, "ratio": r}))

    # -- 2: a child with 1% changed -------------------------------------------------------
    def fig2(self) -> None:
        from strata.catalog import Dataset
        sz = self.sizes
        print("\n2. commit of a child with 1% of the bytes changed", flush=True)
        # 0.2%: whole small files replaced (same size, new bytes)
        budget = int(self.tree_size * 0.002)
        replaced = []
        picks = self.rnd.sample(self.small, len(self.small))
        t_small = 0.0
        for rel in picks:
            if budget <= 0:
                break
            size = os.path.getsize(self.src / rel)
            data = self.gen.block(size)
            t0 = time.perf_counter()
            with open(self.mp / rel, "wb") as f:
                f.write(data)
            t_small += time.perf_counter() - t0
            with open(self.src / rel, "wb") as f:
                f.write(data)
            replaced.append(rel)
            budget -= size
        small_bytes = sum(os.path.getsize(self.src / r) for r in replaced)
        # 0.8%: a region of 0.4% of the tree rewritten in place in each of 2 large files
        region = int(self.tree_size * 0.004)
        edited = self.large[:2]
        t_copyup, copied, t_region = [], 0, 0.0
        for rel in edited:
            size = os.path.getsize(self.src / rel)
            off = self.rnd.randrange(1, size - region - 1) | 1        # unaligned
            data = self.gen.block(region)
            with self.strata.profiled(self.mp, f"fig2-copyup-{rel.replace('/', '_')}"):
                t0 = time.perf_counter()
                f = open(self.mp / rel, "r+b", buffering=0)   # the copy-up happens here
                t_copyup.append(time.perf_counter() - t0)
            copied += size
            t0 = time.perf_counter()
            with f:
                f.seek(off)
                for i in range(0, region, IO_BS):
                    f.write(data[i:i + IO_BS])
            t_region += time.perf_counter() - t0
            with open(self.src / rel, "r+b") as lf:
                lf.seek(off)
                lf.write(data)
        changed = small_bytes + 2 * region
        st = self.strata.status(self.mp)
        kinds = collections.Counter(c["change"] for c in st["changes"])
        print(f"   status: {dict(kinds)}; {len(replaced)} small files "
              f"({human(small_bytes)}) replaced in {secs(t_small)}, 2 regions of "
              f"{human(region)} written in {secs(t_region)}", flush=True)
        assert kinds == {"modified": len(replaced) + 2}, kinds
        # local-copy baseline for the copy-up: the same file read from local disk and
        # written to a new file (page cache warm, no fsync, like the copy-up)
        t0 = time.perf_counter()
        shutil.copyfile(self.src / self.large[2], self.work / "copy-baseline.bin")
        t_cp = time.perf_counter() - t0
        os.unlink(self.work / "copy-baseline.bin")
        self.res.add(Row(f"2.i  copy-up on the first write-open of a large file (whole file "
                         f"fetched through the strata cache, cold; {len(edited)} files, "
                         f"{human(copied)})",
                         f"{secs(sum(t_copyup))} ({mbps(copied, sum(t_copyup))}; "
                         + " / ".join(secs(t) for t in t_copyup) + ")",
                         f"`shutil.copyfile` of one such file on local disk: "
                         f"{mbps(os.path.getsize(self.src / self.large[2]), t_cp)}",
                         values={"copyup_s": t_copyup, "bytes": copied, "cp_s": t_cp}))

        blobs_before = blob_usage(self.repo_dir)
        with self.strata.profiled(self.mp, "fig2-commit"):
            t_commit, child = self.strata.commit(self.mp, "-m", "1% changed")
        blobs_after = blob_usage(self.repo_dir)
        rec = Dataset.get(child, repo=str(self.repo_dir)).record
        grew = blobs_after[1] - blobs_before[1]
        # the mount shows the child now: check a few bytes against the local copy
        for rel in edited + replaced[:3]:
            assert sha_file(str(self.mp / rel)) == sha_file(str(self.src / rel)), rel
        files, size = tree_bytes(self.src)
        assert rec.size == size and rec.files == files, (rec.size, size, rec.files, files)
        self.child = child

        # baseline: re-adding the whole (child) tree under a fresh name, page cache warm
        warm_tree(self.src)
        t0 = time.perf_counter()
        ds = Dataset.create("tree-readd", PROJECT, repo=str(self.repo_dir))
        ds.add_files(str(self.src))
        ds.finalize(auto_upload=True)
        t_readd = time.perf_counter() - t0
        readd_uploaded = ds.record.uploaded_bytes

        up = rec.uploaded_bytes
        self.res.add(Row(f"2. child, 1% of bytes changed ({len(replaced)} small files "
                         f"replaced, a {human(region)} region rewritten in 2 large files): "
                         "uploaded_bytes / version bytes",
                         f"{human(up)} = {up / rec.size:.2%}",
                         f"changed {human(changed)} = {changed / rec.size:.2%}",
                         f"{up / changed:.2f}x changed", "<= 2%", up / rec.size <= 0.02,
                         {"uploaded": up, "size": rec.size, "changed": changed}))
        self.res.add(Row("2.   blobs/ growth / version bytes",
                         f"{human(grew)} = {grew / rec.size:.2%} "
                         f"(+{blobs_after[0] - blobs_before[0]} blobs)", "", "", "<= 2%",
                         grew / rec.size <= 0.02, {"grew": grew}))
        self.res.add(Row("2. `strata commit MOUNTPOINT` (CLI end to end) vs re-adding the "
                         "whole tree (create + add_files + finalize, same repository, fresh "
                         "name, page cache warm)",
                         secs(t_commit),
                         f"{secs(t_readd)} (it stored {human(readd_uploaded)} of new blobs)",
                         f"{t_commit / t_readd:.1%} of it", "<= 10%",
                         t_commit / t_readd <= 0.10,
                         {"commit_s": t_commit, "readd_s": t_readd,
                          "readd_uploaded": readd_uploaded}))
        start = self.cli_start()
        self.res.add(Row("2.i  of the commit: CLI process start + imports (`strata "
                         "--version`, median of 3); the rest (server side, estimate)",
                         f"{secs(start)}; {secs(t_commit - start)} = "
                         f"{(t_commit - start) / t_readd:.1%} of the re-add",
                         values={"cli_start_s": start}))

    def cli_start(self) -> float:
        ts = []
        for _ in range(3):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "strata.cli.main", "--version"],
                           capture_output=True, check=True)
            ts.append(time.perf_counter() - t0)
        self.cli_start_s = sorted(ts)[1]
        return self.cli_start_s

    # -- 3: renames only ------------------------------------------------------------------
    def fig3(self) -> None:
        from strata.catalog import Dataset
        print("\n3. commit of renames only", flush=True)
        folder = "small/d005"
        moves = [(folder, "small/d005-renamed"),
                 (self.large[5], "big05-moved.bin")]
        few = sorted(r for r in self.small if r.startswith("small/d006/"))[:5]
        moves += [(r, "small/d007/" + os.path.basename(r)) for r in few]
        moved_files = sum(1 for r in self.small if r.startswith(folder + "/")) + 1 + len(few)
        moved_bytes = sum(os.path.getsize(self.src / r) for r in self.small
                          if r.startswith(folder + "/")) \
            + os.path.getsize(self.src / self.large[5]) \
            + sum(os.path.getsize(self.src / r) for r in few)
        for a, b in moves:
            os.rename(self.mp / a, self.mp / b)
            os.rename(self.src / a, self.src / b)
        st = self.strata.status(self.mp)
        kinds = collections.Counter(c["change"] for c in st["changes"])
        assert set(kinds) == {"renamed"}, st["changes"]
        blobs_before = blob_usage(self.repo_dir)
        with self.strata.profiled(self.mp, "fig3-commit"):
            t_commit, child = self.strata.commit(self.mp, "-m", "renames only")
        blobs_after = blob_usage(self.repo_dir)
        rec = Dataset.get(child, repo=str(self.repo_dir)).record
        assert sha_file(str(self.mp / "big05-moved.bin")) == \
            sha_file(str(self.src / "big05-moved.bin"))
        assert sorted(os.listdir(self.mp / "small/d005-renamed")) == \
            sorted(os.listdir(self.src / "small/d005-renamed"))
        files, size = tree_bytes(self.src)
        assert rec.size == size and rec.files == files, (rec.size, size, rec.files, files)
        grew = (blobs_after[0] - blobs_before[0], blobs_after[1] - blobs_before[1])
        ok = rec.uploaded_bytes == 0 and grew == (0, 0)
        self.res.add(Row(f"3. child of renames only (a folder, a large file, {len(few)} small "
                         f"files: {moved_files} files, {human(moved_bytes)} moved; "
                         f"status {dict(kinds)}): uploaded_bytes, blobs/ growth",
                         f"{rec.uploaded_bytes} B; blobs/ +{grew[0]} files, +{grew[1]} B",
                         "", "", "0 B, no new blob", ok,
                         {"uploaded": rec.uploaded_bytes, "blob_files": grew[0],
                          "blob_bytes": grew[1]}))
        self.res.add(Row("3.i  `strata commit` of the renames (CLI end to end)",
                         secs(t_commit), values={"commit_s": t_commit}))

    # -- 4: reads after copy-up -----------------------------------------------------------
    def fig4(self) -> None:
        k = self.sizes.read_files
        rels = self.large[6:6 + k]
        print(f"\n4. reading {k} large files after copy-up", flush=True)
        t_copy = []
        for rel in rels:
            t0 = time.perf_counter()
            with open(self.mp / rel, "r+b", buffering=0):
                pass
            t_copy.append(time.perf_counter() - t0)
            assert os.getxattr(self.mp / rel, "user.strata.version") == b"overlay", rel
        n_total = sum(os.path.getsize(self.src / r) for r in rels)
        self.res.add(Row(f"4.i  copy-up of {k} more large files on open r+b "
                         f"({human(n_total)}, strata cache cold)",
                         f"{secs(sum(t_copy))} ({mbps(n_total, sum(t_copy))})",
                         values={"copyup_s": t_copy}))
        mnt = [str(self.mp / r) for r in rels]
        loc = [str(self.src / r) for r in rels]
        for m, lo in zip(mnt, loc):
            assert sha_file(m) == sha_file(lo)
        cold_m, cold_l = [], []
        for rep in range(self.args.reps):
            drop_caches()
            n, t = read_files(loc)
            cold_l.append(t)
            drop_caches()
            with self.strata.profiled(self.mp, f"fig4-cold-{rep}"):
                n2, t = read_files(mnt)
            cold_m.append(t)
            assert n == n2 == n_total
        read_files(loc)
        read_files(mnt)
        warm_l = [read_files(loc)[1] for _ in range(3)]
        with self.strata.profiled(self.mp, "fig4-warm"):
            warm_m = [read_files(mnt)[1] for _ in range(3)]
        for name, tm, tl, what in (("page cache dropped" + self.note_drop, cold_m, cold_l,
                                    f"best of {self.args.reps}"),
                                   ("page cache warm", warm_m, warm_l, "best of 3")):
            r = min(tl) / min(tm)
            self.res.add(Row(f"4. read after copy-up ({k} files, {human(n_total)}, 1 MiB "
                             f"reads), {name}, {what}",
                             f"{mbps(n_total, min(tm))} (runs "
                             + ", ".join(mbps(n_total, t) for t in tm) + ")",
                             f"local disk: {mbps(n_total, min(tl))} (runs "
                             + ", ".join(mbps(n_total, t) for t in tl) + ")",
                             f"{r:.2f}x", ">= 0.7x", r >= 0.7,
                             {"mount_s": tm, "local_s": tl, "ratio": r}))

    # -- B: the binding -------------------------------------------------------------------
    def figB(self) -> None:
        print("\nB. FUSE binding: a minimal read-write passthrough", flush=True)
        n = self.sizes.write_file
        data = [self.gen.block(IO_BS) for _ in range(64)]
        src = self.src / "large"
        rels = [os.path.basename(r) for r in self.large[6:6 + self.sizes.read_files]]
        for keep in (False, True):
            mp = self.work / f"mnt-pt-{int(keep)}"
            with passthrough_mount(src, mp, self.work, keep):
                if not keep:
                    t_w, t_l = [], []
                    for _ in range(self.args.reps):
                        os.sync()
                        t_l.append(write_seq(str(self.work / "local-write.bin"), data, n))
                        os.unlink(self.work / "local-write.bin")
                        os.sync()
                        t_w.append(write_seq(str(mp / "pt-write.bin"), data, n))
                        os.unlink(mp / "pt-write.bin")
                    r = min(t_l) / min(t_w)
                    self.res.add(Row(f"B.   sequential write of {human(n)} (as figure 1) "
                                     "through a minimal mfusepy passthrough, strata's "
                                     "writable-mount options",
                                     f"{mbps(n, min(t_w))}",
                                     f"local disk: {mbps(n, min(t_l))}", f"{r:.2f}x",
                                     values={"pt_s": t_w, "local_s": t_l, "ratio": r}))
                files = [str(mp / r) for r in rels]
                loc = [str(src / r) for r in rels]
                nb, _ = read_files(files)
                read_files(loc)
                t_m = min(read_files(files)[1] for _ in range(3))
                t_l = min(read_files(loc)[1] for _ in range(3))
                r = t_l / t_m
                what = "with keep_cache" if keep else "without keep_cache (as strata's " \
                    "writable mounts)"
                self.res.add(Row(f"B.   warm read of the figure-4 files through the "
                                 f"passthrough, {what}, best of 3", mbps(nb, t_m),
                                 f"local disk: {mbps(nb, t_l)}", f"{r:.2f}x",
                                 values={"pt_s": t_m, "local_s": t_l, "ratio": r}))

    # -- all -------------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self.make_tree()
            self.fig1()
            self.fig2()
            self.fig3()
            self.fig4()
            self.strata.cleanup()
            self.figB()
        finally:
            self.strata.cleanup()


# ---- the binding's ceiling: a minimal read-write passthrough -----------------------------
def wait_mounted(mp: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if mounted(mp):
            try:
                os.listdir(mp)
                return
            except OSError:
                pass
        if proc.poll() is not None:
            raise RuntimeError(f"passthrough at {mp} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{mp} did not mount within {timeout} s")


@contextmanager
def passthrough_mount(src: Path, mp: Path, work: Path, keep_cache: bool):
    mp.mkdir(parents=True, exist_ok=True)
    log = open(work / "passthrough.log", "ab")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--passthrough",
                             str(src), str(mp)] + (["--keep-cache"] if keep_cache else []),
                            stdout=log, stderr=log, start_new_session=True)
    try:
        wait_mounted(str(mp), proc)
        yield proc
    finally:
        force_unmount(str(mp))
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def serve_passthrough(src: str, mp: str, keep_cache: bool) -> None:
    """A minimal read-write passthrough of `src` at `mp` on mfusepy and libfuse3, with the
    options of strata's writable mounts and its 1 MiB readahead; file data moves with
    os.pread/os.pwrite on a descriptor per open file, like strata's upper files."""
    import errno
    import threading
    os.environ["FUSE_LIBRARY_NAME"] = "fuse3"
    import mfusepy

    def fail(e: OSError):
        raise mfusepy.FuseOSError(e.errno or errno.EIO) from None

    class Passthrough(mfusepy.Operations):
        use_ns = True

        def init(self, path):
            threading.Thread(target=raise_ra, daemon=True).start()

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(src + path)
            except OSError as e:
                fail(e)
            return {"st_mode": st.st_mode, "st_size": st.st_size, "st_nlink": st.st_nlink,
                    "st_uid": st.st_uid, "st_gid": st.st_gid, "st_mtime": st.st_mtime_ns,
                    "st_ctime": st.st_mtime_ns, "st_atime": st.st_mtime_ns}

        def readdir(self, path, fh):
            return [".", ".."] + os.listdir(src + path)

        def open(self, path, fi):
            fi.fh = os.open(src + path, fi.flags & ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC))
            if keep_cache:
                fi.keep_cache = 1
            return 0

        def create(self, path, mode, fi):
            fi.fh = os.open(src + path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)
            return 0

        def read(self, path, size, offset, fi):
            return os.pread(fi.fh, size, offset)

        def write(self, path, data, offset, fi):
            return os.pwrite(fi.fh, data, offset)

        def truncate(self, path, length, fh=None):
            os.truncate(src + path, length)
            return 0

        def fsync(self, path, datasync, fi):
            os.fsync(fi.fh)
            return 0

        def flush(self, path, fi):
            return 0

        def release(self, path, fi):
            os.close(fi.fh)
            return 0

        def unlink(self, path):
            os.unlink(src + path)
            return 0

        def utimens(self, path, times=None):
            return 0

        def chmod(self, path, mode):
            return 0

        def getxattr(self, path, name, position=0):
            raise mfusepy.FuseOSError(errno.ENODATA)

    def raise_ra() -> None:
        os.stat(mp)
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == os.path.abspath(mp):
                    with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w") as ra:
                        ra.write("1024")

    mfusepy.FUSE(Passthrough(), mp, raw_fi=True, foreground=True, default_permissions=True,
                 max_idle_threads=16, attr_timeout=1.0, entry_timeout=1.0,
                 negative_timeout=0.0)


def machine_meta(args) -> dict:
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    from importlib.metadata import version
    return {"cores": os.cpu_count(), "memory_gib": round(mem / GiB, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "mfusepy": version("mfusepy"), "quick": args.quick,
            "page_cache_dropped": CAN_DROP, "loadavg_start": loadavg()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="scaled-down sizes (a quick check)")
    ap.add_argument("--out", help="also write the results as JSON to this file")
    ap.add_argument("--workdir", help="parent folder for the work folder (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--pyspy", metavar="DIR", help="py-spy the mount server in strata phases")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--reps", type=int, default=3,
                    help="runs of each figure-1 and cold figure-4 contender; the best counts "
                         "(default 3)")
    ap.add_argument("--passthrough", nargs=2, metavar=("SRC", "MP"), help=argparse.SUPPRESS)
    ap.add_argument("--keep-cache", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.passthrough:
        serve_passthrough(*args.passthrough, args.keep_cache)
        return 0

    work = Path(tempfile.mkdtemp(prefix="strata-bench-overlay-", dir=args.workdir))
    isolate(work)
    sys.path.insert(0, str(ROOT))  # noqa - strata is installed; this only helps a bare checkout
    res = Results()
    res.meta = machine_meta(args)
    print(f"work folder {work}; {res.meta['cores']} cores, {res.meta['memory_gib']} GiB; "
          f"load {res.meta['loadavg_start']}; page cache drops: {CAN_DROP}", flush=True)
    t0 = time.perf_counter()
    bench = Bench(args, work, res)
    try:
        bench.run()
    finally:
        res.meta["loadavg_end"] = loadavg()
        res.meta["seconds"] = round(time.perf_counter() - t0, 1)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\nWritable mounts ({'--quick' if args.quick else 'full'} run, "
          f"{res.meta['seconds']:.0f} s, {res.meta['cores']} cores, load "
          f"{res.meta['loadavg_start']} -> {res.meta['loadavg_end']}):\n")
    print(res.markdown())
    if args.out:
        Path(args.out).write_text(json.dumps({"meta": res.meta,
                                              "rows": [asdict(r) for r in res.rows]},
                                             indent=1))
    return 0 if all(r.ok is not False for r in res.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
