"""`Dataset.mount` and the handle it returns.

The catalog layer does not import the mount layer above it, so it drives the mount
through programs: the mount server's own starter (`python -m strata.vfs.mount
--background`, one interpreter start: the server is forked from it and the starter exits
once the mount is live) and, for the handle's status, commit, discard and unmount, the
`strata` command, whose control commands import little.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import TYPE_CHECKING, Sequence

from strata.catalog import config
from strata.catalog.errors import CatalogError, WrongState

if TYPE_CHECKING:
    from strata.catalog.dataset import Dataset


def mount(ds: "Dataset", path: str | os.PathLike, *, writable: bool = False,
          cache_size: str | int | None = None) -> "MountHandle":
    """Mount version `ds` at `path` and return once the mount is live."""
    if not ds.is_final():
        raise WrongState(f"version {ds.id} is a draft; finalize it before mounting")
    args = ["--repo", ds.repo.url, "--id", ds.id]
    if writable:
        args.append("--writable")
    if cache_size:
        args += ["--cache-size", str(config.parse_size(cache_size))]
    info = json.loads(_run([sys.executable, "-m", "strata.vfs.mount", "--background", *args,
                            os.fspath(path)], "mount"))
    return MountHandle(ds.repo.url, info["mountpoint"], ds.id, writable)


class MountHandle:
    """A live mount of a version (returned by `Dataset.mount`)."""

    def __init__(self, repo_url: str, path: str, version_id: str, writable: bool = False):
        self.repo_url = repo_url
        self.path = path
        self.version_id = version_id
        self.writable = writable
        self.mounted = True

    def status(self) -> list[dict]:
        """Pending changes of a writable mount: dicts with change, path (and from)."""
        return json.loads(_run_cli(self.repo_url, ["status", "--json", self.path]))["changes"]

    def commit(self, description: str | None = None, name: str | None = None,
               version: str | None = None, tags: Sequence[str] | None = None) -> "Dataset":
        """Commit the pending changes as a child version; the mount then shows it."""
        from strata.catalog.dataset import Dataset
        args = ["commit", self.path]
        for flag, value in (("--name", name), ("--version", version),
                            ("--description", description)):
            if value:
                args += [flag, value]
        if tags:
            args += ["--tags", *tags]
        child_id = _run_cli(self.repo_url, args).strip().splitlines()[-1]
        self.version_id = child_id
        return Dataset.get(child_id, repo=self.repo_url)

    def discard(self) -> None:
        _run_cli(self.repo_url, ["discard", self.path])

    def unmount(self) -> None:
        if self.mounted:
            _run_cli(self.repo_url, ["unmount", self.path])
            self.mounted = False

    def __enter__(self) -> "MountHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.unmount()

    def __fspath__(self) -> str:
        return self.path


def _run_cli(repo_url: str, args: list[str]) -> str:
    return _run([sys.executable, "-m", "strata.cli.main", "--quiet", "--repo", repo_url,
                 *args], args[0])


def _run(argv: list[str], what: str) -> str:
    """stdout of a strata program; its last line on stderr as a CatalogError if it fails."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
        message = lines[-1] if lines else f"strata {what} failed"
        raise CatalogError(message.removeprefix("strata: error: "))
    return proc.stdout
