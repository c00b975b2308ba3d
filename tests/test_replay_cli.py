"""`rollout replay` at the command line, and `--train` with the objective flags."""

import pytest
import torch
import yaml
from test_replay import fill_learner_columns, sample, synthetic_run, write_run

from rollout.archive import read_metadata, read_table
from rollout.cli import main


def test_cli_replay(tmp_path, capsys):
    run, _ = synthetic_run(tmp_path / "run", iterations=2)
    assert (
        main(
            ["replay", str(run / "rollouts"), "--out", str(tmp_path / "out"), "--gamma", "0.99", "--estimator", "rloo"]
        )
        == 0
    )
    assert "replayed 24 samples" in capsys.readouterr().err
    meta = read_metadata(tmp_path / "out")
    assert (meta["gamma"], meta["advantage_estimator"]) == ("0.99", "rloo")
    single = write_run(tmp_path / "single", [sample(0, "p", 0, 2, 1.0)])
    assert main(["replay", str(single), "--out", str(tmp_path / "o2"), "--estimator", "grpo"]) == 2
    assert "n > 1" in capsys.readouterr().err
    assert main(["replay", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o3")]) == 2
    assert "no archive here" in capsys.readouterr().err


def test_replay_trains_with_the_objective_flags(tmp_path, capsys, tiny_model_path):
    """grpo without the std, then --train with dynamic sampling and mask_truncated: the groups whose rewards
    are all the same and the truncated samples are left out (6 of 12 here, by hand)."""
    gen = torch.Generator().manual_seed(3)
    rewards = {"p0": [1, 1, 1, 1], "p1": [1, 0, 1, 0], "p2": [0, 0, 1, 1]}  # p0 carries no signal
    records = [sample(0, p, i, 3, float(r), gen=gen) for p, rs in rewards.items() for i, r in enumerate(rs)]
    records[4].finish_reason = records[11].finish_reason = "length"  # p1's first, p2's last: cut at max_tokens
    fill_learner_columns(records, kl_coef=0.05, estimator="k1", gamma=1.0, lam=0.95, gen=gen)
    run = write_run(tmp_path / "run", records)  # 7-row batches: p1 straddles two
    out = tmp_path / "out"
    training = ["--loss-agg-mode", "seq_mean_token_sum", "--clip-eps-high", "0.3", "--mask-truncated"]
    assert main(["replay", str(run), "--out", str(out), "--estimator", "grpo", *training]) == 2
    assert "--loss-agg-mode, --clip-eps-high, --mask-truncated set(s) how --train trains" in capsys.readouterr().err
    replay_args = ["replay", str(run), "--out", str(out), "--estimator", "grpo", "--no-grpo-normalize-std"]
    code = main([*replay_args, "--train", "--model", tiny_model_path, *training, "--dynamic-sampling"])
    assert code == 0
    err = capsys.readouterr().err
    assert "trained on 2 of 7 samples" in err and "trained on 4 of 5 samples" in err, err
    advantages = [row[-1] for row in read_table(out)["advantages"].to_pylist()]
    # reward minus the group's mean, not divided by its std
    assert advantages == pytest.approx([0.0] * 4 + [0.5, -0.5, 0.5, -0.5] + [-0.5, -0.5, 0.5, 0.5])
    assert yaml.safe_load(read_metadata(out)["config"])["learner"]["grpo_normalize_std"] is False
    assert (out / "policy" / "model.safetensors").exists()
