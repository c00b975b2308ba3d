"""The job with its run on S3 (a real S3 API: moto's server): everything a run writes lands in the
bucket, and a driver with none of the run on its disk resumes from the bucket's newest checkpoint."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest

from rollout.driver.run_storage import staging_dir

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "tiny-arith-smoke.yaml")


def _run(env, uri, iterations):
    return subprocess.run(
        [sys.executable, "-m", "rollout", "run", "--config", SMOKE, "--out", uri, "--set", f"iterations={iterations}"]
        + ["--set", "checkpoint_every=2", "--set", "tracking.backends=[]"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_a_run_on_s3_lands_in_the_bucket_and_a_fresh_driver_resumes_from_it(s3_server, tmp_path):
    env = {**os.environ, **s3_server, "PYTHONUNBUFFERED": "1"}
    uri = f"s3://runs/{tmp_path.name}"
    first = _run(env, uri, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    assert f"run directory: {uri}" in first.stderr

    # A driver on another machine: none of the run on its disk, only the bucket.
    shutil.rmtree(staging_dir(uri))
    second = _run(env, uri, 4)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "pulled into" in second.stderr and "resuming from iter-000001" in second.stderr

    for name, value in s3_server.items():
        os.environ[name] = value  # pyarrow reads the endpoint and credentials from the environment
    s3, root = pafs.FileSystem.from_uri(uri)
    infos = s3.get_file_info(pafs.FileSelector(root, recursive=True))
    objects = {i.path[len(root) + 1 :] for i in infos if i.type == pafs.FileType.File}
    assert {"config.yaml", "manifest.json", "metrics.jsonl", "run_id", "checkpoints/latest"} <= objects
    assert "lease.json" not in objects  # released at the end
    assert any(o.startswith("logs/") for o in objects)
    with s3.open_input_stream(f"{root}/checkpoints/latest") as source:
        latest = source.read().decode()
    assert latest == "iter-000003" and f"checkpoints/{latest}/policy/model.safetensors" in objects

    tables = []
    for part in sorted(o for o in objects if o.startswith("rollouts/") and o.endswith(".arrow")):
        with s3.open_input_file(f"{root}/{part}") as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    table = pa.concat_tables(tables)
    counts = {c["values"]: c["counts"] for c in pc.value_counts(table["iteration"]).to_pylist()}
    assert counts == {0: 32, 1: 32, 2: 32, 3: 32}  # whole iterations, each once
    with s3.open_input_stream(f"{root}/manifest.json") as source:
        manifest = json.loads(source.read())
    assert manifest["starts"][1]["resumed_from"]["checkpoint"] == "iter-000001"
    assert manifest["iterations"][-1]["policy_version"] == 4
    with s3.open_input_stream(f"{root}/metrics.jsonl") as source:
        assert [json.loads(line)["iteration"] for line in source.read().decode().splitlines()] == [0, 1, 2, 3]
    shutil.rmtree(staging_dir(uri))
