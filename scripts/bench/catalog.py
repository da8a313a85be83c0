#!/usr/bin/env python3
"""Catalog benchmark (issue 2): strata's Dataset API against baselines measured in the same run.

    python scripts/bench/catalog.py                  # full run: 2 GiB mixed tree (~2.5 min here)
    python scripts/bench/catalog.py --size-gb 0.2    # quick check
    python scripts/bench/catalog.py --out results.json --keep --workdir /big/disk

Everything runs against a private embedded repository: XDG_DATA_HOME, XDG_CACHE_HOME and
XDG_CONFIG_HOME point under the work folder before strata is imported, and STRATA_* variables
are cleared, so nothing of the user's own repository, cache or config is read or touched.

Figures (see docs/performance.md, "Catalog (issue 2)"):
  1. a mixed tree of --size-gb GiB: ~70% in up to 20 large files, ~30% in small files of
     1-100 KiB (20k of them at 2 GiB, scaled with the size) in ~200 folders; unique
     pseudo-random bytes, so nothing dedups by accident;
  2. add_files + finalize(auto_upload=True) of the tree vs `cp -r` (page cache warm for both);
  3. a child with 1% of the bytes changed in place (sync_folder + finalize): uploaded bytes and
     blob-folder growth vs the tree size; a child that only moves a folder and a large file;
  4. get_mutable_local_copy of the first version vs `cp -r` of the source tree;
  5. a 100k-file version of tiny files: finalize, list_files, a child with a few changes,
     compare;
  6. strata end to end on ClearML-shaped trees (1 GiB in 20 files; 10k x 4 KiB) next to
     ClearML 2.1 figures measured earlier on this machine (not re-run here).

--profile DIR runs cProfile on every strata phase, in all threads (the hashing, upload and
fetch pools included), writes DIR/<phase>.pstats and prints the functions with the most own
time. Profiled timings are inflated; use them for where the time goes, not for the table.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import benchlib
from benchlib import GiB, KiB, MiB, human, mbps, tree_stats, warm_tree

# ClearML 2.1 with local storage, measured earlier on this machine (not re-run here).
CLEARML = {
    "1 GiB in 20 files": {"hash": 2.7, "store": 27.6, "finalize": 1.0, "get": 3.0},
    "10k x 4 KiB files": {"hash": 2.7, "store": 6.2, "finalize": 1.4, "get": 1.3},
}


# ---- results ---------------------------------------------------------------------------
@dataclass
class Row(benchlib.Row):
    section: int = 0                # the brief's section (rows print in section order)


class Results(benchlib.Results):
    """Rows print in section order; a row whose figure does not start with a section number
    belongs to the section of the row before it."""

    def __init__(self) -> None:
        super().__init__(order=lambda r: r.section)

    def add(self, row: Row) -> Row:
        head = row.figure.split(".", 1)[0]
        row.section = int(head) if head.isdigit() else (self.rows[-1].section if self.rows
                                                         else 0)
        return super().add(row)


def secs(t: float) -> str:
    return f"{t:.2f} s" if t < 100 else f"{t:.0f} s"


# ---- profiling (all threads) -----------------------------------------------------------
class Profiler:
    """cProfile for a phase in the calling thread and in every thread started during it
    (threading.setprofile runs our hook first thing in each new thread, which swaps in a
    per-thread cProfile). Stats of all threads are summed."""

    def __init__(self, folder: str | None):
        self.folder = Path(folder) if folder else None
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def phase(self, name: str):
        if self.folder is None:
            yield
            return
        profs: list[cProfile.Profile] = []
        lock = threading.Lock()

        def hook(frame, event, arg):
            p = cProfile.Profile()
            with lock:
                profs.append(p)
            p.enable()

        main = cProfile.Profile()
        threading.setprofile(hook)
        main.enable()
        try:
            yield
        finally:
            main.disable()
            threading.setprofile(None)
            stats = pstats.Stats(main)
            for p in profs:
                try:
                    stats.add(p)
                except Exception:  # a thread that never ran Python code
                    pass
            path = self.folder / f"{name}.pstats"
            stats.dump_stats(str(path))
            print(f"\n  profile of {name} ({len(profs)} worker threads) -> {path}")
            stats.sort_stats("tottime").print_stats(14)


# ---- data generation -------------------------------------------------------------------
class Bytes(benchlib.Bytes):
    """benchlib.Bytes with pool words over the whole uint64 range. Without numpy: pool
    slices behind a unique 8-byte counter every 4 KiB."""

    def __init__(self, seed: int):
        try:
            super().__init__(seed, high=2**64)
        except ImportError:
            self.counter = seed * 1_000_003
            self.np = None
            self.pool = os.urandom(self.POOL)

    def block(self, n: int) -> bytes:
        if self.np is not None:
            return super().block(n)
        self.counter += 1
        parts, got, page = [], 0, 0
        base = (self.counter * 104_729) % (self.POOL - 4 * KiB)
        while got < n:
            page += 1
            stamp = (self.counter * 65_536 + page).to_bytes(8, "little")
            piece = stamp + self.pool[(base + page * 4093) % (self.POOL - 4 * KiB):][:4088]
            parts.append(piece)
            got += len(piece)
        return b"".join(parts)[:n]


def make_mixed_tree(root: Path, total: int, gen: Bytes, rnd: random.Random) -> dict:
    """~70% of `total` in large files (up to 20, each >= 16 MiB so it is chunked), ~30% in
    small files of 1-100 KiB (20k at 2 GiB, scaled) in ~n/100 folders (groups of 10)."""
    large_total = int(total * 0.7)
    n_large = max(1, min(20, large_total // (16 * MiB)))
    weights = [rnd.uniform(0.5, 1.5) for _ in range(n_large)]
    scale = large_total / sum(weights)
    large_sizes = [max(9 * MiB, int(w * scale)) for w in weights]
    (root / "large").mkdir(parents=True)
    for i, size in enumerate(large_sizes):
        gen.write_file(root / "large" / f"part-{i:02d}.bin", size, 4 * MiB)

    small_total = total - sum(large_sizes)
    n_small = max(100, round(20_000 * total / (2 * GiB)))
    mean = small_total / n_small
    # size = 1 KiB + 99 KiB * u**p has mean 1 KiB + 99 KiB / (p + 1): pick p for our mean
    p = max(0.05, 99 * KiB / max(mean - KiB, 1) - 1)
    sizes = [KiB + int(99 * KiB * rnd.random() ** p) for _ in range(n_small)]
    n_dirs = max(1, round(n_small / 100))
    per_dir = -(-n_small // n_dirs)
    small_paths = []
    for i, size in enumerate(sizes):
        d = i // per_dir
        folder = root / "small" / f"g{d // 10:02d}" / f"d{d % 10}"
        if i % per_dir == 0:
            folder.mkdir(parents=True)
        path = folder / f"f{i:05d}.dat"
        path.write_bytes(gen.block(size))
        small_paths.append(path)
    return {"large_files": n_large, "large_bytes": sum(large_sizes), "small_files": n_small,
            "small_bytes": sum(sizes), "small_folders": n_dirs,
            "large_paths": [root / "large" / f"part-{i:02d}.bin" for i in range(n_large)],
            "large_sizes": large_sizes, "small_paths": small_paths, "small_sizes": sizes}


def make_uniform_tree(root: Path, n_files: int, size: int, per_dir: int, gen: Bytes) -> None:
    """n_files files of `size` bytes, per_dir to a folder; one random draw sliced up."""
    pool = gen.block(min(n_files, 20_000) * size)
    for i in range(n_files):
        if i % per_dir == 0:
            folder = root / f"d{i // per_dir:04d}"
            folder.mkdir(parents=True)
        if i and i % 20_000 == 0:
            pool = gen.block(min(n_files - i, 20_000) * size)
        j = i % 20_000
        (folder / f"f{i:06d}.txt").write_bytes(pool[j * size:(j + 1) * size])


def make_big_files_tree(root: Path, n_files: int, total: int, gen: Bytes) -> None:
    root.mkdir(parents=True)
    for i in range(n_files):
        gen.write_file(root / f"file-{i:02d}.bin", total // n_files, 4 * MiB)


def sync() -> float:
    t = time.perf_counter()
    os.sync()
    return time.perf_counter() - t


def cp_r(src: Path, dst: Path) -> float:
    t = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    return time.perf_counter() - t


def rm(path: Path) -> None:
    def onerror(func, p, exc):
        os.chmod(os.path.dirname(p), 0o755)
        func(p)
    if path.exists():
        shutil.rmtree(path, onerror=onerror)


def overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


# ---- the benchmark ---------------------------------------------------------------------
def run(args, work: Path, res: Results) -> None:
    from strata.catalog import Dataset
    from strata.catalog.repo import open_repo
    from strata.catalog.ops import compare
    from strata.catalog.repo import Repository

    prof = Profiler(args.profile)
    repo = open_repo(None, create=True)
    assert repo.url.startswith("file://"), repo.url
    blobs_dir = Path(repo.url[len("file://"):]) / "blobs"
    gen = Bytes(args.seed)
    rnd = random.Random(args.seed)
    cold_caches = iter(range(1000))

    def blob_bytes() -> int:
        return tree_stats(blobs_dir)[1] if blobs_dir.exists() else 0

    def fresh_repo(cold: bool = False) -> Repository:
        """What a new process sees: a new Repository object; with `cold`, an empty cache."""
        cache = work / f"cold-cache-{next(cold_caches)}" if cold else None
        return Repository.open(repo.url, cache_dir=cache)

    total = int(args.size_gb * GiB)
    print(f"strata catalog benchmark: {args.size_gb:g} GiB mixed tree, workdir {work}")
    print(f"repository {repo.url} (chunk {human(repo.chunk_size)}, "
          f"pack {human(repo.pack_size)})\n")

    # 1. the mixed tree ------------------------------------------------------------------
    print("1. generating the mixed tree ...", flush=True)
    tree = work / "tree"
    t = time.perf_counter()
    info = make_mixed_tree(tree, total, gen, rnd)
    t_gen = time.perf_counter() - t
    n_files, tree_bytes = tree_stats(tree)
    sync()
    res.meta["mixed_tree"] = {k: v for k, v in info.items() if not k.endswith(("paths", "sizes"))}
    res.meta["mixed_tree"].update(files=n_files, bytes=tree_bytes, generate_s=round(t_gen, 2))
    res.add(Row("1. mixed tree generated",
                f"{n_files} files, {human(tree_bytes)}: {info['large_files']} large "
                f"({info['large_bytes'] / tree_bytes:.0%}), {info['small_files']} small in "
                f"{info['small_folders']} folders", values=res.meta["mixed_tree"]))

    # 2. add_files + finalize vs cp -r ---------------------------------------------------
    # cp runs right before and right after strata and the baseline is their mean, which
    # cancels slow drift of this shared machine. Nothing is deleted until the end: on this
    # ext4, creating files right after many deletions is up to 30x slower (the inode
    # allocator's recently_deleted() scan), which would penalise whichever side came next.
    print("\n2. add_files + finalize(auto_upload=True) vs cp -r ...", flush=True)
    sync()
    warm_tree(tree)
    t_cp_a = cp_r(tree, work / "cp-2a")
    t_cp_sync = sync()
    warm_tree(tree)
    with prof.phase("2_add_finalize_mixed"):
        t0 = time.perf_counter()
        v1 = Dataset.create("mixed", "bench", repo=repo)
        v1.add_files(str(tree))
        t1 = time.perf_counter()
        v1.finalize(auto_upload=True)
        t2 = time.perf_counter()
    t_add, t_fin, t_strata = t1 - t0, t2 - t1, t2 - t0
    t_strata_sync = sync()
    warm_tree(tree)
    t_cp_b = cp_r(tree, work / "cp-2b")
    sync()
    t_cp = (t_cp_a + t_cp_b) / 2
    ratio = t_cp / t_strata
    res.add(Row("2. add_files + finalize(auto_upload) vs `cp -r`",
                f"{secs(t_strata)} ({mbps(tree_bytes, t_strata)})",
                f"{secs(t_cp)} ({mbps(tree_bytes, t_cp)}; runs {t_cp_a:.1f}, {t_cp_b:.1f} s)",
                f"{ratio:.2f}x", ">= 0.5x", ratio >= 0.5,
                {"strata_s": t_strata, "add_files_s": t_add, "finalize_s": t_fin,
                 "cp_s": [t_cp_a, t_cp_b], "bytes": tree_bytes, "ratio": ratio,
                 "uploaded_bytes": v1.record.uploaded_bytes}))
    res.add(Row("   of which add_files (hash) / finalize (store + manifest)",
                f"{secs(t_add)} ({mbps(tree_bytes, t_add)}) / "
                f"{secs(t_fin)} ({mbps(tree_bytes, t_fin)})"))
    ratio_sync = (t_cp_a + t_cp_sync) / (t_strata + t_strata_sync)
    res.add(Row("   same, each followed by `sync` (strata has flushed its blobs already, cp has not)",
                f"{secs(t_strata + t_strata_sync)}", f"{secs(t_cp_a + t_cp_sync)} (first run)",
                f"{ratio_sync:.2f}x", values={"strata_sync_s": t_strata_sync,
                                             "cp_sync_s": t_cp_sync, "ratio": ratio_sync}))

    # 4. get_mutable_local_copy vs cp -r (before the tree is modified) ---------------------
    print("\n4. get_mutable_local_copy vs cp -r ...", flush=True)
    warm_tree(tree)
    t_cp_a = cp_r(tree, work / "cp-4a")
    sync()
    warm_tree(tree)
    warm_tree(blobs_dir)
    target = work / "get-copy"
    with prof.phase("4_get_mutable_local_copy"):
        t0 = time.perf_counter()
        Dataset.get(v1.id, repo=fresh_repo()).get_mutable_local_copy(str(target))
        t_get = time.perf_counter() - t0
    sync()
    warm_tree(tree)
    t_cp_b = cp_r(tree, work / "cp-4b")
    sync()
    t_cp = (t_cp_a + t_cp_b) / 2
    got_files, got_bytes = tree_stats(target)
    same = (got_files, got_bytes) == (n_files, tree_bytes)
    for p in rnd.sample(info["small_paths"], 20) + info["large_paths"][:2]:
        rel = p.relative_to(tree)
        same = same and (target / rel).read_bytes() == p.read_bytes()
    ratio = t_cp / t_get
    res.add(Row("4. get_mutable_local_copy(v1) vs `cp -r` of the source",
                f"{secs(t_get)} ({mbps(tree_bytes, t_get)})",
                f"{secs(t_cp)} ({mbps(tree_bytes, t_cp)}; runs {t_cp_a:.1f}, {t_cp_b:.1f} s)",
                f"{ratio:.2f}x", ">= 0.5x", ratio >= 0.5 and same,
                {"strata_s": t_get, "cp_s": [t_cp_a, t_cp_b], "ratio": ratio,
                 "copy_matches": same}))
    if not same:
        print("  !! the copy does not match the source tree")

    # 3. a 1% change, a rename-only version ----------------------------------------------
    print("\n3. child versions: 1% changed in place; rename only ...", flush=True)
    changed = 0
    # 0.2% of the bytes: whole small files rewritten in place (same size, new bytes)
    small = list(zip(info["small_paths"], info["small_sizes"]))
    rnd.shuffle(small)
    n_small_changed = 0
    for p, size in small:
        if changed >= 0.002 * tree_bytes:
            break
        overwrite(p, 0, gen.block(size))
        changed += size
        n_small_changed += 1
    # 0.8% of the bytes: one contiguous region, at an unaligned offset, in each of 2 large files
    region = int(0.004 * tree_bytes)
    edited = rnd.sample(list(zip(info["large_paths"], info["large_sizes"])),
                        min(2, info["large_files"]))
    for p, size in edited:
        n = min(region, size)
        overwrite(p, rnd.randrange(0, size - n + 1), gen.block(n))
        changed += n
    chunk = repo.chunk_size
    before = blob_bytes()
    with prof.phase("3_child_1pct"):
        t0 = time.perf_counter()
        v2 = Dataset.create("mixed", "bench", parent_datasets=[v1.id], repo=repo)
        counts = v2.sync_folder(str(tree))
        v2.finalize(auto_upload=True)
        t_child = time.perf_counter() - t0
    grew = blob_bytes() - before
    up = v2.record.uploaded_bytes
    res.add(Row("3. child, 1% of bytes changed: uploaded_bytes / tree",
                f"{human(up)} = {up / tree_bytes:.2%}", f"changed {human(changed)} = "
                f"{changed / tree_bytes:.2%}", f"{up / max(changed, 1):.2f}x changed",
                "<= 2%", up <= 0.02 * tree_bytes,
                {"uploaded_bytes": up, "changed_bytes": changed, "tree_bytes": tree_bytes,
                 "small_files_changed": n_small_changed, "large_regions": len(edited),
                 "region_bytes": region, "removed_added_modified": counts,
                 "seconds": t_child}))
    res.add(Row("   blob folder growth / tree", f"{human(grew)} = {grew / tree_bytes:.2%}",
                target="<= 2%", ok=grew <= 0.02 * tree_bytes, values={"blob_growth": grew}))
    res.add(Row("   sync_folder + finalize time", secs(t_child),
                values={"seconds": t_child}))

    # rename only: move a folder of small files and one large file
    moved = tree / "moved"
    moved.mkdir()
    src_folder = tree / "small" / "g00"
    moved_files, moved_bytes = tree_stats(src_folder)
    os.rename(src_folder, moved / "g00")
    os.rename(info["large_paths"][-1], moved / info["large_paths"][-1].name)
    moved_files += 1
    moved_bytes += info["large_sizes"][-1]
    info["large_paths"][-1] = moved / info["large_paths"][-1].name
    before = blob_bytes()
    with prof.phase("3_child_rename"):
        t0 = time.perf_counter()
        v3 = Dataset.create("mixed", "bench", parent_datasets=[v2.id], repo=repo)
        counts = v3.sync_folder(str(tree))
        v3.finalize(auto_upload=True)
        t_ren = time.perf_counter() - t0
    grew = blob_bytes() - before
    up = v3.record.uploaded_bytes
    res.add(Row(f"3. child, rename only ({moved_files} files, {human(moved_bytes)} moved): "
                "uploaded_bytes", f"{up} B (blob growth {grew} B)", target="0 B",
                ok=(up == 0 and grew == 0),
                values={"uploaded_bytes": up, "blob_growth": grew, "moved_files": moved_files,
                        "moved_bytes": moved_bytes, "removed_added_modified": counts,
                        "seconds": t_ren}))
    res.add(Row("   sync_folder + finalize time (moved files are re-read and rehashed)",
                secs(t_ren), values={"seconds": t_ren}))

    # informational: the cost of one small in-place edit with fixed-size chunks
    p = info["large_paths"][0]
    overwrite(p, info["large_sizes"][0] // 2, gen.block(4 * KiB))
    v4 = Dataset.create("mixed", "bench", parent_datasets=[v3.id], repo=repo)
    v4.sync_folder(str(tree))
    v4.finalize(auto_upload=True)
    up = v4.record.uploaded_bytes
    res.add(Row("   child, one 4 KiB in-place edit in a large file: uploaded_bytes",
                human(up), f"chunk size {human(chunk)}",
                values={"uploaded_bytes": up, "chunk_size": chunk}))

    # 5. 100k tiny files ------------------------------------------------------------------
    n_tiny = args.tiny_files
    print(f"\n5. {n_tiny} tiny files ...", flush=True)
    tiny = work / "tiny"
    t = time.perf_counter()
    make_uniform_tree(tiny, n_tiny, 100, 100, gen)
    t_gen = time.perf_counter() - t
    sync()
    warm_tree(tiny)
    with prof.phase("5_tiny_finalize"):
        t0 = time.perf_counter()
        tv = Dataset.create("tiny", "bench", repo=repo)
        tv.add_files(str(tiny))
        t1 = time.perf_counter()
        tv.finalize(auto_upload=True)
        t2 = time.perf_counter()
    t_fin = t2 - t0
    res.add(Row(f"5. {n_tiny} x 100 B files: add_files + finalize", secs(t_fin),
                target="< 10 s", ok=t_fin < 10,
                values={"seconds": t_fin, "add_files_s": t1 - t0, "finalize_s": t2 - t1,
                        "generate_s": t_gen, "files": tv.record.files}))
    res.add(Row("   of which add_files / finalize", f"{secs(t1 - t0)} / {secs(t2 - t1)}"))

    with prof.phase("5_tiny_list_files"):
        t0 = time.perf_counter()
        listed = Dataset.get(tv.id, repo=fresh_repo()).list_files()
        t_list = time.perf_counter() - t0
    res.add(Row(f"5. list_files ({len(listed)} paths, new Repository object)", secs(t_list),
                target="< 10 s", ok=t_list < 10 and len(listed) == n_tiny,
                values={"seconds": t_list, "paths": len(listed)}))

    # a child with a few changes: 10 modified, 10 added, 10 removed
    dirs = sorted(p for p in tiny.iterdir())
    victims = sorted(dirs[0].iterdir())
    for p in victims[:10]:
        p.write_bytes(gen.block(100))
    for p in victims[10:20]:
        p.unlink()
    for i in range(10):
        (dirs[-1] / f"new-{i}.txt").write_bytes(gen.block(100))
    with prof.phase("5_tiny_child"):
        t0 = time.perf_counter()
        tc = Dataset.create("tiny", "bench", parent_datasets=[tv.id], repo=repo)
        counts = tc.sync_folder(str(tiny))
        tc.finalize(auto_upload=True)
        t_child = time.perf_counter() - t0
    res.add(Row("5. child with 30 changes: sync_folder + finalize", secs(t_child),
                target="< 10 s", ok=t_child < 10,
                values={"seconds": t_child, "removed_added_modified": counts}))
    with prof.phase("5_tiny_compare"):
        t0 = time.perf_counter()
        r2 = fresh_repo()
        cmp = compare(Dataset.get(tv.id, repo=r2), Dataset.get(tc.id, repo=r2))
        t_cmp = time.perf_counter() - t0
    ok = (len(cmp.added), len(cmp.modified), len(cmp.removed)) == (10, 10, 10)
    res.add(Row("5. compare(parent, child)", f"{secs(t_cmp)} (+{len(cmp.added)} "
                f"~{len(cmp.modified)} -{len(cmp.removed)})", target="< 10 s",
                ok=t_cmp < 10 and ok, values={"seconds": t_cmp, "correct": ok}))

    # 6. ClearML-shaped trees, end to end -------------------------------------------------
    if args.no_reference:
        return
    print("\n6. ClearML-shaped trees, end to end ...", flush=True)
    shapes = [("1 GiB in 20 files", lambda root: make_big_files_tree(root, 20, GiB, gen)),
              ("10k x 4 KiB files",
               lambda root: make_uniform_tree(root, 10_000, 4 * KiB, 100, gen))]
    for label, make in shapes:
        slug = "ref-" + label.split()[0]
        root = work / slug
        make(root)
        sync()
        warm_tree(root)
        t_cp = cp_r(root, work / (slug + "-cp"))
        sync()
        warm_tree(root)
        ref = CLEARML[label]
        with prof.phase("6_" + label.replace(" ", "_")):
            t0 = time.perf_counter()
            ds = Dataset.create(label, "clearml-shape", repo=repo)
            ds.add_files(str(root))
            t1 = time.perf_counter()
            ds.upload()
            t2 = time.perf_counter()
            ds.finalize()
            t3 = time.perf_counter()
            copy = Dataset.get(ds.id, repo=fresh_repo(cold=True)).get_local_copy()
            t4 = time.perf_counter()
        sync()
        ok_copy = tree_stats(Path(copy)) == tree_stats(root)
        ours = {"hash": t1 - t0, "store": t2 - t1, "finalize": t3 - t2, "get": t4 - t3}
        ours_total, theirs_total = t4 - t0, sum(ref.values())
        speedup = theirs_total / ours_total
        res.add(Row(f"6. {label}: end to end (create+add, upload, finalize, cold "
                    "get_local_copy)", secs(ours_total), f"ClearML 2.1: {secs(theirs_total)}",
                    f"{speedup:.1f}x faster", ">= 3x", speedup >= 3 and ok_copy,
                    {"strata": ours, "clearml": ref, "strata_total_s": ours_total,
                     "clearml_total_s": theirs_total, "speedup": speedup,
                     "copy_matches": ok_copy, "cp_r_now_s": t_cp}))
        res.add(Row("   hash / store / finalize / get",
                    " / ".join(f"{ours[k]:.2f}" for k in ("hash", "store", "finalize", "get"))
                    + " s", " / ".join(f"{ref[k]:.1f}" for k in ("hash", "store", "finalize",
                                                                  "get")) + " s"))
        res.add(Row("   context: `cp -r` of this tree, now (file creation cost drifts here)",
                    secs(t_cp), values={"cp_s": t_cp}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gb", type=float, default=2.0,
                    help="size of the mixed tree in GiB (default 2; 0.2 for a quick check)")
    ap.add_argument("--workdir", help="parent folder for the work folder (default: the "
                    "system temp folder, e.g. /tmp)")
    ap.add_argument("--out", help="also write the results as JSON to this file")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    ap.add_argument("--tiny-files", type=int, default=100_000,
                    help="files in the tiny-file version (default 100000)")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the ClearML-shaped trees (section 6)")
    ap.add_argument("--profile", metavar="DIR",
                    help="cProfile each strata phase (all threads) into DIR/*.pstats")
    ap.add_argument("--seed", type=int, default=2024)
    args = ap.parse_args(argv)
    if args.size_gb <= 0:
        ap.error("--size-gb must be positive")

    parent = Path(args.workdir or tempfile.gettempdir()).resolve()
    parent.mkdir(parents=True, exist_ok=True)
    # tree + cp copy + blobs + get copy, the reference trees with their blobs and copies
    # nothing is deleted before the end: tree, 4 cp copies, blobs, a get copy (~7.2x the
    # tree) plus the reference trees with their cp copies, blobs and cached copies
    need = int(args.size_gb * GiB * 7.5) + (0 if args.no_reference else 4 * GiB + 300 * MiB) \
        + args.tiny_files * 12 * KiB + GiB
    free = shutil.disk_usage(parent).free
    if free < need:
        print(f"not enough free disk in {parent}: {human(free)} free, about {human(need)} "
              "needed; pass --workdir on a bigger disk or a smaller --size-gb", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="strata-bench-", dir=parent))

    # a private embedded repository, cache and config: set before strata is imported
    for var in ("STRATA_REPO", "STRATA_CACHE_DIR", "STRATA_CACHE_SIZE", "STRATA_CONFIG"):
        os.environ.pop(var, None)
    for var, sub in (("XDG_DATA_HOME", "xdg-data"), ("XDG_CACHE_HOME", "xdg-cache"),
                     ("XDG_CONFIG_HOME", "xdg-config")):
        os.environ[var] = str(work / sub)

    res = Results()
    res.meta.update(
        command="python scripts/bench/catalog.py " + " ".join(sys.argv[1:] if argv is None
                                                              else argv),
        python=platform.python_version(), machine=platform.machine(),
        kernel=platform.release(),
        cpus=os.cpu_count(), workdir=str(work), disk_free_gib=round(free / GiB, 1),
        size_gb=args.size_gb, started=time.strftime("%Y-%m-%d %H:%M:%S"))
    try:
        import numpy  # noqa: F401
        res.meta["generator"] = "numpy SFC64 pool"
    except ImportError:
        res.meta["generator"] = "os.urandom pool"
    t0 = time.perf_counter()
    failed = None
    try:
        run(args, work, res)
    except BaseException as e:  # still print what was measured, then re-raise
        failed = e
    finally:
        res.meta["wall_s"] = round(time.perf_counter() - t0, 1)
        print("\n## strata catalog benchmark "
              f"({args.size_gb:g} GiB mixed tree, {os.cpu_count()} CPUs, "
              f"wall {res.meta['wall_s']} s)\n")
        print(res.markdown())
        if args.out:
            Path(args.out).write_text(json.dumps(res.as_json(), indent=1, default=str))
            print(f"\nJSON written to {args.out}")
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            rm(work)
    if failed is not None:
        raise failed
    return 0 if res.passed() else 1


if __name__ == "__main__":
    sys.exit(main())
