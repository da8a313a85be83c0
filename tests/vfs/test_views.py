"""The lazy, path-by-path view of the mount must agree with the catalog's eager merge of
the whole DAG, for any history: random DAGs of versions that add, overwrite and remove
files and folders."""

import os
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from strata.catalog import Dataset
from strata.catalog import repo as repo_mod
from strata.catalog.errors import NothingMatched
from strata.catalog.repo import Repository
from tests.catalog.conftest import write
from tests.vfs.conftest import CHUNK, Mounted

NAMES = ["a", "b", "c/d", "c/e", "c/f/g", "h/i", "h/j/k", "big"]

step = st.fixed_dictionaries({
    "parents": st.lists(st.integers(0, 50), max_size=3, unique=True),
    "adds": st.lists(st.tuples(st.sampled_from(NAMES), st.integers(0, 3)), max_size=4),
    "removes": st.lists(st.sampled_from(["a", "c", "c/f", "h/j/k", "b", "*.bin"]),
                        max_size=2),
    "empty_dir": st.booleans(),
})


def content(name, variant):
    if name == "big":
        return bytes([variant]) * (CHUNK * 2 + 17)  # three chunks
    return f"{name} v{variant}".encode()


def expected_tree(ds, out):
    shutil.rmtree(out, ignore_errors=True)
    ds.get_mutable_local_copy(out)
    tree = {}
    for dirpath, dirnames, filenames in os.walk(out):
        rel = os.path.relpath(dirpath, out).replace(os.sep, "/")
        if rel != "." and not dirnames and not filenames:
            tree[rel] = "dir"
        for f in filenames:
            p = os.path.join(dirpath, f)
            key = os.path.relpath(p, out).replace(os.sep, "/")
            tree[key] = ("link", os.readlink(p)) if os.path.islink(p) else open(p, "rb").read()
    return tree


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(step, min_size=1, max_size=6))
def test_lazy_view_matches_eager_merge(tmp_path_factory, history):
    base = tmp_path_factory.mktemp("h")
    os.environ["XDG_DATA_HOME"] = str(base / "data")
    os.environ["XDG_CACHE_HOME"] = str(base / "cache")
    repo_mod._repos.clear()
    url = str(base / "repo")
    Repository.open(url, create=True, chunk_size=CHUNK, pack_size=256 * 1024)
    ids = []
    for i, s in enumerate(history):
        parents = [ids[p % len(ids)] for p in s["parents"]] if ids else []
        parents = list(dict.fromkeys(parents))
        ds = Dataset.create("n", "p", parent_datasets=parents, repo=url)
        src = base / f"src{i}"
        src.mkdir()
        for name, variant in s["adds"]:
            write(src, name, content(name, variant))
        if s["empty_dir"]:
            (src / "empty" / f"e{i}").mkdir(parents=True)
        if any(src.iterdir()):
            ds.add_files(src)
        for pattern in s["removes"]:
            try:
                ds.remove_files(pattern)
            except NothingMatched:
                pass
        ds.finalize(auto_upload=True)
        ids.append(ds.id)
        m = Mounted(url, ds.id, base / "mcache")
        try:
            assert m.tree() == expected_tree(ds, base / f"out{i}")
        finally:
            m.close()
