import os


from strata.catalog import Dataset, blobs
from strata.catalog.ops import compare, squash
from tests.catalog.conftest import tree, write


def version(repo_url, src, files, parents=(), name="n", remove=()):
    for rel, data in files.items():
        write(src, rel, data)
    ds = Dataset.create(name, "p", parent_datasets=list(parents), repo=repo_url)
    if files:
        ds.add_files(src)
    for r in remove:
        ds.remove_files(r)
    ds.finalize(auto_upload=True)
    return ds


def materialize(ds, tmp_path, name):
    out = tmp_path / name
    ds.get_mutable_local_copy(out)
    return tree(out)


def test_two_parents_later_wins_then_own_changes(tmp_path, repo_url):
    a = version(repo_url, tmp_path / "a", {"x": "a-x", "y": "a-y", "only-a": "1"})
    b = version(repo_url, tmp_path / "b", {"x": "b-x", "only-b": "2"})
    child = Dataset.create("n", "p", parent_datasets=[a.id, b.id], repo=repo_url)
    write(tmp_path / "c", "y", "c-y")
    child.add_files(tmp_path / "c")
    child.remove_files("only-a")
    child.finalize(auto_upload=True)
    assert materialize(child, tmp_path, "o1") == {"x": b"b-x", "y": b"c-y", "only-b": b"2"}
    # the opposite order flips who wins on x
    flip = Dataset.create("n", "p", parent_datasets=[b.id, a.id], repo=repo_url)
    flip.finalize()
    assert materialize(flip, tmp_path, "o2")["x"] == b"a-x"


def test_removed_folder_hides_parents_but_not_own_files(tmp_path, repo_url):
    base = version(repo_url, tmp_path / "a", {"d/1": "1", "d/2": "2", "e": "e"})
    child = Dataset.create("n", "p", parent_datasets=[base.id], repo=repo_url)
    child.remove_files("d")
    write(tmp_path / "new", "3", "three")
    child.add_files(tmp_path / "new", dataset_path="d")
    child.finalize(auto_upload=True)
    assert materialize(child, tmp_path, "o") == {"d/3": b"three", "e": b"e"}
    grandchild = version(repo_url, tmp_path / "g", {"z": "z"}, parents=[child.id])
    assert set(grandchild.list_files()) == {"d/3", "e", "z"}


def test_deep_chain(tmp_path, repo_url):
    parents = []
    expected = {}
    for i in range(20):
        ds = Dataset.create("chain", "p", parent_datasets=parents[-1:], repo=repo_url)
        src = tmp_path / f"s{i}"
        write(src, f"f{i % 5}", f"gen{i}")
        expected[f"f{i % 5}"] = f"gen{i}".encode()
        ds.add_files(src)
        if i % 7 == 6:
            ds.remove_files("f0")
            expected.pop("f0", None)
        ds.finalize(auto_upload=True)
        parents.append(ds.id)
    assert materialize(Dataset.get(parents[-1], repo=repo_url), tmp_path, "o") == expected


def test_sync_reports_changes_and_skips_rehash_of_unchanged(tmp_path, repo_url, monkeypatch):
    src = tmp_path / "s"
    for i in range(10):
        write(src, f"f{i}", f"content {i}")
    base = Dataset.create("n", "p", repo=repo_url)
    assert base.sync_folder(src) == (0, 10, 0)
    base.finalize(auto_upload=True)

    write(src, "f1", "changed")
    os.unlink(src / "f2")
    write(src, "new", "new")
    hashed = []
    real = blobs._hash
    monkeypatch.setattr(blobs, "_hash",
                        lambda p, *a, **kw: hashed.append(p) or real(p, *a, **kw))
    child = Dataset.create("n", "p", parent_datasets=[base.id], repo=repo_url)
    assert child.sync_folder(src) == (1, 1, 1)
    assert sorted(os.path.basename(p) for p in hashed) == ["f1", "new"]
    child.finalize(auto_upload=True)
    assert child.list_added_files() == ["new"]
    assert child.list_modified_files() == ["f1"]
    assert child.list_removed_files() == ["f2"]
    assert materialize(child, tmp_path, "o") == tree(src)


def test_child_with_one_percent_changed_uploads_little(tmp_path, repo_url):
    src = tmp_path / "s"
    for i in range(100):
        write(src, f"small/{i:03}", os.urandom(2000))
    write(src, "big", os.urandom(1_000_000))
    base = Dataset.create("n", "p", repo=repo_url)
    base.add_files(src)
    base.finalize(auto_upload=True)
    total = base.record.size

    write(src, "small/000", os.urandom(2000))
    with open(src / "big", "r+b") as f:
        f.seek(500_000)
        f.write(os.urandom(1000))
    child = Dataset.create("n", "p", parent_datasets=[base.id], repo=repo_url)
    child.sync_folder(src)
    child.finalize(auto_upload=True)
    assert child.record.uploaded_bytes <= 0.2 * total   # one 64 KiB chunk + one small file
    assert materialize(child, tmp_path, "o") == tree(src)


def test_rename_only_version_uploads_nothing(tmp_path, repo_url):
    src = tmp_path / "s"
    for i in range(20):
        write(src, f"a/{i}", os.urandom(3000))
    write(src, "big", os.urandom(300_000))
    base = Dataset.create("n", "p", repo=repo_url)
    base.add_files(src)
    base.finalize(auto_upload=True)
    os.rename(src / "a", src / "renamed")
    os.rename(src / "big", src / "big2")
    child = Dataset.create("n", "p", parent_datasets=[base.id], repo=repo_url)
    child.sync_folder(src)
    child.finalize(auto_upload=True)
    assert child.record.uploaded_bytes == 0
    assert materialize(child, tmp_path, "o") == tree(src)


def test_compare_and_squash(tmp_path, repo_url):
    a = version(repo_url, tmp_path / "a", {"x": "1", "y": "2"})
    b = version(repo_url, tmp_path / "b", {"x": "changed", "z": "3"}, parents=[a.id],
                remove=["y"])
    c = compare(a, b)
    assert (c.added, c.modified, c.removed, c.unchanged) == (["z"], ["x"], ["y"], 0)
    flat = squash("flat", [b.id], repo=repo_url)
    assert flat.parents == []
    assert materialize(flat, tmp_path, "o") == {"x": b"changed", "z": b"3"}
    assert flat.record.uploaded_bytes == 0
    # several versions merge in order like parents: b overrides a, a's y stays
    both = squash("both", [a.id, b.id], repo=repo_url)
    assert materialize(both, tmp_path, "o2") == {"x": b"changed", "y": b"2", "z": b"3"}


def test_a_file_replacing_a_parent_folder_and_the_reverse(tmp_path, repo_url):
    parent = version(repo_url, tmp_path / "p", {"d/x": "1", "d/e/z": "2", "b": "file b"})
    child = Dataset.create("n", "p", parent_datasets=[parent.id], repo=repo_url)
    write(tmp_path / "c", "d", "now a file")
    write(tmp_path / "c", "b/x", "now a folder")
    child.add_files(tmp_path / "c")
    child.finalize(auto_upload=True)
    assert sorted(child.list_files()) == ["b/x", "d"]
    assert materialize(child, tmp_path, "out") == {"d": b"now a file", "b/x": b"now a folder"}
    assert sorted(child.list_removed_files()) == ["b", "d/e/z", "d/x"]
