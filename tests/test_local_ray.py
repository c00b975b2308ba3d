"""Without ray.address or RAY_ADDRESS a run starts its own Ray, even beside a `ray start` cluster."""

import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

START_OWN = """
from contracts.config.load import load_config
from rollout.driver.startup import init_ray
import ray
init_ray(load_config(None, ["ray.num_cpus=2"]), learner=True)
print("GCS", ray.get_runtime_context().gcs_address)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_cluster_started_on_the_machine_does_not_capture_a_local_run():
    port = free_port()
    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # `ray start` leaves its address in Ray's temporary directory, where ray.init(address=None) finds it.
    subprocess.run(
        [
            ray_cli,
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=1",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    try:
        done = subprocess.run([sys.executable, "-c", START_OWN], capture_output=True, text=True, env=env, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        gcs = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("GCS ")]
        assert gcs and not gcs[0].endswith(f":{port}"), (gcs, port)
    finally:
        subprocess.run([ray_cli, "stop", "--force"], capture_output=True, env=env, timeout=120)
