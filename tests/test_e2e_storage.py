"""The job with its run on S3 (a real S3 API: moto's server): everything a run writes lands in the
bucket, and a driver with none of the run on its disk resumes from the bucket's newest checkpoint."""

import json
import os
import re
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


def _free_port():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ray(*args, env, **kwargs):
    return subprocess.Popen([str(Path(sys.executable).parent / "ray"), *args], env=env, **kwargs)


@pytest.fixture
def two_nodes(s3_server, tmp_path):
    """A head with no CPUs (the driver's node: it hosts no actor) and a second node in a mount namespace
    of its own, a private tmpfs over ROLLOUT_CACHE: its processes see neither the driver's cache (the
    built and SFT-warmed models) nor its staging copy of the run."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to give the second node its own filesystem view")
    cache = os.environ["ROLLOUT_CACHE"]
    env = {**os.environ, **s3_server, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    head = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=0"]
        + ["--include-dashboard=false", "--node-ip-address=127.0.0.1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert head.returncode == 0, head.stderr[-2000:]
    joined = f"mount -t tmpfs tmpfs {cache} && exec ray start --address={address} --num-cpus=3 --block"
    node = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", joined],
        env={**env, "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"},
        stdout=open(tmp_path / "node2.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        joined_up = (
            "import ray, sys, time; ray.init(address=sys.argv[1]); deadline = time.time() + 120\n"
            "while ray.cluster_resources().get('CPU', 0) < 3 and time.time() < deadline: time.sleep(0.5)\n"
            "sys.exit(ray.cluster_resources().get('CPU', 0) < 3)"
        )
        waited = subprocess.run([sys.executable, "-c", joined_up, address], env=env, capture_output=True, timeout=180)
        assert waited.returncode == 0, (tmp_path / "node2.log").read_text()[-2000:]
        yield {**env, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1"}
    finally:
        os.killpg(node.pid, 9)
        node.wait()
        subprocess.run([str(Path(sys.executable).parent / "ray"), "stop", "--force"], env=env, capture_output=True)


def test_every_actor_on_a_node_that_cannot_see_the_drivers_disk_trains_and_resumes_through_the_bucket(
    two_nodes, s3_server, tmp_path
):
    uri = f"s3://runs/two-nodes-{tmp_path.name}"
    first = _run(two_nodes, uri, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    # the actors (stdout: Ray's stream of their output) loaded the SFT-warmed start model from the bucket
    assert re.search(r"models/sft-\w+: fetched .* from the run storage", first.stdout), first.stdout[-3000:]
    shutil.rmtree(staging_dir(uri))
    second = _run(two_nodes, uri, 4)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resuming from iter-000001" in second.stderr
    # the learner restored the checkpoint it published there, and the engine serves its policy
    assert re.search(r"checkpoints/iter-000001: fetched", second.stdout), second.stdout[-3000:]
    assert re.search(r"checkpoints/iter-000001/policy: fetched", second.stdout), second.stdout[-3000:]
    for name, value in s3_server.items():
        os.environ[name] = value
    s3, root = pafs.FileSystem.from_uri(uri)
    with s3.open_input_stream(f"{root}/manifest.json") as source:
        manifest = json.loads(source.read())
    assert manifest["starts"][1]["resumed_from"] == {"checkpoint": "iter-000001", "iteration": 1, "policy_version": 2}
    assert [it["policy_version"] for it in manifest["iterations"]] == [1, 2, 3, 4]
    objects = {i.path[len(root) + 1 :] for i in s3.get_file_info(pafs.FileSelector(root, recursive=True))}
    assert "checkpoints/iter-000003/learner.pt" in objects and not any(".partial" in o for o in objects)
    shutil.rmtree(staging_dir(uri))
