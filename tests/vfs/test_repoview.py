"""The repository view (`strata mount --all`) without FUSE: what each path means, which
storage reads a first access costs, and how the catalog folders follow new versions."""

from strata.catalog import Dataset
from strata.catalog.repo import Repository
from strata.storage.cache import UnitCache
from strata.storage.counting import CountingStorage
from strata.vfs.core import Filesystem
from strata.vfs.errors import NoEntry
from strata.vfs.reader import Reader
from strata.vfs.repoview import RepositoryView
from tests.catalog.conftest import write


def version(repo_url, tmp_path, files, parents=(), name="n"):
    src = tmp_path / f"src-{len(list(tmp_path.iterdir()))}"
    for rel, data in files.items():
        write(src, rel, data)
    ds = Dataset.create(name, "p", parent_datasets=list(parents), repo=repo_url)
    ds.add_files(str(src))
    ds.finalize(auto_upload=True)
    return ds.id


def open_view(repo_url, tmp_path, refresh=0.0):
    repo = Repository.open(repo_url, cache_dir=tmp_path / "cache")
    counting = CountingStorage(repo.storage)
    repo.storage = counting
    cache = UnitCache(tmp_path / "cache", 1 << 30)
    view = RepositoryView(repo, Reader(repo, cache), refresh=refresh)
    return view, Filesystem(view), counting


def test_paths_resolve_to_versions_and_labels(repo_url, tmp_path):
    v1 = version(repo_url, tmp_path, {"a.txt": b"one", "d/b.txt": b"bee"})
    v2 = version(repo_url, tmp_path, {"a.txt": b"two"}, parents=[v1])
    view, fs, _ = open_view(repo_url, tmp_path)
    assert [n for n, _ in fs.readdir("")] == ["by-id", "by-name"]
    assert [n for n, _ in fs.readdir("by-id")] == sorted([v1, v2])
    assert fs.readlink("by-name/p/n/1.0.0") == f"../../../by-id/{v1}"
    assert fs.readlink("by-name/p/n/latest") == "1.0.1"
    assert fs.read_path(f"by-id/{v2}/a.txt") == b"two"
    assert fs.read_path(f"by-id/{v2}/d/b.txt") == b"bee"     # from the parent
    assert fs.getxattr(f"by-id/{v2}/d/b.txt", "user.strata.version") == v1.encode()
    assert [n for n, _ in fs.readdir(f"by-id/{v1}/d")] == ["b.txt"]
    for missing in ("by-id/x", f"by-id/{v1}/nope", "by-name/p/n/2.0.0", "by-name/q", "z"):
        try:
            fs.getattr(missing)
        except NoEntry:
            continue
        raise AssertionError(f"{missing} resolved")
    # only the catalog's names are volatile; a version's tree is not
    assert view.volatile("") and view.volatile("by-name/p/n/latest")
    assert view.volatile(f"by-id/{v1}") and not view.volatile(f"by-id/{v1}/a.txt")


def test_a_version_costs_nothing_until_a_path_reaches_it(repo_url, tmp_path):
    v1 = version(repo_url, tmp_path, {"a.txt": b"one"})
    v2 = version(repo_url, tmp_path, {"b.txt": b"bee"}, name="m")
    view, fs, counting = open_view(repo_url, tmp_path)
    fs.readdir("by-id")
    fs.read_path(f"by-id/{v1}/a.txt")
    manifests = [k for k in counting.keys_read if k.startswith("manifests/")]
    assert manifests and all(v1 in k for k in manifests)   # v2's manifest never fetched
    assert v2 not in view._views


def test_listings_change_their_mtime_when_the_catalog_changes(repo_url, tmp_path):
    v1 = version(repo_url, tmp_path, {"a.txt": b"one"})
    view, fs, _ = open_view(repo_url, tmp_path)
    before = {p: fs.getattr(p).mtime_ns for p in ("by-id", "by-name/p/n")}
    assert before == {p: fs.getattr(p).mtime_ns for p in before}   # stable while unchanged
    v2 = version(repo_url, tmp_path, {"a.txt": b"two"}, parents=[v1])
    after = {p: fs.getattr(p).mtime_ns for p in before}
    assert all(after[p] > before[p] for p in before)
    assert fs.readlink("by-name/p/n/latest") == "1.0.1"
    assert v2 in [n for n, _ in fs.readdir("by-id")]
