"""One learner step on the tiny model: alignment, filled columns, GAE consistency, checkpoints, SFT."""

import datetime as dt
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from learner.advantages import gae_reference
from learner.batch import collate
from learner.learner import Learner
from learner.sft import sft_batch, sft_examples, train_sft
from rollout.config import load_config
from rollout.formats import parse_prompt
from rollout.record import RolloutRecord


def make_records(n=24, seed=0, vocab=300):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, t = rng.randint(3, 9), rng.randint(0, 6)
        out.append(RolloutRecord(
            run_id="r", prompt_id=f"p{i}", iteration=0, policy_version=0, sample_index=0, prompt="", response="",
            prompt_ids=[1] + [rng.randint(6, vocab) for _ in range(p)],
            response_ids=[rng.randint(6, vocab) for _ in range(t)], response_logprobs=[-1.0] * t,
            finish_reason="stop", worker="w", generated_at=dt.datetime.now(dt.timezone.utc),
            reward=float(rng.random())))
    return out


@pytest.fixture
def cfg():
    return load_config(None, ["learner.minibatch_size=8", "learner.lr=1e-3", "learner.device=cpu",
                              "rollout.sampling.temperature=0.8"])


def test_padded_batch_scores_each_response_token_like_an_unpadded_forward(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    records = make_records(6)
    batch = collate(records, pad_id=model.config.pad_token_id)
    with torch.no_grad():
        logits = batch.response_slice(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                            position_ids=batch.position_ids).logits)
        for i, r in enumerate(records):
            if not r.response_ids:
                continue
            alone = model(input_ids=torch.tensor([r.prompt_ids + r.response_ids])).logits[0]
            expected = alone[len(r.prompt_ids) - 1:len(r.prompt_ids) - 1 + len(r.response_ids)]
            assert torch.allclose(logits[i, :len(r.response_ids)], expected, atol=1e-4)


@pytest.mark.parametrize("shared", [False, True])
def test_learn_fills_every_column_consistently_and_moves_the_policy(cfg, tiny_model_path, shared):
    cfg = load_config(None, ["learner.minibatch_size=8", "learner.lr=1e-3", "learner.device=cpu",
                             f"learner.shared_critic={str(shared).lower()}"])
    learner = Learner(cfg, tiny_model_path)
    before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
    records, stats, timings = learner.learn(make_records())
    assert learner.version == 1
    assert set(timings) == {"values", "advantages", "update"}
    for key in ("policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "kl", "kl_coef"):
        assert key in stats and stats[key] == stats[key], key
    for r in records:
        for column in ("ref_logprobs", "values", "token_rewards", "advantages", "returns"):
            assert len(getattr(r, column)) == len(r.response_ids), column
        if r.response_ids:
            rewards, values = torch.tensor([r.token_rewards]), torch.tensor([r.values])
            expected, _ = gae_reference(rewards, values, torch.ones_like(rewards), cfg.learner.gamma, cfg.learner.lam)
            assert torch.allclose(torch.tensor(r.returns) - values[0], expected[0], atol=1e-5)
            # The sequence score sits on the last token, on top of the KL penalty.
            assert abs(r.token_rewards[-1] - r.reward) < 1.0
    after = learner.policy.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    names = [n for n, _ in learner.export_weights()]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names


def test_checkpoint_round_trip_restores_weights_optimiser_and_state(cfg, tiny_model_path, tmp_path):
    learner = Learner(cfg, tiny_model_path)
    learner.learn(make_records())
    learner.save(tmp_path / "ckpt", {"iteration": 7, "sampler": {"epoch": 1, "position": 3}})
    fresh = Learner(cfg, tiny_model_path)
    extra = fresh.load(tmp_path / "ckpt")
    assert extra == {"iteration": 7, "sampler": {"epoch": 1, "position": 3}}
    assert fresh.version == learner.version
    for (name, a), (_, b) in zip(learner.export_weights(), fresh.export_weights()):
        assert torch.equal(a, b), name
    # Both continue identically: optimiser state and RNG came back too.
    torch.manual_seed(0)
    s1 = learner.learn(make_records(seed=1))[1]
    torch.manual_seed(0)
    s2 = fresh.learn(make_records(seed=1))[1]
    assert abs(s1["policy_loss"] - s2["policy_loss"]) < 1e-6


def test_sft_trains_on_completions_only_and_lowers_the_loss(tiny_model_path, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    records = [parse_prompt({"prompt": f"{a}+{b}=", "completion": str(a + b)}, "sft", f"t:{i}")
               for i, (a, b) in enumerate((a, b) for a in range(4) for b in range(4))]
    examples = sft_examples(records, tokenizer, 64)
    batch = sft_batch(examples[:2], tokenizer.pad_token_id)
    prompt, completion = examples[0]
    assert (batch["labels"][0, :len(prompt)] == -100).all()
    assert batch["labels"][0, len(prompt):len(prompt) + len(completion)].tolist() == completion
    assert completion[-1] == tokenizer.eos_token_id

    def loss(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        with torch.no_grad():
            return model(**sft_batch(examples, tokenizer.pad_token_id)).loss.item()

    out = train_sft(tiny_model_path, records, tmp_path / "sft", steps=30, lr=3e-3, batch_size=16,
                    max_prompt_tokens=64, log=open("/dev/null", "w"))
    assert loss(out) < 0.5 * loss(tiny_model_path)


def test_offline_training_from_an_archive_moves_the_policy(cfg, tiny_model_path, tmp_path):
    from safetensors.torch import load_file

    from learner.offline import train_offline
    from rollout.archive import ArchiveWriter

    records, _, _ = Learner(cfg, tiny_model_path).learn(make_records())
    with ArchiveWriter(tmp_path / "rollouts", {}) as archive:
        archive.write(records)
    out = train_offline(tmp_path / "rollouts", cfg, tmp_path / "policy", model=tiny_model_path,
                        log=open("/dev/null", "w"))
    before = load_file(f"{tiny_model_path}/model.safetensors")
    after = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "tokenizer.json").exists()


def test_offline_training_refuses_an_archive_without_learner_columns(cfg, tiny_model_path, tmp_path):
    from learner.offline import train_offline
    from rollout.archive import ArchiveWriter

    with ArchiveWriter(tmp_path / "rollouts", {}) as archive:
        archive.write(make_records(4))
    with pytest.raises(ValueError, match="needs the learner columns"):
        train_offline(tmp_path / "rollouts", cfg, tmp_path / "policy", model=tiny_model_path)
