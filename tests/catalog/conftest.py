import os

import pytest

from tests.conftest import isolate_home

from strata.catalog.repo import Repository


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    yield from isolate_home(tmp_path, monkeypatch)


@pytest.fixture
def repo_url(tmp_path):
    """A local repository with small chunks and packs, so tests exercise both cheaply."""
    url = str(tmp_path / "repo")
    Repository.open(url, create=True, chunk_size=64 * 1024, pack_size=256 * 1024)
    return url


def write(root, rel, data):
    path = os.path.join(str(root), rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(data, bytes) else "w"
    with open(path, mode) as f:
        f.write(data)
    return path


def tree(root):
    """{relative path: bytes or ('link', target)} of a local folder."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if os.path.islink(full):
                out[rel] = ("link", os.readlink(full))
            else:
                with open(full, "rb") as f:
                    out[rel] = f.read()
    return out
