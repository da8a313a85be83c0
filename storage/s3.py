"""The S3 backend: AWS S3 and S3-compatible stores, through boto3.

boto3 is imported when the first `S3Storage` is made, so strata installs without it
(`pip install 'strata[s3]'`). Everything else comes from boto3's own configuration chain:
credentials (environment, profile, SSO, instance role), the region (us-east-1 when none is
configured) and the endpoint (`AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_S3` or `endpoint_url`
in the profile, which botocore reads itself), so MinIO, moto or any S3-compatible store
works with no strata-specific setting.

Conditional writes are S3's own: `If-None-Match: *` for only-if-absent and `If-Match: <etag>`
for compare-and-swap. Etags are returned without their quotes.

Writes above `MULTIPART_THRESHOLD` (packs, mostly) go as a multipart upload: `PART_SIZE`
parts, `UPLOAD_CONCURRENCY` in flight per write, and the only-if-absent condition sent with
CompleteMultipartUpload, so a lost race leaves no object behind; an upload that fails or
loses is aborted, so no parts are left to be billed. Compare-and-swap writes always go as
one PutObject: they are small catalog records, and `If-Match` on PutObject is the form that
S3-compatible stores (and moto) honour, while `If-Match` on CompleteMultipartUpload is not.

Reads (GetObject, whole or ranged) skip botocore's request machinery (`DirectGets`): the
object's URL is the client's (`generate_presigned_url`, so endpoint, addressing style and
key quoting stay botocore's), the request is signed by botocore's SigV4 signer with the
session's credentials, as botocore signs its own, and urllib3, which botocore itself
sends with, fetches it. A ranged GET of 64 KiB from a local S3 server takes 1.2-1.3 ms of
CPU through botocore and 0.46 ms this way (2.0-2.2 ms and 1.2-1.3 ms from request to
bytes); a reader of small files makes one per file, a mount reading 1 GiB 128 (8 MiB each:
0.5 against 0.65 CPU-s per GiB). Where the environment sets a proxy, every call goes
through botocore; so do S3 Express directory buckets (`...--x-s3`, signed with session
credentials) and a bucket that redirected once (another region: botocore follows it).

One client per AWS environment, shared by all backends and threads (boto3 clients are
thread-safe). The client makes exactly one attempt per call: `strata.storage.retry` owns
retrying, so the bound on attempts and time is ours. `_translate` is the one table from
botocore errors to strata's; failed direct GETs go through it too.
"""

from __future__ import annotations

import re
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import quote

from strata.storage.base import ObjectInfo, check_write_args
from strata.storage.errors import (
    MissingBucket,
    MissingDependency,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
)
from strata.storage.retry import attempt_timeout
from strata.storage.sdk import ClientCache, OutOfRange, environment_key, ranged_read
from strata.storage.url import StorageURL, check_key, check_prefix

DEFAULT_REGION = "us-east-1"
POOL_SIZE = 64  # above the widest download/readahead pool, so threads never wait on sockets
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # per socket read, not per object: a stalled server fails within this
# Both are cut down to the retry budget by retry.attempt_timeout (STRATA_RETRY_SECONDS).
MULTIPART_THRESHOLD = 8 << 20  # larger writes go as multipart uploads (a chunk is one PUT)
PART_SIZE = 8 << 20  # bytes per part; S3 needs at least 5 MiB for every part but the last
UPLOAD_CONCURRENCY = 4  # parts in flight per write; the catalog runs several writes at once

PRESIGN_SECONDS = 900  # of a presigned URL only the URL is used, not its signature

_clients = ClientCache()   # (client, DirectGets or None) per distinct AWS environment

_CREDENTIALS_HINT = (
    "no usable AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "AWS_PROFILE, or run with an instance role)"
)


_UNKNOWN_KEY = "unknown AWS access key id (check AWS_ACCESS_KEY_ID or AWS_PROFILE)"
_WRONG_SECRET = ("AWS secret key does not match the key id (check AWS_SECRET_ACCESS_KEY "
                 "or AWS_PROFILE)")

# S3 error code (or bare HTTP status, as HEAD responses carry no body) -> our error.
_CODES: dict[str, tuple[type[StorageError], str]] = {
    "NoSuchKey": (NotFound, "no such object"),
    "NotFound": (NotFound, "no such object"),
    "404": (NotFound, "no such object"),
    "InvalidRange": (OutOfRange, "range not satisfiable"),
    "416": (OutOfRange, "range not satisfiable"),
    "PreconditionFailed": (PreconditionFailed, "object exists or changed since it was read"),
    "412": (PreconditionFailed, "object exists or changed since it was read"),
    "ConditionalRequestConflict": (Transient, "conflicting concurrent conditional write"),
    "AccessDenied": (PermissionDenied, "access denied (check credentials and bucket policy)"),
    "AllAccessDisabled": (PermissionDenied, "all access to this bucket is disabled"),
    "AccountProblem": (PermissionDenied, "AWS account problem"),
    "InvalidAccessKeyId": (PermissionDenied, _UNKNOWN_KEY),
    "InvalidClientTokenId": (PermissionDenied, _UNKNOWN_KEY),
    "SignatureDoesNotMatch": (PermissionDenied, _WRONG_SECRET),
    "ExpiredToken": (PermissionDenied, "AWS session token expired"),
    "ExpiredTokenException": (PermissionDenied, "AWS session token expired"),
    "InvalidToken": (PermissionDenied, "invalid AWS session token"),
    "TokenRefreshRequired": (PermissionDenied, "AWS session token must be refreshed"),
    "RequestTimeTooSkewed": (PermissionDenied, "request rejected: this machine's clock is off"),
    "401": (PermissionDenied, "not authenticated (check credentials)"),
    "403": (PermissionDenied, "access denied (check credentials and bucket policy)"),
    "SlowDown": (Transient, "throttled by S3 (SlowDown)"),
    "Throttling": (Transient, "throttled by S3"),
    "ThrottlingException": (Transient, "throttled by S3"),
    "RequestThrottled": (Transient, "throttled by S3"),
    "TooManyRequests": (Transient, "throttled by S3"),
    "RequestLimitExceeded": (Transient, "throttled by S3"),
    "429": (Transient, "throttled by S3"),
    "RequestTimeout": (Transient, "S3 request timed out"),
    "InternalError": (Transient, "S3 internal error"),
    "ServiceUnavailable": (Transient, "S3 service unavailable"),
    "OperationAborted": (Transient, "conflicting concurrent operation"),
}


def from_url(url: StorageURL) -> S3Storage:
    return S3Storage(url.bucket, url.prefix)


def make_client() -> Any:
    """The boto3 S3 client for the current AWS environment, shared by every backend.

    boto3 clients are thread-safe, and sharing one shares its connection pool, so opening a
    backend per external link costs nothing. Clients are keyed by the AWS_* variables and
    the socket timeouts: a changed environment (profile, endpoint, keys, retry budget) gets
    a client of its own.
    """
    return _environment()[0]


def _environment() -> tuple[Any, DirectGets | None]:
    """The client for the current AWS environment and its `DirectGets` (None where a
    proxy is configured: botocore's own transport knows how to use it)."""
    boto3, Config = _import_boto3()
    timeouts = (attempt_timeout(CONNECT_TIMEOUT), attempt_timeout(READ_TIMEOUT))
    proxies = tuple(sorted(urllib.request.getproxies().items()))
    key = environment_key("AWS_") + (("timeouts", repr(timeouts)), ("proxies", proxies))

    def make() -> tuple[Any, DirectGets | None]:   # under the cache's lock: boto3 sessions
        import botocore.session                   # are not thread-safe

        core = botocore.session.Session()
        session = boto3.session.Session(botocore_session=core)
        config = Config(
            max_pool_connections=POOL_SIZE,
            connect_timeout=timeouts[0],
            read_timeout=timeouts[1],
            # total_max_attempts counts the first try; botocore's `max_attempts` would not.
            retries={"total_max_attempts": 1, "mode": "standard"},
            # botocore >= 1.36 adds CRC checksums to every upload by default, which several
            # S3-compatible stores reject; strata verifies every blob by its sha256 anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        client = session.client("s3", region_name=session.region_name or DEFAULT_REGION,
                                config=config)
        direct = None
        if not proxies:
            direct = DirectGets(client, core, timeouts)
        return client, direct
    return _clients.get(key, make)


class DirectGets:
    """GetObject, signed by botocore and sent with urllib3 (see the module's docstring).
    `get` returns the body and whether the store honoured the Range, or None where
    botocore should make the call instead (a redirect); a failure is raised as the
    exception botocore would have raised for it (a ClientError, a connection error)."""

    def __init__(self, client: Any, session: Any, timeouts: tuple[float, float]):
        import urllib3
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.httpsession import get_cert_path

        self._client, self._session = client, session
        self._auth, self._request = S3SigV4Auth, AWSRequest
        self._bases: dict[str, str | None] = {}   # bucket -> URL of its keys, before the key
        self._elsewhere: set[str] = set()   # buckets that redirected: botocore reads them
        self._transport_errors = urllib3.exceptions.HTTPError
        self._pool = urllib3.PoolManager(
            maxsize=POOL_SIZE, cert_reqs="CERT_REQUIRED",
            ca_certs=session.get_config_variable("ca_bundle") or get_cert_path(True),
            timeout=urllib3.Timeout(connect=timeouts[0], read=timeouts[1]))

    def url(self, bucket: str, key: str) -> str:
        """The object's URL as botocore makes it. Presigning costs 0.3 ms of CPU here, so
        it is done once per bucket, for a probe key: every key's URL is the probe's with
        the key quoted in its place, as botocore quotes it (`percent_encode`, '/' and
        '~' kept)."""
        base = self._bases.get(bucket, "")
        if base == "":
            probe = self._presigned(bucket, _PROBE)
            base = self._bases[bucket] = probe[:-len(_PROBE)] if probe.endswith(
                "/" + _PROBE) else None   # an unforeseen form: presign every key
        if base is None:
            return self._presigned(bucket, key)
        return base + quote(key, safe="/~")

    def get(self, bucket: str, key: str, byte_range: str | None) -> tuple[bytes, bool] | None:
        if bucket in self._elsewhere or bucket.endswith(_EXPRESS_SUFFIX):
            return None   # S3 Express buckets sign with session credentials: botocore's
        request = self._request("GET", self.url(bucket, key),
                                headers={"Range": byte_range} if byte_range else {})
        credentials = self._session.get_credentials()
        if credentials is None:
            from botocore.exceptions import NoCredentialsError
            raise NoCredentialsError()
        self._auth(credentials.get_frozen_credentials(), "s3",
                   self._client.meta.region_name).add_auth(request)
        try:
            response = self._pool.request(
                "GET", request.url, headers=dict(request.headers.items()),
                retries=False, redirect=False, decode_content=False)  # the bytes, as stored
            status, data = response.status, response.data
        except self._transport_errors as exc:
            raise _as_botocore(exc, request.url) from exc
        if status in (200, 206):
            expected = response.headers.get("Content-Length")
            if expected is not None and int(expected) != len(data):
                from botocore.exceptions import IncompleteReadError
                raise IncompleteReadError(actual_bytes=len(data),
                                          expected_bytes=int(expected))
            return data, "Content-Range" in response.headers
        code = _xml_field(data, b"Code") or str(status)
        if 300 <= status < 400 or code in _BOTOCORE_FOLLOWS:
            self._elsewhere.add(bucket)   # botocore finds the bucket's region, and keeps it
            return None
        from botocore.exceptions import ClientError
        raise ClientError({"Error": {"Code": code, "Message": _xml_field(data, b"Message")},
                           "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")

    def _presigned(self, bucket: str, key: str) -> str:
        """The object's URL from botocore (raises NoCredentialsError if there are none)."""
        return self._client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key},
            ExpiresIn=PRESIGN_SECONDS).partition("?")[0]


_PROBE = "strata-url-probe"   # a key botocore leaves as it is in a URL
_EXPRESS_SUFFIX = "--x-s3"     # directory buckets (S3 Express One Zone)


def _as_botocore(exc: Exception, url: str) -> Exception:
    """urllib3's failure as the error botocore raises for it (botocore.httpsession), so
    one table (`_translate`) and one wording serve both paths."""
    from botocore import exceptions as bx
    from urllib3 import exceptions as ux

    if isinstance(exc, ux.NewConnectionError):   # before ConnectTimeoutError, its base
        return bx.EndpointConnectionError(endpoint_url=url, error=exc)
    if isinstance(exc, ux.ConnectTimeoutError):
        return bx.ConnectTimeoutError(endpoint_url=url, error=exc)
    if isinstance(exc, ux.ReadTimeoutError):
        return bx.ReadTimeoutError(endpoint_url=url, error=exc)
    if isinstance(exc, ux.SSLError):
        return bx.SSLError(endpoint_url=url, error=exc)
    if isinstance(exc, ux.ProtocolError):   # reset, or closed before the whole body
        return bx.ConnectionClosedError(endpoint_url=url, error=exc)
    return bx.HTTPClientError(error=exc)


# errors that botocore's S3 client answers with another request (the bucket's region)
_BOTOCORE_FOLLOWS = frozenset({"PermanentRedirect", "AuthorizationHeaderMalformed",
                               "AuthorizationQueryParametersError"})


def _xml_field(body: bytes, name: bytes) -> str:
    """A top-level field of an S3 error body (<Error><Code>...</Code>...), or ''."""
    found = re.search(b"<" + name + b">([^<]{0,1024})</" + name + b">", body[:8192])
    return found.group(1).decode("utf-8", "replace") if found else ""


class S3Storage:
    """Objects under `s3://bucket/prefix`."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._key_prefix = self.prefix + "/" if self.prefix else ""
        if client is None:
            client, self._direct = _environment()
        else:
            self._direct = None
        self._client = client

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r})"

    def url_for(self, key: str) -> str:
        return f"{self.url}/{key}"

    def read(self, key: str) -> bytes:
        return self._get(key, None)[0]

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        def fetch() -> bytes:
            data, ranged = self._get(key, f"bytes={offset}-{offset + length - 1}")
            if not ranged:  # a store that ignored Range sent it all
                data = data[offset:offset + length]
            return data
        return ranged_read(self, key, offset, length, fetch)

    def _get(self, key: str, byte_range: str | None) -> tuple[bytes, bool]:
        """GetObject: the body, and whether the store honoured `byte_range`."""
        full = self._full(key)
        with self._translated(self.url_for(key)):  # a dropped body is translated too
            if self._direct is not None:
                got = self._direct.get(self.bucket, full, byte_range)
                if got is not None:
                    return got
            extra = {"Range": byte_range} if byte_range else {}
            response = self._client.get_object(Bucket=self.bucket, Key=full, **extra)
            return response["Body"].read(), bool(response.get("ContentRange"))

    def write(self, key: str, data: bytes, *, if_absent: bool = False,
              if_match: str | None = None) -> str:
        check_write_args(if_absent, if_match)
        if not isinstance(data, bytes):
            data = bytes(data)  # the SDK takes bytes, not bytearray/memoryview
        if len(data) > MULTIPART_THRESHOLD and if_match is None:
            return self._write_multipart(key, data, if_absent=if_absent)
        conditions: dict[str, str] = {}
        if if_absent:
            conditions["IfNoneMatch"] = "*"
        if if_match is not None:
            conditions["IfMatch"] = f'"{if_match}"'
        with self._translated(self.url_for(key), compare_and_swap=if_match is not None):
            response = self._client.put_object(
                Bucket=self.bucket, Key=self._full(key), Body=data, **conditions)
        return _unquote(response["ETag"])

    def stat(self, key: str) -> ObjectInfo:
        with self._translated(self.url_for(key)):
            head = self._client.head_object(Bucket=self.bucket, Key=self._full(key))
        return ObjectInfo(key, head["ContentLength"], _unquote(head["ETag"]),
                          head["LastModified"].timestamp())

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix, self.url)
        return self._list(prefix)

    def delete(self, key: str) -> None:
        with self._translated(self.url_for(key)):
            self._client.delete_object(Bucket=self.bucket, Key=self._full(key))

    # -- internals ---------------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self._key_prefix + check_key(key, self.url)

    def _write_multipart(self, key: str, data: bytes, *, if_absent: bool) -> str:
        """`data` as a multipart upload of `PART_SIZE` parts, `UPLOAD_CONCURRENCY` at a time;
        the condition is checked by S3 when the upload is completed."""
        url, full = self.url_for(key), self._full(key)
        with self._translated(url):
            upload_id = self._client.create_multipart_upload(
                Bucket=self.bucket, Key=full, ContentType="application/octet-stream")["UploadId"]

        def put_part(number: int) -> dict[str, Any]:
            start = (number - 1) * PART_SIZE
            with self._translated(url):
                response = self._client.upload_part(
                    Bucket=self.bucket, Key=full, UploadId=upload_id, PartNumber=number,
                    Body=data[start:start + PART_SIZE])
            return {"PartNumber": number, "ETag": response["ETag"]}

        count = -(-len(data) // PART_SIZE)
        try:
            with ThreadPoolExecutor(min(UPLOAD_CONCURRENCY, count),
                                    thread_name_prefix="strata-s3-part") as pool:
                futures = [pool.submit(put_part, n) for n in range(1, count + 1)]
                try:
                    parts = [future.result() for future in futures]
                except BaseException:
                    for future in futures:  # stop at the first failed part
                        future.cancel()
                    raise
            conditions = {"IfNoneMatch": "*"} if if_absent else {}
            with self._translated(url):
                response = self._client.complete_multipart_upload(
                    Bucket=self.bucket, Key=full, UploadId=upload_id,
                    MultipartUpload={"Parts": parts}, **conditions)
        except BaseException:
            self._abort(full, upload_id)
            raise
        return _unquote(response["ETag"])

    def _abort(self, full_key: str, upload_id: str) -> None:
        """Drop an unfinished multipart upload; best effort (a bucket lifecycle rule for
        incomplete uploads is the backstop), and never hiding the error that caused it."""
        try:
            self._client.abort_multipart_upload(Bucket=self.bucket, Key=full_key,
                                                UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the original failure is what the caller needs
            pass

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        paginator = self._client.get_paginator("list_objects_v2")
        skip = len(self._key_prefix)
        with self._translated(self.url_for(prefix) if prefix else self.url):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key_prefix + prefix):
                for obj in page.get("Contents", ()):
                    yield ObjectInfo(obj["Key"][skip:], obj["Size"], _unquote(obj["ETag"]),
                                     obj["LastModified"].timestamp())

    @contextmanager
    def _translated(self, url: str, *, compare_and_swap: bool = False) -> Iterator[None]:
        """Run S3 calls, turning any botocore failure into one of our errors naming `url`."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every SDK failure must be translated
            error = _translate(exc, url, self.bucket)
            if error is None:
                raise  # not an SDK failure: a bug, keep its traceback
            if compare_and_swap and type(error) is NotFound:
                # If-Match on a deleted key: the object the caller read is gone.
                error = PreconditionFailed(url, "object no longer exists")
            raise error from exc


def _translate(exc: BaseException, url: str, bucket: str) -> StorageError | None:
    """The one table from botocore / transport failures to our errors; None if not one."""
    from botocore import exceptions as bx  # present whenever a client could be made

    if isinstance(exc, bx.ClientError):
        code, status = _code(exc), _status(exc)
        if code == "NoSuchBucket":
            return MissingBucket(url, f"bucket {bucket!r} does not exist (create it first, or "
                                      "fix the bucket name in the URL)")
        if code in _CODES or str(status) in _CODES:
            cls, message = _CODES[code] if code in _CODES else _CODES[str(status)]
            return cls(url, message if code in _CODES else f"{message} ({code})")
        if status >= 500:
            return Transient(url, f"S3 server error {status} ({code})")
        message = exc.response.get("Error", {}).get("Message") or code
        return StorageError(url, f"S3 error {code}: {message}")
    if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError,
                        bx.CredentialRetrievalError, bx.TokenRetrievalError,
                        bx.SSOTokenLoadError, bx.UnauthorizedSSOTokenError)):
        return PermissionDenied(url, _CREDENTIALS_HINT)
    if isinstance(exc, (bx.ConnectTimeoutError, bx.ReadTimeoutError)):
        return Transient(url, f"S3 timed out ({type(exc).__name__})")
    if isinstance(exc, (bx.EndpointConnectionError, bx.ConnectionClosedError,
                        bx.HTTPClientError, bx.ResponseStreamingError,
                        bx.IncompleteReadError, OSError)):
        # connection refused/reset/dropped, also mid-body: worth another attempt
        return Transient(url, f"S3 connection failed ({type(exc).__name__}: {exc})")
    if isinstance(exc, bx.BotoCoreError):
        return StorageError(url, f"S3 client error ({type(exc).__name__}: {exc})")
    return None


def _status(exc: BaseException) -> int:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return 0
    return int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _code(exc: BaseException) -> str:
    """The S3 error code; HEAD responses have no body, so their code is the bare status."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return ""
    return str(response.get("Error", {}).get("Code") or _status(exc))


def _unquote(etag: str) -> str:
    return etag.strip('"')


def _import_boto3() -> tuple[Any, Any]:
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise MissingDependency(
            "s3:// storage needs boto3: pip install 'strata[s3]'") from None
    return boto3, Config
