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

    from s3_server import start_s3_server

    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto[server] is not installed (make setup installs it)")
    server, env = start_s3_server("runs")
    try:
        yield env
    finally:
        server.kill()
        server.wait()


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 4 CPUs for a module's tests (or the one already started)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
