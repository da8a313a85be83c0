"""Version records: the JSON stored at versions/<id>.json, and semantic version labels."""

from __future__ import annotations

import json
import re
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any

from strata.catalog.errors import BadArgument, DamagedRecord

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
    def from_json(cls, data: bytes, where: str = "") -> "VersionRecord":
        """The record stored as `data`. Bytes that are not a record (cut short by a crash,
        edited by hand) raise DamagedRecord naming `where` (the record's URL), so one
        damaged record is a message about that record, not a failure deep inside a
        command. Unknown keys are ignored: a newer strata may add some."""
        try:
            d = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise DamagedRecord(where, f"not JSON ({e})") from None
        if not isinstance(d, dict):
            raise DamagedRecord(where, "not a JSON object")
        problems = []
        for f in fields(cls):
            if f.name not in d:
                if f.default is MISSING and f.default_factory is MISSING:
                    problems.append(f"no {f.name}")
            elif not _has_type(d[f.name], f.type):
                problems.append(f"{f.name} is not {_JSON_TYPES[f.type][1]}")
        if problems:
            raise DamagedRecord(where, ", ".join(problems))
        d = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        d["parents"] = tuple(d.get("parents", ()))
        d["tags"] = tuple(d.get("tags", ()))
        return cls(**d)

    def evolve(self, **changes) -> "VersionRecord":
        return replace(self, **changes)

    @property
    def completed(self) -> bool:
        return self.state in COMPLETED


_JSON_TYPES = {"str": (str, "a string"), "int": (int, "an integer"),
               "float": ((int, float), "a number"), "dict[str, Any]": (dict, "an object"),
               "tuple[str, ...]": (list, "a list of strings")}


def _has_type(value, annotation: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, _JSON_TYPES[annotation][0]):
        return False
    return not isinstance(value, list) or all(isinstance(x, str) for x in value)


_SEMVER = re.compile(r"^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)$")


def parse_semver(label: str) -> tuple[int, int, int] | None:
    m = _SEMVER.match(label)
    return (int(m.group(1)), int(m.group(2)), int(m.group(3))) if m else None


def check_label(label: str) -> str:
    if not isinstance(label, str) or parse_semver(label) is None:
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
