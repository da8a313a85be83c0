"""The CLI's own pieces: greedy options, output formatting, the tqdm progress callback."""

from __future__ import annotations

import io
import threading

import pytest

from strata.catalog import blobs
from strata.catalog.progress import NO_PROGRESS, Progress
from strata.cli import output
from strata.cli import state as state_mod
from strata.cli.options import expand_greedy
from strata.cli.progress import TqdmProgress, make_progress

GREEDY = {"--files", "--tags"}


@pytest.mark.parametrize("args, expected", [
    (["--files", "a", "b", "--id", "x"], ["--files", "a", "--files", "b", "--id", "x"]),
    (["--files", "a", "--files", "b"], ["--files", "a", "--files", "b"]),
    (["--id", "x", "--files", "a"], ["--id", "x", "--files", "a"]),
    (["--files", "-odd", "b"], ["--files", "-odd", "--files", "b"]),
    (["--files", "a", "-", "-q"], ["--files", "a", "--files", "-", "-q"]),
    (["--files", "a", "--", "b"], ["--files", "a", "--", "b"]),
    (["--files=a", "b"], ["--files=a", "b"]),
    (["--tags", "t1", "t2", "--files", "f"], ["--tags", "t1", "--tags", "t2", "--files", "f"]),
])
def test_expand_greedy(args, expected):
    assert expand_greedy(args, GREEDY) == expected


def test_format_size():
    assert [output.format_size(n) for n in (None, 0, 1023, 1024, 1536, 5 << 30)] == \
        ["-", "0 B", "1023 B", "1.0 KiB", "1.5 KiB", "5.0 GiB"]


def test_table_alignment():
    lines = output.table(("name", "size"), [("a", "1 B"), ("long-name", "10 KiB")],
                         right=("size",))
    assert lines == ["name         size", "a             1 B", "long-name  10 KiB"]


def test_tqdm_progress_is_thread_safe():
    sink = io.StringIO()
    p = TqdmProgress(file=sink)
    p.start("hashing", 8 * 1000)
    threads = [threading.Thread(target=lambda: [p.advance(1) for _ in range(1000)])
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert p._bar.n == 8000
    p.done()
    p.start("verifying", 3, unit="files")  # a second operation on the same callback
    p.advance(3)
    p.done()
    p.done()  # idempotent
    assert "hashing" in sink.getvalue()


def test_progress_only_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr("sys.stdout", Tty())
    assert isinstance(make_progress(quiet=False), TqdmProgress)
    assert make_progress(quiet=True) is NO_PROGRESS
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert make_progress(quiet=False) is NO_PROGRESS


class Recorder(Progress):
    def __init__(self):
        self.started = []
        self.lock = threading.Lock()

    def start(self, description, total, unit="B"):
        with self.lock:
            self.started.append(description)


def test_progress_is_passed_to_the_library(run, src, tmp_path, monkeypatch):
    monkeypatch.setattr(blobs, "SETTLE_NS", -1)   # sources old enough to trust: no rehash
    recorder = Recorder()
    monkeypatch.setattr(state_mod, "make_progress", lambda quiet: recorder)
    run.new_id("create", "--project", "p", "--name", "n")
    run("add", "--files", src)     # the embedded folder repository stores while hashing
    run("close")                   # so upload only checks the sources
    run("get", "--copy", tmp_path / "copy")
    run("verify")
    run.new_id("sync", "--project", "p", "--name", "n", "--folder", src)
    assert recorder.started == ["hashing and storing", "get", "verifying",
                                "hashing and storing"]
