"""A writable mount's session: its overlays, pending-change status, commit and discard.

State (workspace/overlays/<name>/state.json, replaced atomically):
    repo, base (the version the overlay applies to), live (generation folder receiving
    writes), frozen (generation being committed, or null), draft (the child version the
    frozen generation is becoming, once created)

Commit freezes the live generation and opens a new one on top before anything slow
happens, so writes made during a commit go to the next overlay and are never lost.
The frozen generation becomes a child version through strata.catalog (draft -> upload ->
finalize); then the base moves to the child and the frozen generation is dropped. A
crash at any step leaves a state from which the next commit (or remount) resumes, and
the draft id recorded before finalizing makes a retried commit finish the same child.

A dropped generation (the frozen one after a commit, the live one after a discard) is
deleted on a background thread, so the reply to the commit does not wait for it. Its
number is never used again, and a generation folder that the state names neither live
nor frozen is garbage: one left by a crash or an unmount mid-delete is removed when the
session next starts.

Concurrency: `_lock` serialises commit, discard and view swaps; file operations keep
running against whichever view the filesystem core holds. A swap goes through
`Filesystem.switch_view`, which lets operations in flight finish first and, at a freeze,
moves files open on the frozen generation to the live one: nothing writes into a
generation once it is frozen.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from strata.catalog import config, paths
from strata.catalog.changes import ChangeSet, open_child, stage_changes
from strata.catalog.dataset import Dataset
from strata.catalog.manifest import Entry
from strata.vfs.errors import MountError
from strata.vfs.overlay import Overlay, OverlayView
from strata.vfs.views import DIR, LINK, VersionView


def overlays_dir() -> Path:
    return config.workspace_dir() / "overlays"


def default_overlay_name(mountpoint: str) -> str:
    real = os.path.join(os.path.realpath(os.path.dirname(os.path.abspath(mountpoint))),
                        os.path.basename(os.path.abspath(mountpoint)))
    return "mnt-" + hashlib.sha256(real.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Change:
    kind: str          # 'A' added, 'M' modified, 'D' removed, 'R' renamed
    path: str
    origin: str | None = None   # for renames: the path it came from

    def as_dict(self) -> dict:
        d = {"change": {"A": "added", "M": "modified", "D": "removed",
                        "R": "renamed"}[self.kind], "path": self.path}
        if self.origin is not None:
            d["from"] = self.origin
        return d


class Session:
    def __init__(self, repo, name: str, version_id: str, reader):
        self.repo = repo
        self.reader = reader
        self.folder = overlays_dir() / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self._owner = _own(self.folder, name)   # one mount per overlay, until close()
        self._lock = threading.RLock()
        self.state = self._load()
        if self.state.get("repo") not in (None, repo.url):
            raise MountError(f"overlay {name} belongs to repository {self.state['repo']}")
        base = self.state.get("base")
        if base and base != version_id and not self._pending(base):
            base = None        # nothing pending: the overlay simply follows the new version
        if base and base != version_id:
            raise MountError(
                f"overlay {name} holds pending changes on version {base}; mount that "
                f"version (or commit/discard them) to use another one")
        self._set(live=self.state.get("live", 1), repo=repo.url, base=version_id)
        self.fs = None   # the filesystem core whose view this session swaps
        self._drop([p for p in self.folder.iterdir()
                    if p.name[:1] == "g" and p.name[1:].isdigit()
                    and p.name not in self._in_use()])

    def close(self) -> None:
        """Let another session use this overlay (a process that ends does this too)."""
        live = getattr(self, "live", None)
        if live is not None:
            live.stop_hashing()
        if self._owner is not None:
            os.close(self._owner)
            self._owner = None

    # ---- state -------------------------------------------------------------------------
    def _load(self) -> dict:
        try:
            return json.loads((self.folder / "state.json").read_text())
        except FileNotFoundError:
            return {}

    def _set(self, **changes) -> None:
        """Change the state on disk, then in memory: a write that fails (a full disk)
        leaves both as they were, so the operation can simply be run again."""
        state = {**self.state, **changes}
        tmp = self.folder / f".state.{os.getpid()}.tmp"
        try:
            tmp.write_text(json.dumps(state, indent=1))
            os.replace(tmp, self.folder / "state.json")
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.state = state

    def _generation(self, n: int) -> Overlay:
        o = Overlay(self.folder / f"g{n}")
        o.chunk_size = self.repo.chunk_size   # large files are hashed once closed
        return o

    def _pending(self, base: str) -> bool:
        live = self.state.get("live")
        if self.state.get("frozen"):
            return True
        if not live or not (self.folder / f"g{live}" / "journal.db").exists():
            return False
        o = self._generation(live)
        try:
            return not o.is_empty()
        finally:
            o.close()

    # ---- views -------------------------------------------------------------------------
    def build_view(self) -> OverlayView:
        with self._lock:
            base = VersionView(self.repo, self.state["base"], self.reader)
            lower = base
            if self.state.get("frozen"):
                lower = OverlayView(base, self._generation(self.state["frozen"]))
            self.live = self._generation(self.state["live"])
            return OverlayView(lower, self.live)

    def _swap(self, frozen: int | None = None) -> None:
        """Point the filesystem at a freshly built view; with `frozen`, the generation
        just frozen, whose open files move to the new live generation."""
        view = self.build_view()
        if self.fs is not None:
            upper = str(self._generation_dir(frozen) / "upper") if frozen else None
            self.fs.switch_view(view, upper)

    def _generation_dir(self, n: int) -> Path:
        return self.folder / f"g{n}"

    def _in_use(self) -> set[str]:
        return {f"g{n}" for n in (self.state.get("live"), self.state.get("frozen")) if n}

    @staticmethod
    def _drop(folders: list[Path]) -> None:
        """Delete dropped generations off the caller's path (see the module docstring)."""
        def delete() -> None:
            for folder in folders:
                shutil.rmtree(folder, ignore_errors=True)
        if folders:
            threading.Thread(target=delete, name="strata-overlay-drop", daemon=True).start()

    # ---- status ------------------------------------------------------------------------
    def status(self) -> dict:
        with self._lock:
            view = self.fs.view if self.fs is not None else self.build_view()
            frozen = changes_of(view.lower) if self.state.get("frozen") else []
            return {"base": self.state["base"], "committing": bool(self.state.get("frozen")),
                    "changes": [c.as_dict() for c in changes_of(view)],
                    "committing_changes": [c.as_dict() for c in frozen]}

    # ---- commit / discard --------------------------------------------------------------
    def commit(self, *, name=None, version=None, description=None, tags=None) -> Dataset:
        with self._lock:
            frozen = None   # the overlay that was live until this commit froze it
            if not self.state.get("frozen"):
                if self.live.is_empty():
                    raise MountError("nothing to commit: the mount has no pending changes")
                self._set(frozen=self.state["live"], live=self.state["live"] + 1, draft=None)
                frozen = self.live
                self._swap(frozen=self.state["frozen"])
                frozen.wait_hashing()   # hashes under way finish sooner than new ones
            frozen_view = OverlayView(VersionView(self.repo, self.state["base"], self.reader),
                                      self._generation(self.state["frozen"]))
            parent = Dataset.get(self.state["base"], repo=self.repo)
            child = open_child(parent, draft_id=self.state.get("draft"), name=name,
                               version=version, description=description, tags=tags)
            if not child.is_final():
                self._set(draft=child.id)
                stage_changes(child, changeset_of(frozen_view))
                child.finalize(auto_upload=True)
            if frozen is not None:
                frozen.stop_hashing()   # its files are in the child now
            old = self.state["frozen"]
            self._set(base=child.id, frozen=None, draft=None)
            self._swap()
            self._drop([self._generation_dir(old)])
            return child

    def discard(self) -> int:
        with self._lock:
            if self.state.get("frozen"):
                raise MountError("a commit is in progress; retry the commit first")
            dropped = len(self.live.rows())
            self.live.stop_hashing()
            old = self.state["live"]
            self._set(live=old + 1)
            self._swap()
            self._drop([self._generation_dir(old)])
            return dropped


def _own(folder: Path, name: str) -> int:
    """An exclusive lock on the overlay, held while the session lives: two mounts writing
    one journal and one upper folder would corrupt both. The kernel drops it when the
    process dies (kill -9 too), so a crashed mount never blocks the next one."""
    fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MountError(f"overlay {name} is in use by another writable mount; unmount "
                         f"it first, or name another overlay with --overlay") from None
    return fd


# ---- reading an overlay as changes -------------------------------------------------------
def _walk(view: OverlayView, folder: str, cs: ChangeSet) -> None:
    """Everything visible under `folder`, as exact entries (a redirected or opaque folder
    is committed by what it shows, not by its journal rows)."""
    nodes = view.listdir(folder)
    n = view.lookup(folder)
    if not nodes or n.mode & 0o7777 != 0o755:   # 0o755: what an implicit folder shows
        cs.dirs.append((folder, n.mode, n.mtime_ns))
    for n in nodes:
        if n.kind == DIR:
            _walk(view, n.path, cs)
        elif n.kind == LINK:
            cs.links.append((n.path, n.entry.target, n.mtime_ns))
        elif n.upper:
            _add_file(view, cs, n)
        else:
            cs.refs.append(_moved(n.entry, n.path, n.mode, n.mtime_ns))


def _add_file(view: OverlayView, cs: ChangeSet, n, path: str | None = None) -> None:
    """An upper file to store; the chunks it still shares with the lower file it was
    copied from need no hashing."""
    cs.files.append((path or n.path, n.upper))
    name = os.path.basename(n.upper)
    hashed = view.overlay.hashed(name, n.size)
    if hashed is not None:
        cs.hashed[n.upper] = (n.size, *hashed)
        return
    known = view.overlay.known_chunks(name, n.size)
    if known:
        cs.known[n.upper] = known


def _moved(e: Entry, path: str, mode: int, mtime_ns: int) -> Entry:
    return Entry(path, e.kind, e.size, e.sha256, mode, mtime_ns, e.pack, e.offset, e.chunks,
                 e.target)


def changeset_of(view: OverlayView) -> ChangeSet:
    cs = ChangeSet()
    covered: list[str] = []   # folders committed by walking them
    for row in view.overlay.rows():
        if any(row.path.startswith(c + "/") for c in covered):
            continue
        if row.kind == "w":
            cs.removed.append(row.path)
        elif row.kind == DIR and (row.redirect is not None or row.opaque):
            cs.removed.append(row.path)
            _walk(view, row.path, cs)
            covered.append(row.path)
        elif row.kind == DIR:
            if not view.listdir(row.path) or row.mode is not None:
                n = view.lookup(row.path)
                cs.dirs.append((row.path, n.mode, n.mtime_ns))
        elif row.kind == LINK:
            cs.links.append((row.path, row.target, row.mtime_ns or 0))
        else:
            n = view.lookup(row.path)
            if n.upper:
                _add_file(view, cs, n, row.path)
            else:
                cs.refs.append(_moved(n.entry, row.path, n.mode, n.mtime_ns))
    # a folder emptied by removals is still there in the mount: keep it explicitly
    for folder in {paths.parent_of(p) for p in cs.removed} - {""}:
        n = view.lookup(folder)
        if n is not None and n.is_dir and not view.listdir(folder):
            cs.dirs.append((folder, n.mode, n.mtime_ns))
    return cs


def changes_of(view: OverlayView) -> list[Change]:
    """Pending changes like `git status`: A added, M modified, D removed, R renamed."""
    out = []
    lower = view.lower
    for row in view.overlay.rows():
        if row.kind == "w":
            out.append(Change("D", row.path))
        elif row.kind == DIR:
            if row.redirect is not None:
                out.append(Change("R", row.path, row.redirect))
            elif lower.lookup(row.path) is None or row.opaque:
                out.append(Change("A", row.path + "/"))
            else:
                out.append(Change("M", row.path + "/"))
        elif row.origin and row.origin != row.path:
            out.append(Change("R", row.path, row.origin))
        elif row.origin == row.path or lower.lookup(row.path) is not None:
            out.append(Change("M", row.path))
        else:
            out.append(Change("A", row.path))
    # a rename shows as R new <- old; its whiteout is not a separate removal (the
    # whiteout may sit below a renamed folder: compare the lower path it hides)
    renamed_from = {c.origin for c in out if c.kind == "R"}

    def hidden(path: str) -> str | None:
        folder = view.lower_path(paths.parent_of(path)) if paths.parent_of(path) else ""
        return None if folder is None else paths.join(folder, paths.name_of(path))
    return [c for c in out if not (c.kind == "D" and (c.path in renamed_from or
                                                      hidden(c.path) in renamed_from))]
