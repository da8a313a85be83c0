"""The installed entry point in real subprocesses: exit codes, stderr one-liners, and the
new id alone on the last line of stdout."""

from __future__ import annotations

import json
import re

from tests.cli.conftest import run_process

ID = re.compile(r"^[0-9a-f]{32}$")


def test_workflow_in_subprocesses(isolated_home, repo_url, src, tmp_path):
    def strata(*args):
        return run_process(*args, env_home=isolated_home, repo_url=repo_url)

    created = strata("create", "--project", "p", "--name", "n")
    assert created.returncode == 0, created.stderr
    assert len(created.stdout.splitlines()) == 1 and ID.match(created.stdout.strip())
    vid = created.stdout.strip()
    assert strata("add", "--files", str(src)).returncode == 0
    closed = strata("close")
    assert closed.returncode == 0 and closed.stdout == ""
    assert "\x1b" not in closed.stderr and "\r" not in closed.stderr  # no bars when piped
    (tmp_path / "next").mkdir()
    (tmp_path / "next" / "only.txt").write_text("only")
    synced = strata("sync", "--project", "p", "--name", "n", "--folder", str(tmp_path / "next"))
    assert synced.returncode == 0, synced.stderr
    assert ID.match(synced.stdout.splitlines()[-1])
    log = json.loads(strata("log", "--json").stdout)
    assert [v["parents"] for v in log] == [[vid], []]


def test_errors_in_subprocesses(isolated_home, repo_url):
    def strata(*args):
        return run_process(*args, env_home=isolated_home, repo_url=repo_url)

    unknown = strata("list", "--id", "f" * 32)
    assert unknown.returncode == 1
    assert unknown.stderr.splitlines() == [f"strata: error: no version {'f' * 32} in "
                                           f"file://{repo_url}"]
    assert unknown.stdout == ""
    none = strata("upload")
    assert none.returncode == 1 and len(none.stderr.splitlines()) == 1
    assert "pass --id" in none.stderr
    usage = strata("create", "--name", "n")
    assert usage.returncode == 2 and "Missing option '--project'" in usage.stderr


BUG = """
import sys
from strata.catalog import ops
from strata.cli.main import main
def fail(*a, **k):
    raise {exc}
ops.gc = fail
sys.argv[0] = "strata"
main()
"""


def test_bug_and_interrupt_exit_codes(isolated_home, repo_url):
    bug = run_process("gc", env_home=isolated_home, repo_url=repo_url,
                      code=BUG.format(exc="RuntimeError('oops')"))
    assert bug.returncode == 3
    assert bug.stderr.splitlines() == ["strata: error: internal error (RuntimeError: oops); "
                                       "run with --debug for the traceback"]
    debug = run_process("--debug", "gc", env_home=isolated_home, repo_url=repo_url,
                        code=BUG.format(exc="RuntimeError('oops')"))
    assert debug.returncode == 3 and "Traceback (most recent call last)" in debug.stderr
    interrupted = run_process("gc", env_home=isolated_home, repo_url=repo_url,
                              code=BUG.format(exc="KeyboardInterrupt"))
    assert interrupted.returncode == 130
    assert interrupted.stderr.splitlines() == ["strata: interrupted"]
