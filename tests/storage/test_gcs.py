"""The GCS backend against fake-gcs-server: the contract, configuration and errors."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys

import pytest

pytest.importorskip("google.cloud.storage")

import requests  # noqa: E402 - after the importorskip
from google.api_core import exceptions as gx  # noqa: E402
from google.auth import exceptions as auth_errors  # noqa: E402

from strata.storage.sdk import OutOfRange
from strata.storage import (  # noqa: E402
    InvalidURL,
    MissingDependency,
    NotFound,
    PermissionDenied,
    PreconditionFailed,
    StorageError,
    Transient,
    open_storage,
)
from strata.storage import gcs  # noqa: E402
from strata.storage.errors import MissingBucket  # noqa: E402
from strata.storage.gcs import GCSStorage, _translate  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.storage.contract import StorageContract  # noqa: E402
from tests.storage.emulators import FlakyProxy, apply_gcs_env  # noqa: E402


class TestGCSStorage(StorageContract):
    @pytest.fixture
    def storage(self, gcs_url: str) -> GCSStorage:
        return open_storage(gcs_url, retry=False)

    @pytest.fixture
    def flaky(self, gcs_server, gcs_url, monkeypatch):
        """The same location through a proxy that answers 503: through the SDK, on HTTP."""
        with FlakyProxy(gcs_server.endpoint) as proxy:
            apply_gcs_env(monkeypatch, {"STORAGE_EMULATOR_HOST": proxy.endpoint})
            yield open_storage(gcs_url, retry=False), proxy


def test_client_is_anonymous_on_the_emulator_with_a_wide_pool(gcs_url) -> None:
    storage = open_storage(gcs_url, retry=False)
    client = storage._client
    assert client.project == "test"
    assert type(client._credentials).__name__ == "AnonymousCredentials"
    assert client._http.get_adapter("http://x").poolmanager.connection_pool_kw["maxsize"] >= 32
    # no background bucket-metadata fetch, which the SDK would retry on its own
    assert not getattr(client, "_bucket_metadata_cache", None)
    assert storage is not open_storage(gcs_url, retry=False)
    assert client is open_storage(gcs_url, retry=False)._client  # one client, shared


def test_without_credentials_the_client_is_anonymous(tmp_path, monkeypatch) -> None:
    apply_gcs_env(monkeypatch, {"NO_GCE_CHECK": "True", "CLOUDSDK_CONFIG": str(tmp_path)})
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    storage = open_storage("gs://some-public-bucket/data", retry=False)
    assert storage._anonymous  # public buckets stay readable; private ones get the hint


def test_unusable_key_file_is_permission_denied(tmp_path, monkeypatch) -> None:
    apply_gcs_env(monkeypatch, {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "nope.json"),
                                "NO_GCE_CHECK": "True", "CLOUDSDK_CONFIG": str(tmp_path)})
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    with pytest.raises(PermissionDenied) as info:
        open_storage("gs://some-bucket/data")
    assert "nope.json" in str(info.value) and "gs://some-bucket/data" in str(info.value)


def test_etag_is_the_generation(gcs_url) -> None:
    storage = open_storage(gcs_url, retry=False)
    etag = storage.write("k", b"v")
    assert etag.isdigit() and int(etag) > 0
    assert storage.stat("k").etag == etag
    with pytest.raises(PreconditionFailed):
        storage.write("k", b"w", if_match="not-a-generation")


def test_prefix_isolates_repositories(gcs_server, gcs_url) -> None:
    bucket = gcs_url.split("/")[2]
    one = open_storage(f"gs://{bucket}/one", retry=False)
    two = open_storage(f"gs://{bucket}/one-two", retry=False)
    one.write("k", b"1")
    two.write("k", b"2")
    assert [i.key for i in one.list("")] == ["k"]
    assert one.read("k") == b"1" and two.read("k") == b"2"
    whole = open_storage(f"gs://{bucket}", retry=False)
    assert sorted(i.key for i in whole.list("")) == ["one-two/k", "one/k"]


def test_listing_follows_pages(gcs_url) -> None:
    storage = GCSStorage(*gcs_url[5:].split("/", 1), page_size=7)
    for i in range(30):
        storage.write(f"p/{i:02d}", b"")
    pages = []
    real_list_blobs = storage._client.list_blobs

    def counting(*args, **kwargs):
        iterator = real_list_blobs(*args, **kwargs)
        pages.append(iterator)
        return iterator

    storage._client.list_blobs = counting  # an instance attribute: this storage only
    try:
        assert sorted(i.key for i in storage.list("p/")) == [f"p/{i:02d}" for i in range(30)]
    finally:
        del storage._client.list_blobs
    assert pages[0].page_number == 5  # 30 objects, 7 per page: the emulator paginates


def test_large_write_is_a_resumable_upload_carrying_the_condition(gcs_url, monkeypatch) -> None:
    storage = open_storage(gcs_url, retry=False)
    data = os.urandom(gcs.RESUMABLE_THRESHOLD + 12345)
    session = storage._client._http
    sent: list[tuple[str, str]] = []
    real_request = session.request

    def recording(method, url, *args, **kwargs):
        sent.append((method, url))
        return real_request(method, url, *args, **kwargs)

    monkeypatch.setattr(session, "request", recording)
    etag = storage.write("big", data, if_absent=True)
    assert storage.read("big") == data and storage.stat("big").etag == etag
    assert storage.read_range("big", len(data) - 5, 100) == data[-5:]
    uploads = [url for method, url in sent if "/upload/" in url]
    assert "uploadType=resumable" in uploads[0] and "ifGenerationMatch=0" in uploads[0]
    assert len(uploads) == 3  # start the session, then two chunks of at most 8 MiB
    # GCS refuses the second create when the upload completes; fake-gcs-server ignores
    # preconditions on resumable uploads (it checks them on single-request uploads only),
    # so the conditional outcome of this path is asserted on small objects in the contract.


@pytest.mark.parametrize("call", [
    lambda s: s.read("k"), lambda s: s.read_range("k", 0, 4), lambda s: s.stat("k"),
    lambda s: s.write("k", b"x"), lambda s: s.write("k", b"x", if_absent=True),
    lambda s: list(s.list("")), lambda s: s.delete("k"),
], ids=["read", "read_range", "stat", "write", "write_if_absent", "list", "delete"])
def test_missing_bucket_its_own_error_naming_it(gcs_url, call) -> None:
    storage = open_storage("gs://no-such-bucket-strata/prefix", retry=False)
    with pytest.raises(MissingBucket) as info:
        call(storage)
    assert not isinstance(info.value, NotFound)   # not "no such object": no location
    assert "bucket 'no-such-bucket-strata' does not exist" in str(info.value)
    assert "gs://no-such-bucket-strata/prefix" in str(info.value)


def test_missing_key_in_a_known_bucket_is_not_probed_again(gcs_url) -> None:
    storage = open_storage(gcs_url, retry=False)
    storage.write("k", b"x")  # proves the bucket exists
    probes = []
    storage._bucket.exists = lambda **kw: probes.append(kw) or True
    with pytest.raises(NotFound, match="no such object"):
        storage.read("missing")
    storage.delete("missing")
    assert probes == []


@pytest.mark.parametrize("url", ["gs://", "gs:///prefix", "gs://ab/prefix", "gs:bucket/x",
                                 "gs://Bad_Bucket/x", "gs://bucket/../x"])
def test_malformed_urls_are_invalid(url) -> None:
    with pytest.raises(InvalidURL) as info:
        open_storage(url)
    assert "gs://bucket/prefix" in str(info.value)  # the message shows the expected form


def test_unreachable_emulator_is_transient(monkeypatch) -> None:
    apply_gcs_env(monkeypatch, {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}"})
    raw = open_storage("gs://some-bucket/repo", retry=False)
    with pytest.raises(Transient) as info:
        raw.read("k")
    assert "gs://some-bucket/repo/k" in str(info.value)


def test_missing_sdk_is_a_missing_dependency(monkeypatch) -> None:
    real_import = builtins.__import__

    def no_google(name, *args, **kwargs):
        if name == "google" or name.startswith("google."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    gcs._sdk.cache_clear()
    monkeypatch.setattr(builtins, "__import__", no_google)
    try:
        with pytest.raises(MissingDependency) as info:
            open_storage("gs://some-bucket/repo")
    finally:
        monkeypatch.undo()
        gcs._sdk.cache_clear()
    assert str(info.value) == ("gs:// storage needs google-cloud-storage: "
                               "pip install 'strata[gcs]'")


def test_strata_storage_imports_without_the_cloud_sdks() -> None:
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('google', 'azure', 'boto3', 'botocore'):\n"
            "            raise ModuleNotFoundError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import strata.storage, strata.storage.gcs, strata.storage.azure\n"
            "from strata.storage import open_storage, MissingDependency\n"
            "for url in ('gs://bucket/p', 'azure://acct.blob.core.windows.net/cont/p'):\n"
            "    try:\n"
            "        open_storage(url)\n"
            "    except MissingDependency as e:\n"
            "        print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "gs:// storage needs google-cloud-storage: pip install 'strata[gcs]'",
        "azure:// storage needs azure-storage-blob: pip install 'strata[azure]'",
    ]


# fake-gcs-server checks no credentials at all, so 401/403 cannot be provoked on it: the
# permission rows of the table are tested directly, with the SDK's own exception types.
class _Response:
    def __init__(self, status: int):
        self.status_code = status


@pytest.mark.parametrize("exc, kind", [
    (gx.NotFound("No such object: b/k"), NotFound),
    (gx.PreconditionFailed("conditionNotMet"), PreconditionFailed),
    (gx.Unauthorized("Anonymous caller"), PermissionDenied),
    (gx.Forbidden("no storage.objects.get access"), PermissionDenied),
    (gx.TooManyRequests("rate"), Transient),
    (gx.InternalServerError("oops"), Transient),
    (gx.BadGateway("oops"), Transient),
    (gx.ServiceUnavailable("oops"), Transient),
    (gx.GatewayTimeout("oops"), Transient),
    (gx.RequestRangeNotSatisfiable("range"), OutOfRange),
    (gx.BadRequest("invalid"), StorageError),
    (requests.exceptions.ConnectionError("refused"), Transient),
    (requests.exceptions.ConnectTimeout("slow"), Transient),
    (requests.exceptions.ReadTimeout("slow"), Transient),
    (requests.exceptions.ChunkedEncodingError("cut"), Transient),
    (ConnectionResetError("reset"), Transient),
    (auth_errors.DefaultCredentialsError("none"), PermissionDenied),
    (auth_errors.RefreshError("expired"), PermissionDenied),
    (auth_errors.TransportError("dns"), Transient),
])
def test_translation_table(exc: Exception, kind: type) -> None:
    error = _translate(exc, "gs://b/p/k")
    assert type(error) is kind
    assert "gs://b/p/k" in str(error)


def test_raw_media_errors_are_translated_by_status() -> None:
    class InvalidResponse(Exception):
        def __init__(self, status: int):
            self.response = _Response(status)

    assert type(_translate(InvalidResponse(412), "gs://b/k")) is PreconditionFailed
    assert type(_translate(InvalidResponse(503), "gs://b/k")) is Transient


def test_denied_without_credentials_says_how_to_log_in() -> None:
    error = _translate(gx.Unauthorized("Anonymous caller"), "gs://b/k", anonymous=True)
    assert type(error) is PermissionDenied
    assert "GOOGLE_APPLICATION_CREDENTIALS" in str(error) and "gs://b/k" in str(error)


def test_non_sdk_errors_are_not_translated() -> None:
    assert _translate(KeyError("bug"), "gs://b/k") is None
