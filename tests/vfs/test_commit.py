"""Commit of a writable session: random operations, then commit; the child version's
tree equals the local model, renames upload nothing, writes during a commit go to the
next overlay, and an interrupted commit retried produces exactly one child."""

import os
import shutil

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from strata.catalog import Dataset
from strata.catalog import repo as repo_mod
from strata.catalog.repo import Repository
from strata.storage.cache import UnitCache
from strata.vfs.core import Filesystem
from strata.vfs.errors import MountError
from strata.vfs.reader import Reader
from strata.vfs.session import Session
from tests.catalog.conftest import write
from tests.vfs.conftest import CHUNK
from tests.vfs.test_overlay_model import (BASE, follows_link, fs_apply, fs_tree, local_apply,
                                          local_tree, op, outcome)


class Env:
    def __init__(self, base):
        os.environ["XDG_DATA_HOME"] = str(base / "data")
        os.environ["XDG_CACHE_HOME"] = str(base / "cache")
        repo_mod._repos.clear()
        self.base = base
        self.url = str(base / "repo")
        Repository.open(self.url, create=True, chunk_size=CHUNK, pack_size=256 * 1024)
        src = base / "src"
        for rel, data in BASE.items():
            write(src, rel, data)
            os.chmod(src / rel, 0o644)
        ds = Dataset.create("n", "p", repo=self.url)
        ds.add_files(src)
        ds.finalize(auto_upload=True)
        self.version = ds.id
        self.local = base / "local"
        shutil.copytree(src, self.local, symlinks=True)
        self.repo = Repository.open(self.url)
        self.cache = UnitCache(base / "ucache", 1 << 30)
        self.reader = Reader(self.repo, self.cache)

    def session(self, version=None, name="ov"):
        s = Session(self.repo, name, version or self.version, self.reader)
        s.fs = Filesystem(s.build_view(), writable=True)
        return s

    def close(self):
        self.reader.close()
        self.cache.close()


def put(fs, path: str, data: bytes) -> None:
    """A new file in a writable filesystem, written and closed."""
    fh = fs.create(path, 0o644)
    fs.write(fh, 0, data)
    fs.release(fh)


def child_tree(env, vid, name):
    out = env.base / name
    Dataset.get(vid, repo=env.url).get_mutable_local_copy(out)
    return local_tree(str(out))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=15))
# a file replacing a parent's folder (the child must remove the folder)
@example(ops=[("rename", "d", "b"), ("create", "d", b"")])
# copied-up chunks: a written chunk is hashed again, untouched ones are reused; the copy
# is forgotten after a truncate; a renamed lower file keeps its chunks
@example(ops=[("write", "big", 5, b"Q", False)])
@example(ops=[("write", "big", CHUNK - 1, b"QR", True), ("truncate", "big", 100),
              ("write", "big", 2 * CHUNK, b"Z", False)])
@example(ops=[("rename", "big", "n"), ("write", "n", CHUNK + 1, b"R", False)])
def test_commit_makes_a_child_equal_to_the_model(tmp_path_factory, ops):
    env = Env(tmp_path_factory.mktemp("c"))
    try:
        s = env.session()
        for o in ops:
            if follows_link(str(env.local), o):
                continue
            outcome(lambda: local_apply(str(env.local), o))
            outcome(lambda: fs_apply(s.fs, o))
        expected = local_tree(str(env.local))
        if s.live.is_empty():
            with pytest.raises(MountError, match="nothing to commit"):
                s.commit()
            return
        child = s.commit(description="model")
        assert child.parents == [env.version]
        assert child_tree(env, child.id, "out") == expected
        assert fs_tree(s.fs) == expected            # the live mount now shows the child
        assert s.status()["changes"] == []
        s.close()
        again = env.session(child.id)               # a remount of the child: same tree
        assert fs_tree(again.fs) == expected
    finally:
        env.close()


def test_renames_upload_nothing_and_status_reports_them(tmp_path):
    env = Env(tmp_path)
    try:
        s = env.session()
        s.fs.rename("big", "big-renamed")
        s.fs.rename("d", "folder")
        s.fs.unlink("a")
        changes = {(c["change"], c["path"], c.get("from")) for c in s.status()["changes"]}
        assert changes == {("renamed", "big-renamed", "big"), ("renamed", "folder", "d"),
                           ("removed", "a", None)}
        child = s.commit()
        assert child.record.uploaded_bytes == 0
        assert sorted(child.list_files()) == ["big-renamed", "folder/e/z", "folder/x"]
        assert s.fs.read_path("folder/e/z") == b"zed"
    finally:
        env.close()


def test_writes_during_a_commit_go_to_the_next_overlay(tmp_path, monkeypatch):
    env = Env(tmp_path)
    try:
        s = env.session()
        put(s.fs, "first", b"1")
        from strata.vfs import session as session_mod
        real = session_mod.stage_changes

        def stage_and_write(ds, changes, progress=None):
            # another writer, while the commit is running
            h = s.fs.create("second", 0o644)
            s.fs.write(h, 0, b"2")
            s.fs.release(h)
            return real(ds, changes)

        monkeypatch.setattr(session_mod, "stage_changes", stage_and_write)
        child = s.commit()
        assert child.list_files() == sorted(["a", "big", "d/e/z", "d/x", "first"])
        assert [c["path"] for c in s.status()["changes"]] == ["second"]
        assert s.fs.read_path("second") == b"2" and s.fs.read_path("first") == b"1"
    finally:
        env.close()


def test_interrupted_commit_retried_gives_exactly_one_child(tmp_path, monkeypatch):
    env = Env(tmp_path)
    try:
        s = env.session()
        put(s.fs, "new", b"x" * 1000)
        calls = {"n": 0}
        real = Dataset.finalize

        def crash_once(self, *a, **kw):
            calls["n"] += 1
            if calls["n"] == 1:
                real(self, *a, **kw)          # the child is final ...
                raise KeyboardInterrupt       # ... but the session never hears of it
            return real(self, *a, **kw)

        monkeypatch.setattr(Dataset, "finalize", crash_once)
        with pytest.raises(KeyboardInterrupt):
            s.commit()
        # the process dies; a new session (remount) resumes and finishes the commit
        s.close()
        s2 = env.session()
        assert s2.status()["committing"]
        child = s2.commit()
        from strata.catalog.ops import list_datasets
        versions = list_datasets("p", repo=env.url)
        assert [v["id"] for v in versions] == [env.version, child.id]
        assert s2.fs.read_path("new") == b"x" * 1000
    finally:
        env.close()


def test_a_commit_cut_short_leaves_the_default_id_alone(tmp_path, monkeypatch):
    # the draft a commit makes is not the default --id of later commands (a remount
    # without --id would take it and refuse a draft); its child is, once final
    from strata.catalog import config
    env = Env(tmp_path)
    try:
        s = env.session()
        put(s.fs, "new", b"x")
        before = config.last_touched(env.repo.url)
        real = Dataset.finalize

        def interrupted(self, *a, **kw):
            raise KeyboardInterrupt

        monkeypatch.setattr(Dataset, "finalize", interrupted)
        with pytest.raises(KeyboardInterrupt):
            s.commit()
        assert config.last_touched(env.repo.url) == before
        monkeypatch.setattr(Dataset, "finalize", real)
        child = s.commit()
        assert config.last_touched(env.repo.url) == child.id
    finally:
        env.close()


def test_a_folder_mode_survives_a_later_commit_of_a_file_inside(tmp_path):
    # the second commit stores the folder as implied by its changed file (no mode of its
    # own): the mount, a fresh view and a copy must all still say 0700, as before it
    from strata.vfs.views import VersionView
    env = Env(tmp_path)
    try:
        s = env.session()
        s.fs.mkdir("sec", 0o700)
        for data in (b"a\n", b"b\n"):
            put(s.fs, "sec/f", data)
            child = s.commit()
            assert s.fs.getattr("sec").mode & 0o7777 == 0o700
        view = VersionView(env.repo, child.id, env.reader)
        assert view.lookup("sec").mode & 0o7777 == 0o700
        assert {n.name: n.mode & 0o7777 for n in view.listdir("")}["sec"] == 0o700
        copy = child.get_mutable_local_copy(str(tmp_path / "copy"))
        assert os.stat(os.path.join(copy, "sec")).st_mode & 0o7777 == 0o700
    finally:
        env.close()


@pytest.mark.parametrize("stores_on_add", [True, False])
def test_a_commit_reads_each_new_file_once(tmp_path, monkeypatch, stores_on_add):
    """The frozen generation's files cannot change any more, so a commit trusts them
    however fresh: each is hashed once (the large one in the background once closed, the
    small one at commit, while stored in a folder repository) and neither checked nor
    hashed again at upload."""
    from strata.catalog import blobs
    monkeypatch.setattr(Repository, "stores_on_add", property(lambda self: stores_on_add))
    env = Env(tmp_path)
    try:
        s = env.session()
        new = {"small": b"s" * 1000, "large": os.urandom(5 * CHUNK + 7)}
        hashed = []
        real = blobs._hash
        monkeypatch.setattr(blobs, "_hash", lambda p, *a, **kw: hashed.append(p) or
                            real(p, *a, **kw))
        for name, data in new.items():
            fh = s.fs.create(name, 0o644)
            s.fs.write(fh, 0, data)
            s.fs.release(fh)
        trusted = []
        real_open = blobs._open_source

        def open_source(staged):
            fd, trust = real_open(staged)
            trusted.append(trust)
            return fd, trust
        monkeypatch.setattr(blobs, "_open_source", open_source)
        child = s.commit()
        assert len(hashed) == len(set(hashed)) == 2     # the two upper files, once each
        # read again to be uploaded, but not hashed again (the large one, hashed after
        # close, is stored at upload in a folder repository too)
        assert trusted == ([True] if stores_on_add else [True, True])
        out = tmp_path / "out"
        Dataset.get(child.id, repo=env.url).get_mutable_local_copy(out)
        assert {n: (out / n).read_bytes() for n in new} == new
    finally:
        env.close()


def chunk_hashes(monkeypatch) -> list[int]:
    """Sizes of the sha256 computations over whole chunks or the last partial chunk of
    "big", counted from now on (hashlib is patched globally: other hashing is ignored)."""
    import hashlib
    sizes = []
    real = hashlib.sha256
    tail = len(BASE["big"]) % CHUNK

    def counting(*args):
        if args and len(args[0]) in (CHUNK, tail):
            sizes.append(len(args[0]))
        return real(*args)
    monkeypatch.setattr(hashlib, "sha256", counting)
    return sizes


def expected_big(*writes):
    data = bytearray(BASE["big"])
    for offset, chunk in writes:
        data[offset:offset + len(chunk)] = chunk
    return bytes(data)


def test_a_commit_hashes_only_the_chunks_written_since_copy_up(tmp_path, monkeypatch):
    env = Env(tmp_path)
    try:
        s = env.session()
        fh = s.fs.open("big", os.O_RDWR)           # copy-up: 2 whole chunks and a tail
        sizes = chunk_hashes(monkeypatch)           # (after the copy-up's verification)
        s.fs.write(fh, CHUNK + 10, b"XY")           # touches chunk 1 only
        s.fs.release(fh)                            # hashed from here, or by the commit
        child = s.commit()
        tail = len(BASE["big"]) % CHUNK
        assert sorted(sizes) == sorted([CHUNK, tail])   # chunk 0 reused, not hashed
        assert child.record.uploaded_bytes == CHUNK     # the tail's bytes did not change
        out = tmp_path / "o"
        Dataset.get(child.id, repo=env.url).get_mutable_local_copy(out)
        assert (out / "big").read_bytes() == expected_big((CHUNK + 10, b"XY"))
    finally:
        env.close()


def test_dirty_chunks_survive_a_remount_and_a_truncate_forgets_the_copy(tmp_path,
                                                                        monkeypatch):
    env = Env(tmp_path)
    try:
        s = env.session()
        fh = s.fs.open("big", os.O_RDWR)
        s.fs.write(fh, 5, b"a")                     # chunk 0
        s.fs.release(fh)
        s.live.wait_hashing()                       # (hashed after close: then it ends)
        s.close()
        s2 = env.session()                          # remount: the journal is reloaded
        fh = s2.fs.open("big", os.O_RDWR)
        sizes = chunk_hashes(monkeypatch)
        s2.fs.write(fh, CHUNK + 5, b"b")            # chunk 1, after the remount
        s2.fs.release(fh)                           # hashed from here, or by the commit
        child = s2.commit()
        assert sorted(sizes) == sorted([CHUNK, CHUNK, len(BASE["big"]) % CHUNK])
        out = tmp_path / "o"
        Dataset.get(child.id, repo=env.url).get_mutable_local_copy(out)
        assert (out / "big").read_bytes() == expected_big((5, b"a"), (CHUNK + 5, b"b"))

        # a file shortened and grown back is not its lower copy any more
        fh = s2.fs.open("big", os.O_RDWR)
        s2.fs.truncate("big", CHUNK // 2, fh)
        s2.fs.truncate("big", len(BASE["big"]), fh)
        s2.fs.release(fh)
        child2 = s2.commit()
        out2 = tmp_path / "o2"
        Dataset.get(child2.id, repo=env.url).get_mutable_local_copy(out2)
        want = expected_big((5, b"a"), (CHUNK + 5, b"b"))[:CHUNK // 2]
        assert (out2 / "big").read_bytes() == want + bytes(len(BASE["big"]) - len(want))
    finally:
        env.close()


# ---- large files hashed once their last writer closes them ------------------------------
def _upper_name(s, path):
    return os.path.basename(s.fs.view.lookup(path).upper)


def committed(env, child, path, tmp_path) -> bytes:
    """The bytes of `path` in the version `child`, as `get --copy` gives them."""
    out = tmp_path / f"out-{child.id}"
    Dataset.get(child.id, repo=env.url).get_mutable_local_copy(out)
    return (out / path).read_bytes()


def _write_file(s, path, data, offset=0, create=True):
    fh = s.fs.create(path, 0o644) if create else s.fs.open(path, os.O_RDWR)
    s.fs.write(fh, offset, data)
    return fh


def test_a_closed_large_file_is_hashed_once_and_the_commit_reads_it_no_more(
        tmp_path, monkeypatch):
    import hashlib
    from strata.catalog import blobs
    env = Env(tmp_path)
    try:
        s = env.session()
        data = os.urandom(3 * CHUNK + 5)
        fh = _write_file(s, "big2", data)
        name = _upper_name(s, "big2")
        assert s.live.hashed(name, len(data)) is None     # still open for writing
        s.fs.release(fh)
        s.live.wait_hashing()
        sha, chunks = s.live.hashed(name, len(data))
        assert sha == hashlib.sha256(data).hexdigest()
        assert chunks == b"".join(hashlib.sha256(data[i:i + CHUNK]).digest()
                                  for i in range(0, len(data), CHUNK))
        read = []
        real = blobs._hash
        monkeypatch.setattr(blobs, "_hash", lambda p, *a, **kw: read.append(p) or
                            real(p, *a, **kw))
        frozen = s.live
        child = s.commit()
        assert read == []
        frozen._thread.join(timeout=30)         # the committed generation's hasher ends
        assert not frozen._thread.is_alive()
        assert committed(env, child, "big2", tmp_path) == data
    finally:
        env.close()


def test_a_write_forgets_the_hash_before_the_bytes_change_also_after_a_crash(tmp_path):
    from strata.vfs.overlay import Overlay
    env = Env(tmp_path)
    try:
        s = env.session()
        data = os.urandom(2 * CHUNK)
        s.fs.release(_write_file(s, "big2", data))
        s.live.wait_hashing()
        name = _upper_name(s, "big2")
        assert s.live.hashed(name, len(data)) is not None
        s.live.begin_change(name)        # a write about to land (then the process dies)
        again = Overlay(s.live.folder)   # what a remount finds in the journal
        assert again.hashed(name, len(data)) is None
        again.close()
        s.live.end_change(name)
        # a write through a handle: forgotten at once, hashed again once closed
        fh = _write_file(s, "big2", b"NEW", offset=5, create=False)
        assert s.live.hashed(name, len(data)) is None
        s.fs.release(fh)
        s.live.wait_hashing()
        new = data[:5] + b"NEW" + data[8:]
        import hashlib
        assert s.live.hashed(name, len(data))[0] == hashlib.sha256(new).hexdigest()
        child = s.commit()
        assert committed(env, child, "big2", tmp_path) == new
    finally:
        env.close()


def test_a_change_while_the_file_is_hashed_is_not_recorded_as_hashed(tmp_path, monkeypatch):
    """A writer that opens the file while its hash is being computed makes that hash
    worthless: it is dropped, and the file is hashed again after that writer closes."""
    import hashlib
    from strata.vfs import overlay
    env = Env(tmp_path)
    try:
        s = env.session()
        data = os.urandom(2 * CHUNK + 1)
        real = overlay.hash_file
        calls = []

        def racing(path, *a, **kw):
            h = real(path, *a, **kw)
            if not calls:   # the first hash: the file changes before it is recorded
                s.fs.release(_write_file(s, "big2", b"LATE", offset=0, create=False))
            calls.append(h.sha256)
            return h
        monkeypatch.setattr(overlay, "hash_file", racing)
        s.fs.release(_write_file(s, "big2", data))
        s.live.wait_hashing()
        new = b"LATE" + data[4:]
        assert calls == [hashlib.sha256(data).hexdigest(), hashlib.sha256(new).hexdigest()]
        assert s.live.hashed(_upper_name(s, "big2"), len(data))[0] == calls[1]
        child = s.commit()
        assert committed(env, child, "big2", tmp_path) == new
    finally:
        env.close()


def test_a_file_removed_while_it_is_hashed_stops_its_hash(tmp_path, monkeypatch):
    """A large file written then deleted (a scratch file): its hash stops at the next
    chunk instead of reading the rest, and records nothing."""
    from strata.vfs import overlay
    env = Env(tmp_path)
    try:
        s = env.session()
        real = overlay.hash_file
        chunks_read = []

        def removing(path, *a, stop, **kw):
            def check():
                chunks_read.append(1)
                if len(chunks_read) == 2:
                    s.fs.unlink("scratch")   # removed while its second chunk is next
                return stop()
            return real(path, *a, stop=check, **kw)
        monkeypatch.setattr(overlay, "hash_file", removing)
        s.fs.release(_write_file(s, "scratch", os.urandom(6 * CHUNK)))
        s.live.wait_hashing()
        assert len(chunks_read) == 2            # not the six chunks
        assert s.live.db.execute("SELECT count(*) FROM hashed").fetchone()[0] == 0
        assert s.live.is_empty()
    finally:
        env.close()


def test_one_session_per_overlay_at_a_time(tmp_path):
    """Two mounts writing one journal would corrupt it: the second is refused in one
    line until the first ends (a crashed process releases it too: the lock is the
    kernel's)."""
    env = Env(tmp_path)
    try:
        s = env.session()
        with pytest.raises(MountError, match="in use by another writable mount"):
            env.session()
        other = env.session(name="other")           # another overlay is fine
        other.close()
        s.close()
        env.session().close()
    finally:
        env.close()
