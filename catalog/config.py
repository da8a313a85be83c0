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


_SETTINGS = {"repo": (str, "a string"), "cache_dir": (str, "a string"),
             "cache_size": ((str, int), 'a size like "20G"')}


def _file_settings() -> dict:
    """The config file's settings, checked here so that a wrong one is reported naming
    the file and the key rather than failing where it is used."""
    path = config_path()
    try:
        data = path.read_bytes()
        settings = tomllib.loads(data.decode())
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise BadArgument(f"cannot read config file {path}: line {line} is not UTF-8 text"
                          ) from None
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise BadArgument(f"cannot read config file {path}: {e}") from None
    for key, (_, expected) in _SETTINGS.items():
        if key in settings and not _valid(key, settings[key]):
            raise BadArgument(f"config file {path}: {key} = {settings[key]!r} is not "
                              f"{expected}")
    return settings


def _valid(key: str, value) -> bool:
    if isinstance(value, bool) or not isinstance(value, _SETTINGS[key][0]):
        return False
    if key != "cache_size":
        return True
    try:
        return parse_size(value) >= 0
    except BadArgument:
        return False


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


def _remembered() -> dict[str, str]:
    """repo URL -> the last version touched there. A state file that cannot be read or
    holds anything else counts as empty: it only supplies a default --id."""
    import json
    try:
        state = json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return {}
    last = state.get("last") if isinstance(state, dict) else None
    if not isinstance(last, dict):
        return {}
    return {url: vid for url, vid in last.items() if isinstance(vid, str)}


def remember_last(repo_url: str, version_id: str) -> None:
    """Remember the last dataset this user touched in `repo_url` (clearml-data's --id
    default). Best effort: a command that did its work must not fail because this could
    not be saved (a read-only or full workspace), so a failure is only logged."""
    import json
    last = _remembered()
    last[repo_url] = version_id
    path = _state_path()
    tmp = path.with_name(f".state.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"last": last}, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        import logging
        logging.getLogger("strata.catalog").debug("last dataset not remembered: %s", e)
        try:
            tmp.unlink()
        except OSError:
            pass


def last_touched(repo_url: str) -> str | None:
    return _remembered().get(repo_url)
