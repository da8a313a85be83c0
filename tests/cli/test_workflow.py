"""The commands end to end through click's CliRunner, on a local repository."""

from __future__ import annotations

import json
import os
from pathlib import Path

from strata.catalog import repo as repo_mod

from tests.cli.conftest import write


def test_full_workflow(run, src, tmp_path):
    vid = run.new_id("create", "--project", "p", "--name", "n", "--tags", "raw", "v1",
                     "--description", "first")
    run("add", "--files", src / "a.txt", src / "d", "--dataset-folder", "data")
    assert run.files("--id", vid) == {"data/a.txt": 6, "data/b.txt": 5, "data/big.bin": 200_000}
    run("close")
    assert run("list", "--id", vid).stdout.splitlines()[0].split() == ["6", "B", "data/a.txt"]

    found = json.loads(run("search", "--json").stdout)
    assert [(d["id"], d["state"], d["files"], d["tags"]) for d in found] == \
        [(vid, "final", 3, ["raw", "v1"])]
    assert vid in run("search").stdout

    out = tmp_path / "copy"
    assert run("get", "--copy", out).stdout.strip() == str(out)
    assert (out / "data" / "big.bin").stat().st_size == 200_000
    assert run("verify").stdout.strip() == "ok: 3 files verified"
    assert run("verify", "--folder", out).stdout.strip() == "ok: 3 files verified"
    assert json.loads(run("verify", "--filesize", "--json").stdout)["ok"] is True

    cached = run("get").stdout.strip()
    assert open(os.path.join(cached, "data", "a.txt")).read() == "alpha\n"

    write(tmp_path / "more", "c.txt", "gamma")
    child = run.new_id("create", "--project", "p", "--name", "n", "--parents", vid)
    run("add", "--files", tmp_path / "more", "--dataset-folder", "data")
    run("remove", "--files", "data/b.txt")
    run("close")
    cmp = json.loads(run("compare", "--source", vid, "--target", child, "--json").stdout)
    assert (cmp["added"], cmp["modified"], cmp["removed"], cmp["unchanged"]) == \
        (["data/c.txt"], [], ["data/b.txt"], 2)
    text = run("compare", "--source", vid, "--target", child, "--verbose").stdout
    assert text.splitlines() == ["D data/b.txt", "A data/c.txt",
                                 "added 1, modified 0, removed 1, unchanged 2"]

    lines = run("log", "--id", child).stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].split()[:5] == [child[:8], "p/n", "1.0.1", "final", "+1"]
    assert lines[0].endswith(f"parents: {vid[:8]}")
    assert lines[1].endswith("parents: -")
    assert [v["id"] for v in json.loads(run("--json", "log").stdout)] == [child, vid]

    modified = run("list", "--modified").stdout.splitlines()
    assert [(line[0], line.split()[-1]) for line in modified] == \
        [("D", "data/b.txt"), ("A", "data/c.txt")]
    rows = json.loads(run("list", "--modified", "--filter", "data/c*", "--json").stdout)
    assert rows == [{"path": "data/c.txt", "size": 5, "change": "added"}]
    assert list(run.files("--filter", "*.bin")) == ["data/big.bin"]


def test_global_and_command_json_agree(run, src):
    vid = run.version(src)
    assert json.loads(run("--json", "search").stdout) == json.loads(run("search", "--json").stdout)
    assert json.loads(run("--json", "list", "--id", vid).stdout)[0]["path"] == "a.txt"


def test_add_wildcard_non_recursive_and_links(run, src, tmp_path):
    run.new_id("create", "--project", "p", "--name", "n")
    run("add", "--files", src, "--wildcard", "*.txt")
    assert sorted(run.files()) == ["a.txt", "d/b.txt"]
    run("add", "--files", src, "--non-recursive", "--dataset-folder", "flat")
    assert "flat/a.txt" in run.files() and "flat/d/b.txt" not in run.files()
    ext = write(tmp_path / "ext", "remote.bin", b"x" * 1000)
    run("add", "--links", "file://" + ext, "--dataset-folder", "links")
    run("close")
    assert run.files()["links/remote.bin"] == 1000
    assert run("verify", "--filesize").stdout.startswith("ok:")


def test_upload_then_close_disable_upload(run, src):
    vid = run.new_id("create", "--project", "p", "--name", "n")
    run("add", "--files", src)
    run("upload")
    run("close", "--disable-upload")
    assert json.loads(run("search", "--json").stdout)[0]["id"] == vid


def test_sync_creates_child_of_latest(run, src, tmp_path):
    first = run.new_id("sync", "--project", "p", "--name", "n", "--folder", src)
    os.unlink(src / "a.txt")
    write(src, "d/b.txt", "changed")
    write(src, "new.txt", "new")
    result = run("sync", "--project", "p", "--name", "n", "--folder", src)
    second = result.stdout.splitlines()[-1]
    assert result.stdout.splitlines() == [second]  # only the id on stdout
    assert "removed 1, added 1, modified 1" in result.stderr
    log = json.loads(run("log", "--id", second, "--json").stdout)
    assert [v["id"] for v in log] == [second, first]
    assert log[0]["parents"] == [first] and log[0]["version"] == "1.0.1"
    assert sorted(run.files("--id", second)) == ["d/b.txt", "d/big.bin", "new.txt"]


def test_sync_skip_close_then_sync_into_draft(run, src, tmp_path):
    vid = run.new_id("sync", "--project", "p", "--name", "n", "--folder", src, "--skip-close")
    assert json.loads(run("search", "--all", "--json").stdout)[0]["state"] == "draft"
    other = tmp_path / "other"
    write(other, "only.txt", "x")
    assert run.new_id("sync", "--id", vid, "--folder", other) == vid
    assert list(run.files("--id", vid)) == ["only.txt"]
    assert json.loads(run("search", "--json").stdout)[0]["state"] == "final"


def test_squash(run, src, tmp_path):
    a = run.version(src)
    write(tmp_path / "b", "extra.txt", "e")
    b = run.version(tmp_path / "b", parents=[a])
    result = run("squash", "--name", "flat", "--ids", a, b, "--version", "2.0.0")
    flat = result.stdout.splitlines()[-1]
    assert result.stdout.splitlines() == [flat]
    d = json.loads(run("search", "--name", "flat", "--json").stdout)[0]
    assert (d["id"], d["version"], d["parents"], d["files"]) == (flat, "2.0.0", [], 4)


def test_delete_force_and_entire_dataset(run, src, tmp_path):
    parent = run.version(src)
    write(tmp_path / "c", "c.txt", "c")
    child = run.version(tmp_path / "c", parents=[parent])
    assert run("delete", "--id", parent, "--force").stdout.strip() == f"deleted {parent}"
    assert [d["id"] for d in json.loads(run("search", "--json").stdout)] == [child]
    run("delete", "--project", "p", "--name", "n", "--entire-dataset")
    assert json.loads(run("search", "--json").stdout) == []


def test_delete_draft_by_id(run):
    vid = run.new_id("create", "--project", "p", "--name", "n")
    run("delete", "--id", vid)
    assert json.loads(run("search", "--all", "--json").stdout) == []


def test_get_parts_cover_the_version(run, tmp_path):
    for i in range(12):
        write(tmp_path / "s", f"f{i:02}.txt", "x" * (100 * (i + 1)))
    vid = run.version(tmp_path / "s")
    got = []
    for k in range(3):
        out = tmp_path / f"part{k}"
        run("get", "--id", vid, "--copy", out, "--part", k, "--num-parts", 3)
        got.append(sorted(os.listdir(out)))
        cached = run("get", "--id", vid, "--part", k, "--num-parts", 3).stdout.strip()
        assert sorted(os.listdir(cached)) == got[-1]
    assert all(got)
    assert sorted(sum(got, [])) == [f"f{i:02}.txt" for i in range(12)]


def test_get_link_and_overwrite(run, src, tmp_path):
    vid = run.version(src)
    link = tmp_path / "link"
    assert run("get", "--link", link).stdout.strip() == str(link)
    assert os.path.islink(link) and (link / "a.txt").read_text() == "alpha\n"
    run("get", "--link", link, "--overwrite")
    assert os.path.islink(link)
    out = tmp_path / "copy"
    run("get", "--copy", out)
    write(out, "stray.txt", "s")
    run("get", "--id", vid, "--copy", out, "--overwrite")
    assert not (out / "stray.txt").exists()


def test_tags_description_metadata_publish(run, src):
    vid = run.version(src)
    assert run("tag", "--add", "a", "b", "--remove", "a").stdout.split() == ["b"]
    run("set-description", "--description", "hello")
    run("metadata", "--set", '{"k": 1, "j": [1, 2]}')
    run("metadata", "--set", '{"m": true}', "--merge")
    assert json.loads(run("metadata").stdout) == {"k": 1, "j": [1, 2], "m": True}
    run("publish", "--id", vid)
    d = json.loads(run("search", "--json").stdout)[0]
    assert (d["state"], d["tags"], d["description"]) == ("published", ["b"], "hello")


def test_rename_and_move(run, src):
    vid = run.version(src)
    run("rename", "--project", "p", "--name", "n", "--new-name", "m")
    run("move", "--project", "p", "--name", "m", "--new-project", "q")
    d = json.loads(run("search", "--json").stdout)[0]
    assert (d["id"], d["project"], d["name"]) == (vid, "q", "m")
    assert list(run.files("--project", "q", "--name", "m")) == ["a.txt", "d/b.txt", "d/big.bin"]


def test_gc_dry_run_and_json(run, src):
    run.version(src)
    assert run("gc", "--grace", "0", "--dry-run").stdout.startswith("would remove 0 blobs")
    found = json.loads(run("gc", "--grace", "0", "--json").stdout)
    assert found == {"dry_run": False, "blobs": 0, "bytes": 0, "manifests": 0}


def test_repo_init(tmp_path, run):
    target = tmp_path / "fresh"
    url = run("repo", "init", target, "--chunk-size", "1M", repo=False).stdout.strip()
    assert url.endswith("fresh")
    assert json.loads((target / "strata.json").read_text())["chunk_size"] == 1 << 20


def test_embedded_repository_by_default(src):
    from click.testing import CliRunner
    from strata.cli.main import cli
    runner = CliRunner()
    vid = runner.invoke(cli, ["create", "--project", "p", "--name", "n"]).stdout.strip()
    assert runner.invoke(cli, ["add", "--files", str(src)]).exit_code == 0
    assert runner.invoke(cli, ["close"]).exit_code == 0
    repo_mod._repos.clear()
    found = json.loads(runner.invoke(cli, ["search", "--json"]).stdout)
    assert [d["id"] for d in found] == [vid]


def test_cache_info_counts_and_clear_removes_the_copies_get_made(run, src):
    vid = run.version(src)
    where = run("get", "--id", vid).stdout.strip()
    info = json.loads(run("cache", "info", "--json").stdout)
    size = sum(f.stat().st_size for f in Path(src).rglob("*") if f.is_file())
    assert info["copies"] == 1 and info["copies_bytes"] == size
    assert "copies: 1 version got with `strata get`" in run("cache", "info").stdout
    assert "(copies: " in run("cache", "clear").output
    assert not os.path.exists(where)
    assert json.loads(run("cache", "info", "--json").stdout)["copies"] == 0
    assert run("get", "--id", vid).stdout.strip() == where   # made again when asked
    assert (Path(where) / "a.txt").read_text() == "alpha\n"


def test_control_characters_in_names_are_escaped_in_listings(run, tmp_path):
    # a newline or an escape sequence in a file, dataset or tag name cannot split a row or
    # steer the terminal; --json keeps the names exact
    src = tmp_path / "odd"
    src.mkdir()
    (src / "two\nlines.txt").write_bytes(b"x")
    (src / "red\x1b[31m.txt").write_bytes(b"y")
    vid = run.version(src, name="multi\nline")
    listed = run("list", "--id", vid).stdout.splitlines()
    assert [line.split("  ")[-1] for line in listed if ".txt" in line] == [
        "red\\x1b[31m.txt", "two\\nlines.txt"]
    assert "\x1b" not in run("list", "--id", vid).stdout
    rows = run("search").stdout.splitlines()
    assert len(rows) == 2 and "multi\\nline" in rows[1]
    assert run("tag", "--id", vid, "--add", "a\tb").stdout.splitlines() == ["a\\tb"]
    assert {r["path"] for r in json.loads(run("list", "--json", "--id", vid).stdout)} == {
        "two\nlines.txt", "red\x1b[31m.txt"}


def test_get_copies_a_file_whose_name_is_255_bytes(run, tmp_path):
    src = tmp_path / "long"
    src.mkdir()
    name = "n" * 251 + ".bin"                 # NAME_MAX: no room for a temp suffix
    (src / name).write_bytes(b"long name\n")
    vid = run.version(src)
    run("get", "--id", vid, "--copy", tmp_path / "copy")
    assert (tmp_path / "copy" / name).read_bytes() == b"long name\n"
    assert os.listdir(tmp_path / "copy") == [name]
