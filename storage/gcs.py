"""The Google Cloud Storage backend: `gs://bucket/prefix`, through google-cloud-storage.

The SDK is imported when the first `GCSStorage` is made, so strata installs without it
(`pip install 'strata[gcs]'`). Credentials come from the SDK's own chain
(GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`, the metadata
server). When `STORAGE_EMULATOR_HOST` is set the client is anonymous with project "test"
(or $GOOGLE_CLOUD_PROJECT), the SDK's own convention for emulators such as fake-gcs-server.
With no credentials at all the client is anonymous too, so public buckets stay readable;
a private bucket then fails with PermissionDenied and a hint.

Conditional writes use GCS generation preconditions: `ifGenerationMatch=0` creates only if
absent, and an object's generation is its etag, so compare-and-swap is
`ifGenerationMatch=<etag>`. Writes above `RESUMABLE_THRESHOLD` go as a resumable upload in
sequential `RESUMABLE_CHUNK` pieces, which GCS checks against the precondition when the
upload completes.

One client per Google environment, shared by every backend and thread, with a connection
pool sized for parallel readers. The SDK makes exactly one attempt per call (`retry=None`
everywhere): `strata.storage.retry` owns retrying. `_translate` is the one table from SDK
errors to strata's.
"""

from __future__ import annotations

import functools
import os
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Iterator

from strata.storage.base import ObjectInfo, check_write_args
from strata.storage.errors import (
    MissingBucket,
    MissingDependency,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    StrataError,
    Transient,
)
from strata.storage.retry import attempt_timeout
from strata.storage.sdk import ClientCache, OutOfRange, environment_key, ranged_read
from strata.storage.url import StorageURL, check_key, check_prefix

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"
EMULATOR_PROJECT = "test"
POOL_SIZE = 64  # above the widest download/readahead pool, so threads never wait on sockets
TIMEOUT = (10.0, 60.0)  # connect, and per socket read: a stalled server fails within these
# Both are cut down to the retry budget by retry.attempt_timeout (STRATA_RETRY_SECONDS).
RESUMABLE_THRESHOLD = 8 << 20  # the SDK's own switch from one multipart request to resumable
RESUMABLE_CHUNK = 8 << 20  # bytes per resumable request (a multiple of 256 KiB)
PAGE_SIZE = 1000  # objects per listing page, the GCS maximum

_ENV_PREFIXES = ("GOOGLE_", "GCLOUD_", "CLOUDSDK_", EMULATOR_ENV)
_clients = ClientCache()   # (client, anonymous) per distinct Google environment

_CREDENTIALS_HINT = (
    "no Google credentials found (set GOOGLE_APPLICATION_CREDENTIALS to a service account "
    "key file, or run `gcloud auth application-default login`)"
)


# HTTP status -> our error. GCS reports most failures by status alone.
_STATUSES: dict[int, tuple[type[StorageError], str]] = {
    401: (PermissionDenied, "not authenticated (check Google credentials)"),
    403: (PermissionDenied, "access denied (check Google credentials and bucket IAM)"),
    404: (NotFound, "no such object"),
    408: (Transient, "GCS request timed out"),
    412: (PreconditionFailed, "object exists or changed since it was read"),
    416: (OutOfRange, "range not satisfiable"),
    429: (Transient, "throttled by GCS (429)"),
}


def from_url(url: StorageURL) -> GCSStorage:
    return GCSStorage(url.bucket, url.prefix)


@functools.cache
def _sdk() -> SimpleNamespace:
    """The SDK modules, imported on first use; MissingDependency with the extra if absent."""
    try:
        import google.auth
        import requests
        from google.api_core import exceptions as api_exceptions
        from google.auth import exceptions as auth_exceptions
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage
    except ImportError:
        raise MissingDependency(
            "gs:// storage needs google-cloud-storage: pip install 'strata[gcs]'") from None
    return SimpleNamespace(storage=storage, auth=google.auth, api=api_exceptions,
                           auth_errors=auth_exceptions, anonymous=AnonymousCredentials,
                           requests=requests)


def make_client() -> tuple[Any, bool]:
    """The shared client for the current Google environment, and whether it is anonymous.

    Clients are keyed by the GOOGLE_*, GCLOUD_*, CLOUDSDK_* and STORAGE_EMULATOR_HOST
    variables: a changed environment gets a client of its own.
    """
    sdk = _sdk()
    return _clients.get(environment_key(*_ENV_PREFIXES), lambda: _new_client(sdk))


def _new_client(sdk: SimpleNamespace) -> tuple[Any, bool]:
    if os.environ.get(EMULATOR_ENV):
        project = os.environ.get("GOOGLE_CLOUD_PROJECT") or EMULATOR_PROJECT
        client, anonymous = sdk.storage.Client(
            project=project, credentials=sdk.anonymous()), True
    else:
        try:
            client, anonymous = sdk.storage.Client(), False
        except sdk.auth_errors.DefaultCredentialsError:
            if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
                raise  # a key file was named but is unusable: say so, don't go anonymous
            client, anonymous = sdk.storage.Client.create_anonymous_client(), True
    # Recent google-cloud-storage (3.17 here) fetches each bucket's metadata on a background
    # thread the first time a client touches it, for tracing attributes strata does not
    # use: one more request (needing storage.buckets.get), retried by the SDK's own policy
    # outside strata's bounds. The SDK skips it when this cache is falsy.
    if getattr(client, "_bucket_metadata_cache", None) is not None:
        client._bucket_metadata_cache = None
    session = client._http  # the SDK's requests session; its pool holds 10 by default
    if not getattr(session, "is_mtls", False):  # an mTLS session keeps its own adapter
        adapter = sdk.requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
        session.mount("https://", adapter)
        session.mount("http://", adapter)
    return client, anonymous


class GCSStorage:
    """Objects under `gs://bucket/prefix`.

    Thread-safe: the client is shared, and the only state, `_bucket_seen`, is a flag whose
    races are harmless (at worst one extra bucket probe).
    """

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None,
                 page_size: int = PAGE_SIZE):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"gs://{bucket}/{self.prefix}" if self.prefix else f"gs://{bucket}"
        self.page_size = page_size
        self.timeout = (attempt_timeout(TIMEOUT[0]), attempt_timeout(TIMEOUT[1]))
        self._key_prefix = self.prefix + "/" if self.prefix else ""
        self._anonymous = False
        if client is None:
            try:
                client, self._anonymous = make_client()
            except StrataError:
                raise  # MissingDependency
            except Exception as exc:  # noqa: BLE001 - e.g. an unusable key file
                error = _translate(exc, self.url)
                if error is None:
                    raise
                raise error from exc
        self._client = client
        self._bucket = client.bucket(bucket)
        self._bucket_seen = False  # set once any call proves the bucket exists

    def __repr__(self) -> str:
        return f"GCSStorage({self.url!r})"

    def url_for(self, key: str) -> str:
        return f"{self.url}/{key}"

    def read(self, key: str) -> bytes:
        blob = self._blob(key)
        with self._translated(self.url_for(key)):
            return blob.download_as_bytes(retry=None, timeout=self.timeout)

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        def fetch() -> bytes:
            with self._translated(self.url_for(key)):
                # `end` is inclusive in the SDK, as in an HTTP Range header
                return self._blob(key).download_as_bytes(
                    start=offset, end=offset + length - 1, retry=None, timeout=self.timeout)
        return ranged_read(self, key, offset, length, fetch)

    def write(self, key: str, data: bytes, *, if_absent: bool = False,
              if_match: str | None = None) -> str:
        check_write_args(if_absent, if_match)
        if not isinstance(data, bytes):
            data = bytes(data)  # the SDK takes bytes or str only, not bytearray/memoryview
        url = self.url_for(key)
        blob = self._blob(key)
        if len(data) > RESUMABLE_THRESHOLD:
            blob.chunk_size = RESUMABLE_CHUNK  # sequential pieces: memory and time bounded
        generation: int | None = None
        if if_absent:
            generation = 0  # GCS: "no live object" has generation 0
        elif if_match is not None:
            if not if_match.isdigit():  # not a generation, so it cannot match one
                raise PreconditionFailed(url, "object changed since it was read")
            generation = int(if_match)
        with self._translated(url, writing=True):
            blob.upload_from_string(data, content_type="application/octet-stream",
                                    if_generation_match=generation, retry=None,
                                    timeout=self.timeout)
        return str(blob.generation)

    def stat(self, key: str) -> ObjectInfo:
        blob = self._blob(key)
        with self._translated(self.url_for(key)):
            blob.reload(retry=None, timeout=self.timeout)
        return _info(key, blob)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix, self.url)
        return self._list(prefix)

    def delete(self, key: str) -> None:
        url = self.url_for(key)
        blob = self._blob(key)
        with self._translated(url):
            try:
                blob.delete(retry=None, timeout=self.timeout)
            except _sdk().api.NotFound as exc:
                if self._bucket_missing(exc):
                    raise self._no_bucket(url) from exc
                # already gone: delete is idempotent

    # -- internals ---------------------------------------------------------------------------

    def _blob(self, key: str) -> Any:
        return self._bucket.blob(self._key_prefix + check_key(key, self.url))

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        skip = len(self._key_prefix)
        with self._translated(self.url_for(prefix) if prefix else self.url, listing=True):
            blobs = self._client.list_blobs(
                self.bucket, prefix=self._key_prefix + prefix, page_size=self.page_size,
                fields="items(name,size,generation,updated),nextPageToken",
                retry=None, timeout=self.timeout)
            for page in blobs.pages:
                for blob in page:
                    key = blob.name[skip:]
                    if key and not key.endswith("/"):  # skip console "folder" placeholders
                        yield _info(key, blob)

    def _bucket_missing(self, exc: BaseException) -> bool:
        """Whether a 404 from an object call means the bucket is missing.

        GCS says so in the message; an emulator may not, so then the bucket is probed once
        (a probe that fails, e.g. for lack of storage.buckets.get, means "assume it exists").
        """
        message = str(getattr(exc, "message", "")).lower()
        if "bucket" in message and "not exist" in message:
            return True
        if "no such object" in message or self._bucket_seen:
            return False
        try:
            exists = self._bucket.exists(retry=None, timeout=self.timeout)
        except Exception:  # noqa: BLE001 - a probe that fails proves nothing
            return False
        self._bucket_seen = exists
        return not exists

    @contextmanager
    def _translated(self, url: str, *, writing: bool = False,
                    listing: bool = False) -> Iterator[None]:
        """Run SDK calls, turning any failure into one of our errors naming `url`.

        A 404 from an upload or a listing can only mean a missing bucket; from a read, stat
        or delete it may mean either, which `_bucket_missing` settles.
        """
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every SDK failure must be translated
            error = _translate(exc, url, anonymous=self._anonymous)
            if error is None:
                raise  # not an SDK failure: a bug, keep its traceback
            if type(error) is NotFound and (writing or listing or self._bucket_missing(exc)):
                error = self._no_bucket(url)
            raise error from exc
        self._bucket_seen = True

    def _no_bucket(self, url: str) -> MissingBucket:
        return MissingBucket(url, f"bucket {self.bucket!r} does not exist (create it first, "
                                  "or fix the bucket name in the URL)")


def _info(key: str, blob: Any) -> ObjectInfo:
    return ObjectInfo(key, int(blob.size or 0), str(blob.generation),
                      blob.updated.timestamp() if blob.updated else None)


def _translate(exc: BaseException, url: str, *, anonymous: bool = False
               ) -> StorageError | None:
    """The one table from google-cloud-storage / transport failures to ours; None if not one."""
    sdk = _sdk()  # present whenever a client could be made
    requests_errors = sdk.requests.exceptions
    status = _status(exc)
    if status:
        if status in (401, 403) and anonymous:
            return PermissionDenied(url, _CREDENTIALS_HINT)
        if status in _STATUSES:
            cls, message = _STATUSES[status]
            return cls(url, message)
        if status >= 500:
            return Transient(url, f"GCS server error {status}")
        detail = getattr(exc, "message", None) or str(exc)
        return StorageError(url, f"GCS error {status}: {str(detail).splitlines()[0]}")
    if isinstance(exc, sdk.auth_errors.DefaultCredentialsError):
        key_file = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        if key_file:  # a key file was named: say that it is the problem, not its absence
            why = str(exc.args[0]) if exc.args else str(exc)
            return PermissionDenied(url, f"unusable Google credentials ({why}); point "
                                         f"GOOGLE_APPLICATION_CREDENTIALS at a valid service "
                                         f"account key file")
        return PermissionDenied(url, f"{exc} ({_CREDENTIALS_HINT})")
    if isinstance(exc, sdk.auth_errors.TransportError):
        return Transient(url, f"cannot reach the Google token service ({exc})")
    if isinstance(exc, sdk.auth_errors.RefreshError):
        return PermissionDenied(url, f"Google credentials could not be refreshed ({exc})")
    if isinstance(exc, requests_errors.Timeout):
        return Transient(url, f"GCS timed out ({type(exc).__name__})")
    if isinstance(exc, (requests_errors.ConnectionError, requests_errors.ChunkedEncodingError,
                        requests_errors.ContentDecodingError, ConnectionError, OSError)):
        # connection refused/reset/dropped, also mid-body: worth another attempt
        return Transient(url, f"GCS connection failed ({type(exc).__name__}: {exc})")
    if type(exc).__name__ == "DataCorruption":  # checksum mismatch in transfer; moved in 3.x
        return Transient(url, "GCS download failed its checksum")
    if isinstance(exc, sdk.api.GoogleAPIError):
        return StorageError(url, f"GCS client error ({type(exc).__name__}: {exc})")
    return None


def _status(exc: BaseException) -> int:
    """The HTTP status of an SDK error: api_core errors carry `code`, raw media errors a
    `response`."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and 100 <= code < 600:
        return code
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else 0
