"""What the end-to-end test files share: the smoke config, the learner's columns, a sample's key, the GAE check."""

import socket
import sys
from pathlib import Path

import torch

from learner.advantages import gae_reference
from rollout.archive import read_metadata, read_table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # job_process: the one way the tests run a job

SMOKE = str(ROOT / "configs" / "tiny-arith-smoke.yaml")
LEARNER_COLUMNS = ("ref_logprobs", "values", "kl", "token_rewards", "advantages", "returns")


def keys(table):
    return list(zip(table["iteration"].to_pylist(), table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))


def assert_gae_consistent(out):
    table = read_table(out)
    meta = read_metadata(out)
    gamma, lam = float(meta["gamma"]), float(meta["lam"])
    for rewards, values, returns in zip(
        table["token_rewards"].to_pylist(), table["values"].to_pylist(), table["returns"].to_pylist()
    ):
        if not rewards:
            continue
        r, v = torch.tensor([rewards]), torch.tensor([values])
        expected, _ = gae_reference(r, v, torch.ones_like(r), gamma, lam)
        got = torch.tensor(returns) - torch.tensor(values)
        assert torch.allclose(got, expected[0], atol=1e-5), (got, expected)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
