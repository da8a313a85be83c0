"""Damaged files strata reads: a version record, the repository's strata.json, the user's
config file and the remembered state. Each is one line on stderr and exit 1, or, where the
file is only a convenience (the remembered id) or one of many (a listing), no failure."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from strata.catalog import config
from strata.catalog.repo import open_repo

from tests.cli.conftest import assert_error, run_process, snapshot, write

DAMAGE = {
    "empty": b"",
    "cut short": None,   # the first half of the real record
    "empty object": b"{}",
    "a list": b"[1, 2]",
    "wrong types": b'{"id": 5, "project": "p", "name": "n", "version": "1.0.0", '
                   b'"parents": [1]}',
}


@pytest.fixture(params=DAMAGE)
def damaged(request, run, src, tmp_path):
    """(damaged id, intact id): two final versions, the first one's record damaged."""
    vid = run.version(src, name="hurt")
    write(tmp_path / "o", "o.txt", "o")
    other = run.version(tmp_path / "o", name="whole")
    path = os.path.join(run.repo_url, "versions", f"{vid}.json")
    with open(path, "rb") as f:
        good = f.read()
    data = DAMAGE[request.param]
    with open(path, "wb") as f:
        f.write(good[:len(good) // 2] if data is None else data)
    return vid, other


def test_listings_skip_a_damaged_record_with_a_warning(run, damaged, caplog):
    vid, other = damaged
    with caplog.at_level(logging.WARNING):
        found = json.loads(run("search", "--json").stdout)
    assert [d["id"] for d in found] == [other]
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"skipping version {vid}: its record is damaged: ")
    assert json.loads(run("search", "--json", "--project", "p", "--name", "hurt").stdout) == []


def test_the_warning_is_one_line_on_stderr(run, damaged, isolated_home):
    vid, other = damaged
    result = run_process("search", env_home=isolated_home, repo_url=run.repo_url)
    assert result.returncode == 0, result.stderr
    assert other in result.stdout and vid not in result.stdout
    warning, summary = result.stderr.splitlines()
    assert warning.startswith(f"skipping version {vid}: its record is damaged: ")
    assert summary == "1 version found"


def test_a_command_on_the_damaged_version_fails_with_one_line(run, damaged, src):
    vid, other = damaged
    for args in (("list", "--id", vid), ("get", "--id", vid), ("log", "--id", vid),
                 ("create", "--project", "p", "--name", "c", "--parents", vid)):
        assert_error(run(*args, ok=False), contains=f"versions/{vid}.json is damaged: ")
    assert run.files("--id", other) == {"o.txt": 1}


def test_delete_and_gc_refuse_rather_than_lose_the_damaged_versions_blobs(
        run, damaged, isolated_home):
    _, other = damaged
    before = snapshot(run.repo_url, isolated_home)
    assert_error(run("delete", "--id", other, ok=False), contains="is damaged: ")
    assert_error(run("gc", ok=False), contains="is damaged: ")
    assert snapshot(run.repo_url, isolated_home) == before


# ---- the repository's strata.json ------------------------------------------------------
@pytest.mark.parametrize("change", [
    lambda m: [],
    lambda m: {**m, "chunk_size": "x"},
    lambda m: {k: v for k, v in m.items() if k != "chunk_size"},
    lambda m: {**m, "chunk_size": 1},
    lambda m: {**m, "chunk_size": 5 << 40},
    lambda m: {**m, "pack_size": True},
], ids=["a list", "chunk size not a number", "no chunk size", "1-byte chunks",
        "5 TiB chunks", "pack size not a number"])
def test_a_damaged_repository_marker_is_one_line_naming_it(run, change):
    path = os.path.join(run.repo_url, "strata.json")
    with open(path) as f:
        marker = json.load(f)
    with open(path, "w") as f:
        json.dump(change(marker), f)
    assert_error(run("search", ok=False), contains="/strata.json")


@pytest.mark.parametrize("option, size", [
    ("--chunk-size", "0"), ("--chunk-size", "1"), ("--chunk-size", "5T"), ("--chunk-size", "2G"),
    ("--pack-size", "1K"), ("--pack-size", "5T")])
def test_init_refuses_unusable_sizes(run, tmp_path, option, size):
    target = tmp_path / "new"
    assert_error(run("repo", "init", option, size, target, ok=False, repo=False),
                 contains="out of range")
    assert not target.exists()


def test_init_takes_the_bounds(run, tmp_path):
    run("repo", "init", "--chunk-size", "64K", "--pack-size", "1G", tmp_path / "a", repo=False)
    run("repo", "init", "--chunk-size", "1G", "--pack-size", "64K", tmp_path / "b", repo=False)


# ---- the user's config file ------------------------------------------------------------
@pytest.mark.parametrize("text, contains", [
    ("cache_dir = 5\n", "cache_dir"),
    ("repo = true\n", "repo"),
    ('cache_size = "lots"\n', "cache_size"),
    ("cache_size = -1\n", "cache_size"),
    (b'cache_size = "1G"\nrepo = "\xff\xfe"\n', "line 2 is not UTF-8"),
])
def test_a_bad_config_file_is_one_line_naming_file_and_key(run, isolated_home, text,
                                                           contains):
    path = write(isolated_home / "config", "strata/config.toml", text)
    line = assert_error(run("search", ok=False), contains=contains)
    assert path in line


def test_a_good_config_file_is_used(run, isolated_home, tmp_path):
    write(isolated_home / "config", "strata/config.toml",
          f'cache_dir = "{tmp_path / "c"}"\ncache_size = "2G"\n')
    cfg = config.load()
    assert (cfg.cache_dir, cfg.cache_size) == (tmp_path / "c", 2 << 30)


# ---- the remembered state --------------------------------------------------------------
def _state_path():
    return config.workspace_dir() / "state.json"


@pytest.mark.parametrize("text", ["[]", '{"last": 5}', '{"last": {"x": 5}}', "{garbage",
                                  "\xff"])
def test_damaged_remembered_state_counts_as_none(run, src, text):
    write(config.workspace_dir(), "state.json", text)
    assert_error(run("list", ok=False), contains="pass --id")
    vid = run.new_id("create", "--project", "p", "--name", "n")
    run("add", "--files", src)
    assert config.last_touched(open_repo(run.repo_url).url) == vid


def test_remembering_is_best_effort(run, src):
    """Saving the remembered id fails (here: state.json is a folder, as a read-only
    workspace fails it): the command still succeeds, and leaves no temporary file."""
    vid = run.version(src)
    os.unlink(_state_path())
    _state_path().mkdir()
    assert run.files("--id", vid) == {"a.txt": 6, "d/b.txt": 5, "d/big.bin": 200_000}
    assert os.path.isdir(run("get", "--id", vid).stdout.strip())
    run("create", "--project", "p", "--name", "other")
    assert sorted(os.listdir(config.workspace_dir())) == ["drafts", "state.json"]


def test_a_damaged_draft_database_is_one_line_and_can_be_deleted(run, isolated_home):
    # in processes of their own, as a user meets it (this one keeps its drafts open)
    def cli(*args):
        return run_process(*args, env_home=isolated_home, repo_url=run.repo_url)

    broken = run.new_id("create", "--project", "p", "--name", "a")
    fine = run.new_id("create", "--project", "p", "--name", "b")
    db = config.workspace_dir() / "drafts" / f"{broken}.db"
    for extra in ("-wal", "-shm"):
        Path(f"{db}{extra}").unlink(missing_ok=True)
    db.write_bytes(b"not a database" * 99)
    listed = cli("search", "--all", "--json")
    assert [d["id"] for d in json.loads(listed.stdout)] == [fine]   # the others still are
    assert f"draft {broken}" in listed.stderr and listed.stderr.count("\n") == 1
    for args in (["add", "--id", broken, "--files", "."], ["list", "--id", broken]):
        r = cli(*args)
        assert r.returncode == 1 and r.stderr.count("\n") == 1
        assert f"remove it with 'strata delete --id {broken}'" in r.stderr
    assert cli("delete", "--id", broken).returncode == 0
    assert not db.exists()
    assert [d["id"] for d in json.loads(cli("search", "--all", "--json").stdout)] == [fine]
