"""Configuration: environment first, then the TOML config file, then defaults.

    STRATA_REPO        repository URL (default: the embedded local repository)
    STRATA_CACHE_DIR   cache folder (default: $XDG_CACHE_HOME/strata)
    STRATA_CACHE_SIZE  cache size limit, e.g. "20G" (default: 10% of the cache disk's free
                       space, at least 1 GiB)
    config file        $STRATA_CONFIG or $XDG_CONFIG_HOME/strata/config.toml, keys
                       repo, cache_dir, cache_size

The data dir ($XDG_DATA_HOME/strata) holds the embedded repository and the workspace
(drafts, overlays, the last dataset touched).
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from strata.catalog.errors import BadArgument

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def _xdg(var: str, fallback: str) -> Path:
    value = os.environ.get(var)
    return Path(value) if value else Path.home() / fallback


def data_dir() -> Path:
    return _xdg("XDG_DATA_HOME", ".local/share") / "strata"


def config_path() -> Path:
    explicit = os.environ.get("STRATA_CONFIG")
    if explicit:
        return Path(explicit)
    return _xdg("XDG_CONFIG_HOME", ".config") / "strata" / "config.toml"


def workspace_dir() -> Path:
    return data_dir() / "workspace"


def embedded_repo_url() -> str:
    return str(data_dir() / "repo")


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str | int) -> int:
    """'10G', '512M', '1.5GiB', '1000' -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.I)
    if not m:
        raise BadArgument(f"cannot read size {text!r}; use a number with K, M, G or T")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


@dataclass(frozen=True)
class Config:
    repo: str
    cache_dir: Path
    cache_size: int | None  # None: computed from free space when the cache opens


def _file_settings() -> dict:
    path = config_path()
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BadArgument(f"cannot read config file {path}: {e}") from None


def load(repo: str | None = None) -> Config:
    settings = _file_settings()
    repo = repo or os.environ.get("STRATA_REPO") or settings.get("repo") or embedded_repo_url()
    cache_dir = (os.environ.get("STRATA_CACHE_DIR") or settings.get("cache_dir")
                 or str(_xdg("XDG_CACHE_HOME", ".cache") / "strata"))
    size = os.environ.get("STRATA_CACHE_SIZE") or settings.get("cache_size")
    return Config(repo=str(repo), cache_dir=Path(cache_dir).expanduser(),
                  cache_size=parse_size(size) if size else None)


def default_cache_size(cache_dir: Path) -> int:
    probe = cache_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return max(free // 10, 1 << 30)


def _state_path() -> Path:
    return workspace_dir() / "state.json"


def remember_last(repo_url: str, version_id: str) -> None:
    """Remember the last dataset this user touched in `repo_url` (clearml-data's --id default)."""
    import json
    path = _state_path()
    try:
        state = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        state = {}
    state.setdefault("last", {})[repo_url] = version_id
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".state.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1))
    os.replace(tmp, path)


def last_touched(repo_url: str) -> str | None:
    import json
    try:
        return json.loads(_state_path().read_text()).get("last", {}).get(repo_url)
    except (FileNotFoundError, ValueError):
        return None
