"""Whole-repository operations: list/search, compare, squash, verify, delete, gc, rename,
move and the version log."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Sequence

from strata.catalog import layout, paths
from strata.catalog import draft as drafts
from strata.catalog.blobs import iter_entry_bytes
from strata.catalog.dataset import Dataset
from strata.catalog.errors import (BadArgument, DamagedDraft, DamagedRecord, HasChildren,
                                   LabelTaken, SourceMissing, UnknownVersion)
from strata.catalog.merge import merge_parents
from strata.catalog.progress import NO_PROGRESS, Progress
from strata.catalog.records import VersionRecord, semver_key
from strata.catalog.repo import open_repo
from strata.storage.errors import Corrupt, StorageError, Unreachable

GC_GRACE_SECONDS = 3600

_log = logging.getLogger("strata.catalog")


# ---- listing ---------------------------------------------------------------------------
def records(repo, *, skip_damaged: bool = False) -> list[VersionRecord]:
    """Every version record in `repo`. A listing passes `skip_damaged`: one damaged record
    is then left out with a warning instead of hiding every version. Delete and gc do
    not: a version they cannot read might hold the only reference to a blob."""
    out = []
    for vid in repo.all_version_ids():
        try:
            rec = repo.try_record(vid)
        except DamagedRecord as e:
            if not skip_damaged:
                raise
            _log.warning("skipping version %s: its record is damaged: %s", vid, e.reason)
            continue
        if rec is not None:
            out.append(rec)
    return out


def list_datasets(project=None, partial_name=None, tags=None, ids=None, *,
                  only_completed=True, repo=None) -> list[dict]:
    r = open_repo(repo)
    want_tags = set(tags or ())
    want_ids = set(ids or ())
    out = []
    for rec in records(r, skip_damaged=True):
        if project is not None and rec.project != project and \
                not rec.project.startswith(project + "/"):
            continue
        if partial_name and partial_name.lower() not in rec.name.lower():
            continue
        if want_tags and not want_tags.issubset(rec.tags):
            continue
        if want_ids and rec.id not in want_ids:
            continue
        if only_completed and not rec.completed:
            continue
        out.append(Dataset(r, record=rec).summary())
    if not only_completed:
        for d in _drafts_of(r.url):
            s = Dataset(r, draft=d)
            if project is not None and s.project != project and \
                    not s.project.startswith(project + "/"):
                continue
            if partial_name and partial_name.lower() not in s.name.lower():
                continue
            if want_ids and s.id not in want_ids:
                continue
            if want_tags and not want_tags.issubset(s.tags):
                continue
            out.append(s.summary())
    out.sort(key=lambda d: (d["project"], d["name"], semver_key(d["version"])))
    return out


def _drafts_of(repo_url: str):
    for d in drafts.open_all():
        if d.get("repo") == repo_url:
            yield d
        else:
            d.close()


# ---- compare ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Comparison:
    added: list[str]
    modified: list[str]
    removed: list[str]
    unchanged: int

    def as_dict(self) -> dict:
        return {"added": self.added, "modified": self.modified, "removed": self.removed,
                "unchanged": self.unchanged}


def compare(source: Dataset, target: Dataset) -> Comparison:
    """What changes from `source` to `target` (paths added, modified, removed)."""
    a = source.view().files
    b = target.view().files
    added = sorted(p for p in b if p not in a)
    removed = sorted(p for p in a if p not in b)
    modified, same = [], 0
    for p, e in b.items():
        o = a.get(p)
        if o is None:
            continue
        if o.same_content(e) and o.mode == e.mode:
            same += 1
        else:
            modified.append(p)
    return Comparison(added, sorted(modified), removed, same)


# ---- squash ----------------------------------------------------------------------------
def squash(name: str, ids: Sequence[str] | None, pairs=None, *, dataset_project=None,
           dataset_version=None, repo=None) -> Dataset:
    """A flat version (no parents) holding the merged tree of `ids`, in order. No bytes
    are copied: entries point at the same blobs."""
    r = open_repo(repo)
    sources = [Dataset.get(i, repo=r, only_completed=True) for i in ids or ()]
    for project, dname in pairs or ():
        sources.append(Dataset.get(dataset_project=project, dataset_name=dname, repo=r,
                                   only_completed=True))
    if not sources:
        raise BadArgument("squash needs at least one version (--ids)")
    view = merge_parents(r, [s.id for s in sources])
    ds = Dataset.create(name, dataset_project or sources[0].project,
                        dataset_version=dataset_version, repo=r,
                        description="squash of " + ", ".join(s.id for s in sources))
    d = ds._draft
    d.stage([(e.path, e.kind, None, e.size, e.sha256, e.mode, e.mtime_ns, e.chunks, e.target,
              e.pack, e.offset, 1) for e in view.files.values()])
    d.add_dirs([(x.path, x.mode, x.mtime_ns) for x in view.dirs.values()])
    ds._changed()
    ds.finalize()
    return ds


# ---- verify ----------------------------------------------------------------------------
def verify(ds: Dataset, *, local_copy_path: str | None = None, skip_hash: bool = False,
           progress: Progress = NO_PROGRESS) -> list[str]:
    """Check a version's stored bytes (or a local copy of it) against its manifest.
    Returns one line per problem; empty when all is well."""
    if local_copy_path is not None and not os.path.isdir(local_copy_path):
        raise SourceMissing(f"{local_copy_path} is not a folder" if
                            os.path.exists(local_copy_path) else
                            f"{local_copy_path} does not exist")
    view = ds.view()
    problems: list[str] = []
    entries = sorted(view.files.values(), key=lambda e: e.path)
    progress.start("verifying", sum(e.size for e in entries) if not skip_hash else len(entries),
                   "B" if not skip_hash else "files")
    try:
        if local_copy_path is not None:
            for e in entries:
                problems.extend(_verify_local(e, local_copy_path, skip_hash))
                progress.advance(1 if skip_hash else e.size)
            return problems
        for e in entries:
            if e.kind == "l":
                continue
            try:
                if skip_hash:
                    problems.extend(_verify_sizes(ds.repo, e))
                    progress.advance(1)
                else:
                    got = 0
                    h = hashlib.sha256()
                    for piece in iter_entry_bytes(ds.repo, e):
                        got += len(piece)
                        h.update(piece)
                        progress.advance(len(piece))
                    if got != e.size:
                        problems.append(f"{e.path}: size {got}, expected {e.size}")
                    elif e.sha256 and h.hexdigest() != e.sha256:
                        problems.append(f"{e.path}: sha256 mismatch")
            except Unreachable:
                if e.kind != "x":
                    raise   # the repository is down: every next file would wait as long
                problems.append(f"{e.path}: its link's store is unreachable")
            except StorageError as err:
                problems.append(f"{e.path}: {err}")
    finally:
        progress.done()
    return problems


def _verify_sizes(repo, e) -> list[str]:
    if e.kind == "x":
        from strata.catalog.external import check_external_size
        try:
            check_external_size(e)
        except Corrupt as err:
            return [f"{e.path}: {err}"]
        return []
    if e.pack:
        size = repo.storage.stat(layout.blob_key(e.pack)).size
        if size < e.offset + e.size:
            return [f"{e.path}: pack {e.pack} is too short"]
        return []
    total = 0
    for cid in e.chunk_ids:
        total += repo.storage.stat(layout.blob_key(cid)).size
    return [] if total == e.size else [f"{e.path}: chunks hold {total} bytes, expected {e.size}"]


def _verify_local(e, root: str, skip_hash: bool) -> list[str]:
    full = os.path.join(root, *e.path.split("/"))
    if e.kind == "l":
        if not os.path.islink(full):
            return [f"{e.path}: missing symlink"]
        return [] if os.readlink(full) == e.target else [f"{e.path}: symlink target differs"]
    try:
        st = os.stat(full)
    except FileNotFoundError:
        return [f"{e.path}: missing"]
    if st.st_size != e.size:
        return [f"{e.path}: size {st.st_size}, expected {e.size}"]
    if skip_hash or not e.sha256:
        return []
    h = hashlib.sha256()
    with open(full, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return [] if h.hexdigest() == e.sha256 else [f"{e.path}: sha256 mismatch"]


# ---- delete / gc -----------------------------------------------------------------------
def children_of(repo, version_id: str) -> list[str]:
    return [rec.id for rec in records(repo) if version_id in rec.parents]


def delete(dataset_id=None, project=None, name=None, *, force=False, dataset_version=None,
           entire_dataset=False, repo=None) -> list[str]:
    """Delete versions. Refuses a version with children unless `force`. Blobs that no
    remaining version references are removed. Returns the ids deleted."""
    r = open_repo(repo)
    if dataset_id:
        targets = [dataset_id]
    elif project and name:
        labels = r.labels(project, name)
        if not labels:
            raise UnknownVersion(f"no dataset {project}/{name} in {r.url}")
        if dataset_version:
            if dataset_version not in labels:
                raise UnknownVersion(f"{project}/{name} has no version {dataset_version}")
            targets = [labels[dataset_version]]
        elif entire_dataset:
            targets = list(labels.values())
        else:
            targets = [Dataset.get(dataset_project=project, dataset_name=name, repo=r).id]
    else:
        raise BadArgument("give --id, or --project and --name")
    deleted = []
    all_recs = {rec.id: rec for rec in records(r)}
    for vid in targets:
        if vid not in all_recs:
            if layout.is_version_id(vid) and drafts.exists(vid):
                try:
                    d = drafts.Draft(vid)
                except DamagedDraft:   # named by its id: it goes, whatever repository
                    drafts.remove_files(vid)
                    deleted.append(vid)
                    continue
                if d.get("repo") == r.url:
                    d.destroy()
                    deleted.append(vid)
                    continue
                d.close()
            raise UnknownVersion(f"no version {vid} in {r.url}")
        kids = [k for k, rec in all_recs.items()
                if vid in rec.parents and k not in targets]
        if kids and not force:
            raise HasChildren(f"version {vid} has {len(kids)} child version(s) "
                              f"({', '.join(kids[:3])}{'…' if len(kids) > 3 else ''}); "
                              "delete them first or use --force")
    for vid in targets:
        if vid in deleted:
            continue
        rec = all_recs[vid]
        mine = r.manifest(vid, rec.manifest_sha256).blob_ids()
        # readers stop finding the version first; then its label, manifest and blobs go
        r.delete_record(vid)
        labels = r.labels(rec.project, rec.name)
        if labels.get(rec.version) == vid:
            r.release_label(rec.project, rec.name, rec.version)
        r.delete_manifest(vid)
        del all_recs[vid]
        still = set()
        for other in all_recs.values():
            still |= r.manifest(other.id, other.manifest_sha256).blob_ids()
        for blob in mine - still:
            r.delete_blob(blob)
        deleted.append(vid)
    return deleted


def gc(repo=None, *, grace_seconds: int = GC_GRACE_SECONDS, dry_run: bool = False) -> dict:
    """Remove blobs and manifests no version references. Objects younger than the grace
    period are kept: they may belong to an upload that has not written its record yet."""
    r = open_repo(repo)
    live_blobs: set[str] = set()
    live = set()
    for rec in records(r):
        live.add(rec.id)
        live_blobs |= r.manifest(rec.id, rec.manifest_sha256).blob_ids()
    now = time.time()
    removed_blobs, freed = 0, 0
    for blob, size, mtime in list(r.blob_ids()):
        if blob in live_blobs or (mtime is not None and now - mtime < grace_seconds):
            continue
        if not dry_run:
            r.delete_blob(blob)
        removed_blobs += 1
        freed += size
    removed_manifests = 0
    for info in list(r.storage.list("manifests/")):
        vid = info.key.rsplit("/", 1)[-1].removesuffix(".db")
        if vid in live or (info.mtime is not None and now - info.mtime < grace_seconds):
            continue
        if not dry_run:
            r.storage.delete(info.key)
        removed_manifests += 1
    return {"blobs": removed_blobs, "bytes": freed, "manifests": removed_manifests}


# ---- rename / move ---------------------------------------------------------------------
def rename(project: str, name: str, *, new_name: str | None = None,
           new_project: str | None = None, repo=None) -> int:
    """Give every version of project/name a new name or project. Returns versions moved."""
    r = open_repo(repo)
    if new_name == "" or new_project == "":
        raise BadArgument("the new " + ("name" if new_name == "" else "project") +
                          " is empty")
    to_project, to_name = new_project or project, new_name or name
    paths.text(to_project, "project")
    paths.text(to_name, "dataset name")
    if (to_project, to_name) == (project, name):
        raise BadArgument("the new name is the same as the old one")
    labels = r.labels(project, name)
    if not labels:
        raise UnknownVersion(f"no dataset {project}/{name} in {r.url}")
    taken = r.labels(to_project, to_name)
    clash = sorted(set(labels) & set(taken))
    if clash:
        raise LabelTaken(f"{to_project}/{to_name} already has version(s) {', '.join(clash)}")
    for label, vid in labels.items():
        if not r.claim_label(to_project, to_name, label, vid):
            raise LabelTaken(f"{to_project}/{to_name} {label} was claimed meanwhile")
        r.update_record(vid, lambda rec: rec.evolve(project=to_project, name=to_name))
        r.release_label(project, name, label)
    return len(labels)


# ---- log -------------------------------------------------------------------------------
def log(ds: Dataset) -> list[dict]:
    """The version and its ancestors, newest first (each after all its children)."""
    graph = ds.get_dependency_graph()
    r = ds.repo
    info = {}
    for vid in graph:
        if vid == ds.id:
            info[vid] = ds.summary()
            if not ds.is_final():
                a, m, rm = ds.changes()
                info[vid].update(added=len(a), modified=len(m), removed=len(rm))
        else:
            info[vid] = Dataset(r, record=r.record(vid)).summary()
    # depth-first from the version so each node comes before its parents
    order, seen = [], set()
    indegree = {v: 0 for v in graph}
    for v, ps in graph.items():
        for p in ps:
            indegree[p] = indegree.get(p, 0) + 1
    ready = [ds.id]
    while ready:
        v = ready.pop(0)
        if v in seen:
            continue
        seen.add(v)
        order.append(info[v])
        for p in graph.get(v, ()):
            indegree[p] -= 1
            if indegree[p] == 0:
                ready.append(p)
    return order
