"""Exact change-sets: what a writable mount's overlay hands the catalog at commit.

Unlike add_files/remove_files (local folders, wildcards), a `ChangeSet` names every path
exactly: local files to store at given dataset paths, entries of this repository that
keep pointing at their blobs under a new path or mode (renames: nothing is uploaded),
symlinks, folders, and removed paths. `commit_changes` turns one into a child version
through the usual draft -> upload -> finalize path, so only new bytes are uploaded.
"""

from __future__ import annotations

import os
import stat as stat_mod
from dataclasses import dataclass, field

from strata.catalog import paths
from strata.catalog.dataset import Dataset
from strata.catalog.errors import SourceMissing
from strata.catalog.manifest import Entry
from strata.catalog.progress import NO_PROGRESS, Progress
from strata.catalog.sources import Candidate
from strata.storage.errors import StrataError


@dataclass
class ChangeSet:
    files: list[tuple[str, str]] = field(default_factory=list)     # (dataset path, local file)
    refs: list[Entry] = field(default_factory=list)                # same blobs, new path/mode
    links: list[tuple[str, str, int]] = field(default_factory=list)  # (path, target, mtime_ns)
    dirs: list[tuple[str, int, int]] = field(default_factory=list)   # (path, mode, mtime_ns)
    removed: list[str] = field(default_factory=list)
    # local file -> {chunk index: digest} of chunks known unchanged (a copied-up file's
    # untouched chunks): reused, not hashed again
    known: dict[str, dict[int, bytes]] = field(default_factory=dict)
    # local file -> (size, sha256, chunk digests) already computed for its current bytes
    hashed: dict[str, tuple[int, str, bytes | None]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.files or self.refs or self.links or self.dirs or self.removed)


def stage_changes(ds: Dataset, changes: ChangeSet, progress: Progress = NO_PROGRESS) -> None:
    """Stage `changes` into the draft `ds` (whose parent is the version they apply to).
    Its local files must no longer change (a frozen overlay generation): they are hashed
    once and not checked again at upload."""
    d = ds._require_draft("commit changes")
    for p in changes.removed:
        paths.clean(p)
    # every question staging asks is about these paths: read only them from the parent
    named = [p for p, _ in changes.files] + [e.path for e in changes.refs] + \
        [p for p, _, _ in changes.links]
    ds._limit_views(
        exact={a for p in named for a in (p, *paths.ancestors(p))} | set(changes.removed),
        folders=set(named) | set(changes.removed))
    if changes.removed:
        d.remove(sorted(set(changes.removed)))
    rows = []
    for e in changes.refs:
        paths.clean(e.path)
        rows.append((e.path, e.kind, None, e.size, e.sha256, e.mode, e.mtime_ns, e.chunks,
                     e.target, e.pack, e.offset, 1))
    for path, target, mtime_ns in changes.links:
        paths.clean(path)
        rows.append((path, "l", None, len(target.encode()), None, 0o777, mtime_ns, None,
                     target, None, 0, 1))
    if rows:
        ds._displace(d, [r[0] for r in rows])
        d.stage(rows)
    if changes.dirs:
        d.add_dirs([(paths.clean(p), m, t) for p, m, t in changes.dirs])
    ds._changed()
    cands = []
    for path, local in changes.files:
        try:
            st = os.stat(local)
        except FileNotFoundError:
            raise SourceMissing(f"{local} (for {path}) vanished before the commit") from None
        cands.append(Candidate(paths.clean(path), local, "f", st.st_size,
                               stat_mod.S_IMODE(st.st_mode), st.st_mtime_ns,
                               known=changes.known.get(local),
                               hashed=changes.hashed.get(local)))
    if cands:
        ds._stage(d, cands, progress, frozen=True)


def open_child(parent: Dataset, *, draft_id: str | None = None, name: str | None = None,
               version: str | None = None, description: str | None = None,
               tags=None) -> Dataset:
    """The child version a commit builds: the draft (or, if it was finalized already,
    the version) `draft_id` left by an earlier attempt, else a new draft of `parent`'s
    dataset. Staging the same changes into a resumed draft again is harmless, so a
    retried commit produces exactly one child."""
    if draft_id:
        existing = parent.repo.try_record(draft_id)
        if existing is not None:
            return Dataset(parent.repo, record=existing)
        try:
            return Dataset.get(draft_id, repo=parent.repo)
        except StrataError:
            pass   # the draft is gone (discarded by hand): start again
    return Dataset.create(name or parent.name, parent.project, parent_datasets=[parent.id],
                          dataset_version=version, dataset_tags=tags,
                          description=description, repo=parent.repo, remember=False)
