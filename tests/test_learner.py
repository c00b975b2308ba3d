"""One learner step on the tiny model: alignment, filled columns, GAE consistency, checkpoints, SFT."""

import datetime as dt
import random

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from contracts.config.load import load_config
from contracts.schema import RolloutRecord
from learner.advantages import gae_reference
from learner.learner import Learner
from learner.microbatch import plan
from learner.samples import SampleBatch


def make_records(n=24, seed=0, vocab=300):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p, t = rng.randint(3, 9), rng.randint(0, 6)
        out.append(
            RolloutRecord(
                run_id="r",
                prompt_id=f"p{i}",
                iteration=0,
                policy_version=0,
                sample_index=0,
                prompt="",
                response="",
                prompt_ids=[1] + [rng.randint(6, vocab) for _ in range(p)],
                response_ids=[rng.randint(6, vocab) for _ in range(t)],
                response_logprobs=[-1.0] * t,
                finish_reason="stop",
                worker="w",
                generated_at=dt.datetime.now(dt.timezone.utc),
                reward=float(rng.random()),
            )
        )
    return out


def learner_for(cfg, model_path):
    """A Learner with the job config's section and the few values of the others it takes."""
    return Learner(
        cfg.learner, model_path, dtype=cfg.model.dtype, temperature=cfg.rollout.sampling.temperature, seed=cfg.seed
    )


@pytest.fixture
def cfg():
    return load_config(
        None, ["learner.minibatch_size=8", "learner.lr=1e-3", "learner.device=cpu", "rollout.sampling.temperature=0.8"]
    )


def test_padded_batch_scores_each_response_token_like_an_unpadded_forward(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    records = make_records(6)
    batch = SampleBatch.from_records(records).collate(range(len(records)), pad_id=model.config.pad_token_id)
    with torch.no_grad():
        logits = batch.response_slice(
            model(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids
            ).logits
        )
        for i, r in enumerate(records):
            if not r.response_ids:
                continue
            alone = model(input_ids=torch.tensor([r.prompt_ids + r.response_ids])).logits[0]
            expected = alone[len(r.prompt_ids) - 1 : len(r.prompt_ids) - 1 + len(r.response_ids)]
            assert torch.allclose(logits[i, : len(r.response_ids)], expected, atol=1e-4)


def learn(learner, records):
    """One iteration as the job runs it: columns in, per-token columns back onto the records."""
    batch = SampleBatch.from_records(records)
    columns, stats, timings = learner.learn(batch)
    for name, rows in columns.rows(batch.response_offsets).items():
        if hasattr(records[0], name):
            for record, row in zip(records, rows):
                setattr(record, name, row)
    return records, stats, timings


@pytest.mark.parametrize("shared", [False, True])
def test_learn_fills_every_column_consistently_and_moves_the_policy(cfg, tiny_model_path, shared):
    cfg = load_config(
        None,
        [
            "learner.minibatch_size=8",
            "learner.lr=1e-3",
            "learner.device=cpu",
            f"learner.shared_critic={str(shared).lower()}",
        ],
    )
    learner = learner_for(cfg, tiny_model_path)
    assert [t.name for t in learner.trained] == (["policy"] if shared else ["policy", "critic"])
    before = {t.name: {k: v.clone() for k, v in t.model.state_dict().items()} for t in learner.trained}
    records, stats, timings = learn(learner, make_records())
    assert learner.version == 1
    assert set(timings) == {"values", "advantages", "update"}
    for key in ("policy_loss", "value_loss", "entropy", "clip_frac", "approx_kl", "kl", "kl_coef", "grad_norm"):
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
    for trained in learner.trained:  # every network with an optimizer has stepped
        after = trained.model.state_dict()
        assert any(not torch.equal(v, after[k]) for k, v in before[trained.name].items()), trained.name
    names = [n for n, _ in learner.export_weights()]
    assert "model.embed_tokens.weight" in names and "lm_head.weight" in names


def test_no_grad_passes_in_tiny_micro_batches_equal_the_whole_batch(tiny_model_path):
    records = make_records(40, seed=3)
    batch = SampleBatch.from_records(records)
    whole = Learner(
        load_config(None, ["learner.device=cpu", "learner.micro_batch_tokens=100000"]).learner, tiny_model_path
    )
    tiny = Learner(load_config(None, ["learner.device=cpu", "learner.micro_batch_tokens=24"]).learner, tiny_model_path)
    assert len(plan(np.arange(len(batch)), batch.prompt_lengths, batch.response_lengths, 24, 1)[0]) > 10
    a, b = whole.evaluate(batch), tiny.evaluate(batch)
    for name in ("old_logprobs", "ref_logprobs", "values", "entropy"):
        torch.testing.assert_close(getattr(b, name), getattr(a, name), atol=1e-6, rtol=1e-6, msg=name)


def test_micro_batched_update_equals_the_whole_minibatch_update(tiny_model_path):
    """Gradient accumulation over token-budget micro-batches gives the same step as one big pass.

    One optimizer step (Adam's first step is about lr·sign(g), so a wrongly weighted micro-batch flips
    signs and moves parameters by ~2·lr, while rounding noise stays far below 1e-5)."""
    records = make_records(32, seed=4)
    results = []
    for budget in (100000, 30):
        cfg = load_config(
            None,
            [
                "learner.device=cpu",
                "learner.minibatch_size=32",
                "learner.ppo_epochs=1",
                "learner.lr=1e-4",
                f"learner.micro_batch_tokens={budget}",
            ],
        )
        learner = learner_for(cfg, tiny_model_path)
        _, stats, _ = learner.learn(SampleBatch.from_records(records))
        results.append((dict(learner.export_weights()), stats))
    (w1, s1), (w2, s2) = results
    assert s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-5)
    assert s1["policy_loss"] == pytest.approx(s2["policy_loss"], rel=1e-4, abs=1e-7)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def test_gradient_checkpointing_gives_the_same_update(tiny_model_path):
    records = make_records(16, seed=8)
    results = []
    for checkpointing in ("false", "true"):
        cfg = load_config(
            None,
            [
                "learner.device=cpu",
                "learner.minibatch_size=16",
                "learner.ppo_epochs=1",
                "learner.lr=1e-4",
                f"learner.gradient_checkpointing={checkpointing}",
            ],
        )
        learner = learner_for(cfg, tiny_model_path)
        batch = SampleBatch.from_records(records)
        saved = []  # bytes autograd keeps for the backward pass of one policy forward

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            learner.policy(learner.collate(batch, np.arange(len(batch))), 1.0)
        _, stats, _ = learner.learn(batch)
        results.append((dict(learner.export_weights()), stats["grad_norm"], sum(saved)))
    (w1, g1, kept), (w2, g2, kept_checkpointed) = results
    assert kept_checkpointed < 0.6 * kept  # layers keep their inputs only, and recompute the rest
    assert g1 == pytest.approx(g2, rel=1e-5)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-6


def test_bfloat16_compute_keeps_float32_master_weights_that_move_like_float32(tiny_model_path):
    """Pure-bf16 AdamW at a small learning rate rounds most updates away; float32 masters keep them."""
    records = make_records(16, seed=9)
    moved = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(
            None,
            [
                "learner.device=cpu",
                "learner.minibatch_size=16",
                "learner.ppo_epochs=1",
                "learner.lr=1e-6",
                f"model.dtype={dtype}",
            ],
        )
        learner = learner_for(cfg, tiny_model_path)
        assert all(p.dtype == torch.float32 for p in learner.policy.parameters())
        assert all(p.dtype == getattr(torch, dtype) for p in learner.reference.parameters())
        before = {k: v.clone() for k, v in learner.policy.state_dict().items()}
        learner.learn(SampleBatch.from_records(records))
        after = learner.policy.state_dict()
        moved[dtype] = sum((after[k] - before[k]).abs().sum().item() for k in before)
        exported = dict(learner.export_weights())
        assert exported["lm_head.weight"].dtype == getattr(torch, dtype)  # the engines' dtype
    assert moved["bfloat16"] == pytest.approx(moved["float32"], rel=0.2)


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_build_no_critic_and_learn(tiny_model_path, estimator):
    records = make_records(24)
    for i, r in enumerate(records):
        r.prompt_id = f"p{i // 4}"  # groups of four samples
    cfg = load_config(
        None, ["learner.device=cpu", "learner.minibatch_size=8", "learner.lr=1e-3", f"learner.estimator={estimator}"]
    )
    learner = learner_for(cfg, tiny_model_path)
    assert learner.critic is None and learner.policy.value_head is None
    records, stats, _ = learn(learner, records)
    assert "value_loss" not in stats and stats["policy_loss"] == stats["policy_loss"]
    assert all(v == 0.0 for r in records for v in r.values)
    if estimator != "reinforce_pp":
        # One advantage per sample, on all its tokens; a group's advantages sum to about 0 for rloo.
        for r in records:
            assert len(set(r.advantages)) <= 1


def test_checkpoint_round_trip_restores_weights_optimiser_and_state(cfg, tiny_model_path, tmp_path):
    learner = learner_for(cfg, tiny_model_path)
    learn(learner, make_records())
    learner.save(tmp_path / "ckpt", {"iteration": 7, "sampler": {"epoch": 1, "position": 3}})
    assert (tmp_path / "ckpt" / "policy" / "model.safetensors").exists()
    fresh = learner_for(cfg, tiny_model_path)
    extra = fresh.load(tmp_path / "ckpt")
    assert extra == {"iteration": 7, "sampler": {"epoch": 1, "position": 3}}
    assert fresh.version == learner.version
    for (name, a), (_, b) in zip(learner.export_weights(), fresh.export_weights()):
        assert torch.equal(a, b), name
    # Both continue identically: optimiser state and the minibatch order came back too.
    s1 = learn(learner, make_records(seed=1))[1]
    s2 = learn(fresh, make_records(seed=1))[1]
    assert s1 == s2
    for (name, a), (_, b) in zip(learner.export_weights(), fresh.export_weights()):
        assert torch.equal(a, b), name
    # The saved policy directory is a loadable model with the learner's weights.
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "policy", dtype=torch.float32)
    assert saved.config.vocab_size == learner.policy.lm.config.vocab_size


def test_offline_training_from_an_archive_moves_the_policy(cfg, tiny_model_path, tmp_path):
    from safetensors.torch import load_file

    from rollout.archive import ArchiveWriter
    from rollout.offline.train import train_offline

    records, _, _ = learn(learner_for(cfg, tiny_model_path), make_records())
    with ArchiveWriter(tmp_path / "rollouts", {}, ("arithmetic",)) as archive:
        archive.write(records)
    out = train_offline(
        tmp_path / "rollouts", cfg, tmp_path / "policy", model=tiny_model_path, log=open("/dev/null", "w")
    )
    before = load_file(f"{tiny_model_path}/model.safetensors")
    after = load_file(str(out / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert (out / "tokenizer.json").exists()


def test_offline_training_refuses_an_archive_without_learner_columns(cfg, tiny_model_path, tmp_path):
    from rollout.archive import ArchiveWriter
    from rollout.offline.train import train_offline

    with ArchiveWriter(tmp_path / "rollouts", {}, ("arithmetic",)) as archive:
        archive.write(make_records(4))
    with pytest.raises(ValueError, match="needs the learner columns"):
        train_offline(tmp_path / "rollouts", cfg, tmp_path / "policy", model=tiny_model_path)


def test_behaviour_importance_weights_are_capped_and_scale_the_policy_gradient(tiny_model_path):
    """Samples from far older weights (behaviour logprobs far below the learner's) get weight = cap."""
    records = make_records(16, seed=10)
    for r in records:
        r.response_logprobs = [-50.0] * len(r.response_ids)
    norms = {}
    for mode in ("none", "token_tis"):
        cfg = load_config(
            None,
            [
                "learner.device=cpu",
                "learner.minibatch_size=16",
                "learner.ppo_epochs=1",
                "learner.shared_critic=false",
                f"learner.rollout_correction.mode={mode}",
            ],
        )
        _, stats, _ = learner_for(cfg, tiny_model_path).learn(SampleBatch.from_records(records))
        norms[mode] = stats["grad_norm"]
        assert stats["behaviour_logprob_mismatch"] > 40
    assert stats["rollout_correction/capped_tokens"] == 1.0
    assert norms["token_tis"] == pytest.approx(2 * norms["none"], rel=1e-4)


def poisoned(records, bad=float("nan")):
    """A reward model that returned NaN (or inf) for one sample: every advantage it touches is too."""
    records[0].reward = bad
    return records


def test_a_step_with_a_non_finite_loss_is_skipped_counted_and_leaves_the_weights(cfg, tiny_model_path):
    learner = learner_for(cfg, tiny_model_path)
    before = [t.clone() for _, t in learner.export_weights()]
    records, stats, _ = learn(learner, poisoned(make_records(8)))  # 8 samples, minibatch 8: 2 steps, both NaN
    assert stats["skipped_steps"] == 2 and learner.finite_steps.in_a_row == 2
    for a, (name, b) in zip(before, learner.export_weights()):
        assert torch.equal(a, b), name
    assert learner.weights_finite()
    # A finite batch steps again, and resets the count.
    records, stats, _ = learn(learner, make_records(8, seed=1))
    assert stats["skipped_steps"] == 0 and learner.finite_steps.in_a_row == 0
    assert any(not torch.equal(a, b) for a, (_, b) in zip(before, learner.export_weights()))


def test_max_nonfinite_steps_in_a_row_fail_naming_the_figure_and_nothing_non_finite_is_saved(tiny_model_path, tmp_path):
    from learner.checkpoint import NonFiniteError

    cfg = load_config(
        None,
        ["learner.minibatch_size=8", "learner.device=cpu", "learner.ppo_epochs=3", "learner.max_nonfinite_steps=3"],
    )
    learner = learner_for(cfg, tiny_model_path)
    with pytest.raises(NonFiniteError, match=r"3 optimizer steps in a row had a non-finite policy_loss \(nan\)"):
        learn(learner, poisoned(make_records(8), float("inf")))
    with torch.no_grad():
        next(learner.policy.parameters())[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="not writing checkpoint ckpt"):
        learner.save(tmp_path / "ckpt", {})
    assert not (tmp_path / "ckpt" / "policy").exists()


@pytest.mark.parametrize("shared", [False, True])
def test_behaviour_old_logprobs_skip_the_policy_pass_and_train_as_recomputed_ones_equal_to_them(
    tiny_model_path, shared
):
    """learner.old_logprobs behaviour: the engine's logprobs are the old ones. Where they equal what the
    policy's pass would give, the iteration is the same as with the pass, which runs only for a shared
    value head."""
    overrides = [
        "learner.minibatch_size=8",
        "learner.lr=1e-3",
        "learner.device=cpu",
        f"learner.shared_critic={str(shared).lower()}",
    ]
    records = make_records(16, seed=5)
    recompute = Learner(load_config(None, overrides).learner, tiny_model_path, seed=3)
    own = recompute.evaluate(SampleBatch.from_records(records))
    for i, r in enumerate(records):  # the engine's logprobs as the learner's own: what a faithful engine gives
        r.response_logprobs = own.old_logprobs[i, : len(r.response_ids)].tolist()
    behaviour = Learner(
        load_config(None, [*overrides, "learner.old_logprobs=behaviour"]).learner, tiny_model_path, seed=3
    )
    calls = []
    behaviour.policy.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    batch = SampleBatch.from_records(records)
    evaluated = behaviour.evaluate(batch)
    assert calls == ([False] * len(calls) if shared else [])  # the policy ran in evaluate only for its value head
    assert (evaluated.entropy is None) != shared
    columns, stats, _ = behaviour.learn(batch)
    reference_columns, reference_stats, _ = recompute.learn(SampleBatch.from_records(records))
    for name in ("old_logprobs", "ref_logprobs", "values", "advantages", "returns"):
        torch.testing.assert_close(
            getattr(columns, name), getattr(reference_columns, name), atol=1e-6, rtol=0, msg=name
        )
    assert ("entropy" in stats) == shared and stats["behaviour_logprob_mismatch"] < 1e-6
    for key in ("policy_loss", "value_loss", "clip_frac", "approx_kl", "kl", "grad_norm"):
        assert stats[key] == pytest.approx(reference_stats[key], abs=1e-6), key
    for (name, weight), (_, expected) in zip(behaviour.export_weights(), recompute.export_weights()):
        torch.testing.assert_close(weight, expected, atol=1e-6, rtol=0, msg=name)


def test_behaviour_old_logprobs_need_fresh_weights():
    from contracts.config import ConfigError
    from contracts.config.load import check

    check(load_config(None, ["learner.old_logprobs=behaviour"]), cuda_available=False)
    with pytest.raises(ConfigError, match="learner.old_logprobs behaviour .* rollout.max_staleness 0"):
        check(load_config(None, ["learner.old_logprobs=behaviour", "rollout.max_staleness=1"]), cuda_available=False)
