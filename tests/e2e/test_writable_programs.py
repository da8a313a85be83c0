"""Real programs inside a writable mount: tar, git, sqlite3, rsync, python -m compileall.

Each test runs the same program the same way in the mount and in a plain local folder
holding the same version (its `get_mutable_local_copy`); the two trees must be equal, and
after `strata commit` the child version's tree (its own local copy) must be equal too."""

from __future__ import annotations

import os
import random
import shutil
import sqlite3
import sys

import pytest

from strata.catalog.dataset import Dataset
from tests.e2e.conftest import (CHUNK, EMPTY_DIR, File, Link, WritableEnv, copy_of, run,
                                tree)

pytestmark = pytest.mark.skipif(
    any(shutil.which(p) is None for p in ("tar", "git", "sqlite3", "rsync")),
    reason="needs tar, git, sqlite3 and rsync (scripts/test installs them)")


def sqlite_db(rows: int) -> bytes:
    """The bytes of a small SQLite database (rollback journal mode)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "db")
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, score REAL)")
        db.executemany("INSERT INTO t(name, score) VALUES (?, ?)",
                       [(f"row{i}", i * 0.5) for i in range(rows)])
        db.commit()
        db.close()
        with open(path, "rb") as f:
            return f.read()


def base_spec() -> dict:
    rng = random.Random(7)
    return {
        "README.md": b"# a dataset\n",
        "data/train.csv": b"".join(b"%d,%d\n" % (i, i * i) for i in range(500)),
        "data/big.bin": rng.randbytes(3 * CHUNK + 100),
        "data/sub/deep.txt": b"deep\n",
        "bin/run.sh": File(b"#!/bin/sh\necho hi\n", 0o755),
        "db/labels.sqlite": sqlite_db(200),
        "latest": Link("data/train.csv"),
        "empty": EMPTY_DIR,
    }


@pytest.fixture
def env(build, mounts, tmp_path) -> WritableEnv:
    return WritableEnv(build, mounts, tmp_path, base_spec())


# ---- tar ---------------------------------------------------------------------------
def make_tree(root, rng: random.Random) -> None:
    """Nested folders with their own modes, files of several modes and sizes (one spans
    chunks), relative, dangling and absolute symlinks, an empty folder, odd names."""
    dirs = {"a": 0o755, "a/b": 0o750, "a/b/c": 0o700, "a/b/c/d": 0o755, "x y": 0o755,
            "empty": 0o755, "ünï": 0o711}
    for d in dirs:
        os.makedirs(os.path.join(root, d), exist_ok=True)
    files = {"a/one.txt": (b"one\n", 0o644), "a/run": (b"#!/bin/sh\n", 0o755),
             "a/b/big.bin": (rng.randbytes(2 * CHUNK + 7), 0o644),
             "a/b/c/secret": (b"s3cret\n", 0o400),
             "a/b/c/d/deep.dat": (rng.randbytes(999), 0o600),
             "x y/spaced name.txt": (b"spaces\n", 0o664),
             "ünï/cødé ✓": (b"unicode\n", 0o644),
             "zero": (b"", 0o644)}
    for rel, (data, mode) in files.items():
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        os.chmod(os.path.join(root, rel), mode)
    os.symlink("../one.txt", os.path.join(root, "a/b/to_one"))
    os.symlink("nowhere/at/all", os.path.join(root, "dangling"))
    os.symlink("/etc/hostname", os.path.join(root, "absolute"))
    os.symlink("a/b", os.path.join(root, "to_dir"))
    for d, mode in sorted(dirs.items(), key=lambda kv: -kv[0].count("/")):
        os.chmod(os.path.join(root, d), mode)
    stamp = 1_600_000_000
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            os.utime(os.path.join(dirpath, name), (stamp, stamp), follow_symlinks=False)


def test_tar_extract_into_the_mount(env):
    src = env.tmp / "tree"
    make_tree(src, random.Random(3))
    archive = env.tmp / "tree.tar"
    run("tar", "-cf", archive, "-C", src, ".", cwd=env.tmp)
    for root in (env.mnt, env.local):
        os.mkdir(root / "unpacked")
    env.run_both("tar", "-xpf", archive, "-C", "unpacked")
    # and once more over itself: tar unlinks and recreates every member
    env.run_both("tar", "-xpf", archive, "-C", "unpacked")
    assert tree(env.mnt / "unpacked", mtimes=True) == tree(src, mtimes=True)
    # GNU tar's own check of the extracted files against the archive
    run("tar", "--compare", "-f", archive, "-C", env.mnt / "unpacked", cwd=env.tmp)
    env.check(mtimes=True)


# ---- git ---------------------------------------------------------------------------
def git_env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(HOME=str(home), GIT_CONFIG_NOSYSTEM="1", GIT_CONFIG_GLOBAL=os.devnull,
               GIT_AUTHOR_NAME="Tess Ter", GIT_AUTHOR_EMAIL="tess@example.com",
               GIT_COMMITTER_NAME="Tess Ter", GIT_COMMITTER_EMAIL="tess@example.com")
    return env


def test_git_init_add_commit_inside_the_mount(env, mounts):
    genv = git_env(env.tmp)

    def git(*args, cwd=env.mnt, check=True):
        return run("git", "-c", "init.defaultBranch=main", *args, cwd=cwd, env=genv,
                   check=check)

    git("init", "-q")
    git("add", "-A")
    git("commit", "-q", "-m", "x")
    (env.mnt / "data/train.csv").write_bytes(b"0,0\n")      # modify a lower file
    git("mv", "data/sub/deep.txt", "data/moved.txt")         # rename a lower file
    git("rm", "-q", "README.md")
    git("commit", "-q", "-am", "y")
    git("gc", "-q")                                          # packs, prunes loose objects
    assert git("status", "--porcelain").stdout == ""
    log = git("log", "--format=%H %s").stdout.split("\n")
    assert [line.split(" ", 1)[1] for line in log if line] == ["y", "x"]
    head = log[0].split()[0]
    git("fsck", "--full", "--strict")

    child = env.commit()
    assert git("status", "--porcelain").stdout == ""   # the mount now shows the child
    # a read-only mount of the child: the same history, and fsck passes
    ro = mounts.folder("ro")
    mounts.start(child, env.repo_url, name="ro")
    assert git("rev-parse", "HEAD", cwd=ro).stdout.strip() == head
    git("fsck", "--full", "--strict", cwd=ro)
    assert git("status", "--porcelain", cwd=ro).stdout == ""
    assert git("show", "HEAD:data/moved.txt", cwd=ro).stdout == "deep\n"
    copy = env.child_copy(child)
    assert tree(copy) == tree(env.mnt)


# ---- sqlite3 -----------------------------------------------------------------------
WORK = """
BEGIN;
WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000)
INSERT INTO t(name, score) SELECT 'new' || i, i * 0.25 FROM n;
COMMIT;
UPDATE t SET score = score * 2 WHERE id % 3 = 0;
DELETE FROM t WHERE id % 10 = 0;
CREATE INDEX IF NOT EXISTS t_name ON t(name);
BEGIN; UPDATE t SET name = 'rolled back'; ROLLBACK;
"""
QUERY = "SELECT count(*), sum(score), min(name), max(name) FROM t;"


def sql(db, script: str, cwd) -> str:
    return run("sqlite3", "-batch", "-bail", db, script, cwd=cwd).stdout


def test_sqlite_with_rollback_journal_and_wal(env):
    for root in (env.mnt, env.local):
        # the lower database: copied up on its first write, rollback journal
        sql("db/labels.sqlite", "PRAGMA journal_mode=DELETE;" + WORK, root)
        # a new database in WAL mode (its -wal and -shm files are mmap'ed and removed)
        assert sql("db/wal.sqlite", "PRAGMA journal_mode=WAL;", root).strip() == "wal"
        sql("db/wal.sqlite", "CREATE TABLE t(id INTEGER PRIMARY KEY, name TEXT, score REAL);"
            + WORK, root)
        sql("db/wal.sqlite", "PRAGMA wal_checkpoint(TRUNCATE);" + WORK, root)
    answers = {}
    for db in ("db/labels.sqlite", "db/wal.sqlite"):
        assert sql(db, "PRAGMA integrity_check;", env.mnt).strip() == "ok"
        answers[db] = sql(db, QUERY, env.local)
        assert sql(db, QUERY, env.mnt) == answers[db]
    child = env.check()
    copy = env.child_copy(child)
    for db, answer in answers.items():
        assert sql(db, "PRAGMA integrity_check;", copy).strip() == "ok"
        assert sql(db, QUERY, copy) == answer


# ---- rsync -------------------------------------------------------------------------
def test_rsync_into_the_mount_then_again_after_changes(env):
    rng = random.Random(11)
    src = env.tmp / "src"
    make_tree(src, rng)
    for i in range(30):
        (src / "a" / f"f{i:02d}.bin").write_bytes(rng.randbytes(rng.randrange(1, 5000)))
    env.run_both("rsync", "-a", f"{src}/", "data/sync/")
    assert tree(env.mnt / "data/sync", mtimes=True) == tree(src, mtimes=True)

    # changes: rsync writes each changed file to a temp file and renames it over the old
    (src / "a/one.txt").write_bytes(b"one, changed\n")
    with open(src / "a/b/big.bin", "ab") as f:
        f.write(rng.randbytes(CHUNK))
    (src / "a/f03.bin").write_bytes(b"shorter")
    os.chmod(src / "a/f04.bin", 0o600)
    os.unlink(src / "a/f05.bin")
    shutil.rmtree(src / "x y")
    (src / "new").mkdir()
    (src / "new/file").write_bytes(b"new\n")
    env.run_both("rsync", "-a", "--delete", f"{src}/", "data/sync/")
    assert tree(env.mnt / "data/sync", mtimes=True) == tree(src, mtimes=True)
    assert not any("/." in c["path"] for c in env.pending())   # no rsync temp file left
    env.check(mtimes=True)


# ---- python -m compileall ----------------------------------------------------------
SOURCES = {"app/__init__.py": "", "app/main.py": "from app.util import twice\nX = twice(21)\n",
           "app/util.py": "def twice(x):\n    return 2 * x\n"}


def test_compileall_writes_pycache_with_atomic_renames(build, mounts, tmp_path):
    """Through the Python API this time: Dataset.mount(writable=True) and its handle."""
    vid = build.version(base_spec())
    ds = Dataset.get(vid, repo=build.repo_url)
    mnt = mounts.folder()
    local = copy_of(vid, build.repo_url, tmp_path / "local")
    with ds.mount(mnt, writable=True) as m:
        for root in (mnt, local):
            for rel, text in SOURCES.items():
                os.makedirs(os.path.dirname(root / rel), exist_ok=True)
                (root / rel).write_text(text)
                os.utime(root / rel, (1_700_000_000, 1_700_000_000))
            run(sys.executable, "-m", "compileall", "-q", "app", cwd=root)
        assert tree(mnt) == tree(local)
        # a changed source: its .pyc is rewritten (temp file, then renamed over the old)
        for root in (mnt, local):
            (root / "app/util.py").write_text("def twice(x):\n    return x + x\n")
            os.utime(root / "app/util.py", (1_700_000_100, 1_700_000_100))
            run(sys.executable, "-m", "compileall", "-q", "app", cwd=root)
        assert tree(mnt) == tree(local)
        out = run(sys.executable, "-c", "import app.main; print(app.main.X)", cwd=mnt,
                  env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
        assert out.stdout == "42\n"
        tag = sys.implementation.cache_tag
        assert m.status() == [{"change": "added", "path": p} for p in [
            "app/", "app/__init__.py", "app/__pycache__/",
            f"app/__pycache__/__init__.{tag}.pyc", f"app/__pycache__/main.{tag}.pyc",
            f"app/__pycache__/util.{tag}.pyc", "app/main.py", "app/util.py"]]
        child = m.commit(description="compiled")
        assert m.status() == []
    assert child.parents == [vid]
    copy = copy_of(child.id, build.repo_url, tmp_path / "child")
    assert tree(copy) == tree(local)
