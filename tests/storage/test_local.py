"""The local folder backend: the contract, plus what only a folder can get wrong."""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import tempfile

import pytest

from strata.storage import (
    InvalidKey,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
    open_storage,
)
from strata.storage.local import LOCK_NAME, LocalStorage, _translate
from tests.storage.contract import StorageContract


class TestLocalStorage(StorageContract):
    @pytest.fixture
    def storage(self, tmp_path) -> LocalStorage:
        return open_storage(tmp_path / "repo", retry=False)


def test_file_url_and_plain_path_open_the_same_folder(tmp_path) -> None:
    by_url = open_storage(f"file://{tmp_path}", retry=False)
    by_path = open_storage(str(tmp_path), retry=False)
    by_url.write("a/b", b"x")
    assert by_path.read("a/b") == b"x"
    assert by_url.url == by_path.url == f"file://{tmp_path}"
    assert (tmp_path / "a" / "b").read_bytes() == b"x"


def test_missing_parents_are_created_and_empty_ones_pruned(tmp_path) -> None:
    storage = LocalStorage(tmp_path / "repo")
    storage.write("deep/er/still/key", b"x")
    assert (tmp_path / "repo/deep/er/still/key").is_file()
    storage.delete("deep/er/still/key")
    assert not (tmp_path / "repo/deep").exists()
    assert (tmp_path / "repo").is_dir()


def test_internal_files_are_never_listed_nor_addressable(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write("k", b"1")
    storage.write("k", b"2", if_match=storage.stat("k").etag)
    (tmp_path / ".strata-tmp-leftover").write_bytes(b"crash debris")
    assert (tmp_path / LOCK_NAME).exists()
    assert [info.key for info in storage.list("")] == ["k"]
    with pytest.raises(InvalidKey):
        storage.read(LOCK_NAME)
    with pytest.raises(InvalidKey):
        storage.write("sub/.strata-tmp-x", b"")


def test_etag_changes_on_every_write_of_the_same_size(tmp_path) -> None:
    # Inode numbers are reused and mtimes are coarse: the etag must still never repeat.
    storage = LocalStorage(tmp_path)
    etags = [storage.write("k", b"ab" if i % 2 else b"ba") for i in range(200)]
    assert len(set(etags)) == len(etags)


def test_a_folder_is_not_an_object(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write("d/e", b"x")
    with pytest.raises(NotFound):
        storage.read("d")
    with pytest.raises(NotFound):
        storage.stat("d")
    with pytest.raises(StorageError, match="same name|folder"):
        storage.write("d", b"y")
    with pytest.raises(StorageError, match="folder"):
        storage.write("d", b"y", if_absent=True)
    storage.delete("d")  # nothing to delete: not an error, and d/e survives
    assert storage.read("d/e") == b"x"


def test_a_file_in_the_way_of_a_folder(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write("f", b"x")
    with pytest.raises(StorageError) as info:
        storage.write("f/g", b"y")
    assert not isinstance(info.value, NotFound)
    with pytest.raises(NotFound):
        storage.read("f/g")


def _as_nobody(fn):
    """Run `fn` in a forked child without root's override of file permissions; return
    the name of the exception it raised (or None)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        os.close(read)
        result = b"None"
        try:
            if os.geteuid() == 0:
                os.setgid(65534)
                os.setuid(65534)
            fn()
        except BaseException as e:  # noqa: BLE001 - report any outcome to the parent
            result = type(e).__name__.encode()
        os.write(write, result)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


def test_unwritable_folder_is_permission_denied() -> None:
    root = tempfile.mkdtemp(prefix="strata-perm-")
    try:
        storage = LocalStorage(root)
        storage.write("k", b"x")
        os.chmod(root, 0o555)
        assert _as_nobody(lambda: storage.write("other", b"y")) == "PermissionDenied"
        assert _as_nobody(lambda: storage.read("k")) in ("None", "PermissionDenied")
    finally:
        os.chmod(root, 0o755)
        shutil.rmtree(root)


@pytest.mark.parametrize("code, kind, words", [
    (errno.ENOENT, NotFound, "no such object"),
    (errno.EACCES, PermissionDenied, "permission denied"),
    (errno.EPERM, PermissionDenied, "not permitted"),
    (errno.EROFS, PermissionDenied, "read-only"),
    (errno.ENOSPC, StorageError, "disk full"),
    (errno.EIO, Transient, "I/O error"),
    (errno.ESTALE, Transient, "stale"),
])
def test_errno_table(code: int, kind: type, words: str) -> None:
    error = _translate(OSError(code, os.strerror(code)), "file:///repo/k")
    assert type(error) is kind
    assert words in str(error) and "file:///repo/k" in str(error)
    # disk full must not be retried: it does not go away by waiting a few milliseconds
    assert not isinstance(_translate(OSError(errno.ENOSPC, "x"), "u"), Transient)


def _increment_in_process(root: str, times: int) -> None:
    storage = LocalStorage(root)
    for _ in range(times):
        while True:
            etag = storage.stat("counter").etag
            value = int(storage.read("counter"))
            try:
                storage.write("counter", str(value + 1).encode(), if_match=etag)
                break
            except PreconditionFailed:
                pass


def test_compare_and_swap_across_processes(tmp_path) -> None:
    storage = LocalStorage(tmp_path)
    storage.write("counter", b"0")
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_increment_in_process, args=(str(tmp_path), 10))
               for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert storage.read("counter") == b"40"


def test_if_absent_without_hard_links(tmp_path, monkeypatch) -> None:
    # FAT, some FUSE and SMB mounts refuse os.link; only-if-absent must still hold.
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    storage = LocalStorage(tmp_path)
    storage.write("k", b"first", if_absent=True)
    with pytest.raises(PreconditionFailed):
        storage.write("k", b"second", if_absent=True)
    assert storage.read("k") == b"first"
    assert [info.key for info in storage.list("")] == ["k"]
