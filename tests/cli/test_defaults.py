"""The --id default: the last dataset this user touched in this repository."""

from __future__ import annotations

import json

from strata.catalog import config
from strata.catalog.repo import open_repo

from tests.cli.conftest import assert_error, write


def test_last_created_is_the_default(run, src):
    vid = run.new_id("create", "--project", "p", "--name", "n")
    run("add", "--files", src)          # no --id anywhere
    run("close")
    assert json.loads(run("search", "--json").stdout)[0]["id"] == vid
    assert config.last_touched(open_repo(run.repo_url).url) == vid


def test_selecting_a_dataset_remembers_it(run, src, tmp_path):
    first = run.version(src)
    write(tmp_path / "o", "o.txt", "o")
    second = run.version(tmp_path / "o", name="other")
    assert list(run.files()) == ["o.txt"]      # the last one closed
    run("list", "--id", first)                  # selecting remembers
    assert list(run.files()) == ["a.txt", "d/b.txt", "d/big.bin"]
    assert config.last_touched(open_repo(run.repo_url).url) == first
    del second


def test_name_selector_ignores_the_remembered_id(run, src, tmp_path):
    first = run.version(src, name="one")
    write(tmp_path / "o", "o.txt", "o")
    second = run.version(tmp_path / "o", name="two")
    assert config.last_touched(open_repo(run.repo_url).url) == second
    assert list(run.files("--project", "p", "--name", "one")) == ["a.txt", "d/b.txt", "d/big.bin"]
    lines = run("log", "--project", "p", "--name", "one").stdout.splitlines()
    assert lines[0].startswith(first[:8])
    out = run("get", "--project", "p", "--name", "one", "--version", "1.0.0").stdout.strip()
    assert out.endswith(first)


def test_failed_command_does_not_move_the_default(run, src):
    vid = run.version(src)
    draft = run.new_id("create", "--project", "p", "--name", "n")
    result = run("add", "--id", vid, "--files", src, ok=False)  # vid is final
    assert_error(result, contains="is final")
    assert config.last_touched(open_repo(run.repo_url).url) == draft


def test_no_id_and_none_remembered(run):
    result = run("add", "--files", ".", ok=False)
    assert_error(result, contains="pass --id")
    assert_error(run("list", ok=False), contains="pass --id")
    assert_error(run("delete", ok=False), contains="pass --id")


def test_remembered_id_deleted(run, src):
    vid = run.version(src)
    run("delete", "--id", vid)
    assert_error(run("list", ok=False), contains=f"last dataset you used ({vid}) no longer")


def test_defaults_are_per_repository(run, src, tmp_path):
    run.version(src)
    other = str(tmp_path / "other-repo")
    run("repo", "init", other, repo=False)
    result = run("--repo", other, "list", repo=False, ok=False)
    assert_error(result, contains="pass --id")
