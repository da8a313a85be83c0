"""The FUSE adapter on real kernel mounts, served from this test process so that the
core's calls can be counted: what the kernel caches and what it reads by itself."""

import contextlib
import gzip
import os
import threading

import pytest

from strata.vfs import kernel
from strata.vfs.core import Filesystem
from strata.vfs.fuse import FuseOperations, serve
from strata.vfs.mount import build as build_fs
from strata.vfs.session import Session, default_overlay_name


@contextlib.contextmanager
def served(fs, mountpoint, **options):
    ops = FuseOperations(fs)
    ready = threading.Event()
    ops.on_ready = ready.set
    server = threading.Thread(target=serve, args=(fs, str(mountpoint)), daemon=True,
                              kwargs=dict(fsname="strata:test", operations=ops, **options))
    server.start()
    try:
        assert ready.wait(30), "the mount did not become ready"
        assert os.path.ismount(mountpoint)
        yield ops
    finally:
        kernel.unmount(str(mountpoint))
        server.join(30)
    assert not server.is_alive(), "the server did not end with the unmount"
    assert not os.path.ismount(mountpoint)


def counted(obj, name: str, calls: list) -> None:
    """Record the first argument of every call of obj.name in `calls`."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        calls.append(args[0] if args else None)
        return original(*args, **kwargs)
    setattr(obj, name, wrapper)


def walk(root) -> list[tuple[str, int]]:
    out = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(folder, name)
            out.append((os.path.relpath(full, root), os.lstat(full).st_size))
    return sorted(out)


def passthrough_expected() -> bool | None:
    """Whether the kernel should grant passthrough here: root and a kernel built with
    CONFIG_FUSE_PASSTHROUGH (None when the kernel's config cannot be read)."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            built = "CONFIG_FUSE_PASSTHROUGH=y" in f.read()
    except OSError:
        return None
    return built and os.geteuid() == 0


@pytest.mark.parametrize("helper", [False, True], ids=["mount(2)", "fusermount3"])
def test_a_read_only_mount_lists_each_folder_once_and_the_kernel_keeps_it(
        build, repo_url, tmp_path, helper):
    spec = {f"d{i}/f{j:02d}.txt": b"x" * j for i in range(3) for j in range(40)}
    spec["top.txt"] = b"top\n"
    vid = build.version(spec)
    fs, reader, cache = build_fs(repo_url, vid)
    listed: list = []
    counted(fs, "readdir", listed)
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        with served(fs, mp, helper=helper):
            first = walk(mp)
            second = walk(mp)                      # from the kernel's caches
            assert (mp / "top.txt").read_bytes() == b"top\n"
    finally:
        reader.close()
        cache.close()
    assert first == second == sorted(
        [(k, len(v)) for k, v in spec.items()] + [(f"d{i}", 0) for i in range(3)])
    assert sorted(listed) == ["", "d0", "d1", "d2"]   # one listing per folder, in all


def test_upper_files_are_read_by_the_kernel_and_a_writer_gets_a_node_of_its_own(
        build, repo_url, tmp_path):
    vid = build.version({"lower.txt": b"lower\n"})
    fs0, reader, cache = build_fs(repo_url, vid)
    mp = tmp_path / "mnt"
    mp.mkdir()
    session = Session(fs0.view.repo, default_overlay_name(str(mp)), vid, reader)
    fs = session.fs = Filesystem(session.build_view(), writable=True)
    reads: list = []
    counted(fs, "read_view", reads)
    data = os.urandom(3 << 20)
    try:
        with served(fs, mp) as ops:
            (mp / "new.bin").write_bytes(data)
            with open(mp / "new.bin", "rb") as r:
                assert r.read() == data
                expected = passthrough_expected()
                if expected is not None:
                    assert ops.channel.passthrough == expected
                # passthrough: no READ reached the server; otherwise they all did
                assert (not reads) if ops.channel.passthrough else reads
                ino = os.fstat(r.fileno()).st_ino
                # a writer while the reader is open (the kernel refuses to mix modes on
                # one inode): the writer's open is retried on a new node, the reader
                # still sees its bytes
                with open(mp / "new.bin", "r+b") as w:
                    w.write(b"WRITTEN")
                    w.flush()
                    if ops.channel.passthrough:
                        assert os.fstat(w.fileno()).st_ino != ino
                    r.seek(0)
                    assert r.read(7) == b"WRITTEN"
                    assert (mp / "new.bin").read_bytes() == b"WRITTEN" + data[7:]
            # the lower file is read through the server (its bytes come from the cache)
            del reads[:]
            assert (mp / "lower.txt").read_bytes() == b"lower\n"
            assert reads
    finally:
        session.close()
        reader.close()
        cache.close()


def test_message_layouts_match_the_kernel_header():
    # sizes from include/uapi/linux/fuse.h (protocol 7.40)
    assert kernel.IN_HEADER.size == 40 and kernel.OUT_HEADER.size == 16
    assert kernel.INIT_OUT.size == 64 and kernel.ATTR.size == 88
    assert kernel.ENTRY_OUT.size == 128 and kernel.ATTR_OUT.size == 104
    assert kernel.OPEN_OUT.size == 16 and kernel.STATFS_OUT.size == 80
    assert kernel.DIRENT.size == 24
    assert kernel.DEV_IOC_BACKING_OPEN == 0x4010E501
    assert kernel.DEV_IOC_BACKING_CLOSE == 0x4004E502
