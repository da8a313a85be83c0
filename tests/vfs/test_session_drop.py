"""Dropped overlay generations: deleted off the commit's path, and a leftover one (a crash
or an unmount in the middle of the delete) removed when the session next starts."""

import time

from tests.vfs.test_commit import Env, put


def wait_gone(path, timeout=30.0):
    deadline = time.monotonic() + timeout
    while path.exists():
        assert time.monotonic() < deadline, f"{path} still there after {timeout:.0f} s"
        time.sleep(0.01)  # polling a condition with a deadline: the delete runs on a thread


def test_commit_and_discard_drop_their_generation(tmp_path):
    env = Env(tmp_path)
    try:
        s = env.session()
        for name in ("one", "two"):
            fh = s.fs.create(name, 0o644)
            s.fs.write(fh, 0, b"x" * 100)
            s.fs.release(fh)
            committed = s.state["live"]
            s.commit()
            wait_gone(s.folder / f"g{committed}")
        fh = s.fs.create("three", 0o644)
        s.fs.release(fh)
        discarded = s.state["live"]
        assert s.discard() == 1
        wait_gone(s.folder / f"g{discarded}")
        assert (s.folder / f"g{s.state['live']}").is_dir()
    finally:
        env.close()


def test_a_leftover_generation_is_removed_at_the_next_start(tmp_path):
    env = Env(tmp_path)
    try:
        s = env.session()
        put(s.fs, "kept", b"pending")
        live = s.folder / f"g{s.state['live']}"
        leftover = s.folder / "g0"          # as a crash in the middle of a delete leaves it
        (leftover / "upper").mkdir(parents=True)
        (leftover / "upper" / "f").write_bytes(b"garbage")
        (s.folder / "gnotes").mkdir()       # not a generation: left alone

        s.close()                           # the process ends
        s2 = env.session()
        wait_gone(leftover)
        assert live.is_dir() and (s.folder / "gnotes").is_dir()
        assert [c["path"] for c in s2.status()["changes"]] == ["kept"]
    finally:
        env.close()
