"""kill -9 of `strata close` in the middle of an upload to S3, then `strata close` again:
the version is finished with every file present (ClearML silently loses files here), and
nothing was visible in between."""

import os
import signal
import subprocess
import sys
import time

from strata.catalog.repo import Repository


def strata(*args, env):
    return subprocess.run([sys.executable, "-m", "strata.cli.main", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_close_killed_mid_upload_then_rerun_finishes(tmp_path, s3_server, s3_url):
    env = dict(os.environ)
    Repository.open(s3_url, create=True, chunk_size=256 * 1024, pack_size=512 * 1024)
    src = tmp_path / "src"
    src.mkdir()
    files = {}
    for i in range(24):
        data = os.urandom(1024 * 1024 + i)
        (src / f"f{i:02}.bin").write_bytes(data)
        files[f"f{i:02}.bin"] = data
    made = strata("--repo", s3_url, "create", "--project", "p", "--name", "n", env=env)
    assert made.returncode == 0, made.stderr
    vid = made.stdout.strip().splitlines()[-1]
    assert strata("--repo", s3_url, "add", "--id", vid, "--files", str(src),
                  env=env).returncode == 0

    bucket, prefix = s3_url[5:].split("/", 1)
    client = s3_server.client()

    def blobs():
        pages = client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, Prefix=f"{prefix}/blobs/")
        return sum(len(p.get("Contents", [])) for p in pages)

    proc = subprocess.Popen([sys.executable, "-m", "strata.cli.main", "--repo", s3_url,
                             "close", "--id", vid], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while blobs() < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)   # polling an observable condition, bounded
    assert proc.poll() is None, "close finished before it could be interrupted"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = blobs()
    assert 10 <= partial < 24 * 4

    shown = strata("--repo", s3_url, "search", "--project", "p", "--json", env=env)
    assert shown.returncode == 0 and '"id"' not in shown.stdout   # nothing visible

    done = strata("--repo", s3_url, "close", "--id", vid, env=env)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    got = strata("--repo", s3_url, "get", "--id", vid, "--copy", str(out), env=env)
    assert got.returncode == 0, got.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    assert strata("--repo", s3_url, "verify", "--id", vid, env=env).returncode == 0
