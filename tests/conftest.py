import os
from pathlib import Path

import pytest

# Tests share one cache of built artefacts (the tiny model), inside the checkout unless set.
os.environ.setdefault("ROLLOUT_CACHE", str(Path(__file__).resolve().parents[1] / ".cache"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from contracts.builtin_model import build_tiny_llama

    return str(build_tiny_llama())


@pytest.fixture(scope="session")
def vllm_engine(tiny_model_path):
    """One in-process CPU engine for the whole session: vLLM sets up process-wide state on start."""
    pytest.importorskip("vllm")
    from contracts.config import RolloutConfig
    from rollout.generation.engine import VLLMEngine

    return VLLMEngine(tiny_model_path, RolloutConfig(device="cpu", max_model_len=128), seed=0)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (moto's standalone server) on a free local port, for the session; yields the
    environment a client needs (the standard AWS_* variables) with one bucket, `runs`, created."""
    import importlib.util
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    # Not imported here: moto's server brings flask, whose context proxies vLLM's kernel dispatcher
    # trips over when it walks the loaded modules (the in-process engine tests would then fail).
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto[server] is not installed (make setup installs it)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=2)
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise RuntimeError(f"moto's S3 server did not start on {endpoint}") from None
                time.sleep(0.2)
        env = {
            "AWS_ACCESS_KEY_ID": "test",
            "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": endpoint,
        }
        request = urllib.request.Request(f"{endpoint}/runs", method="PUT")  # S3's CreateBucket
        urllib.request.urlopen(request, timeout=10)
        yield env
    finally:
        server.kill()
        server.wait()
