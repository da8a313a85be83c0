"""Version records: the JSON stored at versions/<id>.json, and semantic version labels."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from strata.catalog.errors import BadArgument

STATES = ("draft", "final", "published", "archived")
COMPLETED = ("final", "published")


@dataclass(frozen=True)
class VersionRecord:
    id: str
    project: str
    name: str
    version: str                       # semantic version label, e.g. "1.0.3"
    parents: tuple[str, ...] = ()
    state: str = "final"
    tags: tuple[str, ...] = ()
    description: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    user: str = ""
    manifest_sha256: str = ""
    files: int = 0                     # files in the merged view
    size: int = 0                      # bytes in the merged view
    added: int = 0
    modified: int = 0
    removed: int = 0
    uploaded_bytes: int = 0            # bytes of new blobs this version stored

    def to_json(self) -> bytes:
        d = asdict(self)
        d["parents"] = list(self.parents)
        d["tags"] = list(self.tags)
        return json.dumps(d, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "VersionRecord":
        d = json.loads(data)
        known = {f for f in cls.__dataclass_fields__}
        d = {k: v for k, v in d.items() if k in known}
        d["parents"] = tuple(d.get("parents", ()))
        d["tags"] = tuple(d.get("tags", ()))
        return cls(**d)

    def evolve(self, **changes) -> "VersionRecord":
        return replace(self, **changes)

    @property
    def completed(self) -> bool:
        return self.state in COMPLETED


_SEMVER = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")


def parse_semver(label: str) -> tuple[int, int, int] | None:
    m = _SEMVER.match(label)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def check_label(label: str) -> str:
    if parse_semver(label) is None:
        raise BadArgument(f"version {label!r} is not a semantic version like 1.0.0")
    return label


def bump_patch(label: str) -> str:
    major, minor, patch = parse_semver(label) or (1, 0, -1)
    return f"{major}.{minor}.{patch + 1}"


def semver_key(label: str) -> tuple:
    parsed = parse_semver(label)
    return (1, *parsed) if parsed else (0, 0, 0, 0)


def highest(labels) -> str | None:
    labels = list(labels)
    return max(labels, key=semver_key) if labels else None
