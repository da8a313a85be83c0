#!/usr/bin/env python3
"""Mount read benchmark (issue 3): reads through a strata FUSE mount against baselines
measured in the same run.

    python scripts/bench/mount_read.py --quick                 # scaled down, ~3 min
    python scripts/bench/mount_read.py --out mount.json        # full run, ~10 min (root)
    python scripts/bench/mount_read.py --only 2,3 --pyspy /tmp/prof   # some figures, profiled

Everything runs in a private work folder: XDG_DATA_HOME, XDG_CACHE_HOME and XDG_CONFIG_HOME
point under it before strata is imported, STRATA_* variables are cleared and the AWS
variables point at a private s3rver, so nothing of the user's own repository, cache, config
or AWS profile is read or touched. Page caches are dropped with
`echo 3 > /proc/sys/vm/drop_caches` (root only; without root those rows say so).

Figures (docs/performance.md, "Mount reads (issue 3)"):
  1. time to first byte of one file of a 2 GiB version (local-folder repository), vs
     `strata get --copy` of the whole version (same cold start). Target >= 100x. Two
     ways: open + read 4 KiB through a running `strata mount --all` (the version never
     touched before, page cache dropped, strata cache empty), and on the version mounted
     with `strata mount` (mount ready, then page cache dropped, strata cache empty). For
     information, `strata mount` + open + read 4 KiB with everything cold: that includes
     the start of a cold Python process, which figure 5 bounds (mount ready <= 2 s).
  2. cold sequential read (1 MiB reads) of a 1 GiB file of a version stored in S3 (s3rver
     on 127.0.0.1, repository s3://bench/strata) through a fresh mount with an empty
     strata cache, vs a boto3 download (download_file) of the same bytes stored as one
     object into a file on the disk that holds the strata cache (8 threads x 8 MiB
     parts); target >= 0.8x; for reference the same GETs into /dev/null; and vs
     `rclone mount` and `s3fs` (Debian packages, default options) on that object, with
     the peak memory (VmHWM) of each mount process over its read. s3rver's files are
     read into the page cache before each contender, so the server side is the same for
     all; the contenders take turns, round after round (--reps), and each figure is the
     best of its rounds. strata's mounts in figures 2 and 3 have an 8 GiB cache limit
     (`CACHE_SIZE`).
  3. warm re-read of that file: strata cache hot, fresh mount, page cache dropped, vs a
     local-disk read of the same file with the page cache dropped (target >= 0.5x);
     page-cache-hot re-read vs a page-cache-hot local read (target >= 0.7x, best of 3).
  4. `find -printf '%s %T@ %p'` (readdir + stat of every entry) over a version of 100k
     tiny files (made with the Python API) vs the same tree on local disk: cold (fresh
     mount, page cache dropped; target >= 0.1x) and warm (second pass; target >= 0.4x).
  5. a version of 1.3M files (ImageNet-shaped: train/<1000 classes>/<1250 files> and
     val/<50k files>; the manifest is generated, every entry points at one real 110 KiB
     pack blob): `strata mount` + `ls` of the root once the manifest is in the strata
     cache (target <= 2 s), and the mount process's VmRSS after `ls` of the root,
     `ls train` and stat/read of a few files (target <= 300 MB).

  S. small files from S3: a cold read of 2000 files of 64 KiB (a version in s3rver, the
     files in packs) through a fresh mount with an empty strata cache, one reader going
     through them in path order as `cp -r` or `tar` would, vs boto3 `get_object` of the
     same (pack, offset, size) ranges one after the other; then a quarter of them again
     through a TCP proxy that holds each request SMALL_DELAY (20 ms: a store that far
     away). No target: where the time and CPU of one small file go (GETs, verification,
     the cache, FUSE), and what pack windows save.

  B. FUSE bindings: minimal read-only passthrough file systems (this script's
     --passthrough mode) on mfusepy with libfuse3 (strata's binding until strata spoke
     the kernel protocol itself) and with libfuse2, same options: a cold FUSE read of the
     figure-2 file and find + stat of the figure-4 tree (needs `pip install -e .[bench]`).

--quick scales everything down (200 MiB version and file, 10k files, 100k-file manifest).
--pyspy DIR records the mount process with py-spy during the strata phases (raw
collapsed stacks, DIR/<phase>.txt) and prints the hottest functions; timings taken while
profiling are inflated, use them for where the time goes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from benchlib import (
    CAN_DROP,
    MB,
    Bytes,
    GiB,
    KiB,
    MiB,
    Results,
    Row,
    Strata,
    drop_caches,
    fuse_attrs,
    fuse_process,
    isolate,
    mbps,
    raise_readahead,
    read_all,
    read_files,
    run_bench,
    secs,
    warm_tree,
)

TOOLS_DEFAULT = "/opt/strata-bench"
SMALL_DELAY = 0.02   # figure S also reads a quarter of its files from a store this far


# ---- results ---------------------------------------------------------------------------
def ratio_row(res: Results, figure: str, s_val: float, b_val: float, s_txt: str, b_txt: str,
              target: float | None, higher_better: bool = True, info: str = "") -> Row:
    """A row comparing strata with a baseline; the ratio is strata/baseline for rates
    (higher_better) and baseline/strata for times."""
    r = (s_val / b_val) if higher_better else (b_val / s_val)
    ok = None if target is None else r >= target
    tgt = "" if target is None else f">= {target:g}x"
    if info:
        tgt = (tgt + " " + info).strip()
    return res.add(Row(figure, s_txt, b_txt, f"{r:.2f}x", tgt, ok,
                       {"strata": s_val, "baseline": b_val, "ratio": r}))


# ---- environment -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# figures 2 and 3: the strata cache's limit, not 10% of the disk's free space (the
# default), so that whether the 1 GiB file is kept whole (files up to a quarter of the
# limit are) does not depend on the machine's free disk
CACHE_SIZE = ("--cache-size", "8G")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (VmRSS), or its peak so far with field="VmHWM"."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# ---- find + stat -----------------------------------------------------------------------
def find_stat(root: str) -> tuple[int, float]:
    """`find ROOT -printf '%s %T@ %p\\n'`: readdir plus a stat of every entry.
    (entries, seconds)."""
    t0 = time.perf_counter()
    p = subprocess.run(["find", root, "-printf", "%s %T@ %p\n"], capture_output=True)
    t = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"find {root} failed: {p.stderr.decode()[-300:]}")
    return p.stdout.count(b"\n"), t


# ---- s3rver, rclone, s3fs --------------------------------------------------------------
class S3Server:
    def __init__(self, tools: Path, folder: Path, port: int, install: bool):
        self.folder = folder
        self.port = port
        self.endpoint = f"http://127.0.0.1:{port}"
        exe = tools / "node_modules" / ".bin" / "s3rver"
        if not exe.exists() and install:
            subprocess.run(["npm", "--prefix", str(tools), "install", "s3rver@3"], check=True,
                           capture_output=True)
        if not exe.exists():
            raise RuntimeError(f"s3rver not found under {tools} (npm --prefix {tools} "
                               "install s3rver, or pass --install)")
        folder.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, NODE_OPTIONS="--openssl-legacy-provider")
        self.log = open(folder.parent / "s3rver.log", "wb")
        self.proc = subprocess.Popen([str(exe), "-d", str(folder), "-a", "127.0.0.1", "-p",
                                      str(port), "--silent", "--configure-bucket", "bench"],
                                     env=env, stdout=self.log, stderr=self.log,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError("s3rver exited; see s3rver.log")
                time.sleep(0.1)
        self.version = _pkg_version(tools / "node_modules" / "s3rver" / "package.json")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def _pkg_version(path: Path) -> str:
    try:
        return json.loads(path.read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "?"


def foreign_mount(kind: str, s3: S3Server, mp: Path, work: Path):
    """`rclone mount` or `s3fs` of the bench bucket at `mp`, default options, read-only."""
    env = dict(os.environ)
    if kind == "rclone":
        env.update(RCLONE_CONFIG=str(work / "rclone.conf"), RCLONE_CONFIG_S3RV_TYPE="s3",
                   RCLONE_CONFIG_S3RV_PROVIDER="Other", RCLONE_CONFIG_S3RV_ENDPOINT=s3.endpoint,
                   RCLONE_CONFIG_S3RV_ACCESS_KEY_ID="S3RVER",
                   RCLONE_CONFIG_S3RV_SECRET_ACCESS_KEY="S3RVER",
                   RCLONE_CONFIG_S3RV_FORCE_PATH_STYLE="true")
        (work / "rclone.conf").touch()
        args = ["rclone", "mount", "s3rv:bench", str(mp), "--read-only"]
    else:
        pw = work / "s3fs.passwd"
        pw.write_text("S3RVER:S3RVER\n")
        pw.chmod(0o600)
        args = ["s3fs", "bench", str(mp), "-f", "-o", f"url={s3.endpoint}", "-o",
                "use_path_request_style", "-o", f"passwd_file={pw}", "-o", "ro"]
    return fuse_process(args, mp, work / f"{kind}.log", env, terminate=True)


def passthrough_mount(lib: str, src: Path, mp: Path, work: Path):
    return fuse_process([sys.executable, os.path.abspath(__file__), "--passthrough", str(src),
                         str(mp)], mp, work / f"passthrough-{lib}.log",
                        dict(os.environ, FUSE_LIBRARY_NAME=lib))


def serve_passthrough(src: str, mp: str) -> None:
    """A minimal read-only passthrough of `src` at `mp` on mfusepy (libfuse chosen by
    FUSE_LIBRARY_NAME), with strata's read-only mount options and 1 MiB readahead."""
    import errno
    os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
    import mfusepy

    class Passthrough(mfusepy.Operations):
        use_ns = True

        def init(self, path):
            threading.Thread(target=raise_readahead, args=(mp,), daemon=True).start()

        def getattr(self, path, fh=None):
            try:
                st = os.lstat(src + path)
            except FileNotFoundError:
                raise mfusepy.FuseOSError(errno.ENOENT) from None
            return fuse_attrs(st)

        def readdir(self, path, fh):
            return [".", ".."] + os.listdir(src + path)

        def open(self, path, fi):
            fi.fh = os.open(src + path, os.O_RDONLY)
            fi.keep_cache = 1
            return 0

        def read(self, path, size, offset, fi):
            return os.pread(fi.fh, size, offset)

        def release(self, path, fi):
            os.close(fi.fh)
            return 0

    options = dict(foreground=True, ro=True, kernel_cache=True, attr_timeout=3600.0,
                   entry_timeout=3600.0, negative_timeout=3600.0, default_permissions=True)
    if mfusepy.fuse_version_major == 3:
        options["max_idle_threads"] = 16
    mfusepy.FUSE(Passthrough(), mp, raw_fi=True, **options)


def tool_version(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "not installed"


# ---- figures ---------------------------------------------------------------------------
@dataclass
class Sizes:
    version_bytes: int      # figure 1
    large_file: int         # figure 1 large files
    small_file: int         # figure 1 small files
    s3_file: int            # figures 2, 3
    s3_small: int           # figure S: files of small_file bytes
    tiny_files: int         # figure 4
    train_classes: int      # figure 5
    per_class: int
    val_files: int


FULL = Sizes(2 * GiB, 128 * MiB, 64 * KiB, 1 * GiB, 2000, 100_000, 1000, 1250, 50_000)
QUICK = Sizes(200 * MiB, 16 * MiB, 64 * KiB, 200 * MiB, 500, 10_000, 100, 950, 5_000)


class Bench:
    def __init__(self, args, work: Path, res):
        self.args = args
        self.work = work
        self.res = res
        self.sizes = QUICK if args.quick else FULL
        self.gen = Bytes(args.seed)
        self.strata = Strata(Path(args.pyspy) if args.pyspy else None)
        self.local_repo = str(work / "repo-local")
        self.s3: S3Server | None = None
        self.s3_port = args.s3_port
        self.note_drop = "" if CAN_DROP else " (page cache NOT dropped: not root)"
        self.big_local: Path | None = None
        self.tiny_local: Path | None = None

    # -- helpers -----------------------------------------------------------------------
    def make_version(self, src: Path, project: str, name: str, repo: str) -> tuple[str, float]:
        from strata.catalog import Dataset
        t0 = time.perf_counter()
        ds = Dataset.create(name, project, repo=repo)
        ds.add_files(str(src))
        ds.finalize(auto_upload=True)
        return ds.id, time.perf_counter() - t0

    # -- 1 -----------------------------------------------------------------------------
    def fig1(self) -> None:
        sz = self.sizes
        print(f"\n1. time to first byte in a {sz.version_bytes / GiB:.2f} GiB version", flush=True)
        src = self.work / "src1"
        large_total = sz.version_bytes * 7 // 8
        n_large = max(1, large_total // sz.large_file)
        n_small = (sz.version_bytes - n_large * sz.large_file) // sz.small_file
        for i in range(n_large):
            self.gen.write_file(src / "large" / f"{i:03d}.bin", sz.large_file)
        for i in range(n_small):
            self.gen.write_file(src / "small" / f"d{i // 500:03d}" / f"{i:05d}.bin",
                                sz.small_file)
        total = n_large * sz.large_file + n_small * sz.small_file
        vid, t_build = self.make_version(src, "bench", "ttfb", self.local_repo)
        print(f"   version {vid}: {n_large} x {sz.large_file // MiB} MiB + {n_small} x "
              f"{sz.small_file // KiB} KiB = {total / GiB:.2f} GiB (built in {t_build:.1f} s)")
        shutil.rmtree(src)   # the repository holds the bytes now; keep the disk small

        # strata: mount + open + read 4 KiB, everything cold
        mp = self.work / "mnt1"
        cache = self.work / "cache-ttfb-mount"
        drop_caches()
        t0 = time.perf_counter()
        t_mount = self.strata.mount(self.local_repo, vid, mp, cache_dir=cache)
        t1 = time.perf_counter()
        with open(mp / "large" / "000.bin", "rb", buffering=0) as f:
            first = f.read(4096)
        t2 = time.perf_counter()
        assert len(first) == 4096
        ttfb = t2 - t0
        # a small file on the live mount (informational): lookup + one exact ranged read
        t3 = time.perf_counter()
        with open(mp / "small" / "d000" / "00007.bin", "rb", buffering=0) as f:
            f.read(4096)
        t_small = time.perf_counter() - t3
        self.strata.unmount(mp)

        # strata: the version mounted (`strata mount`, ready), then every cache cold: the
        # page cache dropped, the strata cache empty; open + read 4 KiB (lookup, its first
        # chunk fetched and verified)
        mpm = self.work / "mnt1-mounted"
        self.strata.mount(self.local_repo, vid, mpm, cache_dir=self.work / "cache-ttfb-m")
        drop_caches()
        t6 = time.perf_counter()
        with open(mpm / "large" / "000.bin", "rb", buffering=0) as f:
            first_mounted = f.read(4096)
        ttfb_mounted = time.perf_counter() - t6
        assert first_mounted == first
        self.strata.unmount(mpm)

        # strata: a repository mount (`mount --all`) already running, the version never
        # touched: lookup of by-name/.../latest and by-id/ID (record + manifest fetched),
        # open + read 4 KiB (its first chunk fetched and verified)
        mpa = self.work / "mnt1-all"
        cache_all = self.work / "cache-ttfb-all"
        t_mount_all = self.strata.mount_all(self.local_repo, mpa, cache_dir=cache_all)
        drop_caches()
        t4 = time.perf_counter()
        with open(mpa / "by-name" / "bench" / "ttfb" / "latest" / "large" / "000.bin", "rb",
                  buffering=0) as f:
            first_all = f.read(4096)
        ttfb_all = time.perf_counter() - t4
        assert first_all == first
        t5 = time.perf_counter()
        with open(mpa / "by-id" / vid / "small" / "d000" / "00009.bin", "rb",
                  buffering=0) as f:
            f.read(4096)
        t_small_all = time.perf_counter() - t5
        self.strata.unmount(mpa)

        # baseline: strata get --copy of the whole version, same cold start
        dest = self.work / "copy1"
        cache2 = self.work / "cache-ttfb-copy"
        drop_caches()
        t_copy = self.strata.cli("--repo", self.local_repo, "get", "--id", vid, "--copy",
                                 str(dest), cache_dir=cache2)[0]
        shutil.rmtree(dest, ignore_errors=True)
        shutil.rmtree(cache2, ignore_errors=True)
        copy_txt = f"`strata get --copy` {secs(t_copy)} ({mbps(total, t_copy)})"
        one_file = f"one file of a {total / GiB:.1f} GiB version"
        for label, value, target in (
                (f"1. time to first byte, {one_file}, through a running `strata mount "
                 f"--all` (open + read 4 KiB of by-name/.../latest/..., version never "
                 f"touched: record, manifest and first chunk fetched; caches cold)",
                 ttfb_all, 100),
                (f"1. time to first byte, {one_file}, mounted with `strata mount` (mount "
                 f"ready; then page cache dropped, strata cache empty: open + read 4 KiB, "
                 f"its first chunk fetched and verified)", ttfb_mounted, 100),
                # the mount's own start-up (a Python process starting cold) is figure 5's
                # concern (mount ready <= 2 s); this row shows the two together
                ("1.i  `strata mount` of the version first, then open + read 4 KiB, "
                 "everything cold (the mount's start-up included: see figure 5 for its "
                 "target)", ttfb, None)):
            ratio_row(self.res, label + self.note_drop, value, t_copy, secs(value), copy_txt,
                      target, higher_better=False)
        self.res.add(Row("1.i  `strata mount --all` (CLI start to mount ready, before the "
                         "clock of the first row starts) / first 4 KiB of a 64 KiB file "
                         "of the version after that", f"{secs(t_mount_all)} / "
                         f"{secs(t_small_all)}",
                         values={"mount_all": t_mount_all, "small_all": t_small_all}))
        self.res.add(Row("1.i  of which `strata mount` (CLI start to mount ready) / open + "
                         "read 4 KiB of a large file (its first 8 MiB chunk)",
                         f"{secs(t_mount)} / {secs(t2 - t1)}",
                         values={"mount": t_mount, "first_read": t2 - t1}))
        self.res.add(Row("1.i  first 4 KiB of a 64 KiB file on the live mount (one ranged "
                         "read of its pack)", secs(t_small), values={"small": t_small}))
        # where the mount command's time goes: two Python interpreters and their imports
        startup = {}
        for what, code in (("python", "pass"), ("cli", "import strata.cli.main"),
                           ("server", "import strata.vfs.mount, strata.vfs.fuse")):
            runs = []
            for _ in range(3):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", code], check=True)
                runs.append(time.perf_counter() - t0)
            startup[what] = sorted(runs)[1]
        self.res.add(Row("1.i  process start + imports (median of 3): bare `python`, the CLI "
                         "(`strata.cli.main`), the mount server (`strata.vfs.mount` + `.fuse`)",
                         " / ".join(secs(startup[k]) for k in ("python", "cli", "server")),
                         values=startup))

    # -- 2 and 3 -------------------------------------------------------------------------
    def start_s3(self) -> S3Server:
        if self.s3 is None:
            self.s3 = S3Server(Path(self.args.tools), self.work / "s3rver", self.s3_port,
                               self.args.install)
        return self.s3

    def fig23(self) -> None:
        import boto3
        from boto3.s3.transfer import TransferConfig
        sz = self.sizes
        reps = self.args.reps
        print(f"\n2./3. sequential reads of a {sz.s3_file / GiB:.2f} GiB file from S3 "
              f"(s3rver); best of {reps} for every contender", flush=True)
        s3 = self.start_s3()
        src = self.work / "src2"
        self.gen.write_file(src / "big.bin", sz.s3_file)
        repo = "s3://bench/strata"
        vid, t_build = self.make_version(src, "bench", "s3", repo)
        client = boto3.client("s3")
        t0 = time.perf_counter()
        client.upload_file(str(src / "big.bin"), "bench", "raw/big.bin",
                           Config=TransferConfig(multipart_threshold=8 * GiB))
        t_put = time.perf_counter() - t0
        print(f"   version {vid} in {repo} (built + uploaded in {t_build:.1f} s); "
              f"raw object raw/big.bin put in {t_put:.1f} s; s3rver {s3.version}")
        n = sz.s3_file

        def warm() -> None:
            # the server's files in the page cache, and no earlier contender's (or the
            # version build's) dirty pages left to be written back during the next one
            warm_tree(s3.folder)
            os.sync()

        # Contenders, each timed from a warm server with no dirty pages; the reps are
        # interleaved (a round of every contender, then the next round), so a machine
        # whose speed drifts during the run (a shared host) weighs on all of them alike.
        # boto3: the same bytes as one object, 8 threads x 8 MiB ranged GETs, downloaded
        # into a file on the disk that holds the strata cache (the mount writes what it
        # fetches there too); and, for reference, the same GETs thrown away (/dev/null)
        cfg = TransferConfig(multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB,
                             max_concurrency=8)
        target = self.work / "boto3-download.bin"

        def boto3_file() -> float:
            fresh = boto3.session.Session().client("s3")
            t0 = time.perf_counter()
            fresh.download_file("bench", "raw/big.bin", str(target), Config=cfg)
            t = time.perf_counter() - t0
            assert target.stat().st_size == n
            target.unlink()
            return t

        def boto3_null() -> float:
            fresh = boto3.session.Session().client("s3")
            t0 = time.perf_counter()
            with open(os.devnull, "wb") as out:
                fresh.download_fileobj("bench", "raw/big.bin", out, Config=cfg)
            return time.perf_counter() - t0

        # boto3 GETs of the version's own chunk objects, 8 threads (strata's fetch pattern,
        # without FUSE, verification or the cache): informational
        from concurrent.futures import ThreadPoolExecutor
        from strata.catalog.repo import open_repo
        entry = open_repo(repo).manifest(vid).lookup("big.bin")
        keys = [f"strata/blobs/{c[:2]}/{c}" for c in entry.chunk_ids]

        def chunk_gets() -> float:
            def get(key: str) -> int:
                return len(client.get_object(Bucket="bench", Key=key)["Body"].read())
            t0 = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                got = sum(pool.map(get, keys))
            assert got == n, (got, n)
            return time.perf_counter() - t0

        # strata: fresh mount, empty strata cache (a new cache folder for every rep)
        mp = self.work / "mnt2"

        def cache_of(rep: int) -> Path:
            return self.work / f"cache-s3-{rep}"

        peak: dict[str, list[int]] = {"strata": []}   # VmHWM of each mount process, kB

        def strata_read(rep: int) -> float:
            self.strata.mount(repo, vid, mp, *CACHE_SIZE, cache_dir=cache_of(rep))
            with self.strata.profiled(mp, f"fig2-cold-s3-read-{rep}"):
                got, t = read_all(str(mp / "big.bin"))
            assert got == n
            peak["strata"].append(rss_kb(self.strata.pid(mp), "VmHWM"))
            self.strata.unmount(mp)
            return t

        foreign = [k for k in ("rclone", "s3fs") if shutil.which(k)]
        t_other: dict[str, list[float]] = {k: [] for k in foreign}
        failed: dict[str, str] = {}

        def foreign_read(kind: str) -> float:
            with foreign_mount(kind, s3, self.work / f"mnt-{kind}", self.work) as proc:
                got, t = read_all(str(self.work / f"mnt-{kind}" / "raw" / "big.bin"))
                peak.setdefault(kind, []).append(rss_kb(proc.pid, "VmHWM"))
            assert got == n, (kind, got)
            return t

        # every contender once per round, the rounds repeated and the best of each taken:
        # the host's speed drifts over minutes, so all bests come from the same stretch
        t_boto, t_null, t_chunks, t_strata = [], [], [], []
        for rep in range(reps):
            for times, run in ((t_boto, boto3_file), (t_strata, lambda: strata_read(rep)),
                               (t_null, boto3_null), (t_chunks, chunk_gets)):
                warm()
                times.append(run())
            for kind in foreign:
                if kind in failed:
                    continue
                warm()
                try:
                    t_other[kind].append(foreign_read(kind))
                except Exception as e:  # noqa: BLE001 - a baseline that fails is reported
                    failed[kind] = str(e)
        cache = cache_of(reps - 1)   # figure 3 re-reads the last one
        ts, tb = min(t_strata), min(t_boto)
        ratio_row(self.res, f"2. cold sequential read, {n / GiB:.2f} GiB file from S3 "
                  "(fresh mount, empty strata cache)", n / ts, n / tb,
                  mbps(n, ts), f"boto3 download_file, 8 x 8 MiB: {mbps(n, tb)}", 0.8)
        self.res.rows[-1].values.update(strata_all=[n / MB / t for t in t_strata],
                                        boto3_all=[n / MB / t for t in t_boto])
        self.res.add(Row("2.i  boto3 GETs of the version's 8 MiB chunk objects, 8 threads "
                         "(strata's fetch pattern without FUSE/verify/cache)",
                         mbps(n, min(t_chunks)), values={"MBps": n / MB / min(t_chunks)}))
        ratio_row(self.res, "2.ii the same vs boto3 GETs thrown away (download_fileobj "
                  "into /dev/null: no file written)", n / ts, n / min(t_null), mbps(n, ts),
                  f"boto3 to /dev/null: {mbps(n, min(t_null))}", None,
                  info="reference, no target")
        self.res.rows[-1].values.update(boto3_null_all=[n / MB / t for t in t_null])

        for kind in ("rclone", "s3fs"):
            if kind not in foreign:
                self.res.add(Row(f"2. vs {kind} (not installed: apt-get install {kind})",
                                 mbps(n, ts)))
            elif kind in failed:
                self.res.add(Row(f"2. vs {kind} mount: failed ({failed[kind]})", mbps(n, ts)))
            else:
                ver = tool_version([kind, "version" if kind == "rclone" else "--version"])
                best = min(t_other[kind])
                ratio_row(self.res, f"2. cold sequential read vs `{kind}` mount (default "
                          f"options; {ver.split(' (')[0]})", n / ts, n / best,
                          mbps(n, ts), f"{kind}: {mbps(n, best)}", 1.0, info="(ahead)")
                self.res.rows[-1].values.update(
                    {f"{kind}_all": [n / MB / t for t in t_other[kind]]})

        self.res.add(Row(
            "2.iii peak memory (VmHWM) of the mount process over a cold read, highest of "
            "the runs", f"{max(peak['strata']) / 1024:.0f} MB",
            ", ".join(f"{k}: {max(v) / 1024:.0f} MB" for k, v in peak.items() if k != "strata"),
            values={f"{k}_hwm_kb": v for k, v in peak.items()}))

        # 3: strata cache hot, fresh mount, page cache dropped; then page-cache hot
        t_warm, t_lwarm = [], []
        local = str(src / "big.bin")
        for rep in range(reps):
            self.strata.mount(repo, vid, mp, *CACHE_SIZE, cache_dir=cache)
            os.stat(mp / "big.bin")
            drop_caches()
            with self.strata.profiled(mp, f"fig3-warm-read-{rep}"):
                t_warm.append(read_all(str(mp / "big.bin"))[1])
            if rep < reps - 1:
                self.strata.unmount(mp)
            drop_caches()
            t_lwarm.append(read_all(local)[1])
        with self.strata.profiled(mp, "fig3-hot-read"):
            t_hot = min(read_all(str(mp / "big.bin"))[1] for _ in range(3))
        rss = rss_kb(self.strata.pid(mp))
        self.strata.unmount(mp)
        t_lhot = min(read_all(local)[1] for _ in range(3))
        # a fresh mount, the strata cache's copy in the page cache, FUSE cold: passthrough
        # where the kernel grants it (the file is whole in the cache by now)
        self.strata.mount(repo, vid, mp, *CACHE_SIZE, cache_dir=cache)
        with self.strata.profiled(mp, "fig3-units-hot-read"):
            t_units = min(read_all(str(mp / "big.bin"))[1] for _ in range(1))
        self.strata.unmount(mp)
        ratio_row(self.res, "3. warm re-read (strata cache hot, fresh mount, page cache "
                  f"dropped){self.note_drop}", n / min(t_warm), n / min(t_lwarm),
                  mbps(n, min(t_warm)),
                  f"local disk, page cache dropped: {mbps(n, min(t_lwarm))}", 0.5)
        ratio_row(self.res, "3. page-cache-hot re-read (best of 3)", n / t_hot, n / t_lhot,
                  mbps(n, t_hot), f"local, page cache hot: {mbps(n, t_lhot)}", 0.7)
        self.res.add(Row("3.i  re-read through a fresh mount with the strata cache's copy "
                         "in the page cache (passthrough)",
                         mbps(n, t_units), values={"MBps": n / MB / t_units}))
        self.res.add(Row("3.i  mount process VmRSS after reading the file 5 times",
                         f"{rss / 1024:.0f} MB", values={"rss_kb": rss}))
        self.big_local = src / "big.bin"

    # -- S -----------------------------------------------------------------------------
    def figS(self) -> None:
        import boto3
        from strata.catalog import layout
        from strata.catalog.repo import open_repo
        sz = self.sizes
        n, reps = sz.s3_small, self.args.reps
        print(f"\nS. {n} small files of {sz.small_file // KiB} KiB from S3 (s3rver), one "
              f"reader; best of {reps}", flush=True)
        s3 = self.start_s3()
        src = self.work / "srcS"
        for i in range(n):
            self.gen.write_file(src / f"d{i // 250:02d}" / f"{i:05d}.bin", sz.small_file)
        repo = "s3://bench/strata"
        vid, t_build = self.make_version(src, "bench", "s3small", repo)
        entries = sorted((e for e in open_repo(repo).manifest(vid).files() if e.pack),
                         key=lambda e: e.path)
        assert len(entries) == n, (len(entries), n)
        print(f"   version {vid}: {n} files in {len({e.pack for e in entries})} packs "
              f"(built + uploaded in {t_build:.1f} s)")
        mp = self.work / "mntS"

        def boto3_gets(files: list) -> tuple[float, float]:
            client = boto3.session.Session().client("s3")
            client.head_bucket(Bucket="bench")   # connected, as the mount is
            c0 = time.process_time()
            t0 = time.perf_counter()
            got = 0
            for e in files:
                got += len(client.get_object(
                    Bucket="bench", Key="strata/" + layout.blob_key(e.pack),
                    Range=f"bytes={e.offset}-{e.offset + e.size - 1}")["Body"].read())
            t = time.perf_counter() - t0
            assert got == sum(e.size for e in files)
            return t, time.process_time() - c0

        def strata_reads(files: list, cache: str) -> tuple[float, float]:
            self.strata.mount(repo, vid, mp, cache_dir=self.work / cache)
            pid = self.strata.pid(mp)
            os.stat(mp / files[0].path)   # the manifest is in: files are what is timed
            c0 = cpu_seconds(pid)
            with self.strata.profiled(mp, f"figS-small-files-{cache}"):
                got, t = read_files([str(mp / e.path) for e in files])
            c = cpu_seconds(pid) - c0
            assert got == sum(e.size for e in files)
            self.strata.unmount(mp)
            return t, c

        def measure(label: str, files: list, cache: str) -> None:
            n = len(files)
            t_boto, t_strata = [], []
            for rep in range(reps):
                for times, run in ((t_boto, lambda: boto3_gets(files)),
                                   (t_strata, lambda: strata_reads(files, f"{cache}-{rep}"))):
                    warm_tree(s3.folder)
                    os.sync()
                    times.append(run())
            (ts, cs), (tb, cb) = min(t_strata), min(t_boto)
            ratio_row(self.res, f"S. cold read of {n} files of {sz.small_file // KiB} KiB from "
                      f"S3 {label} through a fresh mount, one reader in path order "
                      "(files/s)", n / ts, n / tb, f"{n / ts:.0f}/s",
                      f"boto3 get_object of each range: {n / tb:.0f}/s", None, info="no target")
            self.res.rows[-1].values.update(strata_all=[n / t for t, _ in t_strata],
                                            boto3_all=[n / t for t, _ in t_boto])
            self.res.add(Row(f"S.i  {label}, per file: strata's time / mount CPU; boto3's "
                             "time / client CPU (best rep of each)",
                             f"{ts / n * 1000:.2f} ms / {cs / n * 1000:.2f} ms; "
                             f"{tb / n * 1000:.2f} ms / {cb / n * 1000:.2f} ms",
                             values={"strata_ms": ts / n * 1000,
                                     "strata_cpu_ms": cs / n * 1000,
                                     "boto3_ms": tb / n * 1000, "boto3_cpu_ms": cb / n * 1000}))

        measure("(s3rver on loopback)", entries, "cache-s3small")
        # the same through a proxy that delays every request by DELAY: a store that far
        from tests.proxy import Proxy   # the checkout is on sys.path (run_bench)
        proxy = Proxy(s3.port, delay=SMALL_DELAY)
        direct = os.environ["AWS_ENDPOINT_URL"]
        os.environ["AWS_ENDPOINT_URL"] = proxy.endpoint_url
        try:
            measure(f"{SMALL_DELAY * 1000:.0f} ms away (a proxy delays each request)",
                    entries[:len(entries) // 4], "cache-s3small-far")
        finally:
            os.environ["AWS_ENDPOINT_URL"] = direct
            proxy.close()
        shutil.rmtree(src)

    # -- 4 -----------------------------------------------------------------------------
    def fig4(self) -> None:
        sz = self.sizes
        n = sz.tiny_files
        print(f"\n4. find + stat of {n} tiny files", flush=True)
        src = self.work / "src4"
        rnd = random.Random(self.args.seed)
        t0 = time.perf_counter()
        for i in range(n):
            d = src / f"d{i // 1000:03d}"
            if i % 1000 == 0:
                d.mkdir(parents=True, exist_ok=True)
            with open(d / f"f{i:06d}.txt", "wb") as f:
                f.write(b"%d " % i + os.urandom(rnd.randint(8, 200)))
        t_gen = time.perf_counter() - t0
        vid, t_build = self.make_version(src, "bench", "tiny", self.local_repo)
        print(f"   {n} files written in {t_gen:.1f} s; version {vid} built in {t_build:.1f} s")
        mp = self.work / "mnt4"
        self.strata.mount(self.local_repo, vid, mp)
        find_stat(str(mp))          # fetch the manifest into the strata cache once
        self.strata.unmount(mp)

        drop_caches()
        n_local_cold, t_local_cold = find_stat(str(src))
        n_local_warm, t_local_warm = find_stat(str(src))
        self.strata.mount(self.local_repo, vid, mp)
        drop_caches()
        with self.strata.profiled(mp, "fig4-find-cold"):
            n_cold, t_cold = find_stat(str(mp))
        with self.strata.profiled(mp, "fig4-find-warm"):
            n_warm, t_warm = find_stat(str(mp))
        rss = rss_kb(self.strata.pid(mp))
        self.strata.unmount(mp)
        if not (n_cold == n_warm == n_local_cold == n_local_warm):
            print(f"   WARNING: entry counts differ: mount {n_cold}/{n_warm}, local "
                  f"{n_local_cold}/{n_local_warm}")
        ratio_row(self.res, f"4. find + stat of {n // 1000}k files, cold (fresh mount, page "
                  f"cache dropped){self.note_drop}", n_cold / t_cold,
                  n_local_cold / t_local_cold,
                  f"{n_cold / t_cold / 1000:.1f}k entries/s ({secs(t_cold)})",
                  f"local cold {n_local_cold / t_local_cold / 1000:.0f}k/s "
                  f"({secs(t_local_cold)})", 0.1)
        ratio_row(self.res, f"4. find + stat of {n // 1000}k files, warm (second pass)",
                  n_warm / t_warm, n_local_warm / t_local_warm,
                  f"{n_warm / t_warm / 1000:.1f}k entries/s ({secs(t_warm)})",
                  f"local warm {n_local_warm / t_local_warm / 1000:.0f}k/s "
                  f"({secs(t_local_warm)})", 0.4)
        self.res.add(Row(f"4.i  mount process VmRSS after two passes over {n // 1000}k files",
                         f"{rss / 1024:.0f} MB", values={"rss_kb": rss}))
        self.tiny_local = src

    # -- 5 -----------------------------------------------------------------------------
    def fig5(self) -> None:
        from strata.catalog import layout, manifest
        from strata.catalog.repo import open_repo
        from strata.catalog.manifest import Entry
        from strata.catalog.records import VersionRecord
        sz = self.sizes
        n = sz.train_classes * sz.per_class + sz.val_files
        print(f"\n5. mount of a {n / 1e6:.2f}M-file version (generated manifest)", flush=True)
        repo = open_repo(self.local_repo, create=True)
        data = self.gen.block(110 * KiB)
        sha = hashlib.sha256(data).hexdigest()
        repo.put_blob(sha, data)
        rnd = random.Random(self.args.seed)
        classes = sorted({f"n{rnd.randrange(10**7, 10**8):08d}"
                          for _ in range(sz.train_classes * 2)})[:sz.train_classes]
        now = time.time_ns()
        vid = os.urandom(16).hex()

        def entries():
            for c in classes:
                for i in range(sz.per_class):
                    yield Entry(f"train/{c}/{c}_{i:05d}.JPEG", "f", len(data), sha, 0o644, now,
                                sha, 0)
            for i in range(1, sz.val_files + 1):
                yield Entry(f"val/ILSVRC2012_val_{i:08d}.JPEG", "f", len(data), sha, 0o644,
                            now, sha, 0)

        t0 = time.perf_counter()
        local = str(self.work / f"{vid}.manifest")
        manifest.write(local, vid, entries(), [], [])
        msize = os.path.getsize(local)
        msha = repo.put_manifest(vid, local)
        os.unlink(local)
        assert repo.claim_label("bench", "imagenet", "1.0.0", vid)
        repo.create_record(VersionRecord(id=vid, project="bench", name="imagenet",
                                         version="1.0.0", created=time.time(),
                                         manifest_sha256=msha, files=n, size=n * len(data)))
        t_gen = time.perf_counter() - t0
        print(f"   manifest of {n} entries, {msize / MiB:.0f} MiB, generated in {t_gen:.1f} s")
        assert layout.is_version_id(vid)

        mp = self.work / "mnt5"
        self.strata.mount(self.local_repo, vid, mp)
        os.listdir(mp)              # fetches the manifest into the strata cache
        self.strata.unmount(mp)

        # timed: CLI start -> mount ready -> ls of the root answered (manifest cached;
        # page cache warm as it is right after a first use)
        t0 = time.perf_counter()
        t_mount = self.strata.mount(self.local_repo, vid, mp)
        with self.strata.profiled(mp, "fig5-first-ls"):
            root = os.listdir(mp)
        t_ready = time.perf_counter() - t0
        assert sorted(root) == ["train", "val"], root
        pid = self.strata.pid(mp)
        t1 = time.perf_counter()
        train = os.listdir(mp / "train")
        for c in classes[:: max(1, len(classes) // 5)][:5]:
            os.stat(mp / "train" / c / f"{c}_00007.JPEG")
        with open(mp / "train" / classes[-1] / f"{classes[-1]}_00001.JPEG", "rb") as f:
            assert f.read() == data
        os.stat(mp / "val" / "ILSVRC2012_val_00000042.JPEG")
        t_lookups = time.perf_counter() - t1
        rss = rss_kb(pid)
        assert len(train) == len(classes)
        t2 = time.perf_counter()
        n_val = len(os.listdir(mp / "val"))
        t_val = time.perf_counter() - t2
        rss_val = rss_kb(pid)
        self.strata.unmount(mp)

        # the same with the page cache dropped (manifest still in the strata cache)
        drop_caches()
        t0 = time.perf_counter()
        self.strata.mount(self.local_repo, vid, mp)
        os.listdir(mp)
        t_ready_cold = time.perf_counter() - t0
        self.strata.unmount(mp)

        ok = t_ready <= 2.0
        self.res.add(Row(f"5. mount of a {n / 1e6:.2f}M-file version, manifest cached: "
                         "`strata mount` until `ls` of the root answers",
                         f"{secs(t_ready)} (mount command {secs(t_mount)})", "", "", "<= 2 s",
                         ok, {"ready": t_ready, "mount_cli": t_mount,
                              "manifest_bytes": msize}))
        self.res.add(Row(f"5. mount process VmRSS after `ls` of the root, `ls train` "
                         f"({len(train)} dirs), 6 stats and a read", f"{rss / 1024:.0f} MB",
                         "", "", "<= 300 MB", rss / 1024 <= 300,
                         {"rss_kb": rss, "lookups_s": t_lookups}))
        self.res.add(Row(f"5.i  then `ls val` ({n_val} entries in one folder): time, VmRSS",
                         f"{secs(t_val)}, {rss_val / 1024:.0f} MB",
                         values={"ls_val": t_val, "rss_kb": rss_val}))
        self.res.add(Row(f"5.i  mount until `ls` of the root, manifest cached but page cache "
                         f"dropped{self.note_drop}", secs(t_ready_cold),
                         values={"ready": t_ready_cold}))

    # -- B: the binding ----------------------------------------------------------------
    def figB(self) -> None:
        """Minimal read-only passthrough file systems (this script's --passthrough mode) on
        mfusepy with libfuse3 and with libfuse2, same options as strata's mount: a cold FUSE
        read of the figure-2 file (source in the page cache) and a cold find + stat of the
        figure-4 tree. Compare with 3.i and 4."""
        print("\nB. FUSE binding: minimal passthrough file systems", flush=True)
        for lib in ("fuse3", "fuse"):
            mp = self.work / f"mnt-pt-{lib}"
            label = {"fuse3": "mfusepy on libfuse3 (strata's binding until 2026-11-24)",
                     "fuse": "mfusepy on libfuse2 (fusepy's library)"}[lib]
            if self.big_local is not None:
                read_all(str(self.big_local))          # source in the page cache
                rates, hot = [], []
                for _ in range(self.args.reps):
                    with passthrough_mount(lib, self.big_local.parent, mp, self.work):
                        n, t = read_all(str(mp / self.big_local.name))
                        hot.append(min(read_all(str(mp / self.big_local.name))[1]
                                       for _ in range(3)))
                    rates.append(n / MB / t)
                self.res.add(Row(f"B.   FUSE read (1 MiB reads, source page-cache hot): cold / "
                                 f"page-cache-hot re-read, {label}",
                                 f"{max(rates):.0f} / {n / MB / min(hot):.0f} MB/s",
                                 values={"MBps": max(rates), "hot_MBps": n / MB / min(hot)}))
            if self.tiny_local is not None:
                with passthrough_mount(lib, self.tiny_local, mp, self.work):
                    drop_caches()
                    find_stat(str(self.tiny_local))     # the source hot, the FUSE side cold
                    nc, tc = find_stat(str(mp))
                    nw, tw = find_stat(str(mp))
                self.res.add(Row(f"B.   find + stat of the figure-4 tree (source hot), FUSE cold / warm, {label}",
                                 f"{nc / tc / 1000:.1f}k / {nw / tw / 1000:.1f}k entries/s",
                                 values={"cold": nc / tc, "warm": nw / tw}))

    # -- all -----------------------------------------------------------------------------
    def run(self, only: set[int]) -> None:
        try:
            if 1 in only:
                self.fig1()
            if 2 in only or 3 in only:
                self.fig23()
            if 4 in only:
                self.fig4()
            if 5 in only:
                self.fig5()
            if "S" in self.args.only.upper():
                self.figS()
            if 6 in only or "B" in self.args.only.upper():
                self.figB()
        finally:
            self.strata.cleanup()
            if self.s3 is not None:
                self.s3.stop()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="scaled-down sizes (a quick check)")
    ap.add_argument("--only", default="1,2,3,4,5,S,B",
                    help="figures to run, e.g. 2,3 (S: small files from S3; B: the FUSE "
                         "binding comparison)")
    ap.add_argument("--out", help="also write the results as JSON to this file")
    ap.add_argument("--workdir", help="parent folder for the work folder (default: $TMPDIR)")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--tools", default=TOOLS_DEFAULT,
                    help="folder with node_modules/.bin/s3rver (default %(default)s)")
    ap.add_argument("--install", action="store_true",
                    help="npm-install s3rver into --tools if it is missing")
    ap.add_argument("--s3-port", type=int, default=0, help="s3rver port (default: a free one)")
    ap.add_argument("--pyspy", metavar="DIR", help="py-spy the mount during strata phases")
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--reps", type=int, default=3,
                    help="runs of each figure-2/3 contender; the best counts (default 3)")
    ap.add_argument("--passthrough", nargs=2, metavar=("SRC", "MP"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.passthrough:
        serve_passthrough(*args.passthrough)
        return 0
    only = {int(x) for x in args.only.split(",") if x.strip().isdigit()}
    args.s3_port = args.s3_port or free_port()

    def isolate_env(work: Path) -> None:
        isolate(work, ("STRATA_", "AWS_", "RCLONE_"),
                AWS_ACCESS_KEY_ID="S3RVER", AWS_SECRET_ACCESS_KEY="S3RVER",
                AWS_DEFAULT_REGION="us-east-1",
                AWS_ENDPOINT_URL=f"http://127.0.0.1:{args.s3_port}",
                AWS_CONFIG_FILE=str(work / "aws-none"),
                AWS_SHARED_CREDENTIALS_FILE=str(work / "aws-none"),
                AWS_EC2_METADATA_DISABLED="true")

    return run_bench("Mount reads", "strata-bench-mount-", args, isolate_env,
                     lambda work, res: Bench(args, work, res).run(only),
                     order=lambda r: r.figure.split(" ", 1)[0],
                     boto3=version("boto3"), libfuse=tool_version(["fusermount3", "--version"]))


if __name__ == "__main__":
    sys.exit(main())
