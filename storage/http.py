"""A read-only backend for http(s) links, as `add_external_files` records them.

`HttpStorage(base)` serves keys under a base URL: stat is a HEAD (size, ETag,
Last-Modified), read and read_range are GETs, the latter with a `Range` header. Writes,
deletes and listings are refused: a web server is not a repository. A key may carry a query
string (`file.bin?sig=...`), as presigned links do; only its path part is checked.

Built on urllib (stdlib): one connection per request, thread-safe with no shared state.
`_STATUS` is the one table from HTTP statuses to our errors.
"""

from __future__ import annotations

import http.client
import re
import urllib.error
import urllib.request
from email.utils import parsedate_to_datetime
from typing import Iterator, Mapping

from strata.storage.base import ObjectInfo, check_range_args
from strata.storage.errors import (
    NotFound,
    PermissionDenied,
    StorageError,
    Transient,
)
from strata.storage.url import StorageURL, check_key

TIMEOUT = 30.0  # seconds per socket operation, like the S3 backend's read timeout
_USER_AGENT = "strata"
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


class _OutOfRange(StorageError):
    """HTTP 416: the range starts at or past the end; read_range turns it into b''."""


_STATUS: dict[int, tuple[type[StorageError], str]] = {
    401: (PermissionDenied, "not authorised (HTTP 401)"),
    403: (PermissionDenied, "forbidden (HTTP 403)"),
    404: (NotFound, "no such object (HTTP 404)"),
    410: (NotFound, "no such object (HTTP 410 Gone)"),
    408: (Transient, "request timeout (HTTP 408)"),
    416: (_OutOfRange, "range not satisfiable (HTTP 416)"),
    425: (Transient, "too early (HTTP 425)"),
    429: (Transient, "too many requests (HTTP 429)"),
}


def from_url(url: StorageURL) -> HttpStorage:
    base = f"{url.scheme}://{url.host}/{url.prefix}".rstrip("/")
    return HttpStorage(base)


class HttpStorage:
    """Read-only objects at `<base>/<key>`."""

    def __init__(self, base_url: str, *, timeout: float = TIMEOUT):
        self.url = base_url.rstrip("/")
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"HttpStorage({self.url!r})"

    def url_for(self, key: str) -> str:
        return f"{self.url}/{key}"

    def read(self, key: str) -> bytes:
        status, headers, body = self._request("GET", key)
        return body

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        check_range_args(offset, length)
        if length == 0:
            self.stat(key)  # an empty range has no HTTP form, but a missing key must fail
            return b""
        rng = f"bytes={offset}-{offset + length - 1}"
        try:
            # A server that ignores Range answers 200 with everything; stop reading early.
            status, headers, body = self._request("GET", key, {"Range": rng},
                                                  limit=offset + length)
        except _OutOfRange:
            return b""
        if status == 206:
            match = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
            if match and match.group(1) is not None and int(match.group(1)) != offset:
                raise StorageError(self.url_for(key), f"server answered {rng} with "
                                                      f"{headers['Content-Range']}")
            return body[:length]
        return body[offset:offset + length]

    def stat(self, key: str) -> ObjectInfo:
        try:
            status, headers, _ = self._request("HEAD", key)
        except (NotFound, Transient):
            raise
        except StorageError:
            # Presigned GET links (403) and some servers (405) refuse HEAD; a one-byte GET
            # reports the size just as well.
            return self._stat_by_get(key)
        size = headers.get("Content-Length")
        if size is None:
            return self._stat_by_get(key)
        return _info(key, int(size), headers)

    def write(self, key: str, data: bytes, *, if_absent: bool = False,
              if_match: str | None = None) -> str:
        raise PermissionDenied(self.url_for(key), "read-only: http(s) links cannot be written")

    def delete(self, key: str) -> None:
        raise PermissionDenied(self.url_for(key), "read-only: http(s) links cannot be deleted")

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        raise StorageError(self.url, "http(s) links cannot be listed")

    # -- internals ---------------------------------------------------------------------------

    def _stat_by_get(self, key: str) -> ObjectInfo:
        try:
            status, headers, body = self._request("GET", key, {"Range": "bytes=0-0"}, limit=1)
        except _OutOfRange:  # only an empty object refuses byte 0
            return ObjectInfo(key, 0, "", None)
        match = _CONTENT_RANGE.match(headers.get("Content-Range", ""))
        if status == 206 and match and match.group(3) != "*":
            return _info(key, int(match.group(3)), headers)
        if status == 200 and headers.get("Content-Length") is not None:
            return _info(key, int(headers["Content-Length"]), headers)
        raise StorageError(self.url_for(key), "server does not report the object's size")

    def _request(self, method: str, key: str, headers: Mapping[str, str] | None = None,
                 limit: int | None = None) -> tuple[int, Mapping[str, str], bytes]:
        path, _, _ = key.partition("?")
        check_key(path, self.url)
        url = self.url_for(key)
        request = urllib.request.Request(url, method=method,
                                         headers={"User-Agent": _USER_AGENT, **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                body = response.read() if limit is None else response.read(limit)
                return response.status, response.headers, body
        except urllib.error.HTTPError as exc:
            exc.close()
            raise _translate_status(exc.code, exc.reason, url) from None
        except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
            # refused, reset, timed out, or cut off mid-body: worth another attempt
            reason = getattr(exc, "reason", exc)
            raise Transient(url, f"HTTP request failed ({reason})") from exc


def _translate_status(status: int, reason: str, url: str) -> StorageError:
    if status in _STATUS:
        cls, message = _STATUS[status]
        return cls(url, message)
    if status >= 500:
        return Transient(url, f"server error (HTTP {status} {reason})")
    return StorageError(url, f"HTTP {status} {reason}")


def _info(key: str, size: int, headers: Mapping[str, str]) -> ObjectInfo:
    etag = headers.get("ETag", "")
    etag = etag.removeprefix("W/").strip('"')
    mtime = None
    if headers.get("Last-Modified"):
        try:
            mtime = parsedate_to_datetime(headers["Last-Modified"]).timestamp()
        except (TypeError, ValueError):
            pass
    if not etag and mtime is not None:
        etag = f"{mtime:.0f}-{size:x}"  # no ETag: Last-Modified and size stand in for it
    return ObjectInfo(key, size, etag, mtime)
