"""What the benchmark scripts in this folder share: the results table, sizes and rates as
text, page-cache control, reading and warming files, unique pseudo-random bytes, strata
driven through its CLI (mounts, py-spy), and FUSE mount processes.

The scripts are run by path (`python scripts/bench/overlay.py`), so this folder is on
sys.path and they `import benchlib`; it is not a package. Nothing here imports strata at
module level: the scripts point XDG_* at a private work folder before strata is imported.
"""

from __future__ import annotations

import collections
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
MB = 1e6  # throughput is reported in MB/s (10^6 bytes per second), like cp/dd
ROOT = Path(__file__).resolve().parents[2]
STRATA_CLI = [sys.executable, "-m", "strata.cli.main", "--quiet"]


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
    def __init__(self, order: Callable[[Row], object] | None = None) -> None:
        self.rows: list[Row] = []
        self.meta: dict = {}
        self.order = order          # sort key of the markdown table; None: as added

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        mark = {True: "PASS", False: "FAIL", None: "info"}[row.ok]
        print(f"  [{mark}] {row.figure}: {row.strata}"
              + (f" | baseline {row.baseline}" if row.baseline else "")
              + (f" | {row.ratio}" if row.ratio else ""), flush=True)
        return row

    def markdown(self) -> str:
        rows = self.rows if self.order is None else sorted(self.rows, key=self.order)
        out = ["| figure | strata | baseline | ratio | target | result |",
               "| --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            result = {True: "pass", False: "**FAIL**", None: "info"}[r.ok]
            out.append(f"| {r.figure} | {r.strata} | {r.baseline} | {r.ratio} | {r.target} "
                       f"| {result} |")
        return "\n".join(out)

    def as_json(self) -> dict:
        return {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}

    def passed(self) -> bool:
        return all(r.ok is not False for r in self.rows)


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
def isolate(work: Path, clear: tuple[str, ...] = ("STRATA_",), **env: str) -> None:
    """Point strata at private folders under `work` (before importing strata, so its config
    module reads these): variables starting with `clear` are removed, XDG_DATA_HOME,
    XDG_CACHE_HOME and XDG_CONFIG_HOME set, then `env`."""
    for k in list(os.environ):
        if k.startswith(clear):
            del os.environ[k]
    os.environ.update(XDG_DATA_HOME=str(work / "xdg-data"),
                      XDG_CACHE_HOME=str(work / "xdg-cache"),
                      XDG_CONFIG_HOME=str(work / "xdg-config"), **env)


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


def loadavg() -> str:
    try:
        return str(open("/proc/loadavg").read().split(" ", 3)[:3])
    except OSError:
        return "?"


def machine_meta(quick: bool, **extra) -> dict:
    """The machine and run, for the JSON output; `extra` goes after the mfusepy version."""
    mem = 0
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    from importlib.metadata import version
    return {"cores": os.cpu_count(), "memory_gib": round(mem / GiB, 1),
            "kernel": platform.release(), "python": platform.python_version(),
            "mfusepy": version("mfusepy"), **extra, "quick": quick,
            "page_cache_dropped": CAN_DROP, "loadavg_start": loadavg()}


# ---- files -----------------------------------------------------------------------------
def read_files(files: list[str], bs: int = MiB) -> tuple[int, float]:
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


def read_all(path: str, bs: int = MiB) -> tuple[int, float]:
    """Read one file sequentially with `bs`-sized reads; (bytes, seconds)."""
    return read_files([path], bs)


def warm_tree(folder: Path) -> int:
    """Read every file under `folder` once, so the page cache holds it; bytes read."""
    total = 0
    for dirpath, _, files in os.walk(folder):
        total += read_files([os.path.join(dirpath, fn) for fn in files], 8 * MiB)[0]
    return total


def tree_stats(folder: Path) -> tuple[int, int]:
    """(files, bytes) of every file under `folder`, symlinks not followed."""
    n = size = 0
    for dirpath, _, files in os.walk(folder):
        for fn in files:
            st = os.lstat(os.path.join(dirpath, fn))
            n += 1
            size += st.st_size
    return n, size


class Bytes:
    """Unique pseudo-random bytes fast: a 64 MiB random pool (numpy SFC64) XOR a key that
    differs for every block, read from an offset that moves with the block (so no two
    1 MiB blocks, hence no two chunks or small files, are equal). The pool's words are
    drawn from [0, high)."""

    POOL = 64 * MiB

    def __init__(self, seed: int, high: int = 2**63):
        self.counter = seed * 1_000_003
        import numpy as np
        self.np = np
        gen = np.random.Generator(np.random.SFC64(seed))
        self.pool = gen.integers(0, high, size=self.POOL // 8, dtype=np.uint64)

    def block(self, n: int) -> bytes:
        np = self.np
        self.counter += 1
        words = (n + 7) // 8
        off = (self.counter * 104_729) % (len(self.pool) - words)
        key = np.uint64((self.counter * 0x9E3779B97F4A7C15) & (2**64 - 1))
        return (self.pool[off:off + words] ^ key).tobytes()[:n]

    def write_file(self, path: Path, size: int, block: int = MiB) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(left, block)
                f.write(self.block(n))
                left -= n


# ---- mounts ----------------------------------------------------------------------------
def mounted(mp: str) -> bool:
    mp = os.path.abspath(mp)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == mp for line in f)


def force_unmount(mp: str) -> None:
    if mounted(mp):
        subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
        if mounted(mp):
            subprocess.run(["umount", "-l", mp], capture_output=True)


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
            raise RuntimeError(f"mount at {mp} exited with {proc.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{mp} did not mount within {timeout} s")


@contextmanager
def fuse_process(args: list[str], mp: Path, log_path: Path, env: dict | None = None,
                 terminate: bool = False):
    """Run a FUSE server (`args`, its output appended to `log_path`) that mounts at `mp`,
    wait until the mount answers, and unmount it afterwards. The server is then waited
    for, or with `terminate` sent SIGTERM first."""
    mp.mkdir(parents=True, exist_ok=True)
    log = open(log_path, "ab")
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=log, start_new_session=True)
    try:
        wait_mounted(str(mp), proc)
        yield proc
    finally:
        force_unmount(str(mp))
        if terminate and proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def raise_readahead(mp: str, kb: int = 1024) -> None:
    """Set the readahead of the FUSE mount at `mp` to `kb` (as strata's mounts do); call it
    from a thread of the server, once the mount exists."""
    os.stat(mp)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.path.abspath(mp):
                with open(f"/sys/class/bdi/{fields[2]}/read_ahead_kb", "w") as ra:
                    ra.write(str(kb))


def fuse_attrs(st: os.stat_result) -> dict:
    """A stat result as mfusepy's getattr answer (use_ns: times in nanoseconds)."""
    return {"st_mode": st.st_mode, "st_size": st.st_size, "st_nlink": st.st_nlink,
            "st_uid": st.st_uid, "st_gid": st.st_gid, "st_mtime": st.st_mtime_ns,
            "st_ctime": st.st_mtime_ns, "st_atime": st.st_mtime_ns}


# ---- strata through its CLI and the mount registry -------------------------------------
class Strata:
    def __init__(self, pyspy: Path | None):
        self.pyspy = pyspy
        self.mountpoints: set[str] = set()

    def cli(self, *args: str, cache_dir: Path | None = None) -> tuple[float, str]:
        """Run `strata --quiet ARGS` (with STRATA_CACHE_DIR=cache_dir if given); (seconds,
        stdout)."""
        env = None if cache_dir is None else dict(os.environ, STRATA_CACHE_DIR=str(cache_dir))
        t0 = time.perf_counter()
        p = subprocess.run([*STRATA_CLI, *args], env=env, capture_output=True, text=True)
        t = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"strata {' '.join(args)} failed: {p.stderr.strip()[-800:]}")
        return t, p.stdout

    def mount(self, repo: str, vid: str, mp: Path, *options: str,
              cache_dir: Path | None = None) -> float:
        """`strata mount` (CLI start to mount ready); seconds."""
        mp.mkdir(parents=True, exist_ok=True)
        self.mountpoints.add(str(mp))
        return self.cli("--repo", repo, "mount", "--id", vid, *options, str(mp),
                        cache_dir=cache_dir)[0]

    def mount_all(self, repo: str, mp: Path, cache_dir: Path | None = None) -> float:
        """`strata mount --all` (every version of `repo`); seconds to mount ready."""
        mp.mkdir(parents=True, exist_ok=True)
        self.mountpoints.add(str(mp))
        return self.cli("--repo", repo, "mount", "--all", str(mp), cache_dir=cache_dir)[0]

    def pid(self, mp: Path) -> int:
        from strata.vfs.mount import registered
        info = registered(str(mp))
        if info is None:
            raise RuntimeError(f"{mp} is not a registered strata mount")
        return info.pid

    def status(self, mp: Path) -> dict:
        from strata.vfs.mount import control_call
        return control_call(str(mp), "status")

    def unmount(self, mp: Path) -> None:
        if mounted(str(mp)):
            pid = self.pid(mp)
            subprocess.run([*STRATA_CLI, "unmount", str(mp)], capture_output=True)
            deadline = time.monotonic() + 20
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
        force_unmount(str(mp))

    @contextmanager
    def profiled(self, mp: Path, name: str):
        """py-spy record of the mount server while the block runs (if --pyspy). The
        environment tunes it: PYSPY_RATE (samples per second, default 200), PYSPY_IDLE=1
        (also sample waiting threads: where the wall time goes, not only the CPU)."""
        if not self.pyspy or not shutil.which("py-spy"):
            yield
            return
        self.pyspy.mkdir(parents=True, exist_ok=True)
        out = self.pyspy / f"{name}.txt"
        p = subprocess.Popen(["py-spy", "record", "--pid", str(self.pid(mp)), "--rate", os.environ.get("PYSPY_RATE", "200"),
                              "--format", "raw", "--threads", "--nonblocking", *(["--idle"] if os.environ.get("PYSPY_IDLE") else []),
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


# ---- a whole run -----------------------------------------------------------------------
def compile_strata() -> None:
    """Byte-compile strata's modules, as installing a package does. Run from a checkout
    with PYTHONDONTWRITEBYTECODE set (as in some CI images), every strata command would
    compile its modules again (60 ms of `strata mount`'s 200 here) and the start-up
    figures would measure the compiler."""
    import compileall
    import importlib.util
    for name in ("strata", "strata.cli", "strata.catalog", "strata.storage", "strata.vfs"):
        spec = importlib.util.find_spec(name)
        for folder in (spec.submodule_search_locations or []) if spec else []:
            compileall.compile_dir(folder, quiet=1, maxlevels=0)


def run_bench(title: str, prefix: str, args, isolate_env: Callable[[Path], None],
              run: Callable[[Path, Results], None],
              order: Callable[[Row], object] | None = None, **meta) -> int:
    """A run in a fresh work folder under --workdir: `isolate_env(work)` before strata is
    imported, then `run(work, res)`; the work folder is removed unless --keep. Prints the
    table (not when `run` raised), writes --out as JSON; exit status 1 if a target failed.
    `meta` goes into machine_meta."""
    work = Path(tempfile.mkdtemp(prefix=prefix, dir=args.workdir))
    isolate_env(work)
    sys.path.insert(0, str(ROOT))  # noqa - strata is installed; this only helps a bare checkout
    compile_strata()
    res = Results(order)
    res.meta = machine_meta(args.quick, **meta)
    print(f"work folder {work}; {res.meta['cores']} cores, {res.meta['memory_gib']} GiB; "
          f"load {res.meta['loadavg_start']}; page cache drops: {CAN_DROP}", flush=True)
    t0 = time.perf_counter()
    try:
        run(work, res)
    finally:
        res.meta["loadavg_end"] = loadavg()
        res.meta["seconds"] = round(time.perf_counter() - t0, 1)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{title} ({'--quick' if args.quick else 'full'} run, "
          f"{res.meta['seconds']:.0f} s, {res.meta['cores']} cores, load "
          f"{res.meta['loadavg_start']} -> {res.meta['loadavg_end']}):\n")
    print(res.markdown())
    if args.out:
        Path(args.out).write_text(json.dumps(res.as_json(), indent=1))
    return 0 if res.passed() else 1
