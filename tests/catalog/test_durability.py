"""Hashing once, storing at add, and batched durability of uploads (catalog/blobs.py,
storage/local.py)."""

import hashlib
import os

import pytest

from strata.catalog import Dataset, blobs, layout
from strata.catalog.errors import SourceChanged, SourceMissing
from strata.catalog.repo import Repository
from strata.storage import local
from tests.catalog.conftest import tree, write


@pytest.fixture
def settled(monkeypatch):
    """Every source counts as settled: its ctime is older than the moment it is hashed."""
    monkeypatch.setattr(blobs, "SETTLE_NS", -1)


@pytest.fixture
def upload_path(monkeypatch):
    """The folder repository behaves like a cloud one: add only hashes, upload stores."""
    monkeypatch.setattr(Repository, "stores_on_add", property(lambda self: False))


@pytest.fixture(params=["stored at add", "stored by upload"])
def either_path(request):
    if request.param == "stored by upload":
        request.getfixturevalue("upload_path")
    return request.param


@pytest.fixture
def sha256_calls(monkeypatch):
    """How many times the upload code hashes, counted from now on."""
    calls = []
    real = hashlib.sha256

    def counting(*args):
        calls.append(len(args[0]) if args else 0)
        return real(*args)
    monkeypatch.setattr(blobs.hashlib, "sha256", counting)
    return calls


def test_settled_sources_are_not_hashed_again_at_upload(tmp_path, repo_url, settled,
                                                       upload_path, sha256_calls):
    src = tmp_path / "s"
    for i in range(5):
        write(src, f"small{i}", os.urandom(1000 + i))
    write(src, "big", os.urandom(200_000))          # 4 chunks of 64 KiB
    ds = Dataset.create("n", "p", repo=repo_url)
    ds.add_files(src)
    del sha256_calls[:]
    ds.upload()
    assert sha256_calls == [sum(1000 + i for i in range(5))]   # the pack's name, nothing else
    ds.finalize()
    out = tmp_path / "o"
    Dataset.get(ds.id, repo=repo_url).get_mutable_local_copy(out)
    assert tree(out) == tree(src)


def test_unsettled_sources_are_hashed_again(tmp_path, repo_url, either_path, sha256_calls):
    src = tmp_path / "s"
    write(src, "small", os.urandom(1000))
    write(src, "big", os.urandom(200_000))
    ds = Dataset.create("n", "p", repo=repo_url)
    ds.add_files(src)       # just written: too fresh to trust its ctime
    del sha256_calls[:]
    ds.upload()
    chunks = [65536] * 3 + [200_000 - 3 * 65536]
    if either_path == "stored by upload":   # the pack is named by its hash too
        assert sorted(sha256_calls) == sorted([1000, 1000] + chunks)
    else:               # each file hashed again, whole (fed in pieces) and per chunk
        assert sorted(sha256_calls) == sorted([0, 0] + chunks)


@pytest.mark.parametrize("size", [1000, 200_000])
def test_settled_source_changed_after_add_is_refused(tmp_path, repo_url, settled, size,
                                                     either_path):
    src = tmp_path / "s"
    write(src, "f", os.urandom(size))
    ds = Dataset.create("n", "p", repo=repo_url)
    ds.add_files(src)
    with open(src / "f", "r+b") as f:     # same size, same name, new bytes: ctime moves on
        f.seek(size - 10)
        f.write(b"X" * 10)
    with pytest.raises(SourceChanged, match="changed"):
        ds.upload()


def one_big_file_version(tmp_path, repo_url, size):
    src = tmp_path / "s"
    data = os.urandom(size)
    write(src, "big", data)
    v1 = Dataset.create("n", "p", repo=repo_url)
    v1.add_files(src)
    v1.finalize(auto_upload=True)
    return src, data, v1


def test_chunks_already_stored_are_not_read(tmp_path, repo_url, settled, upload_path,
                                            monkeypatch):
    src, data, v1 = one_big_file_version(tmp_path, repo_url, 300_000)
    with open(src / "big", "r+b") as f:    # change the last chunk only
        f.seek(299_000)
        f.write(b"Y" * 1000)
    v2 = Dataset.create("n", "p", parent_datasets=[v1.id], repo=repo_url)
    v2.add_files(src)
    reads = []
    real = blobs._pread_exact
    monkeypatch.setattr(blobs, "_pread_exact",
                        lambda fd, off, n: reads.append(off) or real(fd, off, n))
    v2.finalize(auto_upload=True)
    assert reads == [4 * 65536]
    out = tmp_path / "o"
    Dataset.get(v2.id, repo=repo_url).get_mutable_local_copy(out)
    assert (out / "big").read_bytes() == data[:299_000] + b"Y" * 1000


def test_deferred_writes_are_fsynced_only_by_make_durable(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(local.os, "fsync",
                        lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    st = local.LocalStorage(tmp_path / "r")
    st.write("plain", b"1")
    assert len(synced) == 1 and synced[0].endswith(tuple("0123456789abcdef"))  # its temp file
    del synced[:]
    with st.deferred_durability():
        st.write("a/x", b"2", if_absent=True)
        st.write("a/y", b"3")
    assert synced == []
    st.make_durable()
    assert sorted(synced) == [str(tmp_path / "r" / "a" / "x"), str(tmp_path / "r" / "a" / "y")]
    st.make_durable()
    assert len(synced) == 2          # nothing left to flush


def test_placements_reach_the_draft_only_after_their_blobs_are_durable(tmp_path, repo_url,
                                                                       monkeypatch):
    monkeypatch.setattr(blobs, "DURABLE_EVERY", 100_000)   # several barriers
    durable: set[str] = set()
    real = local.LocalStorage.make_durable

    def make_durable(self):
        durable.update(os.path.relpath(p, self.root) for p in self._unsynced)
        real(self)
    monkeypatch.setattr(local.LocalStorage, "make_durable", make_durable)
    src = tmp_path / "s"
    for i in range(3):
        write(src, f"big{i}", os.urandom(150_000))
    for i in range(40):
        write(src, f"small/{i}", os.urandom(20_000))
    repo = Repository.open(repo_url)
    staged = [blobs.Staged(f"p/{name}", str(src / name), len(data),
                           hashlib.sha256(data).hexdigest(),
                           blobs.hash_file(str(src / name), repo.chunk_size).chunks)
              for name, data in tree(src).items()]
    placed_calls = []

    def on_placed(placed):
        placed_calls.append(len(placed))
        for p in placed:
            ids = [p.pack] if p.pack else [p.chunks[i:i + 32].hex()
                                           for i in range(0, len(p.chunks), 32)]
            for blob in ids:
                assert layout.blob_key(blob) in durable, f"{p.path}: {blob} not durable yet"
    written = blobs.upload(repo, staged, dedup={}, on_placed=on_placed)
    assert written == 3 * 150_000 + 40 * 20_000
    assert sum(placed_calls) == 43 and len(placed_calls) >= 2   # a barrier mid-upload


def test_a_torn_blob_is_rewritten_by_the_next_upload(tmp_path, repo_url):
    src, data, v1 = one_big_file_version(tmp_path, repo_url, 200_000)
    entry = v1.repo.manifest(v1.id).lookup("big")
    victim = os.path.join(repo_url, layout.blob_key(entry.chunk_ids[1]))
    os.truncate(victim, 100)         # a power cut before the blob was durable
    v2 = Dataset.create("other", "p", repo=repo_url)
    v2.add_files(src)
    v2.finalize(auto_upload=True)
    assert os.path.getsize(victim) == 65536
    out = tmp_path / "o"
    Dataset.get(v1.id, repo=repo_url).get_mutable_local_copy(out)
    assert (out / "big").read_bytes() == data


def test_deferred_writes_start_their_writeback_at_once(tmp_path, monkeypatch):
    """A deferred write asks the kernel to start writing it out (without waiting), so the
    batch's fsync later finds little left to do; a durable write fsyncs instead."""
    assert local._sync_file_range() is not None   # Linux: libc has sync_file_range
    started = []
    real = local.start_writeback
    monkeypatch.setattr(local, "start_writeback", lambda fd: (started.append(fd), real(fd)))
    store = local.LocalStorage(tmp_path / "store")
    with store.deferred_durability():
        store.write("a", b"x" * 100_000)
    store.write("b", b"y")
    assert len(started) == 1
    store.make_durable()
    assert (tmp_path / "store" / "a").read_bytes() == b"x" * 100_000


def blob_bytes(repo_url) -> dict[str, int]:
    root = os.path.join(repo_url, "blobs")
    return {name: os.path.getsize(os.path.join(d, name))
            for d, _, names in os.walk(root) for name in names}


def test_a_folder_repository_stores_the_bytes_in_the_read_that_hashes_them(
        tmp_path, repo_url, settled, monkeypatch):
    src = tmp_path / "s"
    for i in range(30):
        write(src, f"small/{i}", os.urandom(5000 + i))
    write(src, "small/twin", (src / "small" / "0").read_bytes())
    write(src, "big", os.urandom(300_000))           # 5 chunks of 64 KiB
    total = sum(5000 + i for i in range(30)) + 300_000
    read = []
    real = blobs._pread_exact
    monkeypatch.setattr(blobs, "_pread_exact",
                        lambda fd, off, n: read.append(n) or real(fd, off, n))
    ds = Dataset.create("n", "p", repo=repo_url)
    ds.add_files(src)
    assert sum(blob_bytes(repo_url).values()) == total      # stored, the twin once
    del read[:]
    assert ds.upload() == 0
    ds.finalize()
    assert read == []                                  # upload read no source byte
    assert ds.record.uploaded_bytes == total
    out = tmp_path / "o"
    Dataset.get(ds.id, repo=repo_url).get_mutable_local_copy(out)
    assert tree(out) == tree(src)


def test_stored_bytes_removed_before_upload_are_stored_again(tmp_path, repo_url, settled):
    """A blob written by add but deleted before upload (gc after its grace period) is
    noticed by upload, which stores it again."""
    src = tmp_path / "s"
    for i in range(5):
        write(src, f"small{i}", os.urandom(3000))
    write(src, "big", os.urandom(200_000))
    ds = Dataset.create("n", "p", repo=repo_url)
    ds.add_files(src)
    stored = blob_bytes(repo_url)
    pack = next(b for b, size in stored.items() if size == 5 * 3000)
    chunk = next(b for b, size in stored.items() if size == 65536)
    for blob in (pack, chunk):
        os.unlink(os.path.join(repo_url, layout.blob_key(blob)))
    assert ds.upload() == 5 * 3000 + 65536
    ds.finalize()
    out = tmp_path / "o"
    Dataset.get(ds.id, repo=repo_url).get_mutable_local_copy(out)
    assert tree(out) == tree(src)


def test_equal_small_files_hashed_in_parallel_are_stored_once(tmp_path, repo_url, settled):
    src = tmp_path / "s"
    contents = [os.urandom(20_000) for _ in range(3)]
    for i in range(90):      # ~8 batches of 256 KiB hashed two at a time
        write(src, f"d/{i:02d}", contents[i % 3])
    ds = Dataset.create("n", "p", repo=repo_url)
    ds.add_files(src)
    ds.finalize(auto_upload=True)
    assert sum(blob_bytes(repo_url).values()) == 3 * 20_000
    out = tmp_path / "o"
    Dataset.get(ds.id, repo=repo_url).get_mutable_local_copy(out)
    assert tree(out) == tree(src)


def test_an_interrupted_add_records_nothing_and_can_be_run_again(tmp_path, repo_url,
                                                                   monkeypatch):
    src = tmp_path / "s"
    for i in range(20):
        write(src, f"f{i:02d}", os.urandom(30_000))
    write(src, "big", os.urandom(200_000))
    real = blobs._hash

    def vanishing(path, *args, **kwargs):
        if path.endswith("f13"):
            raise FileNotFoundError(2, "No such file or directory", path)
        return real(path, *args, **kwargs)
    monkeypatch.setattr(blobs, "_hash", vanishing)
    ds = Dataset.create("n", "p", repo=repo_url)
    with pytest.raises(SourceMissing, match="f13 vanished"):
        ds.add_files(src)
    assert ds.list_files() == []
    monkeypatch.setattr(blobs, "_hash", real)
    ds.add_files(src)
    ds.finalize(auto_upload=True)
    out = tmp_path / "o"
    Dataset.get(ds.id, repo=repo_url).get_mutable_local_copy(out)
    assert tree(out) == tree(src)
