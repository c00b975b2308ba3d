"""The job with its run on S3 (a real S3 API: moto's server): everything a run writes lands in the
bucket, and a driver with none of the run on its disk resumes from the bucket's newest checkpoint."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest

from rollout.driver.run_storage import staging_dir

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

from e2e_common import free_port  # noqa: E402 - it puts benchmarks/ on the path
from job_process import RolloutProcess, logged_iterations, rollout_cli, run_args  # noqa: E402

SETTINGS = ("checkpoint_every=2", "tracking.backends=[]")


def _run(env, uri, iterations):
    return rollout_cli(*run_args(uri, f"iterations={iterations}", *SETTINGS), env=env, timeout=900, check=False)


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


RAY = str(Path(sys.executable).parent / "ray")


class Cluster:
    """A head with no CPUs (the driver's node: it hosts no actor) and worker nodes, each in a mount
    namespace of its own with a private tmpfs over ROLLOUT_CACHE: their processes see neither the
    driver's cache (the built and SFT-warmed models) nor its staging copy of the run."""

    def __init__(self, env, logs: Path):
        self.env, self.logs, self.nodes = env, logs, []
        self.node_cpus: dict[int, float] = {}  # by the node's process id
        self.address = f"127.0.0.1:{free_port()}"
        head = subprocess.run(
            [RAY, "start", "--head", f"--port={self.address.split(':')[1]}", "--num-cpus=0"]
            + ["--include-dashboard=false", "--node-ip-address=127.0.0.1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert head.returncode == 0, head.stderr[-2000:]
        self.job_env = {**env, "RAY_ADDRESS": self.address, "PYTHONUNBUFFERED": "1"}

    def add_node(self, cpus=3):
        """A node of its own filesystem view; returns once the cluster counts its CPUs."""
        before = self._cpus()
        joined = (
            f"mount -t tmpfs tmpfs {os.environ['ROLLOUT_CACHE']} && "
            f"exec {RAY} start --address={self.address} --num-cpus={cpus} --block"
        )
        log = open(self.logs / f"node{len(self.nodes) + 2}.log", "w")
        node = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", joined],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.nodes.append(node)
        self.node_cpus[node.pid] = cpus
        deadline = time.time() + 120
        while self._cpus() < before + cpus:
            assert time.time() < deadline and node.poll() is None, log.name
            time.sleep(1)
        return node

    def kill(self, node):
        """The node's raylet and every process on it, at once (as a lost machine)."""
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()

    def lose(self, node):
        """`kill`, then wait until the cluster no longer counts the node's CPUs: a node added before that
        would be counted against a total that still holds the dead one."""
        before = self._cpus()
        self.kill(node)
        deadline = time.time() + 120
        while self._cpus() > before - self.node_cpus[node.pid]:
            assert time.time() < deadline, "the cluster still counts a killed node's CPUs after 120 s"
            time.sleep(1)

    def _cpus(self) -> float:
        status = subprocess.run(
            [RAY, "status", f"--address={self.address}"], env=self.env, capture_output=True, text=True
        )
        used = re.search(r"([\d.]+)/([\d.]+) CPU", status.stdout)
        return float(used.group(2)) if used else 0.0

    def stop(self):
        for node in self.nodes:
            if node.poll() is None:
                self.kill(node)
        subprocess.run([RAY, "stop", "--force"], env=self.env, capture_output=True, timeout=120)


@pytest.fixture
def cluster(s3_server, tmp_path):
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to give each node its own filesystem view")
    env = {**os.environ, **s3_server, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}
    made = Cluster(env, tmp_path)
    try:
        made.add_node()
        yield made
    finally:
        made.stop()


def test_every_actor_on_a_node_that_cannot_see_the_drivers_disk_trains_and_resumes_through_the_bucket(
    cluster, s3_server, tmp_path
):
    uri = f"s3://runs/two-nodes-{tmp_path.name}"
    first = _run(cluster.job_env, uri, 2)
    assert first.returncode == 0, first.stderr[-3000:]
    # the actors (stdout: Ray's stream of their output) loaded the SFT-warmed start model from the bucket
    assert re.search(r"models/sft-\w+: fetched .* from the run storage", first.stdout), first.stdout[-3000:]
    shutil.rmtree(staging_dir(uri))
    second = _run(cluster.job_env, uri, 4)
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
    # the actors' logs, written on a node the driver cannot see, were shipped to the bucket
    assert {"logs/learner-0.log", "logs/rollout-0.log", "logs/reward-0.log"} <= objects, sorted(objects)
    shutil.rmtree(staging_dir(uri))


def test_the_node_holding_every_actor_lost_mid_run_and_a_new_one_added_the_run_ends_exact(cluster, s3_server, tmp_path):
    """All of the job's actors die with their node; on a fresh node (an empty disk too) the rollout and
    reward workers restart and the learner is rebuilt from the bucket's checkpoint: `iterations`
    updates, every iteration whole, no key twice."""
    uri = f"s3://runs/node-lost-{tmp_path.name}"
    metrics = staging_dir(uri) / "metrics.jsonl"
    # The cluster's processes are not the job's: it runs in the test's session, against the cluster's head.
    shutil.rmtree(staging_dir(uri), ignore_errors=True)  # a failed run's copy would count as logged iterations
    iterations = 16  # the node dies mid-run: on an idle machine this job's iterations take ~0.2 s each
    args = run_args(uri, f"iterations={iterations}", *SETTINGS)
    with RolloutProcess(args, tmp_path / "run.log", env=cluster.job_env, new_session=False) as job:
        job.wait_for(lambda: logged_iterations(metrics.parent) >= 3, "iteration 2 was logged")
        cluster.lose(cluster.nodes[0])
        cluster.add_node()
        assert job.wait(timeout=600) == 0, job.tail()
    text = (tmp_path / "run.log").read_text()
    assert "learner: a rank died in iteration" in text
    assert re.search(r"ray: node [\d.]+ \(id \w+\) was lost; its actors restart", text), text[-3000:]
    assert re.search(r"ray: node [\d.]+ \(id \w+\) joined", text)
    for name, value in s3_server.items():
        os.environ[name] = value
    s3, root = pafs.FileSystem.from_uri(uri)
    with s3.open_input_stream(f"{root}/manifest.json") as source:
        manifest = json.loads(source.read())
    assert manifest["iterations"][-1]["policy_version"] == iterations
    objects = sorted(
        i.path for i in s3.get_file_info(pafs.FileSelector(f"{root}/rollouts")) if i.path.endswith(".arrow")
    )
    tables = []
    for part in objects:
        with s3.open_input_file(part) as source:
            tables.append(pa.ipc.open_stream(source).read_all())
    table = pa.concat_tables(tables)
    keys = list(zip(*(table[c].to_pylist() for c in ("iteration", "prompt_id", "sample_index"))))
    assert len(set(keys)) == len(keys)  # no key twice
    counts = {c["values"]: c["counts"] for c in pc.value_counts(table["iteration"]).to_pylist()}
    assert sorted(counts) == list(range(len(counts))) and set(counts.values()) == {32}  # whole, no gap
    lost = sum(1 for it in manifest["iterations"] if it.get("update_lost"))
    assert len(counts) == iterations + lost
    shutil.rmtree(staging_dir(uri))
