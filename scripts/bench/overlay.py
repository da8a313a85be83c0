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
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib import (
    CAN_DROP,
    Bytes,
    GiB,
    KiB,
    MiB,
    Row,
    Strata,
    drop_caches,
    fuse_attrs,
    fuse_process,
    human,
    isolate,
    mbps,
    raise_readahead,
    read_files,
    run_bench,
    secs,
    tree_stats,
    warm_tree,
)

IO_BS = 1 * MiB
PROJECT = "bench"


# ---- data ------------------------------------------------------------------------------
def sha_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            b = f.read(8 * MiB)
            if not b:
                return h.hexdigest()
            h.update(b)


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
    return tree_stats(repo / "blobs")


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
    def __init__(self, args, work: Path, res):
        self.args = args
        self.work = work
        self.res = res
        self.sizes = QUICK if args.quick else FULL
        self.gen = Bytes(args.seed)
        self.rnd = random.Random(args.seed)
        self.repo_dir = work / "repo"
        self.strata = Strata(Path(args.pyspy) if args.pyspy else None)
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
        files, size = tree_stats(self.src)
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
        t_mount = self.strata.mount(str(self.repo_dir), self.v1, self.mp, "--writable")
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
            t_commit, child = self.commit("1% changed")
        blobs_after = blob_usage(self.repo_dir)
        rec = Dataset.get(child, repo=str(self.repo_dir)).record
        grew = blobs_after[1] - blobs_before[1]
        # the mount shows the child now: check a few bytes against the local copy
        for rel in edited + replaced[:3]:
            assert sha_file(str(self.mp / rel)) == sha_file(str(self.src / rel)), rel
        files, size = tree_stats(self.src)
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

    def commit(self, message: str) -> tuple[float, str]:
        """`strata commit MOUNTPOINT` (CLI end to end); (seconds, the child's id)."""
        t, out = self.strata.cli("--repo", str(self.repo_dir), "commit", str(self.mp),
                                 "-m", message)
        return t, out.strip().splitlines()[-1]

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
            t_commit, child = self.commit("renames only")
        blobs_after = blob_usage(self.repo_dir)
        rec = Dataset.get(child, repo=str(self.repo_dir)).record
        assert sha_file(str(self.mp / "big05-moved.bin")) == \
            sha_file(str(self.src / "big05-moved.bin"))
        assert sorted(os.listdir(self.mp / "small/d005-renamed")) == \
            sorted(os.listdir(self.src / "small/d005-renamed"))
        files, size = tree_stats(self.src)
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
def passthrough_mount(src: Path, mp: Path, work: Path, keep_cache: bool):
    return fuse_process([sys.executable, os.path.abspath(__file__), "--passthrough", str(src),
                         str(mp)] + (["--keep-cache"] if keep_cache else []),
                        mp, work / "passthrough.log")


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
            threading.Thread(target=raise_readahead, args=(mp,), daemon=True).start()

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(src + path)
            except OSError as e:
                fail(e)
            return fuse_attrs(st)

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

    mfusepy.FUSE(Passthrough(), mp, raw_fi=True, foreground=True, default_permissions=True,
                 max_idle_threads=16, attr_timeout=1.0, entry_timeout=1.0,
                 negative_timeout=0.0)


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

    def isolate_env(work: Path) -> None:
        run = work / "run"
        run.mkdir(mode=0o700)
        isolate(work, XDG_RUNTIME_DIR=str(run))

    return run_bench("Writable mounts", "strata-bench-overlay-", args, isolate_env,
                     lambda work, res: Bench(args, work, res).run())


if __name__ == "__main__":
    sys.exit(main())
