"""Model-based test of the overlay (STYLE.md #13): random sequences of file operations
applied to the writable filesystem core and to a plain local folder must leave identical
trees (names, bytes, modes, symlinks, empty folders) and fail with the same errno."""

import errno
import os
import shutil
import stat

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from strata.catalog import Dataset
from strata.catalog import repo as repo_mod
from strata.catalog.repo import Repository
from strata.storage.cache import UnitCache
from strata.vfs.core import Filesystem
from strata.vfs.fuse import errno_of
from strata.vfs.overlay import Overlay, OverlayView
from strata.vfs.reader import Reader
from strata.vfs.views import VersionView
from tests.catalog.conftest import write
from tests.vfs.conftest import CHUNK

NAMES = ["a", "b", "d", "d/x", "d/y", "d/e", "d/e/z", "big", "n", "n/m"]
BASE = {"a": b"alpha", "d/x": b"ex" * 100, "d/e/z": b"zed", "big": bytes(range(256)) * 600}

op = st.one_of(
    st.tuples(st.just("write"), st.sampled_from(NAMES), st.integers(0, 3 * CHUNK),
              st.binary(min_size=1, max_size=3000), st.booleans()),
    st.tuples(st.just("create"), st.sampled_from(NAMES), st.binary(max_size=500)),
    st.tuples(st.just("truncate"), st.sampled_from(NAMES), st.integers(0, 200_000)),
    st.tuples(st.just("unlink"), st.sampled_from(NAMES)),
    st.tuples(st.just("mkdir"), st.sampled_from(NAMES)),
    st.tuples(st.just("rmdir"), st.sampled_from(NAMES)),
    st.tuples(st.just("rename"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("chmod"), st.sampled_from(NAMES), st.sampled_from([0o600, 0o755, 0o640])),
    st.tuples(st.just("symlink"), st.sampled_from(NAMES), st.sampled_from(["a", "../x", "d"])),
)


def local_apply(root, o):
    name = o[0]
    p = os.path.join(root, o[1])
    if name == "write":
        _, _, off, data, trunc = o
        fd = os.open(p, os.O_WRONLY | (os.O_TRUNC if trunc else 0))
        try:
            os.pwrite(fd, data, off)
        finally:
            os.close(fd)
    elif name == "create":
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, o[2])
        finally:
            os.close(fd)
    elif name == "truncate":
        if os.path.isdir(p):
            raise IsADirectoryError(errno.EISDIR, p)
        os.truncate(p, o[2])
    elif name == "unlink":
        os.unlink(p)
    elif name == "mkdir":
        os.mkdir(p, 0o755)
    elif name == "rmdir":
        os.rmdir(p)
    elif name == "rename":
        os.rename(p, os.path.join(root, o[2]))
    elif name == "chmod":
        if os.path.islink(p):
            return
        os.chmod(p, o[2])
    elif name == "symlink":
        os.symlink(o[2], p)


def fs_apply(fs, o):
    name, path = o[0], o[1]
    if name == "write":
        _, _, off, data, trunc = o
        fh = fs.open(path, os.O_WRONLY | (os.O_TRUNC if trunc else 0))
        try:
            fs.write(fh, off, data)
        finally:
            fs.release(fh)
    elif name == "create":
        fh = fs.create(path, 0o644, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        try:
            fs.write(fh, 0, o[2])
        finally:
            fs.release(fh)
    elif name == "truncate":
        fs.truncate(path, o[2])
    elif name == "unlink":
        fs.unlink(path)
    elif name == "mkdir":
        fs.mkdir(path, 0o755)
    elif name == "rmdir":
        fs.rmdir(path)
    elif name == "rename":
        fs.rename(path, o[2])
    elif name == "chmod":
        n = fs.view.lookup(path)
        if n is not None and n.kind == "l":
            return
        fs.chmod(path, o[2])
    elif name == "symlink":
        fs.symlink(path, o[2])


def local_tree(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for d in list(dirnames):
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                dirnames.remove(d)
                filenames.append(d)
            else:
                key = d if rel == "." else f"{rel}/{d}"
                out[key] = ("dir", stat.S_IMODE(os.lstat(full).st_mode))
        for f in filenames:
            full = os.path.join(dirpath, f)
            key = f if rel == "." else f"{rel}/{f}"
            if os.path.islink(full):
                out[key] = ("link", os.readlink(full))
            else:
                out[key] = ("file", stat.S_IMODE(os.lstat(full).st_mode),
                            open(full, "rb").read())
    return out


def fs_tree(fs, path=""):
    out = {}
    for name, attr in fs.readdir(path):
        child = f"{path}/{name}" if path else name
        kind = stat.S_IFMT(attr.mode)
        if kind == stat.S_IFDIR:
            out[child] = ("dir", stat.S_IMODE(attr.mode))
            out.update(fs_tree(fs, child))
        elif kind == stat.S_IFLNK:
            out[child] = ("link", fs.readlink(child))
        else:
            out[child] = ("file", stat.S_IMODE(attr.mode), fs.read_path(child))
    return out


def follows_link(root, o):
    """Whether the operation would make the kernel follow a symlink before asking the
    file system (path resolution is the kernel's job, not the core's): such steps are
    left out of the model."""
    parts = o[1].split("/")
    check = parts if o[0] in ("write", "truncate", "chmod") else parts[:-1]
    for i in range(1, len(check) + 1):
        if os.path.islink(os.path.join(root, *check[:i])):
            return True
    return o[0] == "rename" and any(
        os.path.islink(os.path.join(root, *o[2].split("/")[:i]))
        for i in range(1, len(o[2].split("/"))))


def outcome(fn):
    try:
        fn()
        return 0
    except OSError as e:
        return e.errno
    except Exception as e:  # noqa: BLE001 - compared as an errno
        return errno_of(e)


# errnos that mean the same refusal (the order in which POSIX checks conditions varies)
SAME = {errno.ENOTEMPTY: errno.EEXIST}


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=25))
# a folder moved into a new folder (n came from mkdir d/y) keeps its lower contents
@example(ops=[("mkdir", "d/y"), ("rename", "d/y", "n"), ("rename", "d", "n/m")])
def test_overlay_behaves_like_a_local_folder(tmp_path_factory, ops):
    base = tmp_path_factory.mktemp("ov")
    os.environ["XDG_DATA_HOME"] = str(base / "data")
    os.environ["XDG_CACHE_HOME"] = str(base / "cache")
    repo_mod._repos.clear()
    url = str(base / "repo")
    Repository.open(url, create=True, chunk_size=CHUNK, pack_size=256 * 1024)
    src = base / "src"
    for rel, data in BASE.items():
        write(src, rel, data)
        os.chmod(src / rel, 0o644)
    ds = Dataset.create("n", "p", repo=url)
    ds.add_files(src)
    ds.finalize(auto_upload=True)
    local = base / "local"
    shutil.copytree(src, local, symlinks=True)

    repo = Repository.open(url)
    cache = UnitCache(base / "ucache", 1 << 30)
    reader = Reader(repo, cache)
    view = OverlayView(VersionView(repo, ds.id, reader), Overlay(base / "overlay"))
    fs = Filesystem(view, writable=True)
    try:
        for o in ops:
            if follows_link(str(local), o):
                continue
            want = outcome(lambda: local_apply(str(local), o))
            got = outcome(lambda: fs_apply(fs, o))
            assert SAME.get(got, got) == SAME.get(want, want), (o, got, want)
            assert fs_tree(fs) == local_tree(str(local)), o
        # a remount (a new view over the same overlay folder) sees the same tree
        again = Filesystem(OverlayView(VersionView(repo, ds.id, reader),
                                       Overlay(base / "overlay")), writable=True)
        assert fs_tree(again) == local_tree(str(local))
    finally:
        reader.close()
        cache.close()
