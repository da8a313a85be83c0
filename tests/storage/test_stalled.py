"""A stalled store: a server that accepts connections and never answers.

Each backend's socket timeouts are bounded by the retry budget (`retry.attempt_timeout`),
so one call fails with Unreachable within about max(MIN_ATTEMPT_SECONDS, budget) and not
after the SDK's default 60 s per socket read (a finding: one read through a mount took
~120 s with STRATA_RETRY_SECONDS=3).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Iterator

import pytest

from strata.storage import Unreachable, open_storage
from strata.storage import retry as retry_mod
from strata.storage.retry import attempt_timeout
from tests.conftest import CREDENTIALS, apply_s3_env
from tests.storage.emulators import (
    AZURE_HOST,
    apply_azure_env,
    apply_gcs_env,
    azurite_connection_string,
)


class StalledServer:
    """Accepts every connection on 127.0.0.1 and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.endpoint = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.accepted.append(conn)  # held open, never answered

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def stalled() -> Iterator[StalledServer]:
    server = StalledServer()
    yield server
    server.close()


def _point_at(kind: str, endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    if kind == "s3":
        pytest.importorskip("boto3")
        apply_s3_env(monkeypatch, {"AWS_ENDPOINT_URL": endpoint, **CREDENTIALS})
        return "s3://stalled-bucket/repo"
    if kind == "gcs":
        pytest.importorskip("google.cloud.storage")
        apply_gcs_env(monkeypatch, {"STORAGE_EMULATOR_HOST": endpoint})
        return "gs://stalled-bucket/repo"
    pytest.importorskip("azure.storage.blob")
    apply_azure_env(monkeypatch, {
        "AZURE_STORAGE_CONNECTION_STRING": azurite_connection_string(endpoint)})
    return f"azure://{AZURE_HOST}/stalled/repo"


def test_attempt_timeout_follows_the_retry_budget(monkeypatch) -> None:
    monkeypatch.delenv("STRATA_RETRY_SECONDS", raising=False)
    assert (attempt_timeout(10.0), attempt_timeout(60.0)) == (10.0, 30.0)  # budget 30 s
    monkeypatch.setenv("STRATA_RETRY_SECONDS", "3")
    assert (attempt_timeout(10.0), attempt_timeout(60.0)) == (5.0, 5.0)  # the floor
    monkeypatch.setenv("STRATA_RETRY_SECONDS", "600")
    assert (attempt_timeout(10.0), attempt_timeout(60.0)) == (10.0, 60.0)  # the defaults


def test_s3_read_from_a_stalled_server_fails_within_the_budget(stalled, monkeypatch) -> None:
    """The finding itself, with the real numbers: budget 3 s -> 5 s socket timeout."""
    url = _point_at("s3", stalled.endpoint, monkeypatch)
    monkeypatch.setenv("STRATA_RETRY_SECONDS", "3")
    storage = open_storage(url)
    started = time.monotonic()
    with pytest.raises(Unreachable) as info:
        storage.read_range("blobs/ab/k", 0, 4096)
    elapsed = time.monotonic() - started
    assert 4.0 < elapsed < 15.0, f"a stalled read failed after {elapsed:.1f} s"
    assert f"{url}/blobs/ab/k" in str(info.value) and "timed out" in str(info.value)
    assert stalled.accepted  # it really reached the server


@pytest.mark.parametrize("kind", ["s3", "gcs", "azure"])
@pytest.mark.parametrize("call", [
    lambda s: s.read_range("k", 10, 100), lambda s: s.write("k", b"x" * 1000, if_absent=True),
    lambda s: list(s.list("")),
], ids=["read_range", "write", "list"])
def test_every_call_to_a_stalled_server_is_bounded(stalled, monkeypatch, kind, call) -> None:
    """Every backend and call, with the floor lowered to 1 s to keep the test short."""
    url = _point_at(kind, stalled.endpoint, monkeypatch)
    monkeypatch.setattr(retry_mod, "MIN_ATTEMPT_SECONDS", 1.0)
    monkeypatch.setenv("STRATA_RETRY_SECONDS", "1")
    storage = open_storage(url)
    started = time.monotonic()
    with pytest.raises(Unreachable) as info:
        call(storage)
    elapsed = time.monotonic() - started
    assert elapsed < 6.0, f"{kind}: a stalled call failed after {elapsed:.1f} s"
    assert url in str(info.value)
