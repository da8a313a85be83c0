"""The Azure Blob backend against Azurite: the contract, credentials and errors."""

from __future__ import annotations

import builtins
import os
import sys

import pytest

pytest.importorskip("azure.storage.blob")

from azure.core import exceptions as ax  # noqa: E402 - after the importorskip

from strata.storage.sdk import OutOfRange
from strata.storage import (  # noqa: E402
    InvalidURL,
    MissingDependency,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    StrataError,
    Transient,
    open_storage,
)
from strata.storage import azure as azure_backend  # noqa: E402
from strata.storage.errors import MissingBucket  # noqa: E402
from strata.storage.azure import (  # noqa: E402
    AzureStorage,
    Credentials,
    _translate,
    find_credentials,
    make_service_client,
)
from tests.conftest import free_port  # noqa: E402
from tests.storage.contract import StorageContract  # noqa: E402
from tests.storage.emulators import (  # noqa: E402
    AZURE_HOST,
    AZURITE_ACCOUNT,
    AZURITE_KEY,
    FlakyProxy,
    apply_azure_env,
    azurite_connection_string,
)

WRONG_KEY = "A" * 86 + "=="  # well-formed base64, not the account's key


class TestAzureStorage(StorageContract):
    @pytest.fixture
    def storage(self, azure_url: str) -> AzureStorage:
        return open_storage(azure_url, retry=False)

    @pytest.fixture
    def flaky(self, azurite, azure_url, monkeypatch):
        """The same location through a proxy that answers 503: through the SDK, on HTTP."""
        with FlakyProxy(azurite.endpoint) as proxy:
            monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                               azurite_connection_string(proxy.endpoint))
            yield open_storage(azure_url, retry=False), proxy


def test_connection_string_to_a_local_endpoint_works_unchanged(azurite, azure_url) -> None:
    storage = open_storage(azure_url, retry=False)
    assert storage.url == azure_url
    assert storage.credentials.source == "AZURE_STORAGE_CONNECTION_STRING"
    assert storage._container.url.startswith(azurite.endpoint)
    config = storage._container._config
    assert config.retry_policy.total_retries == 0  # retry.py owns retrying
    transport = config.transport
    adapter = transport.session.get_adapter("http://x")
    assert adapter.poolmanager.connection_pool_kw["maxsize"] >= 32


def test_prefix_isolates_repositories(azure_url) -> None:
    container = azure_url.split("/")[3]
    one = open_storage(f"azure://{AZURE_HOST}/{container}/one", retry=False)
    two = open_storage(f"azure://{AZURE_HOST}/{container}/one-two", retry=False)
    one.write("k", b"1")
    two.write("k", b"2")
    assert [i.key for i in one.list("")] == ["k"]
    assert one.read("k") == b"1" and two.read("k") == b"2"
    whole = open_storage(f"azure://{AZURE_HOST}/{container}", retry=False)
    assert sorted(i.key for i in whole.list("")) == ["one-two/k", "one/k"]


def test_listing_follows_pages(azure_url) -> None:
    container, prefix = azure_url.split("/", 3)[3].split("/", 1)
    storage = AzureStorage(AZURITE_ACCOUNT, AZURE_HOST, container, prefix, page_size=7)
    for i in range(30):
        storage.write(f"p/{i:02d}", b"")
    calls = []
    real_list_blobs = storage._container.list_blobs

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real_list_blobs(*args, **kwargs)

    storage._container.list_blobs = counting
    pages = list(storage._container.list_blobs(name_starts_with=f"{prefix}/p/",
                                               results_per_page=7).by_page())
    assert len(pages) == 5  # 30 blobs, 7 per page: Azurite paginates
    assert sorted(i.key for i in storage.list("p/")) == [f"p/{i:02d}" for i in range(30)]
    assert calls[-1]["results_per_page"] == 7


def test_large_writes_are_block_uploads_and_keep_their_conditions(azure_url) -> None:
    storage = open_storage(azure_url, retry=False)
    data = os.urandom(azure_backend.SINGLE_PUT_SIZE + 12345)
    etag = storage.write("big", data, if_absent=True)
    assert storage.read("big") == data and storage.stat("big").etag == etag
    assert storage.read_range("big", len(data) - 5, 100) == data[-5:]
    blocks = storage._blob("big").get_block_list()[0]
    assert len(blocks) == 2  # staged in blocks of at most 8 MiB, not one put
    with pytest.raises(PreconditionFailed):  # If-None-Match on the block list commit
        storage.write("big", data[::-1], if_absent=True)
    with pytest.raises(PreconditionFailed):  # If-Match likewise
        storage.write("big", data[::-1], if_match="0x1234")
    new = storage.write("big", data[::-1], if_match=etag)
    assert storage.read("big") == data[::-1] and new != etag


@pytest.mark.parametrize("call", [
    lambda s: s.read("k"), lambda s: s.read_range("k", 0, 4), lambda s: s.stat("k"),
    lambda s: s.write("k", b"x"), lambda s: s.write("k", b"x", if_absent=True),
    lambda s: s.write("k", b"x", if_match="0x1"), lambda s: list(s.list("")),
    lambda s: s.delete("k"),
], ids=["read", "read_range", "stat", "write", "write_if_absent", "write_if_match", "list",
        "delete"])
def test_missing_container_its_own_error_naming_it(azure_url, call) -> None:
    storage = open_storage(f"azure://{AZURE_HOST}/no-such-container/prefix", retry=False)
    with pytest.raises(MissingBucket) as info:
        call(storage)
    assert not isinstance(info.value, NotFound)   # not "no such object": no location
    assert "container 'no-such-container' does not exist" in str(info.value)
    assert f"azure://{AZURE_HOST}/no-such-container/prefix" in str(info.value)


def test_wrong_key_is_permission_denied(azurite, azure_url, monkeypatch) -> None:
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING",
                       azurite.connection_string(key=WRONG_KEY))
    storage = open_storage(azure_url)  # with retries: a denial must not be retried
    for call in (lambda: storage.read("k"), lambda: storage.write("k", b"x"),
                 lambda: storage.stat("k"), lambda: list(storage.list(""))):
        with pytest.raises(PermissionDenied) as info:
            call()
        message = str(info.value)
        assert azure_url in message and "AZURE_STORAGE_CONNECTION_STRING" in message
        assert WRONG_KEY not in message and AZURITE_KEY not in message


@pytest.mark.parametrize("connection_string, message", [
    ("garbage", "unusable credentials from AZURE_STORAGE_CONNECTION_STRING"),
    (azurite_connection_string("http://127.0.0.1:9", key="not*base64"),
     "cannot sign with the account key from AZURE_STORAGE_CONNECTION_STRING"),
])
def test_malformed_credentials_are_permission_denied(connection_string, message,
                                                     monkeypatch) -> None:
    apply_azure_env(monkeypatch, {"AZURE_STORAGE_CONNECTION_STRING": connection_string})
    url = f"azure://{AZURE_HOST}/container/repo"
    with pytest.raises(PermissionDenied, match=message) as info:
        open_storage(url).read("k")
    assert url in str(info.value) and "not*base64" not in str(info.value)


def test_account_key_from_the_environment(azurite, azure_url, monkeypatch) -> None:
    # An account key alone means https://<host>; point the key at Azurite through a
    # service client built the same way, to check the key is what signs the requests.
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING")
    monkeypatch.setenv("AZURE_STORAGE_KEY", AZURITE_KEY)
    credentials = find_credentials(AZURITE_ACCOUNT)
    assert credentials == Credentials("AZURE_STORAGE_KEY", account_key=AZURITE_KEY)
    assert AZURITE_KEY not in repr(credentials)
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient(
        f"{azurite.endpoint}/{AZURITE_ACCOUNT}",
        credential={"account_name": AZURITE_ACCOUNT, "account_key": AZURITE_KEY})
    container, prefix = azure_url.split("/", 3)[3].split("/", 1)
    storage = AzureStorage(AZURITE_ACCOUNT, AZURE_HOST, container, prefix, service=service)
    storage.write("k", b"v")
    assert storage.read("k") == b"v"


@pytest.mark.parametrize("credentials, kind", [
    (Credentials("AZURE_STORAGE_KEY", account_key=AZURITE_KEY), "SharedKeyCredentialPolicy"),
    (Credentials("AZURE_STORAGE_SAS_TOKEN", sas_token="?sv=2024&sig=abc"), None),
])
def test_key_and_sas_clients_address_the_url_host(credentials, kind) -> None:
    service = make_service_client("acct", "acct.blob.core.windows.net", credentials)
    assert service.url.startswith("https://acct.blob.core.windows.net/")
    assert service._config.retry_policy.total_retries == 0
    if kind:
        assert type(service.credential).__name__ == kind
    else:
        assert "sig=abc" in service.url  # a SAS travels in the query string


def test_credentials_order(tmp_path, monkeypatch) -> None:
    apply_azure_env(monkeypatch, {})
    config = tmp_path / "config.toml"
    monkeypatch.setenv("STRATA_CONFIG", str(config))
    config.write_text('[azure]\nsas_token = "sv=1&sig=s"\n'
                      '[azure.other]\naccount_key = "b3RoZXI="\n')
    assert find_credentials("mine") == Credentials(f"[azure] in {config}",
                                                   sas_token="sv=1&sig=s")
    assert find_credentials("other") == Credentials(f"[azure.other] in {config}",
                                                    account_key="b3RoZXI=")
    monkeypatch.setenv("AZURE_STORAGE_SAS_TOKEN", "?sv=2&sig=t")
    assert find_credentials("mine").source == "AZURE_STORAGE_SAS_TOKEN"
    monkeypatch.setenv("AZURE_STORAGE_KEY", "a2V5")
    assert find_credentials("mine").source == "AZURE_STORAGE_KEY"
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite_connection_string("http://h"))
    assert find_credentials(AZURITE_ACCOUNT).source == "AZURE_STORAGE_CONNECTION_STRING"
    # a connection string for another account is skipped, not used against this one
    assert find_credentials("mine").source == "AZURE_STORAGE_KEY"


def test_nothing_configured_is_anonymous_with_a_hint(tmp_path, monkeypatch) -> None:
    apply_azure_env(monkeypatch, {"AZURE_STORAGE_CONNECTION_STRING":
                                  azurite_connection_string("http://h")})
    monkeypatch.setitem(sys.modules, "azure.identity", None)
    credentials = find_credentials("mine")
    assert credentials.anonymous
    assert "is for account 'devstoreaccount1', not 'mine'" in credentials.source
    error = _translate(_http_error(ax.HttpResponseError, 403, "AuthorizationFailure"),
                       "azure://mine.blob.core.windows.net/c/k", "c", credentials)
    assert type(error) is PermissionDenied and "AZURE_STORAGE_SAS_TOKEN" in str(error)


def test_broken_config_file_is_one_clear_error(tmp_path, monkeypatch) -> None:
    apply_azure_env(monkeypatch, {})
    config = tmp_path / "config.toml"
    config.write_text("[azure\n")
    monkeypatch.setenv("STRATA_CONFIG", str(config))
    with pytest.raises(StrataError, match="cannot read config file"):
        find_credentials("mine")


@pytest.mark.parametrize("url", [
    f"azure://{AZURE_HOST}", f"azure://{AZURE_HOST}/", f"azure://{AZURE_HOST}/c/prefix",
    "azure://devstoreaccount1/container/prefix", "azure:///container/prefix",
    f"azure://{AZURE_HOST}/Bad_Container/x", f"azure://{AZURE_HOST}/container/../x",
])
def test_malformed_urls_are_invalid(url) -> None:
    with pytest.raises(InvalidURL) as info:
        open_storage(url)
    assert "azure://<account>.blob.core.windows.net/<container>" in str(info.value)


def test_unreachable_endpoint_is_transient(monkeypatch) -> None:
    apply_azure_env(monkeypatch, {"AZURE_STORAGE_CONNECTION_STRING":
                                  azurite_connection_string(f"http://127.0.0.1:{free_port()}")})
    raw = open_storage(f"azure://{AZURE_HOST}/container/repo", retry=False)
    with pytest.raises(Transient) as info:
        raw.read("k")
    assert f"azure://{AZURE_HOST}/container/repo/k" in str(info.value)


def test_missing_sdk_is_a_missing_dependency(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_azure(name, *args, **kwargs):
        if name == "azure" or name.startswith("azure."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    azure_backend._sdk.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_azure)
    try:
        with pytest.raises(MissingDependency) as info:
            open_storage(f"azure://{AZURE_HOST}/container/repo")
    finally:
        monkeypatch.undo()
        azure_backend._sdk.cache_clear()
    assert str(info.value) == ("azure:// storage needs azure-storage-blob: "
                               "pip install 'strata[azure]'")


def _http_error(cls: type, status: int, code: str | None) -> Exception:
    error = cls(message=f"{status} {code}")
    error.status_code = status
    error.error_code = code
    return error


CREDENTIALS = Credentials("AZURE_STORAGE_CONNECTION_STRING", connection_string="x")


@pytest.mark.parametrize("exc, kind", [
    (_http_error(ax.ResourceNotFoundError, 404, "BlobNotFound"), NotFound),
    (_http_error(ax.ResourceNotFoundError, 404, "ContainerNotFound"), MissingBucket),
    (_http_error(ax.ResourceExistsError, 409, "BlobAlreadyExists"), PreconditionFailed),
    (_http_error(ax.ResourceModifiedError, 412, "ConditionNotMet"), PreconditionFailed),
    (_http_error(ax.HttpResponseError, 412, None), PreconditionFailed),
    (_http_error(ax.ClientAuthenticationError, 403, "AuthenticationFailed"), PermissionDenied),
    (_http_error(ax.HttpResponseError, 403, "AuthorizationFailure"), PermissionDenied),
    (_http_error(ax.HttpResponseError, 403, "AuthorizationPermissionMismatch"),
     PermissionDenied),
    (_http_error(ax.ClientAuthenticationError, 401, "NoAuthenticationInformation"),
     PermissionDenied),
    (_http_error(ax.HttpResponseError, 503, "ServerBusy"), Transient),
    (_http_error(ax.HttpResponseError, 500, "InternalError"), Transient),
    (_http_error(ax.HttpResponseError, 500, "OperationTimedOut"), Transient),
    (_http_error(ax.HttpResponseError, 502, None), Transient),
    (_http_error(ax.HttpResponseError, 429, None), Transient),
    (_http_error(ax.HttpResponseError, 416, "InvalidRange"), OutOfRange),
    (_http_error(ax.HttpResponseError, 409, "LeaseIdMissing"), StorageError),
    (_http_error(ax.HttpResponseError, 400, "InvalidHeaderValue"), StorageError),
    (ax.ClientAuthenticationError(message="DefaultAzureCredential failed"), PermissionDenied),
    (ax.ServiceRequestError("connection refused"), Transient),
    (ax.ServiceRequestTimeoutError("connect timeout"), Transient),
    (ax.ServiceResponseError("connection reset"), Transient),
    (ax.ServiceResponseTimeoutError("read timeout"), Transient),
    (ax.IncompleteReadError(message="cut"), Transient),
    (ConnectionResetError("reset"), Transient),
])
def test_translation_table(exc: Exception, kind: type) -> None:
    error = _translate(exc, "azure://a.blob.core.windows.net/c/k", "c", CREDENTIALS)
    assert type(error) is kind
    assert "azure://a.blob.core.windows.net/c/k" in str(error)


def test_error_codes_from_the_sdk_enum_are_read() -> None:
    from azure.storage.blob import StorageErrorCode

    exc = _http_error(ax.ResourceModifiedError, 412, StorageErrorCode.CONDITION_NOT_MET)
    error = _translate(exc, "azure://a.blob.core.windows.net/c/k", "c", CREDENTIALS)
    assert type(error) is PreconditionFailed and "changed since" in str(error)


def test_non_sdk_errors_are_not_translated() -> None:
    assert _translate(KeyError("bug"), "azure://a.b/c/k", "c", CREDENTIALS) is None


def test_the_sdk_logs_only_errors_unless_told_otherwise(monkeypatch):
    # its INFO lines (every request, ten lines each) filled mount logs, and its warnings
    # ("Incomplete download.") reached a command's stderr before the one error line
    import logging
    sdk_log = logging.getLogger("azure")
    monkeypatch.setattr(sdk_log, "level", logging.NOTSET)
    azure_backend._sdk.cache_clear()
    azure_backend._sdk()
    assert sdk_log.getEffectiveLevel() == logging.ERROR
    monkeypatch.setattr(sdk_log, "level", logging.DEBUG)   # a level the user set stays
    azure_backend._sdk.cache_clear()
    azure_backend._sdk()
    assert sdk_log.level == logging.DEBUG
    azure_backend._sdk.cache_clear()
