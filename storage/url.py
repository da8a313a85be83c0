"""Storage URLs and object keys: the one place that parses them and picks a backend.

Accepted repository forms (`ACCEPTED_FORMS`): a plain path, `file:///abs/path`,
`s3://bucket/prefix`, `gs://bucket/prefix` and
`azure://<account>.blob.core.windows.net/<container>/<prefix>`. External links
(`add_external_files`) may also be `http(s)://` URLs; `parse_link` accepts those.

`open_storage` maps a scheme to a backend module through `BACKENDS` and imports it only
when a URL needs it, so the cloud SDKs stay optional. A backend module exposes
`from_url(url: StorageURL) -> Storage`; it raises `MissingDependency` itself when its
SDK is missing.

Keys and prefixes are checked here too (`check_key`, `check_prefix`), so that no key built
from a dataset name or a manifest path can reach outside the repository.
"""

from __future__ import annotations

import importlib
import os
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from strata.storage.base import Storage
from strata.storage.errors import InvalidKey, InvalidURL, MissingDependency
from strata.storage.retry import RetryingStorage

ACCEPTED_FORMS = (
    "a plain path, file:///abs/path, s3://bucket/prefix, gs://bucket/prefix, "
    "azure://<account>.blob.core.windows.net/<container>/<prefix>"
)

# scheme -> module exposing from_url(StorageURL) -> Storage; imported lazily.
BACKENDS: dict[str, str] = {
    "file": "strata.storage.local",
    "s3": "strata.storage.s3",
    "gs": "strata.storage.gcs",
    "azure": "strata.storage.azure",
}

_EXTRAS = {"s3": "s3", "gs": "gcs", "azure": "azure"}  # pyproject optional-dependencies
_LINK_SCHEMES = ("http", "https")
_MALFORMED = re.compile(r"^(file|s3|gs|azure|https?):(?!//)", re.IGNORECASE)
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
# S3 and GCS bucket names: lowercase letters, digits, dots, hyphens, underscores (GCS).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")
_AZURE_ACCOUNT = re.compile(r"^[a-z0-9]{3,24}$")
_AZURE_CONTAINER = re.compile(r"^(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]$|^\$root$")


@dataclass(frozen=True)
class StorageURL:
    """A parsed repository URL (or, from `parse_link`, an external link).

    scheme:    'file', 's3', 'gs', 'azure', 'http' or 'https'
    bucket:    the S3/GCS bucket or Azure container; '' for file and http(s)
    prefix:    the key prefix inside the bucket, no leading or trailing '/'; for http(s),
               the path without its leading '/' (query kept in `query`)
    path:      the absolute, normalised folder for file URLs; '' otherwise
    host:      Azure `<account>.blob.core.windows.net` or the http(s) host[:port]
    query:     http(s) query string without '?', '' otherwise
    """

    scheme: str
    bucket: str = ""
    prefix: str = ""
    path: str = ""
    host: str = ""
    query: str = ""

    @property
    def account(self) -> str:
        """The Azure storage account name (the first label of the host)."""
        return self.host.split(".", 1)[0] if self.scheme == "azure" else ""

    @property
    def url(self) -> str:
        """The canonical form, with no trailing '/'."""
        if self.scheme == "file":
            return "file://" + self.path
        if self.scheme == "azure":
            base = f"azure://{self.host}/{self.bucket}"
        elif self.scheme in _LINK_SCHEMES:
            base = f"{self.scheme}://{self.host}"
        else:
            base = f"{self.scheme}://{self.bucket}"
        url = f"{base}/{self.prefix}" if self.prefix else base
        return f"{url}?{self.query}" if self.query else url

    def __str__(self) -> str:
        return self.url


def parse_url(url: str | os.PathLike[str]) -> StorageURL:
    """Parse a repository URL or plain path. InvalidURL if it is none of `ACCEPTED_FORMS`."""
    parsed = _parse(url)
    if parsed.scheme in _LINK_SCHEMES:
        raise _invalid(str(url), "http(s) URLs are read-only links, not repositories")
    return parsed


def parse_link(url: str | os.PathLike[str]) -> StorageURL:
    """Parse an external link: any repository form, or an http(s) URL."""
    return _parse(url)


def open_storage(url: str | os.PathLike[str] | StorageURL, *, retry: bool = True) -> Storage:
    """The backend for a repository URL, wrapped in `RetryingStorage` unless retry=False."""
    parsed = url if isinstance(url, StorageURL) else parse_url(url)
    storage = _backend_module(parsed).from_url(parsed)
    return RetryingStorage(storage) if retry else storage


def check_key(key: str, url: str) -> str:
    """Return `key` if it is a safe relative object key, else raise InvalidKey.

    Refused: empty keys, absolute keys, backslashes, NUL and other control characters,
    and '', '.' or '..' segments (so 'a//b' and 'a/./b' cannot alias 'a/b' on a folder).
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey(url, f"empty or non-string object key {key!r}")
    _check_chars(key, url)
    if key.startswith("/"):
        raise InvalidKey(url, f"absolute object key {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(url, f"object key {key!r} has an empty, '.' or '..' segment")
    return key


def check_prefix(prefix: str, url: str) -> str:
    """Return `prefix` if it is a safe listing prefix ('' or a key, maybe ending in '/')."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if prefix.endswith("/") else prefix, url)
    return prefix


def _check_chars(key: str, url: str) -> None:
    if "\\" in key:
        raise InvalidKey(url, f"object key {key!r} contains a backslash")
    if any(ord(c) < 0x20 or c == "\x7f" for c in key):
        raise InvalidKey(url, f"object key {key!r} contains NUL or a control character")


def _parse(url: str | os.PathLike[str]) -> StorageURL:
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str) or not url.strip():
        raise _invalid(repr(url), "empty URL")
    if "\x00" in url:
        raise _invalid(repr(url), "URL contains NUL")
    match = _SCHEME.match(url)
    if match is None:
        if _MALFORMED.match(url):
            raise _invalid(url, "missing '//' after the scheme")
        # A plain path: the user's own folder, so '..' and '~' are resolved, not refused.
        return StorageURL("file", path=os.path.abspath(os.path.expanduser(url)))
    scheme = match.group(1).lower()
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unbalanced '[' ("Invalid IPv6 URL")
        raise _invalid(url, f"cannot be parsed ({exc})") from None
    if parts.fragment or (parts.query and scheme not in _LINK_SCHEMES):
        if scheme == "azure" and parts.query:
            raise _invalid(url, "unexpected '?': a SAS token does not go in the URL; set "
                                "AZURE_STORAGE_SAS_TOKEN or put it in the config file "
                                "(see docs/backends.md)")
        raise _invalid(url, "unexpected '?' or '#'")
    if scheme == "file":
        return _parse_file(url, parts.netloc, parts.path)
    if scheme in ("s3", "gs"):
        bucket = parts.netloc
        if not _BUCKET.match(bucket) or ".." in bucket:
            raise _invalid(url, f"invalid bucket name {bucket!r}")
        return StorageURL(scheme, bucket=bucket, prefix=_prefix(url, parts.path))
    if scheme == "azure":
        return _parse_azure(url, parts.netloc, parts.path)
    if scheme in _LINK_SCHEMES:
        if not parts.hostname:
            raise _invalid(url, "no host")
        return StorageURL(scheme, host=parts.netloc, prefix=parts.path.lstrip("/"),
                          query=parts.query)
    raise _invalid(url, f"unknown scheme {scheme!r}")


def _parse_file(url: str, netloc: str, path: str) -> StorageURL:
    if netloc not in ("", "localhost"):
        raise _invalid(url, "file URLs need an absolute path: file:///abs/path")
    if not path.startswith("/"):
        raise _invalid(url, "file URLs need an absolute path: file:///abs/path")
    return StorageURL("file", path=os.path.normpath(path))


def _parse_azure(url: str, netloc: str, path: str) -> StorageURL:
    account = netloc.split(".", 1)[0]
    if "." not in netloc or not _AZURE_ACCOUNT.match(account):
        raise _invalid(url, "expected azure://<account>.blob.core.windows.net/<container>/...")
    container, _, rest = path.lstrip("/").partition("/")
    if not _AZURE_CONTAINER.match(container):
        raise _invalid(url, f"invalid Azure container name {container!r}")
    return StorageURL("azure", bucket=container, host=netloc.lower(), prefix=_prefix(url, rest))


def _prefix(url: str, path: str) -> str:
    """The key prefix from a URL path: checked like a key, so it cannot escape the bucket."""
    prefix = path.strip("/")
    if prefix:
        try:
            check_key(prefix, url)
        except InvalidKey as exc:
            raise _invalid(url, f"unsafe prefix ({exc.detail})") from None
    return prefix


def _invalid(url: str, why: str) -> InvalidURL:
    return InvalidURL(f"invalid storage URL {url}: {why}; expected {ACCEPTED_FORMS}")


def _backend_module(parsed: StorageURL):
    name = BACKENDS.get(parsed.scheme)
    if name is None:
        raise _invalid(parsed.url, f"no backend for scheme {parsed.scheme!r}")
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            raise MissingDependency(
                f"{parsed.scheme}:// storage is not available in this installation "
                f"(module {name} is missing): {parsed.url}"
            ) from None
        # A backend should import its SDK lazily and say this itself; this is the safety net.
        extra = _EXTRAS.get(parsed.scheme, "all")
        raise MissingDependency(
            f"{parsed.scheme}:// storage needs the Python package {exc.name!r}: "
            f"pip install 'strata[{extra}]'"
        ) from None
