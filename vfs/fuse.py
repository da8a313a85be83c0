"""The FUSE adapter: the one module that imports the FUSE binding.

Binding: mfusepy (fusepy's maintained fork, the same path-based API) on libfuse3, chosen
by measurement (docs/performance.md). Threading: libfuse's multithreaded loop; the core
is thread-safe (its locks are documented in strata.vfs.core, .views, .reader and
strata.storage.cache). `max_idle_threads` is passed because Debian's libfuse 3.14 refuses
the multithreaded loop without it.

Every operation goes through `_errno_boundary`, which maps exceptions to errno values
with one table (`ERRNO`); anything unexpected is logged with its traceback and becomes
EIO: never a hang and never a wrong byte.

Read-only mounts rely on versions being immutable: the kernel keeps page cache across
opens (keep_cache / kernel_cache) and caches attributes and entries for an hour.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import itertools
import logging
import os
import stat as stat_mod
import time

from strata.catalog.errors import CatalogError, InvalidPath
from strata.storage.errors import (Corrupt, NotFound, PermissionDenied, StorageError,
                                   Unreachable)
from strata.vfs.core import Attr, Filesystem
from strata.vfs.errors import (BadHandle, Exists, InvalidArgument, IsADirectory, NoAttribute, NoEntry,
                               NotADirectory, NotEmpty, NotPermitted, ReadOnly)

os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")
import mfusepy  # noqa: E402  (the library name must be chosen before import)

log = logging.getLogger("strata.vfs")

ENOATTR = getattr(errno, "ENOATTR", errno.ENODATA)

# Exception type -> errno, most specific first. Storage failures are EIO: the caller can
# do nothing about them from inside the file system, and the log names the object.
ERRNO: list[tuple[type[BaseException], int]] = [
    (NoEntry, errno.ENOENT),
    (NotADirectory, errno.ENOTDIR),
    (IsADirectory, errno.EISDIR),
    (ReadOnly, errno.EROFS),
    (Exists, errno.EEXIST),
    (NotEmpty, errno.ENOTEMPTY),
    (NotPermitted, errno.EPERM),
    (InvalidArgument, errno.EINVAL),
    (BadHandle, errno.EBADF),
    (NoAttribute, ENOATTR),
    (InvalidPath, errno.EIO),
    (Corrupt, errno.EIO),
    (Unreachable, errno.EIO),
    (NotFound, errno.EIO),
    (PermissionDenied, errno.EIO),
    (StorageError, errno.EIO),
    (CatalogError, errno.EIO),
]
QUIET = (NoEntry, NoAttribute, Exists, NotEmpty)   # expected in normal operation: not logged
RENAME_NOREPLACE = 1   # renameat2 flags (linux/fs.h)


def errno_of(exc: BaseException) -> int:
    for kind, code in ERRNO:
        if isinstance(exc, kind):
            return code
    return errno.EIO


def _errno_boundary(op):
    @functools.wraps(op)
    def wrapper(self, *args):
        try:
            return op(self, *args)
        except mfusepy.FuseOSError:
            raise
        except QUIET as e:
            raise mfusepy.FuseOSError(errno_of(e)) from None
        except Exception as e:  # noqa: BLE001 - the boundary: everything becomes an errno
            code = errno_of(e)
            if any(isinstance(e, kind) for kind, _ in ERRNO):
                log.error("%s %s: %s", op.__name__, args[:1], e)
            else:
                log.exception("unexpected error in %s %s", op.__name__, args[:1])
            raise mfusepy.FuseOSError(code) from None
    return wrapper


def _rel(path: str) -> str:
    return path.lstrip("/")


def _stat(a: Attr) -> dict:
    t = a.mtime_ns
    return {"st_mode": a.mode, "st_size": a.size, "st_nlink": a.nlink, "st_uid": a.uid,
            "st_gid": a.gid, "st_mtime": t, "st_ctime": t, "st_atime": t,
            "st_blocks": a.blocks, "st_blksize": 1 << 20}


def _direct_if_write_only(fi) -> None:
    """Write-only handles bypass the kernel's page cache (direct_io): each write(2) goes
    to the server as it is, without first filling page-cache pages of the FUSE file
    that the upper file's own pages duplicate (measured: sequential writes about 1.3x
    faster). Still write-through: a write that returned is in the upper file. Such a
    handle cannot be mmapped (a shared mapping needs read access), and the kernel
    drops cached pages of the range a direct write covers, so other handles keep
    reading what was written."""
    if fi.flags & os.O_ACCMODE == os.O_WRONLY:
        fi.direct_io = 1


class FuseOperations(mfusepy.Operations):
    use_ns = True

    def __init__(self, fs: Filesystem, *, on_ready=None):
        self.fs = fs
        self.on_ready = on_ready

    def init(self, path):
        # the libfuse handle, for invalidating kernel caches after discard/commit
        self.fuse_ptr = ctypes.c_void_p(mfusepy._libfuse.fuse_get_context().contents.fuse)
        if self.on_ready:
            self.on_ready()

    def invalidate(self, path: str) -> None:
        """Drop what the kernel cached of `path` (entry, attributes, pages)."""
        ptr = getattr(self, "fuse_ptr", None)
        if ptr is not None:
            mfusepy._libfuse.fuse_invalidate_path(ptr, ("/" + path).encode())

    @_errno_boundary
    def getattr(self, path, fh=None):
        return _stat(self.fs.getattr(_rel(path)))

    def opendir(self, path):
        return 0   # defined (not mfusepy's ignored stub) so _FUSE.opendir is registered

    def releasedir(self, path, fh):
        return 0   # likewise for _FUSE.releasedir, which drops the handle's listing

    @_errno_boundary
    def readdir(self, path, fh):
        out = [(".", {"st_mode": stat_mod.S_IFDIR}, 0), ("..", {"st_mode": stat_mod.S_IFDIR}, 0)]
        out += [(name, {"st_mode": mode}, 0) for name, mode in self.fs.readdir_types(_rel(path))]
        return out

    @_errno_boundary
    def readdir_plus(self, path):
        """(name, attributes) of every entry, for READDIRPLUS replies."""
        return [(name, _stat(a)) for name, a in self.fs.readdir(_rel(path))]

    @_errno_boundary
    def readdir_types(self, path):
        """(name, file type bits) of every entry, for plain READDIR replies."""
        return self.fs.readdir_types(_rel(path))

    @_errno_boundary
    def readlink(self, path):
        return self.fs.readlink(_rel(path))

    @_errno_boundary
    def open(self, path, fi):
        fi.fh = self.fs.open(_rel(path), fi.flags)
        # a version never changes, and in a writable mount every change passes through
        # the kernel (discard invalidates what it drops; a commit changes no bytes): the
        # page cache stays valid across opens
        fi.keep_cache = 1
        _direct_if_write_only(fi)
        return 0

    @_errno_boundary
    def read(self, path, size, offset, fi):
        # what mfusepy would call; _FUSE.read calls read_into instead (mfusepy registers
        # libfuse's read callback only if this exists)
        return self.fs.read(fi.fh, offset, size)

    @_errno_boundary
    def read_into(self, path, buf, offset, fi):
        return self.fs.read_into(fi.fh, offset, buf)

    @_errno_boundary
    def release(self, path, fi):
        self.fs.release(fi.fh)
        return 0

    @_errno_boundary
    def getxattr(self, path, name, position=0):
        return self.fs.getxattr(_rel(path), name)

    @_errno_boundary
    def listxattr(self, path):
        return self.fs.listxattr(_rel(path))

    @_errno_boundary
    def statfs(self, path):
        return self.fs.statfs()

    # ---- writable mounts ---------------------------------------------------------------
    @_errno_boundary
    def create(self, path, mode, fi):
        fi.fh = self.fs.create(_rel(path), mode, fi.flags)
        _direct_if_write_only(fi)
        return 0

    @_errno_boundary
    def write(self, path, data, offset, fi):
        return self.fs.write(fi.fh, offset, data)

    @_errno_boundary
    def truncate(self, path, length, fh=None):
        self.fs.truncate(_rel(path), length)
        return 0

    @_errno_boundary
    def flush(self, path, fi):
        return 0

    @_errno_boundary
    def fsync(self, path, datasync, fi):
        self.fs.fsync(fi.fh)
        return 0

    @_errno_boundary
    def unlink(self, path):
        self.fs.unlink(_rel(path))
        return 0

    @_errno_boundary
    def mkdir(self, path, mode):
        self.fs.mkdir(_rel(path), mode)
        return 0

    @_errno_boundary
    def rmdir(self, path):
        self.fs.rmdir(_rel(path))
        return 0

    @_errno_boundary
    def rename(self, old, new, flags=0):
        if flags & ~RENAME_NOREPLACE:
            # RENAME_EXCHANGE / RENAME_WHITEOUT: not supported (done as a plain rename,
            # an exchange would destroy its target); EINVAL is what such file systems say
            raise mfusepy.FuseOSError(errno.EINVAL)
        self.fs.rename(_rel(old), _rel(new), noreplace=bool(flags & RENAME_NOREPLACE))
        return 0

    @_errno_boundary
    def symlink(self, target, source):
        self.fs.symlink(_rel(target), source)
        return 0

    @_errno_boundary
    def link(self, target, source):
        self.fs.link(_rel(target), _rel(source))
        return 0

    @_errno_boundary
    def chmod(self, path, mode):
        self.fs.chmod(_rel(path), mode)
        return 0

    @_errno_boundary
    def chown(self, path, uid, gid):
        self.fs.chown(_rel(path), uid, gid)
        return 0

    @_errno_boundary
    def utimens(self, path, times=None):
        mtime = times[1] if times else time.time_ns()
        self.fs.utimens(_rel(path), int(mtime))
        return 0


def _view(buf, size: int) -> memoryview:
    """A writable view of `size` bytes of a libfuse buffer (valid during the call only)."""
    if not size:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * size).from_address(
        ctypes.cast(buf, ctypes.c_void_p).value)).cast("B")


READDIR_PLUS = 1        # libfuse 3: enum fuse_readdir_flags
FILL_DIR_PLUS = 2       # libfuse 3: enum fuse_fill_dir_flags


class _FUSE(mfusepy.FUSE):
    """mfusepy drops the flags of libfuse 3's rename and the file info of opendir, copies
    written bytes, and never fills READDIRPLUS replies: these overrides hand the
    operations what they need and the kernel what it can use."""

    def readdir_fuse_3(self, path: bytes | None, buf, filler, offset: int, fip,
                       flags: int) -> int:
        # The first listing of a folder carries every entry's attributes (READDIRPLUS),
        # so the kernel creates the entries' inodes from it instead of sending a LOOKUP
        # per name: a cold `find`, `ls -l` or os.walk + stat makes one round trip per
        # folder, not one per file (measured: 50k files, cold find 5.4-7.3 s -> 1.1-2.0
        # s). Later listings of the same folder (the kernel asks again at offset 0) send
        # names and types only: the entries are known by then, and filling attributes
        # again made warm passes slower.
        if path is None:
            return super().readdir_fuse_3(path, buf, filler, offset, fip, flags)
        # One listing per open folder handle: the kernel asks several times (offsets),
        # and building the listing again for each request cost more than sending it.
        listings = self.__dict__.setdefault("_listings", {})
        fh = fip.contents.fh
        listing = listings.get(fh) if offset else None
        if listing is None:
            listing = listings[fh] = self._listing(path.decode(self.encoding, self.errors),
                                                   bool(flags & READDIR_PLUS))
        plus, entries = listing
        # Offsets are never 0 (with offset 0, libfuse keeps the names but drops the
        # attributes): '.' is 1, '..' 2, entry i is i + 3, and a call resumes after
        # `offset` when the kernel's buffer filled up.
        dot = mfusepy.c_stat()
        dot.st_mode = stat_mod.S_IFDIR
        for i, name in enumerate((b".", b"..")[offset:], start=offset + 1):
            if filler(buf, name, dot, i, 0):
                return 0
        start = max(offset - 2, 0)
        fill = FILL_DIR_PLUS if plus else 0
        for i, (name, st) in enumerate(entries[start:], start=start + 3):
            if filler(buf, name, st, i, fill):
                break
        return 0

    def _listing(self, path: str, plus: bool) -> tuple[bool, list]:
        listed = self.__dict__.setdefault("_listed", set())
        plus = plus and path not in listed
        listed.add(path)
        if plus:
            entries = self.operations.readdir_plus(path)
        else:
            entries = [(name, {"st_mode": mode})
                       for name, mode in self.operations.readdir_types(path)]
        out = []
        for name, attrs in entries:
            st = mfusepy.c_stat()
            mfusepy.set_st_attrs(st, attrs, use_ns=True)
            out.append((name.encode(self.encoding, self.errors), st))
        return plus, out

    def releasedir(self, path: bytes | None, fip) -> int:
        self.__dict__.get("_listings", {}).pop(fip.contents.fh, None)
        return super().releasedir(path, fip)

    def opendir(self, path: bytes, fip) -> int:
        # mfusepy's opendir drops the file info; set it here. A version never changes,
        # so on read-only mounts the kernel may keep directory listings (cache_readdir)
        # across opens (keep_cache): a second `find` costs no round trips.
        fi = fip.contents
        self.operations.opendir(path.decode(self.encoding, self.errors))
        fi.fh = next(self.__dict__.setdefault("_dir_handles", itertools.count(1)))
        if not self.operations.fs.writable:
            fi.keep_cache = 1
            if hasattr(fi, "cache_readdir"):
                fi.cache_readdir = 1
        return 0

    def read(self, path: bytes | None, buf, size: int, offset: int, fip) -> int:
        # mfusepy has the operation return bytes and copies them into libfuse's buffer;
        # reading straight into that buffer saves the copy and the allocation
        return self.operations.read_into(None if path is None else
                                         path.decode(self.encoding, self.errors),
                                         _view(buf, size), offset, fip.contents)

    def write(self, path: bytes | None, buf, size: int, offset: int, fip) -> int:
        # mfusepy copies every request's bytes into a new bytes object (ctypes.string_at,
        # 1 MiB per write); os.pwrite needs only a view of libfuse's buffer, which stays
        # valid until this call returns (nothing keeps the view longer)
        return self.operations.write(None if path is None else
                                     path.decode(self.encoding, self.errors),
                                     _view(buf, size), offset, fip.contents)

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(old.decode(self.encoding, self.errors),
                                      new.decode(self.encoding, self.errors), flags)


def serve(fs: Filesystem, mountpoint: str, *, fsname: str, foreground: bool = True,
          on_ready=None, debug: bool = False, operations: FuseOperations | None = None) -> None:
    """Mount `fs` at `mountpoint` and serve it until unmounted or signalled (libfuse
    turns SIGINT/SIGTERM/SIGHUP into a clean unmount)."""
    options = dict(fsname=fsname, subtype="strata", default_permissions=True,
                   max_idle_threads=16, foreground=foreground, debug=debug)
    if fs.writable:
        # short kernel caching: discard and commit invalidate what they change anyway
        options.update(attr_timeout=1.0, entry_timeout=1.0, negative_timeout=0.0)
    else:
        options.update(ro=True, kernel_cache=True, attr_timeout=3600.0,
                       entry_timeout=3600.0, negative_timeout=3600.0)
    try:
        ops = operations or FuseOperations(fs, on_ready=on_ready)
        _FUSE(ops, mountpoint, raw_fi=True, **options)
    except RuntimeError as e:
        # fuse_main returns 8 when its loop ends with an error, and libfuse 3's signal
        # handler records the signal as that error: SIGINT/SIGTERM/SIGHUP come back as 8
        # after libfuse has unmounted. That is the clean shutdown we asked for, not a
        # failure (a real loop error is reported by libfuse itself on stderr).
        if e.args != (8,):
            raise
        log.info("stopped by a signal; %s is unmounted", mountpoint)
