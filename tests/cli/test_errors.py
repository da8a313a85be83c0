"""Bad input: one line on stderr, a non-zero exit, no traceback, and nothing changed.
And the error boundary itself: bugs exit 3, interrupts 130, --debug shows tracebacks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from strata.catalog import ops
from strata.catalog.dataset import Dataset
from strata.catalog.errors import BadArgument
from strata.storage.errors import StrataError

from tests.cli.conftest import assert_error, snapshot, write

UNKNOWN = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def final(run, src):
    return run.version(src)


@pytest.fixture
def unchanged(run, isolated_home):
    """Call with a CLI result: asserts the repository and workspace did not change."""
    before = {}

    def start():
        before.update(snapshot(run.repo_url, isolated_home))

    def check():
        assert snapshot(run.repo_url, isolated_home) == before
    return start, check


def bad(run, unchanged, *args, code=1, contains=""):
    start, check = unchanged
    start()
    result = run(*args, ok=False)
    line = assert_error(result, code=code, contains=contains)
    check()
    return line


def test_unknown_id(run, final, unchanged):
    bad(run, unchanged, "list", "--id", UNKNOWN, contains=f"no version {UNKNOWN}")
    bad(run, unchanged, "add", "--id", UNKNOWN, "--files", ".", contains="no version")
    bad(run, unchanged, "get", "--id", "nonsense", contains="no version nonsense")
    bad(run, unchanged, "compare", "--source", final, "--target", UNKNOWN,
        contains="no version")
    bad(run, unchanged, "publish", "--id", UNKNOWN, contains="no version")


def test_unknown_name(run, final, unchanged):
    bad(run, unchanged, "list", "--project", "p", "--name", "nope", contains="p/nope")
    bad(run, unchanged, "get", "--project", "p", "--name", "n", "--version", "9.9.9",
        contains="no version 9.9.9")
    bad(run, unchanged, "delete", "--project", "p", "--name", "nope", contains="p/nope")
    bad(run, unchanged, "rename", "--project", "p", "--name", "nope", "--new-name", "x",
        contains="p/nope")


def test_adding_to_a_final_version(run, final, src, unchanged):
    line = bad(run, unchanged, "add", "--id", final, "--files", src, contains="is final")
    assert f"--parents {final}" in line
    bad(run, unchanged, "remove", "--id", final, "--files", "a.txt", contains="is final")
    bad(run, unchanged, "close", "--id", final, contains="is final")


def test_missing_source_path(run, src, unchanged, tmp_path):
    vid = run.new_id("create", "--project", "p", "--name", "n")
    missing = tmp_path / "missing"
    bad(run, unchanged, "add", "--files", src / "a.txt", missing, contains=str(missing))
    assert run.files("--id", vid) == {}
    bad(run, unchanged, "sync", "--project", "p", "--name", "s", "--folder", missing,
        contains="does not exist")
    assert [d["id"] for d in json.loads(run("search", "--all", "--json").stdout)] == [vid]


def test_special_files_named_to_add_are_refused(run, unchanged, tmp_path):
    vid = run.new_id("create", "--project", "p", "--name", "n")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for special in ("/dev/null", fifo):   # opening the fifo would wait for a writer
        bad(run, unchanged, "add", "--id", vid, "--files", special,
            contains="not a regular file")
    assert run.files("--id", vid) == {}


def test_names_and_text_that_are_not_utf8_are_refused(run, final, unchanged, tmp_path):
    src = tmp_path / "odd"
    src.mkdir()
    (src / "good.txt").write_text("good")
    open(os.path.join(os.fsencode(src), b"bad\xffname"), "wb").close()
    bad_text = os.fsdecode(b"x\xff")   # as a command line hands it over
    draft = run.new_id("create", "--project", "p", "--name", "n")
    bad(run, unchanged, "add", "--id", draft, "--files", src, contains="not valid UTF-8")
    assert run.files("--id", draft) == {}
    bad(run, unchanged, "sync", "--project", "p", "--name", "s", "--folder", src,
        contains="not valid UTF-8")   # and the draft made for it is gone
    bad(run, unchanged, "create", "--project", bad_text, "--name", "n",
        contains="not valid UTF-8")
    bad(run, unchanged, "tag", "--id", final, "--add", bad_text, contains="not valid UTF-8")
    bad(run, unchanged, "set-description", "--id", final, "--description", bad_text,
        contains="not valid UTF-8")
    bad(run, unchanged, "metadata", "--id", final, "--set", '{"a": NaN}',
        contains="standard JSON")


def test_api_takes_one_tag_or_parent_as_a_string(repo_url, final):
    ds = Dataset.create("n2", "p", parent_datasets=final, dataset_tags="train",
                        repo=repo_url)
    assert ds.tags == ["train"] and ds.parents == [final]


@pytest.mark.parametrize("call, message", [
    (lambda r: Dataset.get(dataset_id=123, repo=r), "dataset_id must be a string"),
    (lambda r: Dataset.get(dataset_project=5, dataset_name=6, repo=r), "project must be"),
    (lambda r: Dataset.create("n", "p", dataset_version=5, repo=r), "semantic version"),
    (lambda r: Dataset.create("n", "p", repo=r).add_files(".", wildcard=5), "wildcard"),
    (lambda r: Dataset.create("n", "p", repo=r).remove_files(5), "a list of them"),
    (lambda r: Dataset.create("n", "p", repo=r).set_metadata([1]), "JSON object"),
])
def test_api_arguments_of_the_wrong_type_are_strata_errors(repo_url, call, message):
    with pytest.raises(StrataError, match=message):
        call(repo_url)


def test_delete_parent_with_children(run, final, tmp_path, unchanged):
    write(tmp_path / "c", "c.txt", "c")
    child = run.version(tmp_path / "c", parents=[final])
    bad(run, unchanged, "delete", "--id", final, contains="--force")
    assert {d["id"] for d in json.loads(run("search", "--json").stdout)} == {final, child}
    run("delete", "--id", final, "--force")   # the child stays, and cannot be read
    for args in (["list", "--id", child], ["log", "--id", child], ["verify", "--id", child]):
        assert_error(run(*args, ok=False),
                     contains=f"version {final}, a parent of {child}, is missing")


def test_non_final_parent(run, unchanged):
    draft = run.new_id("create", "--project", "p", "--name", "n")
    bad(run, unchanged, "create", "--project", "p", "--name", "m", "--parents", draft,
        contains="not final")
    bad(run, unchanged, "create", "--project", "p", "--name", "m", "--parents", UNKNOWN,
        contains="no version")
    bad(run, unchanged, "sync", "--project", "p", "--name", "m", "--folder", ".",
        "--parents", draft, contains="not final")


@pytest.mark.parametrize("parts", [("--part", "2", "--num-parts", "2"), ("--part", "0"),
                                   ("--num-parts", "2"), ("--part", "-1", "--num-parts", "2"),
                                   ("--part", "0", "--num-parts", "0")])
def test_bad_parts(run, final, unchanged, parts, tmp_path):
    bad(run, unchanged, "get", *parts, contains="--part")
    bad(run, unchanged, "get", "--copy", tmp_path / "out", *parts, contains="--part")
    assert not (tmp_path / "out").exists()


def test_non_empty_copy_target(run, final, unchanged, tmp_path):
    out = tmp_path / "out"
    write(out, "keep.txt", "mine")
    bad(run, unchanged, "get", "--copy", out, contains="--overwrite")
    assert os.listdir(out) == ["keep.txt"]
    link = tmp_path / "taken"
    link.mkdir()
    bad(run, unchanged, "get", "--link", link, contains="--overwrite")
    assert not os.path.islink(link)


def test_a_get_that_fails_leaves_no_half_copy(run, final, tmp_path, isolated_home):
    blobs = sorted((Path(run.repo_url) / "blobs").rglob("*"))
    victim = next(b for b in blobs if b.is_file())
    good = victim.read_bytes()
    victim.write_bytes(b"x" + good[1:])
    copies = isolated_home / "cache" / "strata" / "copies"
    dead = copies / f".{final}.999999999.tmp"   # left by a killed get
    dead.mkdir(parents=True)
    out, kept = tmp_path / "new", tmp_path / "empty"
    kept.mkdir()
    for args in (["--copy", out], ["--copy", kept], []):
        assert_error(run("get", "--id", final, *args, ok=False), contains="corrupt")
    assert not out.exists() and os.listdir(kept) == [] and os.listdir(copies) == []
    victim.write_bytes(good)   # the same commands work again, with no --overwrite
    for args in (["--copy", out], ["--copy", kept], []):
        run("get", "--id", final, *args)
    assert (out / "a.txt").read_text() == (kept / "a.txt").read_text() == "alpha\n"


def test_get_never_replaces_the_repository_or_writes_into_it(run, final, unchanged):
    repo = run.repo_url
    bad(run, unchanged, "get", "--id", final, "--link", repo, "--overwrite",
        contains="overlaps the repository")
    bad(run, unchanged, "get", "--id", final, "--copy", os.path.dirname(repo),
        "--overwrite", contains="overlaps")   # the repository, the cache and the workspace
    bad(run, unchanged, "get", "--id", final, "--copy", os.path.join(repo, "copy"),
        contains="overlaps the repository")


def test_bad_metadata_json(run, final, unchanged):
    bad(run, unchanged, "metadata", "--set", "{bad", contains="not valid JSON")
    bad(run, unchanged, "metadata", "--set", "[1, 2]", contains="JSON object")


def test_bad_label_and_taken_label(run, final, unchanged):
    bad(run, unchanged, "create", "--project", "p", "--name", "n", "--version", "v1",
        contains="semantic version")
    bad(run, unchanged, "create", "--project", "p", "--name", "n", "--version", "1.0.0",
        contains="already has version 1.0.0")


def test_rename_to_nothing_and_mount_of_a_draft_are_one_line(run, final, unchanged,
                                                            tmp_path):
    bad(run, unchanged, "rename", "--project", "p", "--name", "n", "--new-name", "",
        contains="the new name is empty")
    bad(run, unchanged, "move", "--project", "p", "--name", "n", "--new-project", "",
        contains="the new project is empty")
    draft = run.new_id("create", "--project", "p", "--name", "n")
    (tmp_path / "mp").mkdir()
    bad(run, unchanged, "mount", "--id", draft, tmp_path / "mp", contains="is a draft")
    with pytest.raises(BadArgument, match="target_folder"):
        Dataset.get(final, repo=run.repo_url).get_mutable_local_copy(None)


def test_close_disable_upload_needs_upload(run, src, unchanged):
    run.new_id("create", "--project", "p", "--name", "n")
    run("add", "--files", src)
    bad(run, unchanged, "close", "--disable-upload", contains="strata upload")


def test_verify_reports_problems(run, final, tmp_path):
    out = tmp_path / "copy"
    run("get", "--copy", out)
    write(out, "a.txt", "tampered")
    os.unlink(out / "d" / "b.txt")
    result = run("verify", "--folder", out, ok=False)
    assert_error(result, contains="2 problems")
    assert sorted(result.stdout.splitlines()) == ["a.txt: size 8, expected 6", "d/b.txt: missing"]
    report = json.loads(run("verify", "--folder", out, "--json", ok=False).stdout)
    assert report["ok"] is False and len(report["problems"]) == 2
    assert_error(run("verify", "--folder", tmp_path / "nowhere", ok=False),
                 contains="nowhere does not exist")   # not each file "missing"


def test_a_history_that_loops_is_refused_not_walked_forever(run, src, unchanged, tmp_path):
    # records altered by hand: the parent now names its own child as its parent
    first = run.version(src)
    second = run.version(src, parents=(first,))
    record = os.path.join("versions", f"{first}.json")
    fields = json.load(open(os.path.join(run.repo_url, record)))
    fields["parents"] = [second]
    write(run.repo_url, record, json.dumps(fields))
    for args in (["list", "--id", second], ["log", "--id", second],
                 ["verify", "--id", second], ["get", "--id", second, "--copy", tmp_path / "x"],
                 ["compare", "--source", first, "--target", second]):
        bad(run, unchanged, *args, contains="is a loop")


def test_usage_errors_exit_2(run, final):
    assert run("create", "--name", "n", ok=False).exit_code == 2           # no --project
    assert run("get", "--copy", "a", "--link", "b", ok=False).exit_code == 2
    assert run("list", "--id", final, "--project", "p", "--name", "n", ok=False).exit_code == 2
    assert run("list", "--project", "p", ok=False).exit_code == 2
    assert run("sync", "--folder", ".", ok=False).exit_code == 2
    assert run("add", ok=False).exit_code == 2
    assert run("no-such-command", ok=False).exit_code == 2
    # an empty --id or --repo (an unset shell variable) is not their default
    for args in (["list", "--id", ""], ["verify", "--id", ""]):
        result = run(*args, ok=False)
        assert result.exit_code == 2 and "'--id': is empty" in result.output


def test_bug_exits_3_with_one_line(run, monkeypatch):
    def boom(*a, **k):
        raise ValueError("kaboom")
    monkeypatch.setattr(ops, "gc", boom)
    result = run("gc", ok=False)
    line = assert_error(result, code=3, contains="ValueError: kaboom")
    assert line.endswith("run with --debug for the traceback")
    debug = run("--debug", "gc", ok=False)
    assert debug.exit_code == 3 and "Traceback" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("strata: error: internal error")


def test_debug_shows_traceback_of_domain_errors(run):
    result = run("--debug", "list", "--id", UNKNOWN, ok=False)
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "UnknownVersion" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("strata: error: no version")


def test_keyboard_interrupt_exits_130(run, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(Dataset, "list_datasets", classmethod(interrupted))
    result = run("search", ok=False)
    assert result.exit_code == 130
    assert result.stderr.splitlines() == ["strata: interrupted"]


def test_os_error_is_one_line(run, final, tmp_path, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))
    monkeypatch.setattr(Dataset, "get_mutable_local_copy", denied)
    assert_error(run("get", "--copy", tmp_path / "x", ok=False),
                 contains=f"Permission denied: {tmp_path / 'x'}")


def test_a_full_workspace_disk_is_named_and_leaves_no_draft(run, tmp_path, monkeypatch):
    # `create` on a full disk: "No space left on device" in one line, exit 1, and no
    # empty draft database left (it said "the draft is damaged", leaving one per try)
    from tests.conftest import small_disk
    small = tmp_path / "small"
    with small_disk(small, "256k"):
        monkeypatch.setenv("XDG_DATA_HOME", str(small))
        drafts = small / "strata" / "workspace" / "drafts"
        drafts.mkdir(parents=True)
        fd = os.open(small / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while os.write(fd, bytes(4096)):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        for _ in range(3):
            r = run("create", "--project", "p", "--name", "n", ok=False)
            assert r.exit_code == 1, r.output
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and "No space left on device" in lines[0], r.stderr
            assert "damaged" not in r.stderr
        assert os.listdir(drafts) == []
