"""Writing new files past the page cache (O_DIRECT), for the bytes nobody reads back soon.

A blob stored by `add`, or a unit the mount's cache keeps on disk, is written once and read
later (or never). Through the page cache each byte is first copied into freshly allocated
kernel pages and written back later; on the 2-core VM strata is measured on that copy is
the largest CPU cost of the whole write (2 GiB: 2.6 core-seconds and 2.8 s to durable,
against 0.5 core-seconds and 1.7 s with O_DIRECT; docs/performance.md). O_DIRECT sends the
bytes from our buffer to the device: the write returns once the device has them, so a
later fsync has only metadata left to do.

O_DIRECT wants the buffer, the file offset and the length aligned to the device's block.
Data is copied piecewise into one page-aligned buffer per thread (a memcpy costs a tenth
of the page-cache copy it replaces); a last partial block is padded with zeros and the file
truncated to its true size. Where a filesystem refuses O_DIRECT (EINVAL on open or on the
first write: tmpfs on old kernels, some FUSE and network filesystems) the file is written
through the page cache instead, and that filesystem is not asked again.

Small files always go through the page cache: below `MIN_DIRECT` the saving is nil and an
O_DIRECT write of a few KiB waits for the device. `STRATA_DIRECT_IO=0` turns it all off.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading

ALIGN = 4096                 # covers 512-byte and 4 KiB logical blocks
PIECE = 8 << 20              # bytes copied into the aligned buffer per write
MIN_DIRECT = 1 << 20         # smaller files go through the page cache

_O_DIRECT = getattr(os, "O_DIRECT", 0)
_local = threading.local()   # .buf: this thread's aligned buffer
_refused: set[int] = set()   # st_dev of filesystems that refused O_DIRECT
_refused_lock = threading.Lock()


def enabled() -> bool:
    return bool(_O_DIRECT) and os.environ.get("STRATA_DIRECT_IO", "1") not in ("0", "no",
                                                                                 "false")


Buffer = bytes | bytearray | memoryview


def create(path: str, data: Buffer | list[Buffer], *, exclusive: bool = True,
           mode: int = 0o666) -> int:
    """Create the file `path` holding `data` (one buffer, or a list of them written one
    after the other) and return its descriptor, open for writing (the caller sets times,
    fsyncs, closes). Large data bypasses the page cache where the filesystem allows it.
    On an error nothing is left open; the caller removes the file."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    parts = [memoryview(p).cast("B") for p in (data if isinstance(data, list) else [data])]
    total = sum(len(p) for p in parts)
    direct = total >= MIN_DIRECT and enabled() and not _refused_here(path)
    try:
        fd = os.open(path, flags | (_O_DIRECT if direct else 0), mode)
    except OSError as exc:
        if not direct or exc.errno != errno.EINVAL:
            raise
        # refused at open; the file may have been created before the refusal
        _remember_refusal(os.stat(os.path.dirname(path) or ".").st_dev)
        direct = False
        fd = os.open(path, (flags & ~os.O_EXCL) | os.O_TRUNC, mode)
    try:
        if not (direct and _write_direct(fd, parts, total)):
            for view in parts:
                _write_buffered(fd, view)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refused_here(path: str) -> bool:
    if not _refused:
        return False
    try:
        return os.stat(os.path.dirname(path) or ".").st_dev in _refused
    except OSError:
        return False


def _write_buffered(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _buffer() -> mmap.mmap:
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = mmap.mmap(-1, PIECE)   # anonymous mappings are page-aligned
    return buf


def _write_direct(fd: int, parts: list[memoryview], total: int) -> bool:
    """Write the parts one after the other from offset 0 with O_DIRECT. False if the
    filesystem refused it (the descriptor is then switched back to buffered writes, at
    offset 0, file empty)."""
    buf = _buffer()
    done = 0     # bytes written to the file
    filled = 0   # bytes waiting in the buffer
    try:
        for part in parts:
            at = 0
            while at < len(part):
                n = min(PIECE - filled, len(part) - at)
                buf[filled:filled + n] = part[at:at + n]
                filled += n
                at += n
                if filled == PIECE:
                    _pwrite_aligned(fd, buf, PIECE, done)
                    done += PIECE
                    filled = 0
        if filled:
            padded = -(-filled // ALIGN) * ALIGN
            buf[filled:padded] = bytes(padded - filled)
            _pwrite_aligned(fd, buf, padded, done)
    except OSError as exc:
        if exc.errno != errno.EINVAL or done:
            raise
        _refuse(fd)
        return False
    if total % ALIGN:
        os.ftruncate(fd, total)
    return True


def _pwrite_aligned(fd: int, buf: mmap.mmap, length: int, offset: int) -> None:
    written = 0
    while written < length:
        # a short direct write ends on a block boundary; go on from there
        written += os.pwrite(fd, memoryview(buf)[written:length], offset + written)


def _refuse(fd: int) -> None:
    """This filesystem takes O_DIRECT opens but not the writes: remember, and go buffered."""
    _remember_refusal(os.fstat(fd).st_dev)
    fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)


def _remember_refusal(dev: int) -> None:
    with _refused_lock:
        _refused.add(dev)


def write_at(path: str, data: Buffer, offset: int) -> None:
    """Write `data` at `offset` of the existing file `path`, past the page cache where the
    filesystem allows it (offset a multiple of ALIGN). A last partial block goes out padded
    with zeros: the caller truncates the file to its size once it is whole."""
    view = memoryview(data).cast("B")
    direct = (len(view) >= MIN_DIRECT and offset % ALIGN == 0 and enabled()
              and not _refused_here(path))
    flags = os.O_WRONLY | os.O_CLOEXEC
    try:
        fd = os.open(path, flags | (_O_DIRECT if direct else 0))
    except OSError as exc:
        if not direct or exc.errno != errno.EINVAL:
            raise
        _remember_refusal(os.stat(os.path.dirname(path) or ".").st_dev)
        direct = False
        fd = os.open(path, flags)
    try:
        if direct:
            try:
                _write_pieces_at(fd, view, offset)
                return
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                _remember_refusal(os.fstat(fd).st_dev)
                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~_O_DIRECT)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
    finally:
        os.close(fd)


def _write_pieces_at(fd: int, view: memoryview, offset: int) -> None:
    buf = _buffer()
    at = 0
    while at < len(view):
        n = min(PIECE, len(view) - at)
        buf[:n] = view[at:at + n]
        padded = -(-n // ALIGN) * ALIGN
        if padded != n:
            buf[n:padded] = bytes(padded - n)
        _pwrite_aligned(fd, buf, padded, offset + at)
        at += n
