"""Up to 64 samples a prompt (`rollout.n_samples` 1..64): the config's bound, the group code at n = 16 by
hand, and one short run of the embedded default at n = 16."""

import json
import math

import numpy as np
import pytest
import torch
from e2e_common import ROOT
from job_process import rollout_cli, run_args  # noqa: E402

from contracts.config import ConfigError
from contracts.config.load import load_config
from learner.estimators import grpo_advantages, rloo_advantages
from rollout.archive import read_table
from rollout.driver.dynamic_sampling import group_signal

N = 16


def test_n_samples_takes_1_to_64_and_refuses_65_naming_the_field():
    assert load_config(None, ["rollout.n_samples=64"]).rollout.n_samples == 64
    assert load_config(None, ["rollout.n_samples=1", "rollout.sampling.temperature=0"]).rollout.n_samples == 1
    with pytest.raises(ConfigError, match=r"rollout\.n_samples.*<= 64"):
        load_config(None, ["rollout.n_samples=65"])
    with pytest.raises(ConfigError, match=r"rollout\.n_samples.*>= 1"):
        load_config(None, ["rollout.n_samples=0"])


def test_group_estimators_at_16_samples_a_prompt_by_hand():
    # group 0: four 1s and twelve 0s; group 1: all 0.5 (no signal); group 2: 0..15
    rewards = torch.tensor([1.0] * 4 + [0.0] * 12 + [0.5] * N + [float(i) for i in range(N)])
    groups = torch.arange(3).repeat_interleave(N)
    grpo, rloo = grpo_advantages(rewards, groups), rloo_advantages(rewards, groups)
    # group 0: mean 1/4, unbiased variance (4·(3/4)² + 12·(1/4)²) / 15 = 3/15 = 1/5
    std0 = math.sqrt(1 / 5)
    assert grpo[0].item() == pytest.approx(0.75 / std0, abs=1e-5)
    assert grpo[4].item() == pytest.approx(-0.25 / std0, abs=1e-5)
    # rloo: r_i − mean of the other 15: 1 − 3/15, 0 − 4/15
    assert rloo[0].item() == pytest.approx(1 - 3 / 15)
    assert rloo[4].item() == pytest.approx(-4 / 15)
    assert grpo[N : 2 * N].abs().max().item() == 0 and rloo[N : 2 * N].abs().max().item() == 0
    # group 2: mean 7.5, unbiased variance 16·17/12 = 22.67; rloo: i − (120 − i)/15 = (16·i − 120)/15
    std2 = math.sqrt(N * (N + 1) / 12)
    assert grpo[2 * N + 15].item() == pytest.approx(7.5 / std2, abs=1e-5)
    assert rloo[2 * N + 15].item() == pytest.approx((16 * 15 - 120) / 15)
    for g in range(3):  # every group's advantages sum to 0
        assert grpo[groups == g].sum().item() == pytest.approx(0, abs=1e-9)
        assert rloo[groups == g].sum().item() == pytest.approx(0, abs=1e-9)
    # dynamic sampling keeps groups 0 and 2
    assert group_signal(rewards.numpy(), groups.numpy()).tolist() == [True, False, True]


def test_the_plan_says_when_a_prompts_samples_exceed_the_engine_batch():
    from rollout.offline.plan import make_plan

    wide = ["model.path=builtin:tiny-llama", "rollout.device=cpu", "learner.device=cpu", "rollout.n_samples=64"]
    text = "\n".join(make_plan(load_config(None, [*wide, "rollout.max_num_seqs=16"])).lines)
    assert "rollout.n_samples 64 exceeds the engine batch (16 sequences)" in text
    assert "exceeds the engine batch" not in "\n".join(make_plan(load_config(None, wide)).lines)


@pytest.mark.e2e
@pytest.mark.vllm
def test_the_embedded_default_runs_at_16_samples_a_prompt(tmp_path):
    out = tmp_path / "run"
    settings = (
        f"rollout.n_samples={N}",
        "iterations=2",
        "model.sft_warmup=false",
        "data.builtin_size=40",
        "rollout.prompts_per_iteration=4",
        "learner.ppo_epochs=1",
        "checkpoint_every=2",
    )
    rollout_cli(*run_args(out, *settings, config=ROOT / "configs" / "tiny-arith.yaml"))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1]
    table = read_table(out)
    assert table.num_rows == 2 * 4 * N
    keys = list(zip(table["iteration"].to_pylist(), table["prompt_id"].to_pylist()))
    _, counts = np.unique(np.array([f"{i}/{p}" for i, p in keys]), return_counts=True)
    assert counts.tolist() == [N] * 8
    assert sorted(set(table["sample_index"].to_pylist())) == list(range(N))
    stats = rollout_cli("stats", str(out))
    assert "samples" in stats.stdout
