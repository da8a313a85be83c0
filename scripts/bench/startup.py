"""Start-up cost of the mount and control commands, optionally against an older copy.

    python scripts/bench/startup.py                       # this checkout only
    python scripts/bench/startup.py --base /tmp/strata-base --reps 7

`--base DIR` names a folder holding an importable `strata` package (for example the four
layer folders of an older commit copied under DIR/strata/, with strata_pkg/__init__.py as
DIR/strata/__init__.py). Its runs get PYTHONPATH=DIR, so the CLI and the mount server it
starts run that code; runs of the two variants are interleaved, so load from other jobs on
the machine hits both alike. Each figure is the median over --reps runs:

- `strata --version` and `strata status MNT` (a writable mount with one pending change):
  process start to exit;
- `strata mount` of a local repository version, command start to return (the mount is
  ready when it returns), each run with a new, empty cache folder;
- the same mount plus open + read of the first 4 KiB of a 64 MiB file (its first 8 MiB
  chunk is fetched and verified);
- `strata commit MNT` of one new 4 KiB file on a writable mount, end to end;
- `Dataset.mount(path)` in a Python process that has already imported strata, call to
  return (the mount is ready when it returns).

Everything lives in a fresh work folder (XDG_* and STRATA_CACHE_DIR point there), removed
at the end.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import STRATA_CLI, compile_strata, force_unmount


class Variant:
    def __init__(self, name: str, work: Path, base: str | None):
        self.name = name
        self.work = work
        self.env = dict(os.environ)
        for k in [k for k in self.env if k.startswith("STRATA_")]:
            del self.env[k]
        for k in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME"):
            self.env[k] = str(work / "xdg" / k)
        if base:
            self.env["PYTHONPATH"] = base
        else:
            self.env.pop("PYTHONPATH", None)
        self.runs = 0

    def run(self, *args: str, cache: Path | None = None) -> float:
        env = dict(self.env)
        if cache is not None:
            env["STRATA_CACHE_DIR"] = str(cache)
        t0 = time.perf_counter()
        p = subprocess.run([*STRATA_CLI, *args], env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL)
        t = time.perf_counter() - t0
        if p.returncode != 0:
            raise RuntimeError(f"[{self.name}] strata {' '.join(args)}: {p.stderr.strip()}")
        return t

    def fresh(self, what: str) -> Path:
        self.runs += 1
        path = self.work / f"{what}{self.runs}"
        path.mkdir(parents=True)
        return path

    def unmount(self, mnt: Path) -> None:
        self.run("unmount", str(mnt))
        force_unmount(str(mnt))


def build_version(repo: str, env: dict) -> str:
    """A version with one 64 MiB file and 100 small files, built with this checkout."""
    src = Path(repo).parent / "src"
    (src / "small").mkdir(parents=True)
    with open(src / "big.bin", "wb") as f:
        for i in range(64):
            f.write(os.urandom(1 << 20))
    for i in range(100):
        (src / "small" / f"f{i:03}.txt").write_bytes(os.urandom(2048))
    code = ("import sys\nfrom strata.catalog import Dataset\n"
            "ds = Dataset.create(dataset_project='bench', dataset_name='startup', "
            "repo=sys.argv[1])\nds.add_files(sys.argv[2])\nds.finalize(auto_upload=True)\n"
            "print(ds.id)\n")
    out = subprocess.run([sys.executable, "-c", code, repo, str(src)], env=env, check=True,
                         capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


DATASET_MOUNT = """
import sys, time
from strata.catalog import Dataset
ds = Dataset.get(sys.argv[2], repo=sys.argv[1])
t0 = time.perf_counter()
handle = ds.mount(sys.argv[3])
print(time.perf_counter() - t0)
handle.unmount()
"""


def one_round(v: Variant, repo: str, vid: str, figures: dict) -> None:
    fig = figures.setdefault(v.name, {})

    def add(key: str, value: float) -> None:
        fig.setdefault(key, []).append(value)

    add("strata --version", v.run("--version"))
    # mount to ready, then the first 4 KiB of the big file (cold strata cache)
    mnt, cache = v.fresh("mnt"), v.fresh("cache")
    t0 = time.perf_counter()
    v.run("--repo", repo, "mount", "--id", vid, str(mnt), cache=cache)
    t_mount = time.perf_counter() - t0
    with open(mnt / "big.bin", "rb") as f:
        assert len(f.read(4096)) == 4096
    t_first = time.perf_counter() - t0
    v.unmount(mnt)
    add("strata mount (to ready)", t_mount)
    add("mount + open + first 4 KiB", t_first)
    # writable mount: status and a small commit
    mnt = v.fresh("wmnt")
    v.run("--repo", repo, "mount", "--id", vid, "--writable", str(mnt))
    (mnt / f"new{v.runs}.txt").write_bytes(os.urandom(4096))
    add("strata status MNT", v.run("status", str(mnt)))
    add("strata commit MNT (one 4 KiB file)", v.run("commit", str(mnt)))
    v.unmount(mnt)
    mnt = v.fresh("dmnt")
    out = subprocess.run([sys.executable, "-c", DATASET_MOUNT, repo, vid, str(mnt)],
                         env=v.env, capture_output=True, text=True, check=True)
    add("Dataset.mount (to ready)", float(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", help="folder with an older `strata` package to compare against")
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="strata-startup-"))
    try:
        variants = [Variant("this checkout", work / "after", None)]
        if a.base:
            variants.insert(0, Variant("base", work / "before", os.path.abspath(a.base)))
            compileall.compile_dir(a.base, quiet=1)
        compile_strata()
        repo = str(work / "repo" / "r")
        Path(repo).mkdir(parents=True)
        subprocess.run([*STRATA_CLI, "repo", "init", repo], env=variants[-1].env, check=True,
                       capture_output=True)
        vid = build_version(repo, variants[-1].env)
        figures: dict = {}
        for v in variants:          # warm-up round, not counted
            one_round(v, repo, vid, {})
        for _ in range(a.reps):
            for v in variants:
                one_round(v, repo, vid, figures)
        keys = list(figures[variants[0].name])
        names = [v.name for v in variants]
        print(f"median of {a.reps} runs, ms | " + " | ".join(names))
        for k in keys:
            row = [f"{statistics.median(figures[n][k]) * 1000:.0f} "
                   f"({min(figures[n][k]) * 1000:.0f}-{max(figures[n][k]) * 1000:.0f})"
                   for n in names]
            print(f"{k} | " + " | ".join(row))
        return 0
    finally:
        for path in work.rglob("*mnt*"):
            if path.is_dir():
                force_unmount(str(path))
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
