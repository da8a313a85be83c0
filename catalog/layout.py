"""Where each thing lives in a repository: one function per layout rule (DESIGN.md).

Project and dataset names are escaped so that nothing from a name reaches outside its
prefix: every byte outside [A-Za-z0-9_-] becomes %XX, dots included.
"""

from __future__ import annotations

import re

MARKER_KEY = "strata.json"

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[0-9a-f]{32}$")
_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def escape(component: str) -> str:
    return "".join(chr(b) if b in _SAFE else f"%{b:02X}" for b in component.encode("utf-8"))


def unescape(component: str) -> str:
    out = bytearray()
    i = 0
    while i < len(component):
        c = component[i]
        if c == "%":
            out.append(int(component[i + 1:i + 3], 16))
            i += 3
        else:
            out += c.encode()
            i += 1
    return out.decode("utf-8")


def is_blob_id(value: str) -> bool:
    return bool(_HEX64.match(value))


def is_version_id(value: str) -> bool:
    return bool(_ID.match(value))


def blob_key(sha256: str) -> str:
    if not is_blob_id(sha256):
        raise ValueError(f"not a blob id: {sha256!r}")
    return f"blobs/{sha256[:2]}/{sha256}"


def manifest_key(version_id: str) -> str:
    _check_id(version_id)
    return f"manifests/{version_id}.db"


def record_key(version_id: str) -> str:
    _check_id(version_id)
    return f"versions/{version_id}.json"


def names_prefix(project: str | None = None, name: str | None = None) -> str:
    if project is None:
        return "names/"
    if name is None:
        return f"names/{escape(project)}/"
    return f"names/{escape(project)}/{escape(name)}/"


def name_key(project: str, name: str, label: str) -> str:
    return names_prefix(project, name) + escape(label)


def parse_name_key(key: str) -> tuple[str, str, str] | None:
    parts = key.split("/")
    if len(parts) != 4 or parts[0] != "names":
        return None
    return unescape(parts[1]), unescape(parts[2]), unescape(parts[3])


def _check_id(version_id: str) -> None:
    if not is_version_id(version_id):
        raise ValueError(f"not a version id: {version_id!r}")
