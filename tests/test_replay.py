"""Offline replay: reproduction of a run's returns, new GAE settings, KL coefficient, re-scoring,
and the group-baseline estimators (GRPO, RLOO), on small synthetic archives built like a run's."""

import datetime as dt
import json
import math

import pytest
import torch
import yaml

from contracts.config import JobConfig
from contracts.config.load import to_yaml
from contracts.formats import record_id
from contracts.schema import RolloutRecord
from learner.advantages import gae, gae_reference, kl_penalty, token_rewards
from learner.estimators import broadcast, grpo_advantages, rloo_advantages
from rollout.archive import ArchiveWriter, read_metadata, read_table
from rollout.offline.replay import ReplayError, ReplayOptions, replay


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    """Ragged per-token lists -> (B, width) float tensor, zero-padded."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def unpad_rows(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """(B, T) tensor -> per-row lists of the valid (mask == 1) prefix."""
    lengths = mask.sum(dim=1).long().tolist()
    return [x[i, :n].tolist() for i, n in enumerate(lengths)]


T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def sample(iteration, prompt_id, index, response_len, reward, *, prompt="1+1=", response="2", gen=None):
    """An engine-side record: token ids and behaviour logprobs, scored, no learner columns yet."""
    logprobs = (-torch.rand(response_len, generator=gen) * 2).tolist()
    return RolloutRecord(
        run_id="synthetic",
        prompt_id=prompt_id,
        iteration=iteration,
        policy_version=iteration,
        sample_index=index,
        prompt=f"<s><|user|>{prompt}\n<|assistant|>",
        response=response,
        prompt_ids=[1, 2, 3],
        response_ids=list(range(5, 5 + response_len)),
        response_logprobs=logprobs,
        finish_reason="stop",
        worker="rollout-0",
        generated_at=T0 + dt.timedelta(seconds=iteration),
        reward=reward,
        reward_components={"arithmetic": reward},
    )


def fill_learner_columns(records, *, kl_coef, estimator, gamma, lam, gen):
    """What the learner does for one iteration: its own old logprobs (close to, not equal to, the
    behaviour ones), reference logprobs, values, KL-penalised token rewards, GAE."""
    width = max(1, max(len(r.response_ids) for r in records))
    mask = pad_rows([[1.0] * len(r.response_ids) for r in records], width)
    behaviour = pad_rows([r.response_logprobs for r in records], width)
    policy = behaviour + 0.01 * torch.randn(behaviour.shape, generator=gen)
    ref = behaviour + 0.2 * torch.randn(behaviour.shape, generator=gen)
    values = torch.randn(behaviour.shape, generator=gen)
    scores = torch.tensor([r.reward for r in records])
    rewards, kl = token_rewards(scores, policy * mask, ref * mask, mask, kl_coef, estimator)
    advantages, returns = gae(rewards, values * mask, mask, gamma, lam)
    columns = [unpad_rows(x, mask) for x in (ref, values, kl, rewards, advantages, returns)]
    for record, *row in zip(records, *columns):
        record.ref_logprobs, record.values, record.kl, record.token_rewards, record.advantages, record.returns = row
        record.kl_coef = kl_coef
    return unpad_rows(policy, mask)


def write_run(
    run_dir,
    records,
    *,
    gamma=1.0,
    lam=0.95,
    kl_coef=0.05,
    estimator="k1",
    batch_rows=7,
    prompts="builtin:arith",
    cfg=None,
):
    cfg = cfg or JobConfig()
    cfg.data.prompts = prompts
    metadata = {
        "run_id": "synthetic",
        "gamma": repr(gamma),
        "lam": repr(lam),
        "kl_coef": repr(kl_coef),
        "kl_estimator": estimator,
        "kl_target": "None",
        "temperature": "1.0",
        "model": "tiny",
        "config": to_yaml(cfg),
    }
    components = sorted({k for r in records for k in (r.reward_components or {})})
    with ArchiveWriter(run_dir / "rollouts", metadata, components, batch_rows=batch_rows) as writer:
        writer.write(records)
    return run_dir


def synthetic_run(run_dir, *, iterations=3, prompts=3, n=4, kl_coef=0.05, estimator="k1", gamma=1.0, lam=0.95):
    """A run's archive (rows cut into 7-row batches, so groups straddle batches, and an empty
    response in every iteration); also the learner's policy logprobs, which archives do not keep."""
    gen = torch.Generator().manual_seed(0)
    records, policy = [], []
    for it in range(iterations):
        lengths = torch.randint(1, 9, (prompts * n,), generator=gen).tolist()
        lengths[0] = 0  # an empty response: no token to carry its score
        scores = torch.randint(0, 2, (prompts * n,), generator=gen).float().tolist()
        batch = [sample(it, f"p{i // n}", i % n, lengths[i], scores[i], gen=gen) for i in range(prompts * n)]
        policy += fill_learner_columns(batch, kl_coef=kl_coef, estimator=estimator, gamma=gamma, lam=lam, gen=gen)
        records += batch
    return write_run(run_dir, records, gamma=gamma, lam=lam, kl_coef=kl_coef, estimator=estimator), policy


def padded(table, column):
    rows = table[column].to_pylist()
    width = max(1, max(len(r) for r in rows))
    return pad_rows(rows, width), pad_rows([[1.0] * len(r) for r in rows], width)


# --- GAE ------------------------------------------------------------------------------------------


def test_replay_with_the_runs_settings_reproduces_its_returns(tmp_path):
    run, _ = synthetic_run(tmp_path / "run", estimator="k3")
    report = replay(run, tmp_path / "out")
    source, replayed = read_table(run), read_table(tmp_path / "out")
    assert report.rows == source.num_rows == replayed.num_rows
    assert report.max_return_diff < 1e-5
    old, mask = padded(source, "returns")
    new, _ = padded(replayed, "returns")
    assert (new - old).abs().max() < 1e-5
    for column in ("response_ids", "reward", "reward_components", "token_rewards", "values", "prompt_id"):
        assert replayed[column].equals(source[column]), column
    meta = read_metadata(tmp_path / "out")
    assert meta["gamma"] == "1.0" and meta["lam"] == "0.95" and meta["advantage_estimator"] == "gae"
    assert meta["replayed_from"] == str(run.resolve())


def test_other_gamma_and_lambda_give_the_gae_of_the_stored_token_rewards(tmp_path):
    run, _ = synthetic_run(tmp_path / "run", lam=0.95)
    report = replay(run, tmp_path / "out", ReplayOptions(gamma=0.9, lam=0.5))
    source, replayed = read_table(run), read_table(tmp_path / "out")
    rewards, mask = padded(source, "token_rewards")
    values, _ = padded(source, "values")
    want_adv, want_ret = gae_reference(rewards, values, mask, 0.9, 0.5)
    got_adv, _ = padded(replayed, "advantages")
    got_ret, _ = padded(replayed, "returns")
    assert torch.allclose(got_adv, want_adv, atol=1e-5) and torch.allclose(got_ret, want_ret, atol=1e-5)
    assert report.max_return_diff > 0.01  # the settings changed the returns
    meta = read_metadata(tmp_path / "out")
    assert (meta["gamma"], meta["lam"]) == ("0.9", "0.5")
    config = yaml.safe_load(meta["config"])["learner"]
    assert (config["gamma"], config["lam"]) == (0.9, 0.5)


def test_reinforce_pp_gives_the_discounted_return_to_go_of_the_token_rewards(tmp_path):
    run, _ = synthetic_run(tmp_path / "run")
    replay(run, tmp_path / "out", ReplayOptions(estimator="reinforce_pp", gamma=0.9))
    source, replayed = read_table(run), read_table(tmp_path / "out")
    for rewards, returns, advantages in zip(
        source["token_rewards"].to_pylist(), replayed["returns"].to_pylist(), replayed["advantages"].to_pylist()
    ):
        want = [sum(r * 0.9**k for k, r in enumerate(rewards[t:])) for t in range(len(rewards))]
        assert returns == pytest.approx(want, abs=1e-5) and advantages == returns
    assert read_metadata(tmp_path / "out")["advantage_estimator"] == "reinforce_pp"


def test_a_new_kl_coefficient_rescales_the_learners_kl(tmp_path):
    run, policy = synthetic_run(tmp_path / "run", kl_coef=0.05)
    replay(run, tmp_path / "out", ReplayOptions(kl_coef=0.2))
    source, replayed = read_table(run), read_table(tmp_path / "out")
    # The learner's own policy logprobs are not archived; replay must still use its KL, not the behaviour one.
    width = max(1, max(len(r) for r in policy))
    mask = pad_rows([[1.0] * len(r) for r in policy], width)
    ref = pad_rows(source["ref_logprobs"].to_pylist(), width)
    scores = torch.tensor(source["reward"].to_pylist())
    want, _ = token_rewards(scores, pad_rows(policy, width), ref, mask, 0.2, "k1")
    got = pad_rows(replayed["token_rewards"].to_pylist(), width)
    assert (got - want).abs().max() < 1e-5
    values = pad_rows(source["values"].to_pylist(), width)
    _, want_returns = gae(want, values, mask, 1.0, 0.95)
    assert (pad_rows(replayed["returns"].to_pylist(), width) - want_returns).abs().max() < 1e-5
    meta = read_metadata(tmp_path / "out")
    assert meta["kl_coef"] == "0.2" and meta["kl_target"] == "None"


def test_a_v1_run_without_kl_penalty_gets_its_kl_from_the_behaviour_logprobs(tmp_path):
    """A v1 archive of a run at β = 0 reads with `kl` null (its token rewards hold none) and kl_coef 0."""
    gen = torch.Generator().manual_seed(0)
    records = [sample(0, f"p{i // 2}", i % 2, 1 + i % 5, float(i % 2), gen=gen) for i in range(8)]
    fill_learner_columns(records, kl_coef=0.0, estimator="k1", gamma=1.0, lam=0.95, gen=gen)
    for r in records:
        r.kl = None
    run = write_run(tmp_path / "run", records, kl_coef=0.0)
    with pytest.warns(UserWarning, match="behaviour"):
        replay(run, tmp_path / "out", ReplayOptions(kl_coef=0.1))
    source, replayed = read_table(run), read_table(tmp_path / "out")
    behaviour, mask = padded(source, "response_logprobs")
    ref, _ = padded(source, "ref_logprobs")
    stored, _ = padded(source, "token_rewards")
    got, _ = padded(replayed, "token_rewards")
    want = stored - 0.1 * kl_penalty(behaviour, ref, "k1") * mask
    assert (got - want).abs().max() < 1e-5


def test_gae_needs_the_learner_columns(tmp_path):
    records = [sample(0, "p0", k, 3, 1.0) for k in range(2)]
    run = write_run(tmp_path / "run", records)
    with pytest.raises(ReplayError, match="learner columns"):
        replay(run, tmp_path / "out")


def test_replay_refuses_an_output_that_already_holds_an_archive(tmp_path):
    run, _ = synthetic_run(tmp_path / "run", iterations=1)
    replay(run, tmp_path / "out")
    with pytest.raises(ReplayError, match="already holds"):
        replay(run, tmp_path / "out")
    with pytest.raises(ReplayError, match="own directory"):
        replay(run, run)


# --- group baselines ------------------------------------------------------------------------------


def test_grpo_and_rloo_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 2.0, 2.0, 3.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    # group 0: mean 0.5, unbiased std 0.5; group 1: all equal; group 2: mean 2, std √2
    want_grpo = [1.0, -1.0, 0.0, 0.0, 0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)]
    assert torch.allclose(grpo_advantages(rewards, groups), torch.tensor(want_grpo, dtype=torch.float64), atol=1e-5)
    # r_i minus the mean of the others: 1 − 0.25, 0 − 0.75, 0.5 − 0.5; 0; 3 − 1, 1 − 3
    want_rloo = [0.75, -0.75, 0.0, 0.0, 0.0, 2.0, -2.0]
    assert torch.allclose(rloo_advantages(rewards, groups), torch.tensor(want_rloo, dtype=torch.float64))
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]]).bool()
    assert broadcast(torch.tensor([2.0, 3.0]), mask).tolist() == [[2.0, 2.0, 0.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_group_estimators_need_more_than_one_sample_per_prompt(estimator, tmp_path):
    records = [sample(0, f"p{i}", 0, 2, 1.0) for i in range(3)]
    run = write_run(tmp_path / "run", records)
    with pytest.raises(ReplayError, match="n > 1"):
        replay(run, tmp_path / "out", ReplayOptions(estimator=estimator))
    with pytest.raises(ValueError, match="single sample"):
        grpo_advantages(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))


@pytest.mark.parametrize(
    "estimator, want",
    [
        ("grpo", [1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1 / math.sqrt(2), -1 / math.sqrt(2)]),
        ("rloo", [0.75, -0.75, 0.0, 0.0, 0.0, 0.0, 1.0, -1.0]),
    ],
)
def test_group_estimators_group_by_iteration_and_prompt_across_batches(estimator, want, tmp_path):
    rewards = [1.0, 0.0, 0.5, 2.0, 2.0, 2.0, 1.0, 0.0]
    keys = [(0, "a"), (0, "a"), (0, "a"), (0, "b"), (0, "b"), (0, "b"), (1, "a"), (1, "a")]
    lengths = [3, 1, 0, 2, 2, 4, 1, 2]
    records = [sample(it, pid, k, length, r) for k, ((it, pid), length, r) in enumerate(zip(keys, lengths, rewards))]
    run = write_run(tmp_path / "run", records, batch_rows=2)  # every group straddles a batch boundary
    replay(run, tmp_path / "out", ReplayOptions(estimator=estimator))
    out = read_table(tmp_path / "out")
    for row, length, expected in zip(out.to_pylist(), lengths, want):
        assert len(row["advantages"]) == length
        assert row["advantages"] == pytest.approx([expected] * length, abs=1e-5)
        assert row["returns"] == row["advantages"]
        assert row["token_rewards"] is None  # a generate-style archive has none to rebuild
    assert read_metadata(tmp_path / "out")["advantage_estimator"] == estimator


# --- re-scoring -----------------------------------------------------------------------------------


def two_prompts(tmp_path):
    """A prompt file of two problems with their reference answers: (its path, the records, their ids)."""
    data = [{"prompt": "2+3=", "completion": "5"}, {"prompt": "4+4=", "completion": "8"}]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(d) + "\n" for d in data))
    return prompts, data, [record_id(d) for d in data]


def test_rescoring_with_a_reward_config_changes_reward_and_components(tmp_path):
    prompts, data, ids = two_prompts(tmp_path)
    gen = torch.Generator().manual_seed(1)
    # Rewards as archived (all 0); responses right, wrong, and one from a prompt not in the file.
    records = [
        sample(0, ids[0], 0, 2, 0.0, prompt="2+3=", response="5", gen=gen),
        sample(0, ids[0], 1, 3, 0.0, prompt="2+3=", response="6", gen=gen),
        sample(0, ids[1], 0, 1, 0.0, prompt="4+4=", response="8", gen=gen),
        sample(0, "unknown", 0, 4, 0.0, prompt="1+2=", response="3", gen=gen),
    ]
    fill_learner_columns(records, kl_coef=0.1, estimator="k1", gamma=1.0, lam=0.95, gen=gen)
    run = write_run(tmp_path / "run", records, kl_coef=0.1)
    config = tmp_path / "reward.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "reward": {
                    "rules": [
                        {"name": "arithmetic", "weight": 1.0},
                        {"name": "similarity", "weight": 0.5},
                        {"name": "length", "weight": 1.0, "params": {"target": 0, "penalty_per_unit": 0.1}},
                        {"name": "overlong", "weight": 1.0, "params": {"max_tokens": 4, "buffer_tokens": 2}},
                    ]
                }
            }
        )
    )

    report = replay(run, tmp_path / "out", ReplayOptions(reward_config=config, prompts=str(prompts)))
    assert report.unmatched_prompts == 1
    source, out = read_table(run).to_pylist(), read_table(tmp_path / "out").to_pylist()
    components = [dict(r["reward_components"]) for r in out]
    assert [c["arithmetic"] for c in components] == [1.0, 0.0, 1.0, 1.0]  # the last from its prompt text
    assert [c["similarity"] for c in components[:3]] == [1.0, 0.0, 1.0]
    assert math.isnan(components[3]["similarity"])  # no reference: that component fails
    assert [c["length"] for c in components] == pytest.approx([-0.1, -0.1, -0.1, -0.1])
    assert [c["overlong"] for c in components] == [0.0, -0.5, 0.0, -1.0]  # 2, 3, 1, 4 response tokens
    assert [r["reward"] for r in out] == pytest.approx([1.4, -0.6, 1.4, -0.1])
    for old, new in zip(source, out):  # the KL part stays, the score on the last token moves
        want = list(old["token_rewards"])
        want[-1] += new["reward"] - old["reward"]
        assert new["token_rewards"] == pytest.approx(want, abs=1e-6)
    assert [f.name for f in read_table(tmp_path / "out").schema.field("reward_components").type] == [
        "arithmetic",
        "similarity",
        "length",
        "overlong",
    ]  # the re-scoring's own components
    meta = read_metadata(tmp_path / "out")
    rules = yaml.safe_load(meta["config"])["reward"]["rules"]
    assert [r["name"] for r in rules] == ["arithmetic", "similarity", "length", "overlong"]


@pytest.mark.parametrize("reward_to", ["all_segments", "last_segment"])
def test_rescoring_an_agent_run_keeps_what_its_agents_returned(reward_to, tmp_path):
    """An agent's own reward cannot be asked again offline: the archived `agent` component is kept, the
    rules score each episode on its last segment, and the episode's reward goes to the segments the run
    gave it to, also where an episode's segments straddle two archive batches."""
    prompts, data, ids = two_prompts(tmp_path)
    gen = torch.Generator().manual_seed(1)
    # (prompt, response, episode, segment, what the agent returned); batches of 2 rows cut episode "b" in two.
    rows = [
        (0, "5", "a", 0, 1.0),
        (1, "7", "b", 0, 0.5),
        (1, "8", "b", 1, 0.5),
        (0, "6", "c", 0, None),
    ]
    records = []
    for k, (p, response, episode, segment, agent) in enumerate(rows):
        record = sample(0, ids[p], k, 2, 0.0, prompt=data[p]["prompt"], response=response, gen=gen)
        record.episode_id, record.segment = episode, segment
        record.reward_components = {"agent": agent}
        records.append(record)
    fill_learner_columns(records, kl_coef=0.1, estimator="k1", gamma=1.0, lam=0.95, gen=gen)
    cfg = JobConfig()
    cfg.env.name = "openai_agent"
    cfg.env.params = {"agent": "agents:solve", "reward_to": reward_to}
    run = write_run(tmp_path / "run", records, kl_coef=0.1, batch_rows=2, cfg=cfg)
    config = tmp_path / "reward.yaml"
    config.write_text(yaml.safe_dump({"reward": {"rules": [{"name": "arithmetic", "weight": 2.0}]}}))

    replay(run, tmp_path / "out", ReplayOptions(reward_config=config, prompts=str(prompts)))
    out = read_table(tmp_path / "out").to_pylist()
    components = [r["reward_components"] for r in out]
    assert components[0] == {"arithmetic": 1.0, "agent": 1.0}
    assert components[2] == {"arithmetic": 1.0, "agent": 0.5}  # "8" is right
    assert components[3] == {"arithmetic": 0.0, "agent": None}  # the agent returned None: no component
    assert [r["reward"] for r in out[2:]] == pytest.approx([2.5, 0.0])
    if reward_to == "all_segments":  # the first segment scored on the last one's answer
        assert components[1] == components[2] and out[1]["reward"] == pytest.approx(2.5)
    else:
        assert components[1] == {"arithmetic": None, "agent": None} and out[1]["reward"] == 0.0


def test_a_reward_config_with_an_unknown_rule_is_a_clear_error(tmp_path):
    run, _ = synthetic_run(tmp_path / "run", iterations=1)
    config = tmp_path / "reward.yaml"
    config.write_text("reward:\n  rules:\n    - name: vibes\n")
    with pytest.raises(ReplayError, match="unknown reward rule 'vibes'"):
        replay(run, tmp_path / "out", ReplayOptions(reward_config=config))
