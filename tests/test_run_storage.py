"""Run storage against a real S3 API (moto's server): what is pushed, in what order, what a fresh
staging copy pulls, and the lease that keeps a second driver out."""

import json
import os
import platform
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from rollout.driver.run_storage import LEASE, RunStorage, RunStorageError, is_uri, staging_dir


@pytest.fixture
def s3(s3_server, monkeypatch):
    for name, value in s3_server.items():
        monkeypatch.setenv(name, value)
    return pafs.FileSystem.from_uri("s3://runs")[0]


def _uri(tmp_path):
    return f"s3://runs/{tmp_path.name}"


def _objects(s3, prefix):
    infos = s3.get_file_info(pafs.FileSelector(prefix, recursive=True, allow_not_found=True))
    return sorted(i.path[len(prefix) + 1 :] for i in infos if i.type == pafs.FileType.File)


def _read(s3, path):
    with s3.open_input_stream(path) as source:
        return source.read().decode()


def _staged_run(root):
    for name, text in {
        "run_id": "r1",
        "config.yaml": "iterations: 2\n",
        "manifest.json": "{}",
        "metrics.jsonl": "",
    }.items():
        (root / name).write_text(text)
    (root / "rollouts").mkdir()
    (root / "rollouts" / "part-00000.arrow").write_bytes(b"a" * 10)
    for name in ("iter-000001", "iter-000003"):
        (root / "checkpoints" / name / "policy").mkdir(parents=True)
        (root / "checkpoints" / name / "policy" / "model.safetensors").write_bytes(name.encode())
    (root / "checkpoints" / "latest").write_text("iter-000003")


def test_uris_and_local_paths_are_told_apart():
    assert is_uri("s3://bucket/run") and is_uri("gs://b/r") and is_uri("file:///tmp/run")
    assert not is_uri("runs/x") and not is_uri("/abs/run") and not is_uri("C:/x")


def test_a_checkpoint_is_pushed_with_its_archive_and_latest_and_pruned_ones_leave_the_bucket(s3, tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    _staged_run(staging)
    storage = RunStorage(_uri(tmp_path), staging)
    storage.take_lease()
    storage.push_checkpoint(staging / "checkpoints" / "iter-000001")
    storage.push_checkpoint(staging / "checkpoints" / "iter-000003")
    root = f"runs/{tmp_path.name}"
    assert _read(s3, f"{root}/checkpoints/latest") == "iter-000003"
    assert "rollouts/part-00000.arrow" in _objects(s3, root) and "manifest.json" in _objects(s3, root)
    # the staging copy prunes the older checkpoint: the next push removes it from the bucket too
    (staging / "rollouts" / "part-00000.arrow").write_bytes(b"a" * 20)  # the open archive file grew
    import shutil

    shutil.rmtree(staging / "checkpoints" / "iter-000001")
    storage.push_checkpoint(staging / "checkpoints" / "iter-000003")
    objects = _objects(s3, root)
    assert not any(o.startswith("checkpoints/iter-000001") for o in objects)
    assert "checkpoints/iter-000003/policy/model.safetensors" in objects
    assert len(_read(s3, f"{root}/rollouts/part-00000.arrow")) == 20
    storage.release()
    assert LEASE not in _objects(s3, root)

    # a fresh machine: its staging copy is pulled whole from the bucket
    fresh = RunStorage(_uri(tmp_path), tmp_path / "fresh")
    fresh.take_lease()
    fresh.pull(sys.stderr)
    assert (tmp_path / "fresh" / "checkpoints" / "latest").read_text() == "iter-000003"
    assert (tmp_path / "fresh" / "checkpoints" / "iter-000003" / "policy" / "model.safetensors").read_bytes() == (
        b"iter-000003"
    )
    assert (tmp_path / "fresh" / "rollouts" / "part-00000.arrow").stat().st_size == 20
    fresh.release()


def test_a_stale_staging_checkpoint_the_bucket_never_got_is_dropped_at_pull(s3, tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    _staged_run(staging)
    (staging / ".lock").write_text("")
    storage = RunStorage(_uri(tmp_path), staging)
    storage.take_lease()
    storage.push_checkpoint(staging / "checkpoints" / "iter-000001")
    storage.release()
    # iter-000003 is only in this staging copy (the bucket never got it); the bucket's `latest` wins
    again = RunStorage(_uri(tmp_path), staging)
    again.take_lease()
    (staging / "rollouts" / "part-00001.arrow").write_bytes(b"b")  # never pushed either
    again.pull(sys.stderr)
    assert not (staging / "checkpoints" / "iter-000003").exists()
    assert not (staging / "rollouts" / "part-00001.arrow").exists() and (staging / ".lock").exists()
    assert (staging / "checkpoints" / "latest").read_text() == "iter-000003"  # pushed with the first checkpoint
    again.release()


def test_a_second_driver_is_refused_while_a_live_one_holds_the_lease(s3, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lease = {"owner": {"host": platform.node(), "pid": holder.pid, "command": "rollout run"}, "expires": 4e9}
        with s3.open_output_stream(f"runs/{tmp_path.name}/{LEASE}") as sink:
            sink.write(json.dumps(lease).encode())
        with pytest.raises(RunStorageError, match=rf"in use by 'rollout run' \(pid {holder.pid}"):
            RunStorage(_uri(tmp_path), tmp_path / "staging").take_lease()
    finally:
        holder.kill()
        holder.wait()
    # its process gone (a crash), the lease is free at once on its own machine
    storage = RunStorage(_uri(tmp_path), tmp_path / "staging")
    storage.take_lease()
    assert json.loads(_read(s3, f"runs/{tmp_path.name}/{LEASE}"))["owner"]["pid"] == os.getpid()
    storage.release()


def test_a_missing_bucket_is_one_clear_error(s3, tmp_path):
    with pytest.raises(RunStorageError, match=r"--out s3://no-such-bucket/run: .*no-such-bucket"):
        RunStorage("s3://no-such-bucket/run", tmp_path / "staging")


def test_the_staging_copy_is_under_the_cache_and_named_by_the_uri(monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLOUT_CACHE", str(tmp_path))
    one, two = staging_dir("s3://b/run"), staging_dir("s3://b/run2")
    assert one.parent == tmp_path / "runs" and one != two and one.name.startswith("b-run-")
