import pytest

from strata.catalog.repo import Repository
from strata.storage.cache import UnitCache
from strata.storage.counting import CountingStorage
from strata.vfs.core import Filesystem
from strata.vfs.reader import Reader
from strata.vfs.views import VersionView
from tests.catalog.conftest import isolated_home, write  # noqa: F401  (autouse fixture)

CHUNK = 64 * 1024


@pytest.fixture
def repo_url(tmp_path):
    url = str(tmp_path / "repo")
    Repository.open(url, create=True, chunk_size=CHUNK, pack_size=256 * 1024)
    return url


class Mounted:
    """A version opened through the filesystem core, with a storage call counter."""

    def __init__(self, repo_url, version_id, cache_dir, limit=1 << 30, wrap=None,
                 **cache_options):
        self.repo = Repository.open(repo_url, cache_dir=cache_dir)
        self.counting = CountingStorage(self.repo.storage)
        self.repo.storage = wrap(self.counting) if wrap else self.counting
        self.cache = UnitCache(cache_dir, limit, **cache_options)
        self.reader = Reader(self.repo, self.cache)
        self.view = VersionView(self.repo, version_id, self.reader)
        self.fs = Filesystem(self.view)

    def tree(self, path=""):
        """{path: bytes | ('link', target) | 'dir'} of everything below `path`."""
        out = {}
        for name, attr in self.fs.readdir(path):
            child = f"{path}/{name}" if path else name
            kind = attr.mode & 0o170000
            if kind == 0o040000:
                sub = self.tree(child)
                if not sub:
                    out[child] = "dir"
                out.update(sub)
            elif kind == 0o120000:
                out[child] = ("link", self.fs.readlink(child))
            else:
                out[child] = self.fs.read_path(child)
        return out

    def close(self):
        self.reader.close()
        self.cache.close()


@pytest.fixture
def mounted(tmp_path):
    opened = []

    def open_(repo_url, version_id, limit=1 << 30, wrap=None, cache="cache", **cache_options):
        m = Mounted(repo_url, version_id, tmp_path / cache, limit, wrap, **cache_options)
        opened.append(m)
        return m

    yield open_
    for m in opened:
        m.close()
