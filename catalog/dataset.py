"""`Dataset`: the Python API, shaped like `clearml.Dataset`.

A Dataset is either a draft (in the local workspace, changeable) or a final version (in the
repository, immutable but for tags, description, metadata and state). Building a version
is create -> add_files / remove_files / sync_folder -> upload -> finalize; the CLI is a thin
shell over these methods. Whole-repository operations (compare, squash, verify, delete,
gc, listing) live in strata.catalog.ops and are re-exported here as class methods.
"""

from __future__ import annotations

import bisect
import getpass
import itertools
import json
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Sequence

from strata.catalog import blobs, config, layout, paths
from strata.catalog.sources import Candidate, collect, patterns_of
from strata.catalog import draft as drafts
from strata.catalog.errors import (BadArgument, LabelTaken, NothingMatched, SourceMissing,
                                   UnknownVersion, WrongState)
from strata.catalog.manifest import chunk_ids
from strata.catalog.merge import MergedView, Scope, ancestry, merge_parents, merged
from strata.catalog.progress import NO_PROGRESS, Progress
from strata.catalog.records import VersionRecord, bump_patch, check_label, highest
from strata.catalog.repo import Repository, open_repo
from strata.storage.errors import PreconditionFailed

HASH_WORKERS = max(2, os.cpu_count() or 2)   # hashing is CPU-bound: one per core
# Storing while hashing: large files leave a thread waiting on the page cache part of the
# time, so twice as many threads as cores keep both busy (2 GiB mixed tree: 11.1-11.6 s ->
# 7.2-8.6 s); small files are mostly per-file Python work under the GIL, where more
# threads only contend (100k tiny files: 4.6 s with two, 5.6-6.9 s with four).
STORE_WORKERS = 2 * HASH_WORKERS

log = logging.getLogger("strata.catalog")



class Dataset:
    def __init__(self, repo: Repository, *, record: VersionRecord | None = None,
                 draft: drafts.Draft | None = None):
        self.repo = repo
        self._record = record
        self._draft = draft
        self._view: MergedView | None = None
        self._parent_view: MergedView | None = None
        self._scope: Scope | None = None   # see _limit_views

    # ---- identity ------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self._record.id if self._record else self._draft.id

    def _field(self, name: str, default: Any = None) -> Any:
        if self._record:
            return getattr(self._record, name)
        return self._draft.get(name, default)

    @property
    def project(self) -> str:
        return self._field("project")

    @property
    def name(self) -> str:
        return self._field("name")

    @property
    def version(self) -> str:
        return self._field("version")

    @property
    def parents(self) -> list[str]:
        return list(self._field("parents", []))

    parent_datasets = parents

    @property
    def tags(self) -> list[str]:
        return list(self._field("tags", []))

    @property
    def description(self) -> str:
        return self._field("description", "")

    @property
    def state(self) -> str:
        return self._record.state if self._record else "draft"

    @property
    def record(self) -> VersionRecord | None:
        return self._record

    def is_final(self) -> bool:
        return self._record is not None

    def __repr__(self) -> str:
        return f"<Dataset {self.project}/{self.name} {self.version} {self.id} {self.state}>"

    # ---- create / get --------------------------------------------------------------
    @classmethod
    def create(cls, dataset_name: str, dataset_project: str,
               parent_datasets: Sequence[str | "Dataset"] | None = None,
               dataset_version: str | None = None, dataset_tags: Sequence[str] | None = None,
               description: str | None = None, repo: str | Repository | None = None,
               metadata: dict | None = None, *, remember: bool = True) -> "Dataset":
        """A new draft. `remember`: it becomes the default `--id` of later commands, as
        clearml-data's create does (a writable mount's commit says False: its child is
        remembered once final, so an interrupted commit leaves the default as it was)."""
        if not dataset_name or not dataset_project:
            raise BadArgument("a dataset needs a project and a name")
        paths.text(dataset_project, "project")
        paths.text(dataset_name, "dataset name")
        if description is not None:
            paths.text(description, "description")
        dataset_tags = _strings(dataset_tags, "tag")
        if isinstance(parent_datasets, (str, Dataset)):
            parent_datasets = [parent_datasets]
        r = open_repo(repo, create=True)
        parents = []
        for p in parent_datasets or ():
            pid = p.id if isinstance(p, Dataset) else str(p)
            rec = r.try_record(pid)
            if rec is None:
                if layout.is_version_id(pid) and drafts.exists(pid):
                    raise WrongState(f"parent {pid} is not final; close it first "
                                     f"(strata close --id {pid})")
                raise UnknownVersion(f"no version {pid} in {r.url}")
            parents.append(rec.id)
        labels = r.labels(dataset_project, dataset_name)
        if dataset_version:
            check_label(dataset_version)
            if dataset_version in labels:
                raise LabelTaken(f"{dataset_project}/{dataset_name} already has version "
                                 f"{dataset_version} ({labels[dataset_version]})")
            label, explicit = dataset_version, True
        else:
            top = highest(labels)
            label, explicit = (bump_patch(top) if top else "1.0.0"), False
        if metadata is not None:
            _check_json(metadata)
        vid = uuid.uuid4().hex
        d = drafts.new_draft(vid, repo=r.url, project=dataset_project, name=dataset_name,
                             version=label, version_explicit=explicit, parents=parents,
                             tags=list(dataset_tags or ()), description=description or "",
                             metadata=metadata or {}, user=_user())
        if remember:
            config.remember_last(r.url, vid)
        return cls(r, draft=d)

    @classmethod
    def get(cls, dataset_id: str | None = None, dataset_project: str | None = None,
            dataset_name: str | None = None, dataset_version: str | None = None,
            only_completed: bool = False, only_published: bool = False,
            repo: str | Repository | None = None) -> "Dataset":
        for value, what in ((dataset_id, "dataset_id"), (dataset_project, "project"),
                            (dataset_name, "dataset name"), (dataset_version, "version")):
            if value is not None:
                paths.text(value, what)
        r = open_repo(repo)
        if dataset_id:
            rec = r.try_record(dataset_id)
            if rec is not None:
                _check_state(rec, only_completed, only_published)
                return cls(r, record=rec)
            if layout.is_version_id(dataset_id) and drafts.exists(dataset_id):
                d = drafts.Draft(dataset_id)
                if d.get("repo") == r.url:
                    if only_completed or only_published:
                        raise WrongState(f"version {dataset_id} is a draft, not final")
                    return cls(r, draft=d)
                d.close()
            raise UnknownVersion(f"no version {dataset_id} in {r.url}")
        if not (dataset_project and dataset_name):
            raise BadArgument("give a version id, or a project and a name")
        labels = r.labels(dataset_project, dataset_name)
        if dataset_version:
            vid = labels.get(dataset_version)
            if vid is None:
                raise UnknownVersion(f"{dataset_project}/{dataset_name} has no version "
                                     f"{dataset_version} in {r.url}")
            return cls.get(vid, only_completed=only_completed,
                           only_published=only_published, repo=r)
        from strata.catalog.records import semver_key
        for label in sorted(labels, key=semver_key, reverse=True):
            rec = r.try_record(labels[label])
            if rec is None or rec.state == "archived":
                continue
            if only_published and rec.state != "published":
                continue
            return cls(r, record=rec)
        if not (only_completed or only_published):
            for d in _local_drafts(r.url, dataset_project, dataset_name):
                return cls(r, draft=d)
        what = "published " if only_published else ""
        raise UnknownVersion(f"no {what}version of {dataset_project}/{dataset_name} "
                             f"in {r.url}")

    # ---- views ---------------------------------------------------------------------
    def parent_view(self) -> MergedView:
        if self._parent_view is None:
            self._parent_view = merge_parents(self.repo, self.parents, self._scope)
        return self._parent_view

    def _limit_views(self, exact=(), folders=()) -> None:
        """Let this draft's views (parent_view, view) hold only the paths `exact`, the
        trees below `folders` and what earlier calls named, until finalize: for staging
        an exact change-set (a commit), where every question the staging asks is about a
        path it names, and reading the whole merged tree would cost more than the change."""
        scope = (self._scope or Scope()).widen(exact, folders)
        if scope != self._scope:
            self._scope = scope
            self._parent_view = self._view = None

    def _unlimit_views(self) -> None:
        if self._scope is not None:
            self._scope = None
            self._parent_view = self._view = None

    def view(self) -> MergedView:
        """The merged tree of this version (for a draft: parents plus pending changes)."""
        if self._view is None:
            if self._record:
                self._view = merged(self.repo, self.id)
            else:
                v = self.parent_view().copy()
                v.apply(self._draft.removed(), self._draft.entries(), self._draft.dirs())
                self._view = v
        return self._view

    def _changed(self) -> None:
        self._view = None

    def _require_draft(self, action: str) -> drafts.Draft:
        if self._draft is None:
            raise WrongState(
                f"version {self.id} ({self.project}/{self.name} {self.version}) is "
                f"{self.state}; cannot {action}. Create a child version to change it: "
                f"strata create --project {_q(self.project)} --name {_q(self.name)} "
                f"--parents {self.id}")
        return self._draft

    # ---- changing a draft ----------------------------------------------------------
    def add_files(self, path: str | os.PathLike, wildcard: str | Sequence[str] | None = None,
                  dataset_path: str | None = None, recursive: bool = True,
                  verbose: bool = False, progress: Progress = NO_PROGRESS) -> int:
        """Stage a file or a folder's files. Returns how many files were added or changed."""
        d = self._require_draft("add files")
        prefix = paths.clean(dataset_path or "", allow_root=True, what="dataset_path")
        cands = collect(str(path), prefix, recursive=recursive, wildcard=wildcard)
        added, modified = self._stage(d, cands, progress)
        return added + modified

    def add_external_files(self, source_url: str | Sequence[str],
                           wildcard: str | Sequence[str] | None = None,
                           dataset_path: str | None = None, recursive: bool = True,
                           verbose: bool = False) -> int:
        from strata.catalog.external import list_external
        d = self._require_draft("add files")
        prefix = paths.clean(dataset_path or "", allow_root=True, what="dataset_path")
        urls = [source_url] if isinstance(source_url, str) else list(source_url)
        patterns = patterns_of(wildcard)
        rows = []
        now = time.time_ns()
        for url in urls:
            for link, rel, size in list_external(url):
                rel = paths.clean(rel, what=f"name from {url}")
                if not recursive and "/" in rel:
                    continue
                if patterns and not any(paths.matches(rel, p, recursive=True) for p in patterns):
                    continue
                rows.append((paths.join(prefix, rel), "x", None, size, None, 0o444, now,
                             None, link, None, 0, 1))
        d.stage(rows)
        self._changed()
        return len(rows)

    def remove_files(self, dataset_path: str | Sequence[str], recursive: bool = True,
                     verbose: bool = False) -> int:
        """Remove files by path, wildcard, folder (with or without a trailing '/') or
        external link URL; several at once with a list. All or nothing: if any of them
        matches nothing, nothing is removed. Returns how many files were removed."""
        d = self._require_draft("remove files")
        view = self.view()
        wanted = _strings(dataset_path, "dataset path")
        plan = [(raw, *_match_removal(view, raw, recursive)) for raw in wanted]
        for raw, hits, folder in plan:
            if not hits and folder is None:
                raise NothingMatched(f"nothing in {self.project}/{self.name} {self.version} "
                                     f"matches {raw!r}")
        parent = self.parent_view()
        removed: set[str] = set()
        for raw, hits, folder in plan:
            if folder is not None:
                d.unstage_under(folder)
                if any(paths.is_under(p, folder) for p in parent.files) or \
                        any(paths.is_under(p, folder) for p in parent.dirs):
                    d.remove([folder])
            else:
                d.unstage(hits)
                d.remove([p for p in hits if p in parent.files])
            removed.update(hits)
        self._hide_emptied_folders(d)
        return len(removed)

    def sync_folder(self, local_path: str | os.PathLike, dataset_path: str | None = None,
                    verbose: bool = False,
                    progress: Progress = NO_PROGRESS) -> tuple[int, int, int]:
        """Make the version's folder `dataset_path` mirror `local_path`.
        Returns (removed, added, modified)."""
        d = self._require_draft("sync")
        prefix = paths.clean(dataset_path or "", allow_root=True, what="dataset_path")
        cands = collect(str(local_path), prefix, recursive=True, wildcard=None,
                        as_folder=True)
        present = {c.path for c in cands}
        view = self.view()
        gone = [p for p in view.files if paths.is_under(p, prefix) and p not in present]
        gone_dirs = [p for p in view.dirs if paths.is_under(p, prefix) and p not in present
                     and not any(paths.is_under(q, p) for q in present)]
        parent = self.parent_view()
        d.unstage(gone)
        d.remove([p for p in gone + gone_dirs if p in parent.files or p in parent.dirs])
        with d.db:
            d.db.executemany("DELETE FROM dirs WHERE path=?", [(p,) for p in gone_dirs])
        self._hide_emptied_folders(d)
        added, modified = self._stage(d, cands, progress)
        return len(gone), added, modified

    def _hide_emptied_folders(self, d: drafts.Draft) -> None:
        """A parent's folder whose every file this draft removed is removed too, so the
        version's tree has no empty folder that was not asked for; the lazy mount view
        and the eager merge then agree."""
        self._changed()
        before = self.parent_view().all_dirs()
        now = self.view().all_dirs()
        emptied = [p for p in before - now
                   if not any(a in before and a not in now for a in paths.ancestors(p))]
        if emptied:
            d.remove(sorted(emptied))
            self._changed()

    def _stage(self, d: drafts.Draft, cands: list[Candidate], progress: Progress,
               *, frozen: bool = False) -> tuple[int, int]:
        """Stage local files (and links and folders) that differ from the version's view.
        `frozen`: nothing writes the sources any more (an overlay frozen for a commit), so
        upload trusts them however fresh they are, instead of hashing them again."""
        view = self.view()
        parent = self.parent_view()
        staged = {e.path: e for e in d.entries()}
        hidden = set(d.removed())
        rows, dirs, to_hash = [], [], []
        added = modified = 0
        all_dirs = None
        for c in cands:
            if c.kind == "d":
                all_dirs = view.all_dirs() if all_dirs is None else all_dirs
                if c.path not in all_dirs:
                    dirs.append((c.path, c.mode, c.mtime_ns))
                continue
            if c.kind == "l":
                cur = view.files.get(c.path)
                if cur and cur.kind == "l" and cur.target == c.target:
                    continue
                rows.append((c.path, "l", None, len(c.target.encode()), None, c.mode,
                             c.mtime_ns, None, c.target, None, 0, 1))
                added, modified = (added + 1, modified) if cur is None else (added, modified + 1)
                continue
            cur = view.files.get(c.path)
            if (cur is not None and cur.kind == "f" and cur.size == c.size
                    and cur.mtime_ns == c.mtime_ns and cur.mode == c.mode):
                continue  # the mtime+size shortcut: unchanged, not rehashed
            to_hash.append(c)
        # files whose hash the caller knows (frozen, so it still holds): not read here;
        # upload stores the chunks that are missing
        prehashed, rest = [], []
        for c in to_hash:
            (prehashed if c.hashed and c.hashed[0] == c.size else rest).append(c)
        to_hash = rest
        store = self.repo.stores_on_add
        total = sum(c.size for c in to_hash)
        progress.start("hashing and storing" if store else "hashing", total)
        dedup = self._stored_small_files(d) if store else {}
        claimed: set[str] = set()
        lock = threading.Lock()
        written = 0

        def digest(batch: list[Candidate]):
            nonlocal written
            try:
                if store:
                    out, new = blobs.hash_and_store(
                        self.repo, [(c.source, c.known) for c in batch], dedup, claimed,
                        lock, frozen=frozen)
                    with lock:
                        written += new
                else:
                    out = [(blobs.hash_file(c.source, self.repo.chunk_size, frozen=frozen,
                                            known=c.known), None) for c in batch]
            except FileNotFoundError as exc:
                raise SourceMissing(f"{exc.filename} vanished while it was being added") \
                    from None
            progress.advance(sum(h.size for h, _ in out))
            return [(c, h, where) for c, (h, where) in zip(batch, out)]

        batches = (_batches(to_hash, 512, self.repo.pack_size) if store
                   else _batches(to_hash))
        large = sum(c.size for c in to_hash if c.size >= self.repo.chunk_size)
        mostly_large = 2 * large >= total
        with ThreadPoolExecutor(STORE_WORKERS if store and mostly_large else HASH_WORKERS,
                                thread_name_prefix="strata-hash") as pool:
            results = itertools.chain(
                ((c, blobs.FileHash(c.size, c.hashed[1], c.hashed[2],
                                    blobs.stamp_of(os.stat(c.source))), None)
                 for c in prehashed),
                (item for batch in pool.map(digest, batches) for item in batch))
            for c, h, where in results:
                cur = view.files.get(c.path)
                pe = parent.files.get(c.path)
                if (pe is not None and pe.kind == "f" and pe.sha256 == h.sha256
                        and pe.mode == c.mode and not _hidden(c.path, hidden)):
                    if c.path in staged:  # back to the parent's content: no change
                        d.unstage([c.path])
                    continue
                if cur is not None and cur.kind == "f" and cur.sha256 == h.sha256 \
                        and cur.mode == c.mode and c.path in staged:
                    continue
                pack, offset, placed = (None, 0, 0) if where is None else \
                    (where.pack, where.offset, drafts.STORED)
                rows.append((c.path, "f", c.source, h.size, h.sha256, c.mode, c.mtime_ns,
                             h.chunks, None, pack, offset, placed, h.stamp))
                if pe is None or _hidden(c.path, hidden):
                    added += 1
                else:
                    modified += 1
        if written:
            self.repo.make_durable()   # before the draft records where the bytes are
            d.set(uploaded_bytes=d.get("uploaded_bytes", 0) + written)
        progress.done()
        self._displace(d, [r[0] for r in rows], [p for p, _, _ in dirs])
        d.stage(rows)
        if dirs:
            d.add_dirs(dirs)
        self._changed()
        return added, modified

    def _displace(self, d: drafts.Draft, files: list[str], folders: list[str] = ()) -> None:
        """A path staged where the parent has the other kind of thing replaces it: a file
        (or link) over a parent's folder removes the folder and everything under it; a
        file or folder under what was a parent's file removes that file. Without the
        removal, the merge would show a file and a folder of one name."""
        parent = self.parent_view()
        if not (parent.files or parent.dirs) or not (files or folders):
            return
        gone = {p for p in folders if p in parent.files}
        if files:
            # a path is a parent's folder when some parent path lies below it: bisect the
            # sorted paths instead of listing every folder of the parent
            below = sorted(itertools.chain(parent.files, parent.dirs))
            for p in files:
                i = bisect.bisect_left(below, p + "/")
                if p in parent.dirs or (i < len(below) and below[i].startswith(p + "/")):
                    gone.add(p)
        for path in (*files, *folders):
            gone.update(a for a in paths.ancestors(path) if a in parent.files)
        if gone:
            d.remove(sorted(gone))

    # ---- upload / finalize ---------------------------------------------------------
    def upload(self, show_progress: bool = True, verbose: bool = False,
               progress: Progress = NO_PROGRESS) -> int:
        """Store the draft's new bytes as blobs. Resumable: what is stored is recorded.
        Returns the number of bytes written."""
        d = self._require_draft("upload")
        stored = d.stored_unchecked()
        if stored:   # stored at add: check the sources, upload what gc took meanwhile
            missing = blobs.check_stored(self.repo, stored, progress)
            d.confirm_stored([s.path for s in missing])
        todo = d.unplaced()
        if not todo:
            return 0
        dedup = self._stored_small_files(d)
        progress.start("uploading", sum(s.size for s in todo))
        try:
            written = blobs.upload(self.repo, todo, dedup=dedup, on_placed=d.place,
                                   progress=progress)
        finally:
            progress.done()
        d.set(uploaded_bytes=d.get("uploaded_bytes", 0) + written)
        return written

    def _stored_small_files(self, d: drafts.Draft) -> dict[str, tuple[str, int]]:
        """sha256 -> (pack, offset) of every small file the parents (within the views'
        scope, if limited) or this draft stored: a file with those bytes is placed there,
        not stored again. A scoped commit thus finds the bytes of the paths it touches
        (a file rewritten with its old bytes), not a copy of another file of the tree:
        storing a small file's bytes again costs less than reading the whole tree."""
        dedup: dict[str, tuple[str, int]] = {}
        for e in self.parent_view().files.values():
            if e.pack and e.sha256:
                dedup.setdefault(e.sha256, (e.pack, e.offset))
        for sha, pack, offset in d.db.execute(
                "SELECT sha256, pack, offset FROM entries WHERE pack IS NOT NULL"):
            dedup.setdefault(sha, (pack, offset))
        return dedup

    def finalize(self, verbose: bool = False, raise_on_error: bool = True,
                 auto_upload: bool = False, progress: Progress = NO_PROGRESS) -> bool:
        """Make the draft a final version: manifest, label, record (DESIGN.md lifecycle)."""
        d = self._require_draft("finalize")
        existing = self.repo.try_record(self.id)
        if existing is None:
            if d.unplaced_count():
                if not auto_upload:
                    raise WrongState(f"version {self.id} has files not uploaded yet; run "
                                     f"'strata upload --id {self.id}' or close without "
                                     "--disable-upload")
                self.upload(progress=progress)
            self._check_placed(d, auto_upload, progress)
            existing = self._publish_record(d)
        d.destroy()
        self._draft = None
        self._record = existing
        self._unlimit_views()
        self._changed()
        config.remember_last(self.repo.url, self.id)
        return True

    def _check_placed(self, d: drafts.Draft, auto_upload: bool, progress: Progress) -> None:
        """Check that the blobs of files uploaded earlier are still stored, just before
        the version is published: blobs are shared by content, so a `delete` of another
        version, or a `gc` an hour after the upload, may have removed them meanwhile.
        Files that lost theirs are uploaded again from their sources (or, without
        `auto_upload`, the caller is told to)."""
        need: dict[str, list[str]] = {}
        for path, pack, chunks in d.db.execute(
                "SELECT path, pack, chunks FROM entries WHERE placed=1 AND kind='f' "
                "AND size>0"):
            for blob in [pack] if pack else chunk_ids(chunks):
                need.setdefault(blob, []).append(path)
        if not need:
            return
        with ThreadPoolExecutor(16) as pool:
            sizes = dict(zip(need, pool.map(self.repo.blob_size, need)))
        gone = sorted({p for blob, ps in need.items() if sizes[blob] is None for p in ps})
        if not gone:
            return
        d.unplace(gone)
        log.warning("%d files of version %s lost their stored bytes since upload (removed "
                    "by a delete or gc meanwhile): uploading them again", len(gone), self.id)
        if not auto_upload:
            n = len(gone)
            raise WrongState(f"{n} file{'s' if n != 1 else ''} of version {self.id} lost "
                             f"their stored bytes since upload (a delete or gc removed "
                             f"them); run 'strata upload --id {self.id}' again")
        self.upload(progress=progress)
        self._check_placed(d, False, progress)

    def _publish_record(self, d: drafts.Draft) -> VersionRecord:
        from strata.catalog import manifest as manifest_mod
        f = d.fields
        local = str(d.path) + ".manifest"
        entries = list(d.entries())
        gone = d.removed()
        manifest_mod.write(local, self.id, entries, gone, d.dirs())
        sha = self.repo.put_manifest(self.id, local)
        os.unlink(local)
        # within a scope the totals are the single parent's, corrected by what changed
        base = None
        if self._scope is not None and len(self.parents) == 1:
            self._limit_views([e.path for e in entries] + gone, gone)
            base = self.repo.record(self.parents[0])
        else:
            self._unlimit_views()
        parent = self.parent_view()
        view = parent.copy()
        view.apply(gone, entries, d.dirs())
        added = sum(1 for e in entries if e.path not in parent.files)
        modified = sum(1 for e in entries if e.path in parent.files)
        removed = sum(1 for p in parent.files if p not in view.files)
        files = len(view.files)
        size = sum(e.size for e in view.files.values())
        if base is not None:
            files += base.files - len(parent.files)
            size += base.size - sum(e.size for e in parent.files.values())
        label = f["version"]
        # a label taken meanwhile (even an explicit one) gives way to the next patch
        while not self.repo.claim_label(f["project"], f["name"], label, self.id):
            label = bump_patch(label)
        if label != f["version"] and f.get("version_explicit"):
            log.warning("%s/%s %s was taken by another version while this draft was open; "
                        "it is %s", f["project"], f["name"], f["version"], label)
        rec = VersionRecord(
            id=self.id, project=f["project"], name=f["name"], version=label,
            parents=tuple(f.get("parents", ())), state="final", tags=tuple(f.get("tags", ())),
            description=f.get("description", ""), metadata=f.get("metadata", {}),
            created=f.get("created", time.time()), user=f.get("user", ""),
            manifest_sha256=sha, files=files, size=size, added=added, modified=modified,
            removed=removed, uploaded_bytes=f.get("uploaded_bytes", 0))
        try:
            self.repo.create_record(rec)
        except PreconditionFailed:
            rec = self.repo.record(self.id)
        return rec

    # ---- state and mutable fields -------------------------------------------------
    def publish(self) -> None:
        if self._draft is not None:
            raise WrongState(f"version {self.id} is a draft; close it before publishing")

        def change(r: VersionRecord) -> VersionRecord:
            if r.state == "archived":
                raise WrongState(f"version {r.id} is archived")
            return r.evolve(state="published")
        self._record = self.repo.update_record(self.id, change)

    def _update(self, draft_fields: dict, change) -> None:
        if self._draft is not None:
            self._draft.set(**draft_fields)
        else:
            self._record = self.repo.update_record(self.id, change)

    def add_tags(self, tags: Sequence[str]) -> None:
        new = _strings(tags, "tag")
        merged_tags = list(dict.fromkeys(self.tags + new))
        self._update({"tags": merged_tags},
                     lambda r: r.evolve(tags=tuple(dict.fromkeys(r.tags + tuple(new)))))

    def remove_tags(self, tags: Sequence[str]) -> None:
        drop = set(_strings(tags, "tag"))
        self._update({"tags": [t for t in self.tags if t not in drop]},
                     lambda r: r.evolve(tags=tuple(t for t in r.tags if t not in drop)))

    def set_description(self, description: str) -> None:
        paths.text(description, "description")
        self._update({"description": description},
                     lambda r: r.evolve(description=description))

    def set_metadata(self, metadata: dict, replace: bool = True) -> None:
        _check_json(metadata)
        if self._draft is not None:
            cur = {} if replace else dict(self._draft.get("metadata", {}))
            cur.update(metadata)
            self._draft.set(metadata=cur)
            return

        def change(r: VersionRecord) -> VersionRecord:
            cur = {} if replace else dict(r.metadata)
            cur.update(metadata)
            return r.evolve(metadata=cur)
        self._record = self.repo.update_record(self.id, change)

    def get_metadata(self) -> dict:
        return dict(self._field("metadata", {}) or {})

    # ---- listing -------------------------------------------------------------------
    def list_files(self, dataset_path: str | None = None, recursive: bool = True,
                   dataset_id: str | None = None) -> list[str]:
        ds = self if dataset_id in (None, self.id) else Dataset.get(dataset_id, repo=self.repo)
        view = ds.view()
        if not dataset_path:
            return sorted(view.files)
        pattern = paths.clean(dataset_path, allow_root=True)
        if not paths.has_magic(pattern):
            return sorted(p for p in view.files if paths.is_under(p, pattern))
        return sorted(p for p in view.files if paths.matches(p, pattern, recursive=recursive))

    def changes(self) -> tuple[list[str], list[str], list[str]]:
        """(added, modified, removed) paths relative to the merged parents."""
        parent = self.parent_view()
        view = self.view()
        own = self._own_paths()
        added = sorted(p for p in own if p in view.files and p not in parent.files)
        modified = sorted(p for p in own if p in view.files and p in parent.files
                          and not view.files[p].same_content(parent.files[p]))
        removed = sorted(p for p in parent.files if p not in view.files)
        return added, modified, removed

    def _own_paths(self) -> list[str]:
        if self._draft is not None:
            return [e.path for e in self._draft.entries()]
        m = self.repo.manifest(self.id, self._record.manifest_sha256)
        return [e.path for e in m.files()]

    def list_added_files(self, dataset_id: str | None = None) -> list[str]:
        return self._other(dataset_id).changes()[0]

    def list_modified_files(self, dataset_id: str | None = None) -> list[str]:
        return self._other(dataset_id).changes()[1]

    def list_removed_files(self, dataset_id: str | None = None) -> list[str]:
        return self._other(dataset_id).changes()[2]

    def _other(self, dataset_id: str | None) -> "Dataset":
        return self if dataset_id in (None, self.id) else Dataset.get(dataset_id, repo=self.repo)

    def get_dependency_graph(self) -> dict[str, list[str]]:
        if self._record:
            return {k: list(v) for k, v in ancestry(self.repo, self.id).items()}
        graph = {self.id: self.parents}
        for p in self.parents:
            graph.update({k: list(v) for k, v in ancestry(self.repo, p).items()})
        return graph

    def summary(self) -> dict[str, Any]:
        """The version's fields as a JSON-able dict (what `--json` prints)."""
        out = {"id": self.id, "project": self.project, "name": self.name,
               "version": self.version, "state": self.state, "parents": self.parents,
               "tags": self.tags, "description": self.description}
        if self._record:
            r = self._record
            out.update(created=r.created, user=r.user, files=r.files, size=r.size,
                       added=r.added, modified=r.modified, removed=r.removed,
                       metadata=r.metadata)
        return out

    # ---- copies, verify (strata.catalog.materialize / ops) --------------------------
    def get_local_copy(self, part: int | None = None, num_parts: int | None = None,
                       progress: Progress = NO_PROGRESS, **_ignored) -> str:
        from strata.catalog.materialize import local_copy
        return local_copy(self, part=part, num_parts=num_parts, progress=progress)

    def get_mutable_local_copy(self, target_folder: str | os.PathLike, overwrite: bool = False,
                               part: int | None = None, num_parts: int | None = None,
                               progress: Progress = NO_PROGRESS, **_ignored) -> str:
        if not isinstance(target_folder, (str, os.PathLike)) or not os.fspath(target_folder):
            raise BadArgument(f"target_folder must name a folder, got {target_folder!r}")
        from strata.catalog.materialize import mutable_copy
        return mutable_copy(self, str(target_folder), overwrite=overwrite, part=part,
                            num_parts=num_parts, progress=progress)

    def verify_dataset_hash(self, local_copy_path: str | None = None, skip_hash: bool = False,
                            verbose: bool = False, progress: Progress = NO_PROGRESS) -> list[str]:
        from strata.catalog.ops import verify
        return verify(self, local_copy_path=local_copy_path, skip_hash=skip_hash,
                      progress=progress)

    # ---- whole-repository operations ------------------------------------------------
    @classmethod
    def squash(cls, dataset_name: str, dataset_ids: Sequence[str] | None = None,
               dataset_project_name_pairs: Sequence[tuple[str, str]] | None = None,
               dataset_project: str | None = None, dataset_version: str | None = None,
               repo: str | Repository | None = None) -> "Dataset":
        from strata.catalog.ops import squash
        return squash(dataset_name, dataset_ids, dataset_project_name_pairs,
                      dataset_project=dataset_project, dataset_version=dataset_version,
                      repo=repo)

    @classmethod
    def list_datasets(cls, dataset_project: str | None = None, partial_name: str | None = None,
                      tags: Sequence[str] | None = None, ids: Sequence[str] | None = None,
                      only_completed: bool = True, repo: str | Repository | None = None,
                      **_ignored) -> list[dict]:
        from strata.catalog.ops import list_datasets
        return list_datasets(dataset_project, partial_name, tags, ids,
                             only_completed=only_completed, repo=repo)

    @classmethod
    def delete(cls, dataset_id: str | None = None, dataset_project: str | None = None,
               dataset_name: str | None = None, force: bool = False,
               dataset_version: str | None = None, entire_dataset: bool = False,
               repo: str | Repository | None = None) -> list[str]:
        from strata.catalog.ops import delete
        return delete(dataset_id, dataset_project, dataset_name, force=force,
                      dataset_version=dataset_version, entire_dataset=entire_dataset,
                      repo=repo)

    def mount(self, path: str | os.PathLike, writable: bool = False,
              cache_size: str | int | None = None):
        """Mount this version at `path` (an empty folder); use as a context manager:

            with ds.mount("/mnt/data") as m:
                train(m.path)

        Returns a strata.catalog.mounting.MountHandle; see there how the server starts."""
        from strata.catalog.mounting import mount
        return mount(self, path, writable=writable, cache_size=cache_size)


# ---- helpers ---------------------------------------------------------------------------
def _q(s: str) -> str:
    import shlex
    return shlex.quote(s)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return ""


def _batches(cands: list[Candidate], max_files: int = 512, max_bytes: int = 16 << 20):
    """Hashing work in batches: one task per large file, small files grouped, so a tree
    of many tiny files does not pay one thread hand-off per file."""
    batch: list[Candidate] = []
    size = 0
    for c in cands:
        batch.append(c)
        size += c.size
        if len(batch) >= max_files or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _check_json(value: Any) -> None:
    """Metadata is stored as standard JSON in UTF-8: no NaN or Infinity, no lone
    surrogates (bytes that were not UTF-8)."""
    if not isinstance(value, dict):
        raise BadArgument(f"metadata must be a JSON object, got {type(value).__name__}")
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:   # UnicodeEncodeError is a ValueError
        raise BadArgument(f"metadata must be standard JSON in UTF-8: {e}") from None


def _strings(values, what: str) -> list[str]:
    """A list of strings from a string or a sequence of them (a string is not split)."""
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, (list, tuple, set, frozenset)):
        raise BadArgument(f"expected a {what} or a list of them, got {values!r}")
    return [paths.text(v, what) for v in values]


def _check_state(rec: VersionRecord, only_completed: bool, only_published: bool) -> None:
    if only_published and rec.state != "published":
        raise WrongState(f"version {rec.id} is {rec.state}, not published")
    if only_completed and not rec.completed:
        raise WrongState(f"version {rec.id} is {rec.state}, not completed")


def _hidden(path: str, removed: set[str]) -> bool:
    return bool(removed) and (path in removed or any(a in removed for a in paths.ancestors(path)))


def _match_removal(view: MergedView, raw: str, recursive: bool) -> tuple[list[str], str | None]:
    """(file paths, folder) that removing `raw` concerns; folder is set when `raw` names
    a folder of the view."""
    if "://" in raw:
        return [p for p, e in view.files.items() if e.kind == "x" and e.target == raw], None
    pattern = paths.clean(raw, what="path to remove")
    if paths.has_magic(pattern):
        return [p for p in view.files if paths.matches(p, pattern, recursive=recursive)], None
    if pattern in view.files:
        return [pattern], None
    if pattern in view.all_dirs():
        return [p for p in view.files if paths.is_under(p, pattern)], pattern
    return [], None


def _local_drafts(repo_url: str, project: str, name: str) -> Iterable[drafts.Draft]:
    found = []
    for d in drafts.open_all():
        if (d.get("repo"), d.get("project"), d.get("name")) == (repo_url, project, name):
            found.append((d.get("created", 0), d))
        else:
            d.close()
    found.sort(key=lambda t: t[0], reverse=True)
    return [d for _, d in found]
