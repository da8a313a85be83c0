"""The read-only http(s) backend and external links, against a tiny local server.

Python's SimpleHTTPRequestHandler ignores Range, so `RangeHandler` serves in-memory files
with single-range support, ETag and Last-Modified. Special paths imitate other servers:
/norange/* ignores Range, /nohead/* refuses HEAD like a presigned GET link, /busy/* answers
503.
"""

from __future__ import annotations

import re
import threading
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from strata.storage import (
    NotFound,
    PermissionDenied,
    StorageError,
    Transient,
    Unreachable,
    open_external,
)
from strata.storage.http import HttpStorage
from tests.conftest import free_port

DATA = bytes(range(256)) * 4  # 1024 bytes
FILES = {"/data/file.bin": DATA, "/data/empty": b"", "/norange/file.bin": DATA,
         "/nohead/file.bin": DATA}
MTIME = 1_700_000_000


class RangeHandler(BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        path, _, query = self.path.partition("?")
        if path.startswith("/busy/"):
            return self._reply(503, b"")
        if path.startswith("/nohead/") and not body:
            return self._reply(403, b"")
        if path.startswith("/signed/"):
            path = "/data/" + path.rsplit("/", 1)[1]
            if query != "sig=ok":
                return self._reply(403, b"")
        data = FILES.get(path)
        if data is None:
            return self._reply(404, b"", body=body)
        headers = {"ETag": f'"etag-{len(data)}"', "Last-Modified": formatdate(MTIME, usegmt=True),
                   "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        if match and not path.startswith("/norange/"):
            start, end = int(match.group(1)), int(match.group(2))
            if start >= len(data):
                return self._reply(416, b"", {"Content-Range": f"bytes */{len(data)}"}, body)
            end = min(end, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._reply(206, data[start:end + 1], headers, body)
        self._reply(200, data, headers, body)

    def _reply(self, status: int, data: bytes, headers: dict | None = None,
               body: bool = True) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture(scope="module")
def http_base():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), RangeHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def data(http_base) -> HttpStorage:
    return HttpStorage(http_base + "/data")


def test_stat(data) -> None:
    info = data.stat("file.bin")
    assert (info.key, info.size, info.etag, info.mtime) == ("file.bin", 1024, "etag-1024",
                                                             MTIME)
    assert data.stat("empty").size == 0


def test_read(data) -> None:
    assert data.read("file.bin") == DATA
    assert data.read("empty") == b""


@pytest.mark.parametrize("offset, length", [(0, 10), (1023, 1), (1020, 10), (1024, 5),
                                            (5000, 5), (10, 0), (0, 1024), (0, 99999)])
@pytest.mark.parametrize("folder", ["data", "norange"])
def test_read_range(http_base, folder, offset, length) -> None:
    storage = HttpStorage(f"{http_base}/{folder}")
    assert storage.read_range("file.bin", offset, length) == DATA[offset:offset + length]


def test_read_range_of_empty_object(data) -> None:
    assert data.read_range("empty", 0, 10) == b""


@pytest.mark.parametrize("call", [lambda s: s.read("nope"), lambda s: s.stat("nope"),
                                  lambda s: s.read_range("nope", 0, 10),
                                  lambda s: s.read_range("nope", 0, 0)])
def test_missing_is_not_found(data, call) -> None:
    with pytest.raises(NotFound) as info:
        call(data)
    assert data.url_for("nope") in str(info.value)


def test_read_only(data) -> None:
    with pytest.raises(PermissionDenied, match="read-only"):
        data.write("file.bin", b"x")
    with pytest.raises(PermissionDenied, match="read-only"):
        data.delete("file.bin")
    with pytest.raises(StorageError, match="cannot be listed"):
        data.list("")


def test_stat_falls_back_to_a_ranged_get_when_head_is_refused(http_base) -> None:
    assert HttpStorage(http_base + "/nohead").stat("file.bin").size == 1024


def test_server_errors_are_transient(http_base) -> None:
    with pytest.raises(Transient, match="503"):
        HttpStorage(http_base + "/busy").read("x")


def test_open_external_http_link_with_query(http_base) -> None:
    storage, key = open_external(f"{http_base}/signed/file.bin?sig=ok")
    assert key == "file.bin?sig=ok"
    assert storage.stat(key).size == 1024
    assert storage.read_range(key, 1000, 100) == DATA[1000:]
    storage, key = open_external(f"{http_base}/signed/file.bin?sig=bad", retry=False)
    with pytest.raises(PermissionDenied):
        storage.read(key)


def test_open_external_http_unreachable() -> None:
    storage, key = open_external(f"http://127.0.0.1:{free_port()}/x/file.bin", retry=False)
    with pytest.raises(Transient):
        storage.read_range(key, 0, 1)


def test_open_external_file_link(tmp_path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.bin").write_bytes(b"local bytes")
    storage, key = open_external(f"file://{tmp_path}/sub/f.bin")
    assert key == "f.bin"
    assert storage.stat(key).size == 11
    assert storage.read_range(key, 6, 100) == b"bytes"


def test_open_external_s3_link(s3_url) -> None:
    from strata.storage import open_storage

    open_storage(s3_url, retry=False).write("dir/obj.bin", b"0123456789")
    storage, key = open_external(f"{s3_url}/dir/obj.bin")
    assert key == s3_url.split("/", 3)[3] + "/dir/obj.bin"
    assert storage.stat(key).size == 10
    assert storage.read_range(key, 8, 5) == b"89"


def test_open_external_refuses_links_to_no_file() -> None:
    from strata.storage import InvalidURL

    for link in ("s3://bucket", "https://example.com/", "file:///"):
        with pytest.raises(InvalidURL):
            open_external(link)


def test_retrying_external_link_becomes_unreachable(http_base, monkeypatch) -> None:
    monkeypatch.setenv("STRATA_RETRY_SECONDS", "0.2")
    storage, key = open_external(f"{http_base}/busy/file.bin")
    with pytest.raises(Unreachable, match="busy/file.bin"):
        storage.read(key)
