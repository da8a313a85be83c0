"""Scoped views: a commit's staging reads only the paths it changes, and still records
exactly what a whole-tree computation would."""

import os

import pytest

from strata.catalog import Dataset
from strata.catalog.changes import ChangeSet, open_child, stage_changes
from strata.catalog.manifest import Entry, Manifest
from strata.catalog.merge import Scope, merge_parents
from tests.catalog.conftest import write
from tests.catalog.test_merge_and_sync import version


@pytest.fixture
def dag(tmp_path, repo_url):
    """a and b, a child of both that removes a folder and overrides files, and a
    grandchild with an explicit empty folder."""
    a = version(repo_url, tmp_path / "a", {"d/1": "a1", "d/2": "a2", "d/sub/3": "a3",
                                           "e": "a-e", "x/y": "a-xy", "dx": "a-dx"})
    b = version(repo_url, tmp_path / "b", {"e": "b-e", "d/4": "b4", "z": "b-z"})
    child = Dataset.create("n", "p", parent_datasets=[a.id, b.id], repo=repo_url)
    child.remove_files("d/sub")
    write(tmp_path / "c", "d/5", "c5")
    write(tmp_path / "c", "x/y", "c-xy")
    child.add_files(tmp_path / "c")
    child.finalize(auto_upload=True)
    grand = Dataset.create("n", "p", parent_datasets=[child.id], repo=repo_url)
    os.makedirs(tmp_path / "g" / "empty")
    write(tmp_path / "g", "w", "g-w")
    grand.add_files(tmp_path / "g")
    grand.remove_files("z")
    grand.finalize(auto_upload=True)
    return grand


SCOPES = [
    Scope(frozenset({"e", "z", "w", "nothing"}), frozenset()),
    Scope(frozenset(), frozenset({"d"})),
    Scope(frozenset({"d"}), frozenset({"d/sub", "x"})),
    Scope(frozenset({"empty", "dx"}), frozenset({"empty", "d/5"})),
    Scope(frozenset(), frozenset({""})),
]


@pytest.mark.parametrize("scope", SCOPES, ids=lambda s: ",".join(sorted(s.exact | s.folders)))
def test_a_scoped_merge_is_the_whole_merge_cut_to_the_scope(dag, scope):
    whole = merge_parents(dag.repo, [dag.id])
    part = merge_parents(dag.repo, [dag.id], scope)

    def inside(p):
        return p in scope.exact or any(f == "" or p.startswith(f + "/") for f in scope.folders)
    assert part.files == {p: e for p, e in whole.files.items() if inside(p)}
    assert part.dirs == {p: e for p, e in whole.dirs.items() if inside(p)}


def test_staging_a_change_set_reads_no_whole_manifest(dag, tmp_path, monkeypatch):
    """Renames, replaced files, a file over a parent's folder, a link and a removed
    folder: the child records the same totals as a whole-tree computation, and no
    manifest is read in full on the way."""
    parent = Dataset.get(dag.id, repo=dag.repo.url)
    whole_parent = parent.view()
    cs = ChangeSet()
    cs.files.append(("e", write(tmp_path / "up", "e", "new e")))
    cs.files.append(("brand/new", write(tmp_path / "up", "new", "fresh")))
    cs.files.append(("x", write(tmp_path / "up", "x", "a file where a folder was")))
    moved = whole_parent.files["d/1"]
    cs.refs.append(Entry("moved/1", moved.kind, moved.size, moved.sha256, moved.mode,
                         moved.mtime_ns, moved.pack, moved.offset, moved.chunks))
    cs.removed += ["d/1", "d"]
    cs.links.append(("ln", "brand/new", 0))

    def whole(*a, **k):
        raise AssertionError("a manifest was read in full")
    monkeypatch.setattr(Manifest, "files", whole)
    child = open_child(parent)
    stage_changes(child, cs)
    child.finalize(auto_upload=True)
    monkeypatch.undo()

    after = Dataset.get(child.id, repo=dag.repo.url)
    view = after.view()
    assert set(view.files) == (set(whole_parent.files) - {p for p in whole_parent.files
                                                          if p.startswith(("d/", "x/"))}
                               | {"brand/new", "x", "moved/1", "ln"})
    rec = after._record
    assert rec.files == len(view.files)
    assert rec.size == sum(e.size for e in view.files.values())
    assert (rec.added, rec.modified) == (4, 1)   # brand/new, x, moved/1, ln; e
    assert rec.removed == sum(1 for p in whole_parent.files if p not in view.files)
    assert after.get_local_copy() and open(
        os.path.join(after.get_local_copy(), "e")).read() == "new e"
