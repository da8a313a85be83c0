import os

import pytest

from strata.catalog import Dataset
from strata.catalog.errors import (InvalidPath, LabelTaken, NothingMatched, SourceChanged,
                                   SourceMissing, UnknownVersion, WrongState)
from tests.catalog.conftest import tree, write


def make_source(root):
    write(root, "a.txt", "alpha")
    write(root, "sub/b.bin", os.urandom(10_000))
    write(root, "sub/deep/c.bin", os.urandom(200_000))   # > chunk size: chunked
    write(root, "sub/deep/zero", b"")
    os.makedirs(os.path.join(root, "empty/dir"))
    os.symlink("a.txt", os.path.join(root, "link-to-a"))
    return tree(root)


def test_round_trip_create_add_close_get(tmp_path, repo_url):
    src = tmp_path / "src"
    expected = make_source(src)
    ds = Dataset.create("mnist", "vision", repo=repo_url)
    assert ds.state == "draft" and ds.version == "1.0.0"
    assert ds.add_files(src) == 5
    ds.finalize(auto_upload=True)
    assert ds.is_final()

    got = Dataset.get(ds.id, repo=repo_url)
    assert got.state == "final"
    assert got.list_files() == sorted(expected)
    out = tmp_path / "out"
    got.get_mutable_local_copy(out)
    assert tree(out) == expected
    assert os.path.isdir(out / "empty" / "dir")
    assert os.path.islink(out / "link-to-a")


def test_get_by_name_picks_highest_version(tmp_path, repo_url):
    write(tmp_path / "s", "f", "1")
    ids = []
    for _ in range(3):
        ds = Dataset.create("n", "p", parent_datasets=ids[-1:], repo=repo_url)
        write(tmp_path / "s", "f", f"v{len(ids)}")
        ds.add_files(tmp_path / "s")
        ds.finalize(auto_upload=True)
        ids.append(ds.id)
    latest = Dataset.get(dataset_project="p", dataset_name="n", repo=repo_url)
    assert latest.id == ids[-1] and latest.version == "1.0.2"
    assert Dataset.get(dataset_project="p", dataset_name="n", dataset_version="1.0.0",
                       repo=repo_url).id == ids[0]
    with pytest.raises(UnknownVersion):
        Dataset.get(dataset_project="p", dataset_name="n", only_published=True, repo=repo_url)
    Dataset.get(ids[1], repo=repo_url).publish()
    assert Dataset.get(dataset_project="p", dataset_name="n", only_published=True,
                       repo=repo_url).id == ids[1]


def test_explicit_version_wins_and_taken_label_is_refused(tmp_path, repo_url):
    write(tmp_path / "s", "f", "x")
    ds = Dataset.create("n", "p", dataset_version="2.3.4", repo=repo_url)
    ds.add_files(tmp_path / "s")
    ds.finalize(auto_upload=True)
    assert ds.version == "2.3.4"
    with pytest.raises(LabelTaken):
        Dataset.create("n", "p", dataset_version="2.3.4", repo=repo_url)
    assert Dataset.create("n", "p", repo=repo_url).version == "2.3.5"


def test_an_explicit_version_taken_while_the_draft_was_open_is_said(tmp_path, repo_url,
                                                                     caplog):
    write(tmp_path / "s", "f", "x")
    first, second = (Dataset.create("n", "p", dataset_version="2.0.0", repo=repo_url)
                     for _ in range(2))   # both open before either is closed
    for ds in (first, second):
        ds.add_files(tmp_path / "s")
    with caplog.at_level("WARNING", logger="strata.catalog"):
        first.finalize(auto_upload=True)
        assert not caplog.records
        second.finalize(auto_upload=True)
    assert (first.version, second.version) == ("2.0.0", "2.0.1")
    assert [r.getMessage() for r in caplog.records] == [
        "p/n 2.0.0 was taken by another version while this draft was open; it is 2.0.1"]


def test_final_version_refuses_changes(tmp_path, repo_url):
    write(tmp_path / "s", "f", "x")
    ds = Dataset.create("n", "p", repo=repo_url)
    ds.add_files(tmp_path / "s")
    ds.finalize(auto_upload=True)
    before = ds.list_files()
    with pytest.raises(WrongState):
        ds.add_files(tmp_path / "s")
    with pytest.raises(WrongState):
        ds.remove_files("f")
    assert Dataset.get(ds.id, repo=repo_url).list_files() == before


def test_parent_must_be_final(tmp_path, repo_url):
    draft = Dataset.create("n", "p", repo=repo_url)
    with pytest.raises(WrongState, match="not final"):
        Dataset.create("n2", "p", parent_datasets=[draft.id], repo=repo_url)
    with pytest.raises(UnknownVersion):
        Dataset.create("n2", "p", parent_datasets=["f" * 32], repo=repo_url)


def test_missing_source_and_hostile_dataset_path(tmp_path, repo_url):
    ds = Dataset.create("n", "p", repo=repo_url)
    with pytest.raises(SourceMissing):
        ds.add_files(tmp_path / "nope")
    write(tmp_path / "s", "f", "x")
    for bad in ("../up", "/abs", "a/../../b"):
        with pytest.raises(InvalidPath):
            ds.add_files(tmp_path / "s", dataset_path=bad)
    assert ds.list_files() == []


def test_file_changed_between_add_and_upload_is_refused(tmp_path, repo_url):
    src = tmp_path / "s"
    write(src, "keep", "k")
    path = write(src, "changes", "before")
    ds = Dataset.create("n", "p", repo=repo_url)
    ds.add_files(src)
    write(src, "changes", "after!")
    with pytest.raises(SourceChanged, match="changes"):
        ds.finalize(auto_upload=True)
    assert not ds.is_final()
    os.unlink(path)
    write(src, "changes", "again")
    ds.add_files(src)
    ds.finalize(auto_upload=True)
    out = tmp_path / "o"
    ds.get_mutable_local_copy(out)
    assert tree(out) == {"keep": b"k", "changes": b"again"}


def test_file_vanished_before_upload_is_refused(tmp_path, repo_url):
    src = tmp_path / "s"
    path = write(src, "gone", "x" * 100)
    ds = Dataset.create("n", "p", repo=repo_url)
    ds.add_files(src)
    os.unlink(path)
    with pytest.raises(SourceChanged, match="vanished") as e:
        ds.upload()
    assert "strata remove --files gone" in str(e.value)   # which does it
    ds.remove_files("gone")
    ds.finalize(auto_upload=True)
    assert ds.list_files() == []


def test_large_file_changed_is_refused(tmp_path, repo_url):
    src = tmp_path / "s"
    write(src, "big", os.urandom(300_000))
    ds = Dataset.create("n", "p", repo=repo_url)
    ds.add_files(src)
    with open(src / "big", "r+b") as f:
        f.seek(200_000)
        f.write(b"X")
    with pytest.raises(SourceChanged):
        ds.upload()


def test_remove_folder_with_trailing_slash_and_wildcards(tmp_path, repo_url):
    src = tmp_path / "s"
    for rel in ("data/jsons/a.json", "data/jsons/b.json", "data/img/x.jpg", "data/img/y.jpg",
                "top.jpg", "readme.md"):
        write(src, rel, rel)
    base = Dataset.create("n", "p", repo=repo_url)
    base.add_files(src)
    base.finalize(auto_upload=True)

    child = Dataset.create("n", "p", parent_datasets=[base.id], repo=repo_url)
    assert child.remove_files("data/jsons/") == 2      # ClearML's trap: matches nothing there
    assert child.remove_files("*.jpg") == 3
    with pytest.raises(NothingMatched):
        child.remove_files("nothing-*.txt")
    child.finalize()
    assert child.list_files() == ["readme.md"]
    assert sorted(child.list_removed_files()) == sorted(
        ["data/jsons/a.json", "data/jsons/b.json", "data/img/x.jpg", "data/img/y.jpg",
         "top.jpg"])
    # the parent is untouched
    assert len(Dataset.get(base.id, repo=repo_url).list_files()) == 6
