"""Fixtures shared by every test layer: a moto S3 server in its own process.

The server is a real subprocess (`python -m moto.server`), not moto's in-process mock, so
that boto3 goes through real sockets and a test can kill the server in the middle of a
read. The session fixture `s3_server` is shared; a test that stops a server should start its
own `MotoServer()` instead, so later tests keep theirs.

Nothing global is changed: a test opts into the server's environment with the `s3_url`
fixture (monkeypatched, undone after the test) or `MotoServer.env()`.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Iterator

import pytest

pytest_plugins = ["tests.storage.emulators"]  # GCS and Azure emulator fixtures

START_TIMEOUT = 30.0  # seconds; a cold moto import takes ~1 s, a loaded CI box far more
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
_bucket_numbers = itertools.count()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoServer:
    """A moto server process on 127.0.0.1; `extra_env` configures moto (e.g. auth)."""

    def __init__(self, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self._log = tempfile.TemporaryFile()
        self._client = None

    def start(self) -> MotoServer:
        env = {**os.environ, **self.extra_env}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_until_up()
        return self

    def stop(self) -> None:
        """Kill the server at once (SIGKILL): in-flight requests see a dropped connection."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def close(self) -> None:
        self.stop()
        self._log.close()

    def env(self) -> dict[str, str]:
        """The environment that points boto3 at this server with test credentials."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, **CREDENTIALS}

    def client(self):
        """An S3 client for test setup, independent of the environment."""
        if self._client is None:
            import boto3

            self._client = boto3.client(
                "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
                aws_access_key_id="testing", aws_secret_access_key="testing")
        return self._client

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"strata-test-{next(_bucket_numbers)}-{secrets.token_hex(4)}"
        self.client().create_bucket(Bucket=name)
        return name

    def _wait_until_up(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode}:\n"
                                   f"{self._read_log()}")
            try:
                with urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1):
                    return
            except urllib.error.HTTPError:
                return  # any HTTP answer means the server is serving
            except OSError:
                time.sleep(0.02)  # polling interval, not a fixed wait
        self.stop()
        raise RuntimeError(f"moto server did not answer within {START_TIMEOUT}s:\n"
                           f"{self._read_log()}")

    def _read_log(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    pytest.importorskip("moto.server")
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.close()


def apply_s3_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Point boto3 at a test server only: no profile, config file or token from the host."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION",
                 "AWS_ENDPOINT_URL_S3", "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 1 s IMDS probe
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def s3_url(s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """`s3://<fresh bucket>/<prefix>`, with the environment pointing boto3 at moto."""
    apply_s3_env(monkeypatch, s3_server.env())
    return f"s3://{s3_server.make_bucket()}/repo-{secrets.token_hex(2)}"


# ---- isolation of the user's strata state ----------------------------------------------
STRATA_ENV = ("STRATA_REPO", "STRATA_CACHE_DIR", "STRATA_CACHE_SIZE", "STRATA_CONFIG",
              "STRATA_RETRY_SECONDS")


@contextlib.contextmanager
def small_disk(folder, size: str) -> Iterator[None]:
    """A tmpfs of `size` (e.g. "2m") mounted at `folder` for the block: a disk to fill."""
    os.makedirs(folder, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                   check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def isolate_home(tmp_path, monkeypatch):
    """Own data, cache and config dirs for a test and every process it starts; yields the
    home folder. Suites make it autouse through their own conftest."""
    from strata.catalog import repo as repo_mod
    home = tmp_path / "home"
    for var, sub in (("XDG_DATA_HOME", "data"), ("XDG_CACHE_HOME", "cache"),
                     ("XDG_CONFIG_HOME", "config")):
        monkeypatch.setenv(var, str(home / sub))
    for var in STRATA_ENV:
        monkeypatch.delenv(var, raising=False)
    repo_mod._repos.clear()
    yield home
    repo_mod._repos.clear()


# ---- no skipped tests ------------------------------------------------------------------
def pytest_sessionfinish(session, exitstatus):
    """A skipped test hides a missing feature or a missing install step (an emulator or a
    cloud SDK that scripts/test failed to install): any skip fails the run, unless
    STRATA_ALLOW_SKIPS=1 is set for a deliberately partial local run."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = len(reporter.stats.get("skipped", [])) if reporter else 0
    if skipped and os.environ.get("STRATA_ALLOW_SKIPS") != "1" and exitstatus == 0:
        reporter.write_line(f"{skipped} test(s) skipped: every test must run "
                            "(set STRATA_ALLOW_SKIPS=1 to allow it locally)", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
