"""Writing large new files past the page cache (storage/directio.py), and its fallbacks."""

from __future__ import annotations

import errno
import os

import pytest

from strata.storage import directio
from strata.storage.cache import UnitCache
from strata.storage.local import LocalStorage

SIZES = [0, 1, directio.MIN_DIRECT - 1, directio.MIN_DIRECT, directio.MIN_DIRECT + 1,
         directio.PIECE, directio.PIECE + 4095, 2 * directio.PIECE + 123]


@pytest.fixture
def opened(monkeypatch):
    """Records the flags of every os.open, to see which writes asked for O_DIRECT."""
    flags: list[int] = []
    real = os.open

    def spy(path, fl, *args, **kw):
        flags.append(fl)
        return real(path, fl, *args, **kw)
    monkeypatch.setattr(os, "open", spy)
    return flags


def _direct(flags: list[int]) -> bool:
    return any(f & os.O_DIRECT for f in flags)


@pytest.mark.parametrize("size", SIZES)
def test_round_trip_any_size(tmp_path, size):
    data = os.urandom(size)
    path = str(tmp_path / "f")
    os.close(directio.create(path, data))
    assert (tmp_path / "f").read_bytes() == data


@pytest.mark.parametrize("cuts", [[0], [1], [4095, 4097], [directio.PIECE - 1, 2],
                                  [directio.PIECE, directio.PIECE], [10, 3 << 20, 7]])
def test_a_list_of_parts_is_written_in_order(tmp_path, cuts):
    parts = [os.urandom(n) for n in cuts] + [os.urandom(directio.MIN_DIRECT)]
    os.close(directio.create(str(tmp_path / "f"), parts))
    assert (tmp_path / "f").read_bytes() == b"".join(parts)


def test_large_writes_go_direct_small_ones_do_not(tmp_path, opened):
    os.close(directio.create(str(tmp_path / "small"), b"x" * 1000))
    assert not _direct(opened)
    os.close(directio.create(str(tmp_path / "large"), os.urandom(directio.MIN_DIRECT)))
    assert _direct(opened)


def test_can_be_switched_off(tmp_path, opened, monkeypatch):
    monkeypatch.setenv("STRATA_DIRECT_IO", "0")
    data = os.urandom(directio.MIN_DIRECT * 2)
    os.close(directio.create(str(tmp_path / "f"), data))
    assert not _direct(opened)
    assert (tmp_path / "f").read_bytes() == data


def test_exclusive_create_refuses_an_existing_file(tmp_path):
    (tmp_path / "f").write_bytes(b"old")
    with pytest.raises(FileExistsError):
        directio.create(str(tmp_path / "f"), os.urandom(directio.MIN_DIRECT))
    assert (tmp_path / "f").read_bytes() == b"old"


@pytest.fixture
def forget_refusals():
    yield
    directio._refused.clear()


def test_filesystem_refusing_direct_writes_falls_back(tmp_path, monkeypatch, forget_refusals):
    """EINVAL from the first direct write: the file is written through the page cache,
    whole, and that filesystem is not asked again."""
    real = os.pwrite
    calls = []

    def refuse(fd, data, offset):
        calls.append(offset)
        raise OSError(errno.EINVAL, "Invalid argument")
    monkeypatch.setattr(os, "pwrite", refuse)
    data = os.urandom(directio.MIN_DIRECT + 5)
    os.close(directio.create(str(tmp_path / "a"), data))
    assert (tmp_path / "a").read_bytes() == data
    assert calls == [0]
    monkeypatch.setattr(os, "pwrite", real)
    os.close(directio.create(str(tmp_path / "b"), data))
    assert calls == [0]  # not tried again on this filesystem
    assert (tmp_path / "b").read_bytes() == data


def test_filesystem_refusing_direct_opens_falls_back(tmp_path, monkeypatch, forget_refusals):
    real = os.open

    def refuse(path, flags, *args):
        if flags & os.O_DIRECT:
            fd = real(path, flags & ~os.O_DIRECT, *args)  # created, then refused
            os.close(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(path, flags, *args)
    monkeypatch.setattr(os, "open", refuse)
    data = os.urandom(directio.MIN_DIRECT)
    os.close(directio.create(str(tmp_path / "f"), data))
    assert (tmp_path / "f").read_bytes() == data


def test_other_write_errors_are_raised(tmp_path, monkeypatch):
    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OSError) as info:
        directio.create(str(tmp_path / "f"), os.urandom(directio.MIN_DIRECT))
    assert info.value.errno == errno.ENOSPC
    assert not directio._refused


def test_local_storage_writes_large_objects_direct(tmp_path, opened):
    store = LocalStorage(tmp_path / "repo")
    data = os.urandom(directio.PIECE + 17)
    with store.deferred_durability():
        store.write("blobs/big", data, if_absent=True)
    assert _direct(opened)
    store.make_durable()
    assert store.read("blobs/big") == data
    assert store.stat("blobs/big").size == len(data)


def test_unit_cache_stores_large_units_direct(tmp_path, opened):
    import hashlib
    cache = UnitCache(tmp_path / "cache", limit=1 << 30)
    data = os.urandom(directio.MIN_DIRECT * 3)
    unit = hashlib.sha256(data).hexdigest()
    cache.store(unit, data)
    assert _direct(opened)
    assert cache.path_of(unit).read_bytes() == data
    cache.close()
