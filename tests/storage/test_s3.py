"""The S3 backend against a real moto server: the contract, configuration and errors."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Iterator

import pytest

pytest.importorskip("boto3")

from botocore.exceptions import (  # noqa: E402 - after the importorskip
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from strata.storage import (  # noqa: E402
    MissingDependency,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    RetryingStorage,
    StorageError,
    Transient,
    Unreachable,
    open_storage,
)
from strata.storage import s3  # noqa: E402
from strata.storage.errors import MissingBucket  # noqa: E402
from strata.storage.s3 import S3Storage, _translate, make_client  # noqa: E402
from tests.conftest import CREDENTIALS, MotoServer, apply_s3_env, free_port  # noqa: E402
from tests.storage.contract import StorageContract  # noqa: E402
from tests.storage.emulators import FlakyProxy  # noqa: E402


@pytest.fixture(scope="module")
def serial_moto(s3_server) -> Iterator[FlakyProxy]:
    """moto behind a proxy that passes one request at a time. moto checks If-None-Match /
    If-Match and then stores, in two steps on a threaded server, so two racing conditional
    writes can both pass there, where S3 decides atomically; without this the racing tests
    would test moto. The SDK still sends concurrently."""
    with FlakyProxy(s3_server.endpoint_url, serial=True) as proxy:
        yield proxy


class TestS3Storage(StorageContract):
    @pytest.fixture
    def storage(self, serial_moto, s3_url, monkeypatch) -> S3Storage:
        monkeypatch.setenv("AWS_ENDPOINT_URL", serial_moto.endpoint)
        return open_storage(s3_url, retry=False)

    @pytest.fixture
    def flaky(self, s3_server, s3_url, monkeypatch):
        """The same location through a proxy that answers 503: through boto3, on HTTP."""
        with FlakyProxy(s3_server.endpoint_url) as proxy:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
            yield open_storage(s3_url, retry=False), proxy


def test_storage_is_configured_from_the_environment(s3_url, s3_server, monkeypatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION")
    monkeypatch.delenv("STRATA_RETRY_SECONDS", raising=False)
    storage = open_storage(s3_url, retry=False)
    meta = storage._client.meta
    assert meta.endpoint_url == s3_server.endpoint_url  # from AWS_ENDPOINT_URL alone
    assert meta.region_name == "us-east-1"
    assert meta.config.max_pool_connections >= 32
    assert meta.config.retries["total_max_attempts"] == 1  # retry.py owns retrying
    # 10 s to connect, 60 s per socket read, the read cut to the default 30 s retry budget
    assert (meta.config.connect_timeout, meta.config.read_timeout) == (10.0, 30.0)


def test_prefix_isolates_repositories(s3_server, s3_url) -> None:
    bucket = s3_url.split("/")[2]
    one = open_storage(f"s3://{bucket}/one", retry=False)
    two = open_storage(f"s3://{bucket}/one-two", retry=False)
    one.write("k", b"1")
    two.write("k", b"2")
    assert [i.key for i in one.list("")] == ["k"]
    assert one.read("k") == b"1" and two.read("k") == b"2"
    objects = s3_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert sorted(o["Key"] for o in objects) == ["one-two/k", "one/k"]


MIB = 1 << 20


@pytest.fixture
def small_parts(monkeypatch) -> int:
    """Multipart uploads with parts of 5 MiB, S3's (and moto's) minimum, so that a test
    object of a few parts stays small. Returns the part size."""
    monkeypatch.setattr(s3, "MULTIPART_THRESHOLD", 5 * MIB)
    monkeypatch.setattr(s3, "PART_SIZE", 5 * MIB)
    return 5 * MIB


def _open_uploads(s3_server, s3_url: str) -> list:
    bucket = s3_url.split("/")[2]
    return s3_server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def test_large_write_is_a_multipart_upload_carrying_the_condition(
        s3_server, s3_url, small_parts) -> None:
    storage = open_storage(s3_url, retry=False)
    data = os.urandom(6 * small_parts + 123)   # 7 parts, the last one short
    client = storage._client
    real_upload_part = client.upload_part
    # The first UPLOAD_CONCURRENCY parts wait for each other: only parallel parts pass.
    together = threading.Barrier(s3.UPLOAD_CONCURRENCY, timeout=30)
    lock = threading.Lock()
    in_flight = peak = calls = 0

    def upload_part(**kwargs):
        nonlocal in_flight, peak, calls
        with lock:
            in_flight += 1
            calls += 1
            peak = max(peak, in_flight)
            first = calls <= s3.UPLOAD_CONCURRENCY
        try:
            if first:
                together.wait()
            return real_upload_part(**kwargs)
        finally:
            with lock:
                in_flight -= 1

    client.upload_part = upload_part   # an instance attribute: this client only
    try:
        etag = storage.write("big", data, if_absent=True)
    finally:
        del client.upload_part
    assert calls == 7 and peak == s3.UPLOAD_CONCURRENCY
    assert etag.endswith("-7")   # S3's etag of a 7-part upload
    assert storage.stat("big").etag == etag and storage.read("big") == data
    edge = small_parts
    assert storage.read_range("big", edge - 3, 6) == data[edge - 3:edge + 3]
    assert storage.read_range("big", len(data) - 5, 100) == data[-5:]

    with pytest.raises(PreconditionFailed):   # If-None-Match on CompleteMultipartUpload
        storage.write("big", data[::-1], if_absent=True)
    assert storage.read("big") == data
    assert _open_uploads(s3_server, s3_url) == []   # the losing upload was aborted

    # compare-and-swap of a large object: one PutObject carrying If-Match
    new = storage.write("big", data[::-1], if_match=etag)
    with pytest.raises(PreconditionFailed):
        storage.write("big", data, if_match=etag)
    assert storage.read("big") == data[::-1] and storage.stat("big").etag == new


def test_a_failed_part_aborts_the_upload(s3_server, s3_url, small_parts) -> None:
    storage = open_storage(s3_url, retry=False)
    client = storage._client
    real_upload_part = client.upload_part

    def upload_part(**kwargs):
        if kwargs["PartNumber"] == 2:
            raise EndpointConnectionError(endpoint_url="http://dropped")
        return real_upload_part(**kwargs)

    client.upload_part = upload_part
    try:
        with pytest.raises(Transient) as info:
            storage.write("big", os.urandom(3 * small_parts), if_absent=True)
    finally:
        del client.upload_part
    assert s3_url + "/big" in str(info.value)
    assert _open_uploads(s3_server, s3_url) == []
    with pytest.raises(NotFound):
        storage.stat("big")
    data = os.urandom(3 * small_parts)   # the retry of the whole write succeeds
    assert RetryingStorage(storage).write("big", data, if_absent=True)
    assert storage.read("big") == data


@pytest.mark.parametrize("call", [
    lambda s: s.read("k"), lambda s: s.write("k", b"x"), lambda s: list(s.list("")),
    lambda s: s.write("k", b"x", if_absent=True), lambda s: s.delete("k"),
], ids=["read", "write", "list", "write_if_absent", "delete"])
def test_missing_bucket_its_own_error_naming_it(s3_url, call) -> None:
    storage = open_storage("s3://no-such-bucket-strata/prefix", retry=False)
    with pytest.raises(MissingBucket) as info:
        call(storage)
    assert not isinstance(info.value, NotFound)   # not "no such object": no location
    assert "no-such-bucket-strata" in str(info.value)
    assert "does not exist" in str(info.value)


@pytest.fixture(scope="module")
def auth_server():
    # moto's server accepts any credentials unless INITIAL_NO_AUTH_ACTION_COUNT is set;
    # with 0, every request must be signed by an access key its IAM knows.
    server = MotoServer({"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()
    yield server
    server.close()


def test_unknown_credentials_are_permission_denied(auth_server, monkeypatch) -> None:
    apply_s3_env(monkeypatch, auth_server.env())
    storage = open_storage("s3://some-bucket/repo", retry=True)
    for call in (lambda: storage.read("k"), lambda: storage.write("k", b"x"),
                 lambda: storage.stat("k")):
        with pytest.raises(PermissionDenied) as info:
            call()
        assert "s3://some-bucket/repo/k" in str(info.value)


def test_no_credentials_is_permission_denied_with_a_hint(s3_url, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage = open_storage(s3_url)
    with pytest.raises(PermissionDenied, match="AWS_ACCESS_KEY_ID"):
        storage.read("k")


def test_unreachable_endpoint_fails_fast(s3_url, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    raw = open_storage(s3_url, retry=False)
    with pytest.raises(Transient):
        raw.read("k")
    storage = RetryingStorage(raw, attempts=3, base_delay=0.01)
    started = time.monotonic()
    with pytest.raises(Unreachable) as info:
        storage.stat("k")
    assert time.monotonic() - started < 5
    assert s3_url + "/k" in str(info.value) and "3 attempts" in str(info.value)


def test_server_gone_is_transient_then_unreachable(monkeypatch) -> None:
    server = MotoServer().start()
    try:
        apply_s3_env(monkeypatch, server.env())
        bucket = server.make_bucket()
        storage = open_storage(f"s3://{bucket}", retry=False)
        storage.write("k", b"x" * 1000)
        server.stop()
        with pytest.raises(Transient):
            storage.read_range("k", 0, 10)
        with pytest.raises(Unreachable):
            RetryingStorage(storage, attempts=2, base_delay=0.01).read("k")
    finally:
        server.close()


def test_missing_boto3_is_a_missing_dependency(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # makes `import boto3` fail
    with pytest.raises(MissingDependency, match=r"strata\[s3\]"):
        make_client()


def _client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "m"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


@pytest.mark.parametrize("exc, kind", [
    (_client_error("NoSuchKey", 404), NotFound),
    (_client_error("404", 404), NotFound),
    (_client_error("PreconditionFailed", 412), PreconditionFailed),
    (_client_error("ConditionalRequestConflict", 409), Transient),
    (_client_error("AccessDenied", 403), PermissionDenied),
    (_client_error("403", 403), PermissionDenied),
    (_client_error("InvalidAccessKeyId", 403), PermissionDenied),
    (_client_error("SignatureDoesNotMatch", 403), PermissionDenied),
    (_client_error("ExpiredToken", 400), PermissionDenied),
    (_client_error("SlowDown", 503), Transient),
    (_client_error("ThrottlingException", 400), Transient),
    (_client_error("TooManyRequests", 429), Transient),
    (_client_error("InternalError", 500), Transient),
    (_client_error("SomethingNew", 502), Transient),
    (_client_error("SomethingNew", 400), StorageError),
    (NoCredentialsError(), PermissionDenied),
    (EndpointConnectionError(endpoint_url="http://x"), Transient),
    (ConnectTimeoutError(endpoint_url="http://x"), Transient),
    (ReadTimeoutError(endpoint_url="http://x"), Transient),
    (ResponseStreamingError(error="reset"), Transient),
])
def test_translation_table(exc: Exception, kind: type) -> None:
    error = _translate(exc, "s3://b/p/k", "b")
    assert type(error) is kind
    assert "s3://b/p/k" in str(error)


def test_non_sdk_errors_are_not_translated() -> None:
    assert _translate(KeyError("bug"), "s3://b/k", "b") is None


# ---- reads past botocore's request machinery (DirectGets) --------------------------------
TRICKY_KEYS = ["blobs/ab/0123", "a b/c+d=e", "caf\u00e9/\u6570\u636e", "x%20y/~tilde!*'()",
               "semi;colon,comma&amp?q#frag", "deep/" * 20 + "end"]


def _forbid_get_object(storage: S3Storage, monkeypatch) -> None:
    def get_object(**kwargs):
        raise AssertionError(f"a read went through botocore: {kwargs}")
    monkeypatch.setattr(storage._client, "get_object", get_object, raising=False)


def test_reads_skip_botocore_and_get_the_stored_bytes(s3_url, monkeypatch) -> None:
    storage = open_storage(s3_url, retry=False)
    raw = storage.inner if hasattr(storage, "inner") else storage
    data = {key: os.urandom(1000 + i) for i, key in enumerate(TRICKY_KEYS)}
    for key, value in data.items():
        storage.write(key, value)
    _forbid_get_object(raw, monkeypatch)
    for key, value in data.items():
        assert storage.read(key) == value
        assert storage.read_range(key, 7, 100) == value[7:107]
        assert storage.read_range(key, len(value) - 3, 100) == value[-3:]
        assert storage.read_range(key, len(value) + 5, 10) == b""   # past the end: 416
    with pytest.raises(NotFound):
        storage.read("no/such key")


def test_a_direct_url_is_the_one_botocore_presigns(s3_url) -> None:
    storage = open_storage(s3_url, retry=False)
    bucket = s3_url.split("/")[2]
    for key in TRICKY_KEYS:
        presigned = storage._client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key})
        assert storage._direct.url(bucket, key) == presigned.partition("?")[0]


def test_a_proxy_in_the_environment_leaves_reads_to_botocore(s3_url, monkeypatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")   # moto itself is not reached through it
    storage = open_storage(s3_url, retry=False)
    assert storage._direct is None
    storage.write("k", b"proxied")
    assert storage.read("k") == b"proxied"


class _OddServer:
    """Answers every GET as `answer(handler)` says: redirects, broken bodies, HTML."""

    def __init__(self, answer):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                answer(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _send(handler, status: int, body: bytes, length: int | None = None) -> None:
    handler.send_response(status)
    handler.send_header("Content-Length", str(len(body) if length is None else length))
    handler.end_headers()
    handler.wfile.write(body)
    handler.wfile.flush()
    handler.close_connection = length is not None   # a short body ends with the connection


def test_a_redirect_is_left_to_botocore(monkeypatch) -> None:
    redirect = b"<Error><Code>PermanentRedirect</Code><Message>elsewhere</Message></Error>"
    direct = []
    server = _OddServer(lambda h: direct.append(h.path) or _send(h, 301, redirect))
    try:
        apply_s3_env(monkeypatch, {"AWS_ENDPOINT_URL": server.endpoint, **CREDENTIALS})
        storage = open_storage("s3://bucket/repo", retry=False)
        calls = []
        monkeypatch.setattr(storage._client, "get_object",
                            lambda **kw: calls.append(kw) or _FakeBody(b"from botocore"),
                            raising=False)
        assert storage.read("k") == b"from botocore"
        assert storage.read_range("k", 2, 3) == b"om "   # its Range was honoured
        assert [c["Key"] for c in calls] == ["repo/k", "repo/k"]
        assert calls[1]["Range"] == "bytes=2-4"
        assert direct == ["/bucket/repo/k"]   # once: then the bucket is botocore's
    finally:
        server.close()


def test_express_buckets_are_left_to_botocore(monkeypatch) -> None:
    seen = []
    server = _OddServer(lambda h: seen.append(h.path) or _send(h, 500, b""))
    try:
        apply_s3_env(monkeypatch, {"AWS_ENDPOINT_URL": server.endpoint, **CREDENTIALS})
        storage = open_storage("s3://data--use1-az4--x-s3/repo", retry=False)
        assert storage._direct.get("data--use1-az4--x-s3", "repo/k", None) is None
        assert seen == []   # not a request: botocore signs these with session credentials
    finally:
        server.close()


class _FakeBody(dict):
    def __init__(self, data: bytes):
        import io
        super().__init__(Body=io.BytesIO(data), ContentRange="")


@pytest.mark.parametrize("answer, kind, words", [
    (lambda h: _send(h, 200, b"short", length=50), Transient, "connection failed"),
    (lambda h: _send(h, 500, b"<html>crashed</html>"), Transient, "server error 500"),
    (lambda h: _send(h, 503, b"<Error><Code>SlowDown</Code></Error>"), Transient, "SlowDown"),
    (lambda h: _send(h, 403, b"<Error><Code>AccessDenied</Code></Error>"), PermissionDenied,
     "access denied"),
    (lambda h: _send(h, 404, b"<Error><Code>NoSuchBucket</Code></Error>"), MissingBucket,
     "does not exist"),
], ids=["truncated", "html-500", "slowdown", "denied", "no-bucket"])
def test_a_failed_direct_get_is_translated(monkeypatch, answer, kind, words) -> None:
    server = _OddServer(answer)
    try:
        apply_s3_env(monkeypatch, {"AWS_ENDPOINT_URL": server.endpoint, **CREDENTIALS})
        storage = open_storage("s3://bucket/repo", retry=False)
        _forbid_get_object(storage, monkeypatch)
        with pytest.raises(kind) as info:
            storage.read_range("k", 0, 10)
        assert type(info.value) is kind
        assert words in str(info.value) and "s3://bucket/repo/k" in str(info.value)
    finally:
        server.close()
