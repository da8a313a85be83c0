"""Fixtures for driving the real CLI: an isolated home per test, a small-chunk repository,
and `run` (click's CliRunner) with helpers to check outputs and that nothing changed."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys

import pytest

from tests.conftest import isolate_home
from click.testing import CliRunner
from strata.catalog import config
from strata.catalog.repo import Repository
from strata.cli.main import cli

ENV_VARS = ("STRATA_REPO", "STRATA_CACHE_DIR", "STRATA_CACHE_SIZE", "STRATA_CONFIG")


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    yield from isolate_home(tmp_path, monkeypatch)


@pytest.fixture
def repo_url(tmp_path):
    """A local repository with small chunks and packs, so tests exercise both cheaply."""
    url = str(tmp_path / "repo")
    Repository.open(url, create=True, chunk_size=64 * 1024, pack_size=256 * 1024)
    return url


class Runner:
    """Runs `strata --repo <repo_url> ARGS` in-process and returns click's Result."""

    def __init__(self, repo_url: str):
        self.repo_url = repo_url
        self.runner = CliRunner()

    def __call__(self, *args: str, ok: bool = True, repo: bool = True):
        argv = (["--repo", self.repo_url] if repo else []) + [str(a) for a in args]
        result = self.runner.invoke(cli, argv)
        if ok:
            assert result.exit_code == 0, (argv, result.output, result.exception)
        return result

    def new_id(self, *args: str, **kwargs) -> str:
        """Run a command that creates a version; its id is alone on stdout's last line."""
        result = self(*args, **kwargs)
        last = result.stdout.splitlines()[-1]
        assert len(last) == 32 and all(c in "0123456789abcdef" for c in last), result.stdout
        return last

    def version(self, src, project="p", name="n", parents=()) -> str:
        """A final version holding the files of `src`."""
        args = ["create", "--project", project, "--name", name]
        if parents:
            args += ["--parents", *parents]
        vid = self.new_id(*args)
        self("add", "--id", vid, "--files", src)
        self("close", "--id", vid)
        return vid

    def files(self, *selector: str) -> dict[str, int]:
        out = self("list", "--json", *selector).stdout
        import json
        return {row["path"]: row["size"] for row in json.loads(out)}


@pytest.fixture
def run(repo_url) -> Runner:
    return Runner(repo_url)


def write(root, rel, data) -> str:
    path = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


@pytest.fixture
def src(tmp_path):
    """A small source folder: two small files and one file of several chunks."""
    root = tmp_path / "src"
    write(root, "a.txt", "alpha\n")
    write(root, "d/b.txt", "beta\n")
    write(root, "d/big.bin", os.urandom(200_000))
    return root


def assert_error(result, code: int = 1, contains: str = "") -> str:
    """One line on stderr starting with 'strata: error:', no traceback, exit `code`."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("strata: error: "), lines[0]
    assert "Traceback" not in result.output
    assert contains in lines[0], lines[0]
    return lines[0]


def snapshot(repo_url: str, home) -> dict:
    """Everything a command could change: repository objects, drafts, the remembered id."""
    state = {}
    for base, label in ((repo_url, "repo"), (str(home / "data"), "data"),
                        (str(home / "config"), "config")):  # the cache may fill on reads
        for dirpath, _, names in os.walk(base):
            for n in names:
                full = os.path.join(dirpath, n)
                rel = os.path.relpath(full, base)
                if label == "data" and n.endswith((".db", "-wal", "-shm")):
                    continue  # drafts: compared by content below
                with open(full, "rb") as f:
                    state[f"{label}/{rel}"] = hashlib.sha256(f.read()).hexdigest()
    drafts = config.workspace_dir() / "drafts"
    for p in sorted(drafts.glob("*.db")) if drafts.exists() else ():
        db = sqlite3.connect(str(p))
        try:
            state[f"draft/{p.stem}"] = [
                db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                for t in ("meta", "entries", "removed", "dirs")]
        finally:
            db.close()
    return state


def run_process(*args: str, env_home, repo_url: str | None = None, code: str | None = None):
    """The CLI in a real subprocess (`python -m strata.cli.main`, or `python -c code`)."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    for var, sub in (("XDG_DATA_HOME", "data"), ("XDG_CACHE_HOME", "cache"),
                     ("XDG_CONFIG_HOME", "config")):
        env[var] = str(env_home / sub)
    argv = (["--repo", repo_url] if repo_url else []) + list(args)
    cmd = [sys.executable, "-c", code, *argv] if code else \
        [sys.executable, "-m", "strata.cli.main", *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
