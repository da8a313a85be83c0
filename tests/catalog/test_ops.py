import os
import sqlite3
import threading

import pytest

from strata.catalog import Dataset, layout
from strata.catalog import repo as repo_mod
from strata.catalog.errors import HasChildren, InvalidPath, TargetNotEmpty, BadArgument, WrongState
from strata.catalog.materialize import select_part
from strata.catalog.ops import delete, gc, list_datasets, log, rename
from strata.catalog.repo import Repository
from strata.storage.errors import Corrupt
from strata.storage.errors import Transient
from tests.catalog.conftest import tree, write


def simple(repo_url, src, files, parents=(), name="n", project="p"):
    for rel, data in files.items():
        write(src, rel, data)
    ds = Dataset.create(name, project, parent_datasets=list(parents), repo=repo_url)
    ds.add_files(src)
    ds.finalize(auto_upload=True)
    return ds


def blob_files(repo_url):
    out = []
    for dirpath, _, names in os.walk(os.path.join(repo_url, "blobs")):
        out += [os.path.join(dirpath, n) for n in names if layout.is_blob_id(n)]
    return out


def test_verify_finds_corrupted_blob(tmp_path, repo_url):
    ds = simple(repo_url, tmp_path / "s", {"a": os.urandom(5000), "big": os.urandom(200_000)})
    assert ds.verify_dataset_hash() == []
    assert ds.verify_dataset_hash(skip_hash=True) == []
    victim = max(blob_files(repo_url), key=os.path.getsize)
    data = bytearray(open(victim, "rb").read())
    data[10] ^= 0xFF
    open(victim, "wb").write(bytes(data))
    problems = ds.verify_dataset_hash()
    assert len(problems) == 1 and "big" in problems[0]


def test_verify_stops_at_a_store_that_is_down(tmp_path, repo_url, monkeypatch):
    # an outage is not a problem of each file: the first Unreachable ends verify (each
    # further file would wait out the retry budget again: hours for thousands of files)
    from strata.storage.errors import Unreachable
    ds = simple(repo_url, tmp_path / "s", {f"f{i}": os.urandom(3000) for i in range(30)})
    ds.view()   # the manifest is read: the files are what meet the outage
    calls = []

    def down(*args, **kwargs):
        calls.append(args)
        raise Unreachable(repo_url, "connection refused (injected)")

    for name in ("read", "read_range", "stat"):
        monkeypatch.setattr(ds.repo.storage, name, down)
    for skip_hash in (False, True):
        calls.clear()
        with pytest.raises(Unreachable):
            ds.verify_dataset_hash(skip_hash=skip_hash)
        assert len(calls) == 1


def test_verify_local_copy(tmp_path, repo_url):
    ds = simple(repo_url, tmp_path / "s", {"a": "aaa", "d/b": "bbb"})
    out = tmp_path / "copy"
    ds.get_mutable_local_copy(out)
    assert ds.verify_dataset_hash(str(out)) == []
    write(out, "d/b", "bbx")
    assert ds.verify_dataset_hash(str(out)) == ["d/b: sha256 mismatch"]
    assert ds.verify_dataset_hash(str(out), skip_hash=True) == []
    os.unlink(out / "a")
    assert "a: missing" in ds.verify_dataset_hash(str(out), skip_hash=True)


def test_copy_target_must_be_empty(tmp_path, repo_url):
    ds = simple(repo_url, tmp_path / "s", {"a": "1"})
    out = tmp_path / "out"
    write(out, "keep", "mine")
    with pytest.raises(TargetNotEmpty):
        ds.get_mutable_local_copy(out)
    assert tree(out) == {"keep": b"mine"}
    ds.get_mutable_local_copy(out, overwrite=True)
    assert tree(out) == {"a": b"1"}


def test_local_copy_is_read_only_and_shares_bytes(tmp_path, repo_url):
    a = simple(repo_url, tmp_path / "s", {"same": os.urandom(3000), "x": "1"})
    b = simple(repo_url, tmp_path / "s", {"x": "2"}, parents=[a.id])
    pa, pb = a.get_local_copy(), b.get_local_copy()
    assert tree(pa)["x"] == b"1" and tree(pb)["x"] == b"2"
    assert os.stat(os.path.join(pa, "same")).st_ino == os.stat(os.path.join(pb, "same")).st_ino
    assert not os.access(os.path.join(pb, "x"), os.W_OK) or os.geteuid() == 0
    assert os.stat(os.path.join(pb, "x")).st_mode & 0o222 == 0
    assert a.get_local_copy() == pa


def test_local_copy_of_many_twins_and_small_files(tmp_path, repo_url, monkeypatch):
    """Identical files become links to one object, fetched once; more small files than
    one span holds are all there, whole (spans are cut by count to spread the work)."""
    twin = os.urandom(5000)
    files = {f"twin{i}": twin for i in range(5)}
    files.update({f"d/f{i:04}": os.urandom(10 + i % 50) for i in range(600)})
    ds = simple(repo_url, tmp_path / "s", files)
    reads = []
    real = ds.repo.read_blob
    monkeypatch.setattr(ds.repo, "read_blob",
                        lambda *a, **k: reads.append(a) or real(*a, **k))
    out = ds.get_local_copy()
    assert tree(out) == {k: v for k, v in files.items()}
    assert len({os.stat(os.path.join(out, f"twin{i}")).st_ino for i in range(5)}) == 1
    assert len(reads) >= 3   # 605 small files: more than one span of 256


def test_a_full_disk_during_get_names_the_file_and_leaves_no_partial_copy(
        tmp_path, repo_url, monkeypatch):
    import errno
    from strata.storage import directio
    ds = simple(repo_url, tmp_path / "s", {"big": os.urandom(3 << 20), "small": "1"})

    def full(fd, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(directio.os, "pwrite", full)
    monkeypatch.setattr(directio.os, "write", full)
    out = tmp_path / "out"
    with pytest.raises(OSError) as info:
        ds.get_mutable_local_copy(out)
    assert info.value.errno == errno.ENOSPC
    assert info.value.filename in (str(out / "big"), str(out / "small"))
    assert not [p for p in out.rglob("*") if p.is_file()]


def test_parts_partition_the_files(tmp_path, repo_url):
    files = {f"f{i:02}": os.urandom(100 * (i + 1)) for i in range(30)}
    ds = simple(repo_url, tmp_path / "s", files)
    entries = list(ds.view().files.values())
    seen = []
    for k in range(4):
        part = select_part(entries, k, 4)
        assert part, "every part gets files"
        seen += [e.path for e in part]
        assert [e.path for e in select_part(entries, k, 4)] == [e.path for e in part]
    assert sorted(seen) == sorted(files)
    out = tmp_path / "p1"
    ds.get_mutable_local_copy(out, part=1, num_parts=4)
    assert set(tree(out)) == {e.path for e in select_part(entries, 1, 4)}
    with pytest.raises(BadArgument):
        select_part(entries, 4, 4)


class FailingWrites:
    """Lets `allow` blob writes through, then fails every write as if the network dropped."""

    def __init__(self, inner, allow):
        self.inner, self.allow, self.url = inner, allow, inner.url

    def write(self, key, data, **kw):
        if key.startswith("blobs/"):
            if self.allow <= 0:
                raise Transient(self.inner.url_for(key), "connection reset")
            self.allow -= 1
        return self.inner.write(key, data, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


@pytest.mark.parametrize("stored_by", ["upload", "add"])
def test_interrupted_upload_resumes_with_every_file(tmp_path, repo_url, stored_by,
                                                    monkeypatch):
    """Storage failing after a few blobs, in the upload (a cloud repository) or in the add
    that stores as it hashes (a folder repository): rerunning finishes the version."""
    if stored_by == "upload":
        monkeypatch.setattr(Repository, "stores_on_add", property(lambda self: False))
    src = tmp_path / "s"
    files = {f"small/{i:03}": os.urandom(20_000) for i in range(60)}
    files["big"] = os.urandom(700_000)
    for rel, data in files.items():
        write(src, rel, data)
    ds = Dataset.create("n", "p", repo=repo_url)
    real = ds.repo.storage
    if stored_by == "upload":
        ds.add_files(src)
    for allow in (1, 3, 6):
        ds.repo.storage = FailingWrites(real, allow)
        with pytest.raises(Transient):
            if stored_by == "add":
                ds.add_files(src)
            else:
                ds.finalize(auto_upload=True)
        assert not ds.is_final()
        assert list_datasets(repo=repo_url) == []       # nothing half-written is visible
    ds.repo.storage = real
    if stored_by == "add":
        assert ds.list_files() == []
        ds.add_files(src)
    ds.finalize(auto_upload=True)
    repo_mod._repos.clear()
    out = tmp_path / "o"
    Dataset.get(ds.id, repo=repo_url).get_mutable_local_copy(out)
    assert tree(out) == files


def test_hostile_manifest_paths_are_rejected_on_read(tmp_path, repo_url):
    ds = simple(repo_url, tmp_path / "s", {"ok": "1"})
    repo = ds.repo
    local = tmp_path / "evil.db"
    local.write_bytes(repo.storage.read(layout.manifest_key(ds.id)))
    db = sqlite3.connect(local)
    db.execute("UPDATE files SET path='../../escape', name='escape'")
    db.commit()
    db.close()
    sha = repo.put_manifest(ds.id, str(local))
    repo.update_record(ds.id, lambda r: r.evolve(manifest_sha256=sha))
    repo_mod._repos.clear()
    evil = Dataset.get(ds.id, repo=repo_url)
    with pytest.raises(InvalidPath):
        evil.get_mutable_local_copy(tmp_path / "out")
    assert not (tmp_path / "escape").exists()


def test_delete_refuses_parent_with_children_and_cleans_blobs(tmp_path, repo_url):
    a = simple(repo_url, tmp_path / "a", {"shared": os.urandom(4000)})
    b = simple(repo_url, tmp_path / "b", {"own": os.urandom(300_000)}, parents=[a.id])
    with pytest.raises(HasChildren):
        delete(a.id, repo=repo_url)
    assert Dataset.get(a.id, repo=repo_url).is_final()
    before = set(blob_files(repo_url))
    assert delete(b.id, repo=repo_url) == [b.id]
    after = set(blob_files(repo_url))
    assert after < before
    assert Dataset.get(a.id, repo=repo_url).verify_dataset_hash() == []
    assert delete(a.id, repo=repo_url) == [a.id]
    assert blob_files(repo_url) == []
    assert list_datasets(repo=repo_url) == []


@pytest.mark.parametrize("store", ["folder", "s3"])
@pytest.mark.parametrize("remover", ["delete", "gc"])
def test_close_uploads_again_what_a_delete_or_gc_removed_after_upload(
        tmp_path, repo_url, request, store, remover):
    # blobs are shared by content: a draft uploaded (finding its bytes stored by another
    # version), then that version deleted, or a gc once the draft's upload is older than
    # the grace: close published a version whose files had no bytes, exit 0
    url = request.getfixturevalue("s3_url") if store == "s3" else repo_url
    files = {"x.bin": os.urandom(300_000), "s.txt": b"small\n"}
    first = simple(url, tmp_path / "a", files, name="first")
    draft = Dataset.create("second", "p", repo=url)
    draft.add_files(tmp_path / "a")
    draft.upload()
    if remover == "delete":
        delete(first.id, repo=url)
    else:
        delete(first.id, repo=url)
        gc(repo=url, grace_seconds=0)
    draft.finalize(auto_upload=True)
    final = Dataset.get(draft.id, repo=url)
    assert final.verify_dataset_hash() == []
    out = final.get_mutable_local_copy(str(tmp_path / "copy"))
    assert tree(out) == tree(tmp_path / "a")


def test_finalize_without_upload_says_which_files_lost_their_bytes(tmp_path, repo_url):
    first = simple(repo_url, tmp_path / "a", {"x.bin": os.urandom(300_000)}, name="first")
    draft = Dataset.create("second", "p", repo=repo_url)
    draft.add_files(tmp_path / "a")
    draft.upload()
    delete(first.id, repo=repo_url)
    with pytest.raises(WrongState, match="1 file of version .* lost their stored bytes"):
        draft.finalize()
    draft.upload()
    draft.finalize()
    assert Dataset.get(draft.id, repo=repo_url).verify_dataset_hash() == []


def test_gc_removes_orphans_only_after_grace(tmp_path, repo_url):
    ds = simple(repo_url, tmp_path / "a", {"f": "keep"})
    orphan = Dataset.create("n", "p", repo=repo_url)
    write(tmp_path / "o", "g", os.urandom(5000))
    orphan.add_files(tmp_path / "o")
    orphan.upload()
    assert gc(repo=repo_url)["blobs"] == 0             # young: may be an upload in flight
    assert gc(repo=repo_url, grace_seconds=0)["blobs"] == 1
    assert ds.verify_dataset_hash() == []


def test_tags_and_metadata_concurrent_updates_lose_nothing(tmp_path, repo_url):
    ds = simple(repo_url, tmp_path / "a", {"f": "x"})

    def tagger(i):
        Dataset.get(ds.id, repo=repo_url).add_tags([f"t{i}"])

    threads = [threading.Thread(target=tagger, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(Dataset.get(ds.id, repo=repo_url).tags) == sorted(f"t{i}" for i in range(8))
    ds.set_metadata({"rows": 3})
    assert Dataset.get(ds.id, repo=repo_url).get_metadata() == {"rows": 3}
    with pytest.raises(BadArgument):
        ds.set_metadata({"bad": object()})


def test_list_search_rename_and_log(tmp_path, repo_url):
    a = simple(repo_url, tmp_path / "a", {"f": "1"}, name="cats", project="zoo")
    b = simple(repo_url, tmp_path / "b", {"g": "2"}, parents=[a.id], name="cats", project="zoo")
    simple(repo_url, tmp_path / "c", {"h": "3"}, name="dogs", project="zoo")
    names = [(d["name"], d["version"]) for d in list_datasets("zoo", repo=repo_url)]
    assert names == [("cats", "1.0.0"), ("cats", "1.0.1"), ("dogs", "1.0.0")]
    assert [d["id"] for d in list_datasets(partial_name="dog", repo=repo_url)] != []
    assert rename("zoo", "cats", new_name="felines", repo=repo_url) == 2
    assert Dataset.get(dataset_project="zoo", dataset_name="felines", repo=repo_url).id == b.id
    history = log(Dataset.get(b.id, repo=repo_url))
    assert [h["id"] for h in history] == [b.id, a.id]
    assert history[0]["added"] == 1


def test_external_file_links(tmp_path, repo_url):
    outside = tmp_path / "outside"
    write(outside, "one.bin", b"1" * 1000)
    write(outside, "sub/two.bin", b"2" * 10)
    ds = Dataset.create("n", "p", repo=repo_url)
    assert ds.add_external_files(f"file://{outside}", dataset_path="ext") == 2
    ds.finalize()
    out = tmp_path / "o"
    ds.get_mutable_local_copy(out)
    assert tree(out) == {"ext/one.bin": b"1" * 1000, "ext/sub/two.bin": b"2" * 10}
    assert ds.verify_dataset_hash(skip_hash=True) == []
    write(outside, "one.bin", b"1" * 1001)   # it grew: its first 1000 bytes are not enough
    for skip_hash in (True, False):
        problems = ds.verify_dataset_hash(skip_hash=skip_hash)
        assert len(problems) == 1 and "ext/one.bin" in problems[0], problems
    with pytest.raises(Corrupt, match="1001 bytes, 1000 when it was added"):
        ds.get_mutable_local_copy(tmp_path / "o2")
