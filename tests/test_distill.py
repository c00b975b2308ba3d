"""On-policy distillation (`learner.teacher`): the token reward by hand, the learner's teacher pass (one rank
and two), the teacher's path resolved, the config, and the console and summary without reward components."""

import msgspec
import numpy as np
import pytest
import torch
from test_learner import make_records

from contracts.config import ConfigError
from contracts.config.distill import TeacherConfig
from contracts.config.load import check, explain, load_config
from learner.distill import distill_rewards
from learner.learner import Learner
from learner.memory import QWEN25_05B, estimate
from learner.samples import SampleBatch
from rollout.driver.metrics import MetricsLog, summary_lines
from rollout.driver.teacher import teacher_model_path

CPU = ["learner.device=cpu", "learner.micro_batch_tokens=64", "learner.minibatch_size=32", "learner.ppo_epochs=1"]


def test_the_distillation_reward_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, 9.0, 9.0]])
    teacher = torch.tensor([[-1.5, -1.0, -0.5], [-2.1, -9.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    rewards, kl = distill_rewards(logprobs, teacher, mask, coef=0.5)
    # log π − log π_t: 0.5, −1, 0; 2 (the padding is 0 whatever it holds)
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [2.0, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.25, 0.5, 0.0], [-1.0, 0.0, 0.0]]))  # −0.5·kl


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_path, tmp_path_factory):
    """The tiny model with every weight nudged: a teacher whose logprobs differ from the policy's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    out = tmp_path_factory.mktemp("teacher")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_path).save_pretrained(out)
    return str(out)


def test_the_teacher_reward_is_added_to_the_token_rewards(tiny_model_path, teacher_dir):
    batch = SampleBatch.from_records(make_records(24, seed=3))
    with_teacher = load_config(None, [*CPU, f"learner.teacher={{path: {teacher_dir}, coef: 0.5}}"])
    plain = load_config(None, CPU)
    columns, stats, _ = Learner(with_teacher.learner, tiny_model_path, teacher_path=teacher_dir).learn(batch)
    base, base_stats, _ = Learner(plain.learner, tiny_model_path).learn(batch)
    # the teacher's logprobs of the same tokens: a learner whose policy is the teacher, its old logprobs
    teacher, _, _ = Learner(plain.learner, teacher_dir).learn(batch)
    reverse_kl = columns.old_logprobs - teacher.old_logprobs
    assert np.abs(reverse_kl).max() > 1e-3
    np.testing.assert_allclose(columns.token_rewards, base.token_rewards - 0.5 * reverse_kl, atol=1e-5)
    assert stats["distill/reverse_kl"] == pytest.approx(float(reverse_kl.mean()), abs=1e-5)
    assert "distill/reverse_kl" not in base_stats


def test_a_teacher_of_another_vocabulary_is_refused(tiny_model_path, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_path)
    config.vocab_size += 8
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    cfg = load_config(None, [*CPU, f"learner.teacher.path={tmp_path}"])
    with pytest.raises(ValueError, match="needs the policy's tokenizer"):
        Learner(cfg.learner, tiny_model_path, teacher_path=str(tmp_path))


def test_two_ranks_give_the_one_rank_distillation(local_ray, tiny_model_path, teacher_dir):
    from test_learner_ranks import exported

    from rollout.actors.learner_ranks import LearnerRanks
    from rollout.actors.learner_spec import LearnerSpec

    batch = SampleBatch.from_records(make_records(32, seed=5))
    results = []
    for ranks in (1, 2):
        cfg = load_config(
            None, [*CPU, "learner.lr=1e-4", f"learner.num_ranks={ranks}", f"learner.teacher.path={teacher_dir}"]
        )
        learners = LearnerRanks(LearnerSpec.of_job(cfg, tiny_model_path, teacher_dir), cfg.ray)
        try:
            columns, stats, _ = learners.learn_samples(batch)
            results.append((exported(learners), columns, stats))
        finally:
            learners.release()
    (w1, c1, s1), (w2, c2, s2) = results
    np.testing.assert_allclose(c2.token_rewards, c1.token_rewards, atol=1e-5)
    np.testing.assert_allclose(c2.advantages, c1.advantages, atol=1e-5)
    assert s2["distill/reverse_kl"] == pytest.approx(s1["distill/reverse_kl"], abs=1e-6)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def test_the_teacher_path_is_a_model_a_checkpoint_a_run_or_a_builtin(tiny_model_path, tmp_path):
    def resolved(path):
        return teacher_model_path(load_config(None, [f"learner.teacher.path={path}"]))

    assert teacher_model_path(load_config(None, [])) is None
    assert resolved(tiny_model_path) == tiny_model_path
    assert resolved("builtin:tiny-llama") == tiny_model_path
    # a checkpoint (learner.pt marks an old one whole) and a run whose `latest` names it
    checkpoint = tmp_path / "run" / "checkpoints" / "iter-000004"
    (checkpoint / "policy").mkdir(parents=True)
    (checkpoint / "policy" / "config.json").write_text("{}")
    (checkpoint / "learner.pt").write_bytes(b"")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("iter-000004")
    assert resolved(checkpoint) == str(checkpoint / "policy")
    assert resolved(tmp_path / "run") == str(checkpoint / "policy")
    (tmp_path / "empty-run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="learner.teacher.path: .*no whole checkpoint"):
        resolved(tmp_path / "empty-run")
    with pytest.raises(ConfigError, match="learner.teacher.path: .* does not exist"):
        resolved(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="neither a model directory"):
        resolved(tmp_path / "empty-run" / "checkpoints")


def test_no_reward_rules_are_allowed_with_a_teacher_only():
    check(load_config(None, ["reward.rules=[]", "learner.teacher.path=builtin:tiny-llama"]), cuda_available=False)
    with pytest.raises(ConfigError, match="no learner.teacher"):
        check(load_config(None, ["reward.rules=[]"]), cuda_available=False)
    with pytest.raises(ConfigError, match=r"learner\.teacher\.coef"):
        load_config(None, ["learner.teacher={path: x, coef: 0}"])
    (line,) = [line for line in explain() if line.startswith("learner.teacher ")]
    assert "distill/reverse_kl" in line
    # `--explain` prints an optional section as one line, so its fields' docs are checked here.
    assert all(f.type.extra_json_schema["description"] for f in msgspec.inspect.type_info(TeacherConfig).fields)


def test_the_teacher_is_counted_in_the_learner_memory():
    without = estimate(QWEN25_05B, num_ranks=2, micro_batch_tokens=4096)
    with_teacher = estimate(QWEN25_05B, num_ranks=2, micro_batch_tokens=4096, teacher_params=QWEN25_05B.params)
    assert without["teacher"] == 0
    assert with_teacher["teacher"] == pytest.approx(2 * QWEN25_05B.params / 2 / 2**30)  # bfloat16, halved
    assert with_teacher["total"] - without["total"] == pytest.approx(with_teacher["teacher"])


def test_the_console_and_summary_cope_with_no_reward_components():
    lines = [
        {"iteration": i, "reward_mean": 0.0, "distill/reverse_kl": 1.0 - 0.1 * i, "kl": 0.0, "tokens_per_s": 10.0}
        | {"response_length_mean": 4.0, "time/iteration": 1.0}
        for i in range(10)
    ]
    progress = MetricsLog.progress_line(lines[0], 9)
    assert "reward +0.000" in progress and "reverse_kl 1.000" in progress
    summary = "\n".join(summary_lines(lines))
    assert "distill/reverse_kl" in summary and "first fifth 0.950 -> last fifth 0.150" in summary


def test_replay_with_a_new_kl_coefficient_keeps_the_teachers_reward(tmp_path):
    from test_replay import fill_learner_columns, sample

    from rollout.archive import ArchiveWriter, read_table
    from rollout.offline.replay import ReplayOptions, replay

    gen = torch.Generator().manual_seed(0)
    records = [sample(0, f"p{i // 4}", i % 4, 1 + i % 5, float(i % 2), gen=gen) for i in range(8)]
    fill_learner_columns(records, kl_coef=0.05, estimator="k1", gamma=1.0, lam=0.95, gen=gen)
    distilled = [[-0.1 * (t + 1) for t in range(len(r.response_ids))] for r in records]  # −coef·reverse kl
    for r, d in zip(records, distilled):
        r.token_rewards = [x + y for x, y in zip(r.token_rewards, d)]
    metadata = {"run_id": "s", "gamma": "1.0", "lam": "0.95", "kl_coef": "0.05", "kl_estimator": "k1"}
    with ArchiveWriter(tmp_path / "run" / "rollouts", {**metadata, "distill_coef": "1.0"}, ["arithmetic"]) as w:
        w.write(records)
    replay(tmp_path / "run", tmp_path / "out", ReplayOptions(kl_coef=0.2))
    got = read_table(tmp_path / "out")["token_rewards"].to_pylist()
    for row, r, d in zip(got, records, distilled):
        want = [-0.2 * k + dt + (r.reward if t == len(d) - 1 else 0.0) for t, (k, dt) in enumerate(zip(r.kl, d))]
        assert row == pytest.approx(want, abs=1e-5)
