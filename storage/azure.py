"""The Azure Blob backend: `azure://<account>.blob.core.windows.net/<container>/<prefix>`.

azure-storage-blob is imported when the first `AzureStorage` is made, so strata installs
without it (`pip install 'strata[azure]'`). Credentials, first found wins (`find_credentials`):

1. `AZURE_STORAGE_CONNECTION_STRING`, used unchanged, so one that points at a local
   endpoint (Azurite) works; its AccountName must be the URL's account, else it is skipped.
2. `AZURE_STORAGE_KEY` (account key) or `AZURE_STORAGE_SAS_TOKEN`, for the URL's account.
3. The strata config file ($STRATA_CONFIG or $XDG_CONFIG_HOME/strata/config.toml): a table
   `[azure.<account>]`, else `[azure]`, with `connection_string`, `account_key` or
   `sas_token`.
4. `DefaultAzureCredential` when azure-identity is installed (managed identity, Azure CLI
   login, workload identity, AZURE_CLIENT_ID/SECRET...).
5. Otherwise anonymous: public containers stay readable, anything else fails with a hint.

Conditional writes are Azure's ETag conditions: `If-None-Match: *` (`overwrite=False`) for
only-if-absent, `If-Match: <etag>` for compare-and-swap. Etags are returned without quotes.
Writes above `SINGLE_PUT_SIZE` go as staged blocks, `UPLOAD_CONCURRENCY` at a time, and the
condition is checked when the block list is committed.

One service client per (account, credentials), shared by every backend and thread, over a
requests session whose pool fits parallel readers. The SDK makes exactly one attempt per
call (`retry_total=0`): `strata.storage.retry` owns retrying. `_translate` is the one table
from SDK errors to strata's. No credential is ever put in a message.
"""

from __future__ import annotations

import functools
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
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
from strata.storage.sdk import ClientCache, OutOfRange, ranged_read
from strata.storage.url import StorageURL, check_key, check_prefix

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

POOL_SIZE = 64  # above the widest download/readahead pool, so threads never wait on sockets
CONNECT_TIMEOUT = 10.0
READ_TIMEOUT = 60.0  # per socket read, not per object: a stalled server fails within this
# Both are cut down to the retry budget by retry.attempt_timeout (STRATA_RETRY_SECONDS).
SINGLE_PUT_SIZE = 8 << 20  # larger writes are staged as blocks
BLOCK_SIZE = 8 << 20
UPLOAD_CONCURRENCY = 4  # blocks in flight per write
SINGLE_GET_SIZE = 32 << 20  # a larger read is fetched as sequential chunks
CHUNK_GET_SIZE = 8 << 20
PAGE_SIZE = 1000  # blobs per listing page (Azure allows up to 5000)

CONNECTION_STRING_ENV = "AZURE_STORAGE_CONNECTION_STRING"
KEY_ENV = "AZURE_STORAGE_KEY"
SAS_ENV = "AZURE_STORAGE_SAS_TOKEN"

_clients = ClientCache()   # one service client per (account, credentials, timeouts)

_CREDENTIALS_HINT = (
    f"set {CONNECTION_STRING_ENV}, {KEY_ENV} or {SAS_ENV}, put account_key or sas_token "
    "under [azure] in the strata config file, or install azure-identity and log in"
)


# Azure error code (x-ms-error-code) -> our error; checked before the bare status below.
_CODES: dict[str, tuple[type[StorageError], str]] = {
    "BlobNotFound": (NotFound, "no such object"),
    "BlobAlreadyExists": (PreconditionFailed, "object exists"),
    "ConditionNotMet": (PreconditionFailed, "object changed since it was read"),
    "InvalidRange": (OutOfRange, "range not satisfiable"),
    "AuthenticationFailed": (PermissionDenied, "authentication failed"),
    "AuthorizationFailure": (PermissionDenied, "not authorized"),
    "AuthorizationPermissionMismatch": (PermissionDenied, "not authorized for this operation"),
    "InsufficientAccountPermissions": (PermissionDenied, "insufficient account permissions"),
    "NoAuthenticationInformation": (PermissionDenied, "no credentials sent"),
    "InvalidAuthenticationInfo": (PermissionDenied, "invalid credentials"),
    "ServerBusy": (Transient, "throttled by Azure (ServerBusy)"),
    "OperationTimedOut": (Transient, "Azure operation timed out"),
    "InternalError": (Transient, "Azure internal error"),
}
_STATUSES: dict[int, tuple[type[StorageError], str]] = {
    401: (PermissionDenied, "not authenticated"),
    403: (PermissionDenied, "access denied"),
    404: (NotFound, "no such object"),
    408: (Transient, "Azure request timed out"),
    412: (PreconditionFailed, "object exists or changed since it was read"),
    416: (OutOfRange, "range not satisfiable"),
    429: (Transient, "throttled by Azure (429)"),
}


@dataclass(frozen=True)
class Credentials:
    """Where the credentials for one account come from. `source` names the place for
    messages; the secrets are kept out of repr so they never reach a log or traceback."""

    source: str
    connection_string: str | None = field(default=None, repr=False)
    account_key: str | None = field(default=None, repr=False)
    sas_token: str | None = field(default=None, repr=False)
    identity: bool = False  # DefaultAzureCredential

    @property
    def anonymous(self) -> bool:
        return not (self.connection_string or self.account_key or self.sas_token
                    or self.identity)


def from_url(url: StorageURL) -> AzureStorage:
    return AzureStorage(url.account, url.host, url.bucket, url.prefix)


@functools.cache
def _sdk() -> SimpleNamespace:
    """The SDK modules, imported on first use; MissingDependency with the extra if absent."""
    try:
        import requests
        from azure.core import MatchConditions
        from azure.core import exceptions as errors
        from azure.core.pipeline.transport import RequestsTransport
        from azure.storage.blob import BlobServiceClient
    except ImportError:
        raise MissingDependency(
            "azure:// storage needs azure-storage-blob: pip install 'strata[azure]'") from None
    # The SDK logs every request and response at INFO (ten lines each in a mount's log)
    # and warnings such as "Incomplete download." that a command's stderr would show
    # before its one error line: strata reports failures itself. A level the user set
    # is kept.
    sdk_log = logging.getLogger("azure")
    if sdk_log.level == logging.NOTSET:
        sdk_log.setLevel(logging.ERROR)
    return SimpleNamespace(requests=requests, MatchConditions=MatchConditions, errors=errors,
                           RequestsTransport=RequestsTransport,
                           BlobServiceClient=BlobServiceClient)


def config_path() -> Path:
    """The strata config file; the same rule as strata.catalog.config, which storage/ must
    not import."""
    explicit = os.environ.get("STRATA_CONFIG")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME")
    return (Path(base) if base else Path.home() / ".config") / "strata" / "config.toml"


def _config_section(account: str) -> tuple[dict, str]:
    """The `[azure.<account>]` table of the config file, else `[azure]`, and its name."""
    path = config_path()
    try:
        with open(path, "rb") as f:
            settings = tomllib.load(f)
    except FileNotFoundError:
        return {}, ""
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise StrataError(f"cannot read config file {path}: {exc}") from None
    azure = settings.get("azure")
    if not isinstance(azure, dict):
        return {}, ""
    if isinstance(azure.get(account), dict):
        return azure[account], f"[azure.{account}] in {path}"
    return azure, f"[azure] in {path}"


def _connection_account(connection_string: str) -> str | None:
    parts = dict(part.split("=", 1) for part in connection_string.split(";") if "=" in part)
    for name, value in parts.items():
        if name.strip().lower() == "accountname":
            return value.strip()
    return None


def find_credentials(account: str) -> Credentials:
    """The first credentials for `account` in the order of the module docstring."""
    env = os.environ
    skipped = ""
    connection_string = env.get(CONNECTION_STRING_ENV, "").strip()
    if connection_string:
        other = _connection_account(connection_string)
        if other in (None, account):
            return Credentials(CONNECTION_STRING_ENV, connection_string=connection_string)
        skipped = f"; {CONNECTION_STRING_ENV} is for account {other!r}, not {account!r}"
    if env.get(KEY_ENV, "").strip():
        return Credentials(KEY_ENV, account_key=env[KEY_ENV].strip())
    if env.get(SAS_ENV, "").strip():
        return Credentials(SAS_ENV, sas_token=env[SAS_ENV].strip())
    section, where = _config_section(account)
    connection_string = str(section.get("connection_string") or "").strip()
    if connection_string and _connection_account(connection_string) in (None, account):
        return Credentials(where, connection_string=connection_string)
    if section.get("account_key"):
        return Credentials(where, account_key=str(section["account_key"]).strip())
    if section.get("sas_token"):
        return Credentials(where, sas_token=str(section["sas_token"]).strip())
    try:
        import azure.identity  # noqa: F401 - only whether it is installed
    except ImportError:
        return Credentials("no credentials found" + skipped)
    return Credentials("DefaultAzureCredential (azure-identity)", identity=True)


def make_service_client(account: str, host: str, credentials: Credentials) -> Any:
    """The shared BlobServiceClient for one account, its credentials and the socket
    timeouts (which follow the retry budget)."""
    sdk = _sdk()
    timeouts = (attempt_timeout(CONNECT_TIMEOUT), attempt_timeout(READ_TIMEOUT))
    return _clients.get((account, host, credentials, timeouts),
                        lambda: _new_service_client(sdk, account, host, credentials, timeouts))


def _new_service_client(sdk: SimpleNamespace, account: str, host: str,
                        credentials: Credentials,
                        timeouts: tuple[float, float] = (CONNECT_TIMEOUT, READ_TIMEOUT)
                        ) -> Any:
    session = sdk.requests.Session()
    adapter = sdk.requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=POOL_SIZE)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    options: dict[str, Any] = {
        "retry_total": 0,  # strata.storage.retry owns retrying
        "transport": sdk.RequestsTransport(session=session, session_owner=False,
                                           connection_timeout=timeouts[0],
                                           read_timeout=timeouts[1]),
        "max_single_put_size": SINGLE_PUT_SIZE, "max_block_size": BLOCK_SIZE,
        "max_single_get_size": SINGLE_GET_SIZE, "max_chunk_get_size": CHUNK_GET_SIZE,
    }
    if credentials.connection_string:
        return sdk.BlobServiceClient.from_connection_string(
            credentials.connection_string, **options)
    credential: Any = None
    if credentials.account_key:
        credential = {"account_name": account, "account_key": credentials.account_key}
    elif credentials.sas_token:
        credential = credentials.sas_token.lstrip("?")
    elif credentials.identity:
        credential = _default_azure_credential()
    return sdk.BlobServiceClient(f"https://{host}", credential=credential, **options)


@functools.cache
def _default_azure_credential() -> Any:
    from azure.identity import DefaultAzureCredential  # checked by find_credentials

    return DefaultAzureCredential()  # one per process: it caches tokens


class AzureStorage:
    """Objects under `azure://<account>.blob.core.windows.net/<container>/<prefix>`.

    Thread-safe: the service client and its session are shared, and nothing else changes.
    """

    def __init__(self, account: str, host: str, container: str, prefix: str = "", *,
                 service: Any = None, page_size: int = PAGE_SIZE):
        self.account = account
        self.host = host
        self.container = container
        self.prefix = prefix.strip("/")
        base = f"azure://{host}/{container}"
        self.url = f"{base}/{self.prefix}" if self.prefix else base
        self.page_size = page_size
        self._key_prefix = self.prefix + "/" if self.prefix else ""
        self.credentials = find_credentials(account)
        if service is None:
            try:
                service = make_service_client(account, host, self.credentials)
            except ValueError as exc:  # the SDK's word for a malformed connection string
                raise PermissionDenied(self.url, f"unusable credentials from "
                                                 f"{self.credentials.source} ({exc})") from None
        self._container = service.get_container_client(container)

    def __repr__(self) -> str:
        return f"AzureStorage({self.url!r})"

    def url_for(self, key: str) -> str:
        return f"{self.url}/{key}"

    def read(self, key: str) -> bytes:
        blob = self._blob(key)
        with self._translated(self.url_for(key), reading=True):
            return blob.download_blob(max_concurrency=1).readall()

    def read_range(self, key: str, offset: int, length: int) -> bytes:
        def fetch() -> bytes:
            with self._translated(self.url_for(key), reading=True):
                return self._blob(key).download_blob(offset=offset, length=length,
                                                     max_concurrency=1).readall()
        return ranged_read(self, key, offset, length, fetch)

    def write(self, key: str, data: bytes, *, if_absent: bool = False,
              if_match: str | None = None) -> str:
        check_write_args(if_absent, if_match)
        if not isinstance(data, bytes):
            data = bytes(data)  # the SDK takes bytes, not bytearray/memoryview
        blob = self._blob(key)
        conditions: dict[str, Any] = {}
        if if_match is not None:
            conditions = {"etag": f'"{if_match}"',
                          "match_condition": _sdk().MatchConditions.IfNotModified}
        with self._translated(self.url_for(key), compare_and_swap=if_match is not None):
            result = blob.upload_blob(data, overwrite=not if_absent,
                                      max_concurrency=UPLOAD_CONCURRENCY, **conditions)
        return _unquote(result["etag"])

    def stat(self, key: str) -> ObjectInfo:
        blob = self._blob(key)
        with self._translated(self.url_for(key)):
            props = blob.get_blob_properties()
        return _info(key, props)

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        check_prefix(prefix, self.url)
        return self._list(prefix)

    def delete(self, key: str) -> None:
        blob = self._blob(key)
        with self._translated(self.url_for(key)):
            try:
                blob.delete_blob(delete_snapshots="include")
            except _sdk().errors.ResourceNotFoundError as exc:
                if _code(exc) != "BlobNotFound":
                    raise
                # already gone: delete is idempotent

    # -- internals ---------------------------------------------------------------------------

    def _blob(self, key: str) -> Any:
        return self._container.get_blob_client(self._key_prefix + check_key(key, self.url))

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        skip = len(self._key_prefix)
        with self._translated(self.url_for(prefix) if prefix else self.url):
            pages = self._container.list_blobs(name_starts_with=self._key_prefix + prefix,
                                               results_per_page=self.page_size).by_page()
            for page in pages:
                for props in page:
                    key = props.name[skip:]
                    if key and not key.endswith("/"):  # skip hierarchical-namespace folders
                        yield _info(key, props)

    @contextmanager
    def _translated(self, url: str, *, reading: bool = False,
                    compare_and_swap: bool = False) -> Iterator[None]:
        """Run SDK calls, turning any failure into one of our errors naming `url`."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:  # noqa: BLE001 - every SDK failure must be translated
            error = _translate(exc, url, self.container, self.credentials)
            if error is None:
                raise  # not an SDK failure: a bug, keep its traceback
            if reading and type(error) is PreconditionFailed:
                # a large read fetches chunks on If-Match: the blob changed halfway through
                error = Transient(url, "object changed while it was being read")
            elif compare_and_swap and _code(exc) == "BlobNotFound":
                # If-Match on a deleted blob: the object the caller read is gone.
                error = PreconditionFailed(url, "object no longer exists")
            raise error from exc


def _info(key: str, props: Any) -> ObjectInfo:
    modified = props.last_modified
    return ObjectInfo(key, int(props.size or 0), _unquote(props.etag),
                      modified.timestamp() if modified else None)


def _unquote(etag: str) -> str:
    return etag.strip('"')


def _translate(exc: BaseException, url: str, container: str,
               credentials: Credentials) -> StorageError | None:
    """The one table from azure-core / transport failures to ours; None if not one."""
    errors = _sdk().errors  # present whenever a client could be made
    if isinstance(exc, errors.DecodeError):  # includes IncompleteReadError: a dropped body
        return Transient(url, f"Azure response broken off ({type(exc).__name__})")
    status = getattr(exc, "status_code", None) if isinstance(exc, errors.HttpResponseError) \
        else None
    if status:
        code = _code(exc)
        if code == "ContainerNotFound" or (
                credentials.anonymous and status == 404 and code != "BlobNotFound"):
            return MissingBucket(url, _no_container(container, credentials))
        if code in _CODES:
            cls, message = _CODES[code]
        elif status in _STATUSES:
            cls, message = _STATUSES[status]
        elif status >= 500:
            return Transient(url, f"Azure server error {status} ({code or 'no code'})")
        else:
            return StorageError(url, f"Azure error {status} ({code or 'no code'})")
        if cls is PermissionDenied:
            message = _denied(message, credentials)
        return cls(url, message)
    if isinstance(exc, errors.ClientAuthenticationError):
        # raised before sending: a key that cannot sign, or no token from azure-identity
        what = "cannot sign with the account key" if type(exc).__name__ == "AzureSigningError" \
            else "no Azure token"
        return PermissionDenied(url, f"{what} from {credentials.source}; {_CREDENTIALS_HINT}")
    if isinstance(exc, (errors.ServiceRequestError, errors.ServiceResponseError)):
        # connection refused/reset/dropped, timeouts (their *TimeoutError subclasses)
        return Transient(url, f"Azure connection failed ({type(exc).__name__}: {exc})")
    if isinstance(exc, OSError):
        return Transient(url, f"Azure connection failed ({type(exc).__name__}: {exc})")
    if isinstance(exc, errors.AzureError):
        return StorageError(url, f"Azure client error ({type(exc).__name__}: {exc})")
    return None


def _code(exc: BaseException) -> str:
    """The x-ms-error-code of an SDK error; the SDK gives an enum or a plain string."""
    code = getattr(exc, "error_code", None)
    return str(getattr(code, "value", code) or "")


def _no_container(container: str, credentials: Credentials) -> str:
    if credentials.anonymous:  # Azure answers 404 to anonymous requests on private ones
        return (f"container {container!r} does not exist or is not public "
                f"({credentials.source}: {_CREDENTIALS_HINT})")
    return (f"container {container!r} does not exist (create it first, or fix the "
            "container name in the URL)")


def _denied(message: str, credentials: Credentials) -> str:
    if credentials.anonymous:
        return f"{message} ({credentials.source}: {_CREDENTIALS_HINT})"
    return f"{message} (check the credentials from {credentials.source})"
