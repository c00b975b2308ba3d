"""`learner`: the PPO update, its advantage estimator, policy loss and KL penalty."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, field

from contracts.config.base import Base, doc
from contracts.config.distill import TeacherConfig


class KLConfig(Base):
    coef: Annotated[float, doc("Initial KL penalty coefficient.", ge=0.0)] = 0.05
    estimator: Annotated[
        str,
        doc(
            "Per-token KL estimator, a name registered in learner/advantages.py: k1 = log p - log p_ref, "
            "k3 = (r - 1) - log r with r = p_ref / p."
        ),
    ] = "k1"
    target: Annotated[
        float | None, doc("Adaptive controller target KL per sequence; null keeps the coefficient fixed.")
    ] = None
    horizon: Annotated[int, doc("Adaptive controller horizon, in samples.", ge=1)] = 10000


class RolloutCorrectionConfig(Base):
    mode: Annotated[
        Literal["none", "token_tis", "sequence_tis", "token_mask", "sequence_mask"],
        doc(
            "How each token's loss is weighted by ρ = π_old / π_behaviour. `token_tis` (decoupled PPO, Hilton "
            "et al. 2022): min(ρ_t, upper). `sequence_tis`: the sequence's ratio Π_t ρ_t, capped at upper, on "
            "every token of it. `token_mask` (IcePop): tokens whose ρ_t is outside [lower, upper] carry no "
            "loss. `sequence_mask`: a sequence whose geometric-mean ratio exp(mean_t log ρ_t) is outside "
            "[lower, upper] carries none. Masked tokens still count in the loss's denominator. `none`: no "
            "weight. Metrics rollout_correction/capped_tokens, capped_sequences, masked_tokens or "
            "masked_sequences: the share capped or masked."
        ),
    ] = "token_tis"
    lower: Annotated[
        Annotated[float, Meta(gt=0.0, lt=1.0)] | None,
        doc("Lower bound of the mask modes' ratio, less than 1; null: 1 / upper. The TIS modes cap only above."),
    ] = None
    upper: Annotated[float, doc("Cap of the TIS modes and upper bound of the mask modes, more than 1.", gt=1.0)] = 2.0

    @property
    def lower_bound(self) -> float:
        return 1.0 / self.upper if self.lower is None else self.lower


# The attention and MLP projections of Llama, Qwen2/3 and Mistral: LoRA's usual targets.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraConfig(Base):
    rank: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        doc(
            "LoRA rank r: the policy trains only low-rank adapters W + B·A·alpha/r (A: r x in, B: out x r, B "
            "starting at 0) on target_modules, built with peft; the base weights stay frozen, the reference "
            "is the same model with the adapters off (no second copy), and engines and the checkpoint's "
            "policy/ get the merged weights. null: full fine-tuning."
        ),
    ] = None
    alpha: Annotated[float, doc("LoRA alpha: the adapters' update is scaled by alpha / rank.", gt=0.0)] = 16.0
    dropout: Annotated[
        float,
        doc(
            "Dropout on each adapter's input in the update's forward passes; the no-grad passes (old and "
            "reference logprobs, values, the post-sync probe) and the exported weights have none.",
            ge=0.0,
            lt=1.0,
        ),
    ] = 0.0
    target_modules: Annotated[
        list[str],
        doc(
            "Names (or name suffixes) of the linear layers inside the transformer blocks that get adapters; "
            "the default is the attention and MLP projections of Llama, Qwen and Mistral."
        ),
    ] = field(default_factory=lambda: list(LORA_TARGETS))
    critic: Annotated[
        Literal["full", "lora"],
        doc(
            "The separate critic (estimator gae, shared_critic false): `full` trains its whole backbone, "
            "`lora` adapters of the same shape on its frozen backbone (its value head is trained whole)."
        ),
    ] = "full"

    def __post_init__(self):
        # Raised here, msgspec reports it at load as `learner.lora: ...`, naming the section.
        if self.rank is None and self.critic == "lora":
            raise ValueError("critic is lora but rank is null (full fine-tuning): set a rank, or critic full")
        if not self.target_modules:
            raise ValueError("target_modules is empty: name the layers that get adapters")


class LearnerConfig(Base):
    device: Annotated[Literal["auto", "cpu", "cuda"], doc("Where the learner runs.")] = "auto"
    num_ranks: Annotated[
        int,
        doc(
            "Learner actors, one per GPU (or CPU process), joined by torch.distributed (NCCL on cuda, "
            "gloo on cpu) with policy, critic and reference sharded by FSDP2. Each rank computes a "
            "share of every pass; the update equals the one-rank update on the same samples.",
            ge=1,
        ),
    ] = 1
    num_cpus_per_rank: Annotated[float, doc("CPUs Ray reserves for each learner rank.", gt=0)] = 1.0
    num_threads: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        doc(
            "Torch threads of each rank on CPU. null: with rollout.max_staleness 0 the engines and reward "
            "workers are idle while the learner works, so the ranks share the node's cores between them; "
            "with generation running beside the learner, num_cpus_per_rank."
        ),
    ] = None
    micro_batch_tokens: Annotated[
        int,
        doc(
            "Token budget of one forward pass (padding included, unless pack_sequences): the no-grad "
            "passes (old and reference logprobs, values) and the training micro-batches (gradients "
            "accumulate up to minibatch_size samples) run in length-sorted pieces of at most this many tokens, so "
            "activation memory is bounded by it, not by the batch. A sample longer than the budget "
            "runs alone.",
            ge=1,
        ),
    ] = 8192
    pack_sequences: Annotated[
        bool,
        doc(
            "Run each micro-batch as one row of its sequences back to back, no padding, attention kept "
            "within each sequence (torch's varlen attention on CUDA, else flash-attn's; on CPU one SDPA call "
            "per group of similar lengths), and budget micro_batch_tokens in real tokens. false: padded, "
            "length-sorted rows. On CUDA without a varlen kernel, or in float32 there, micro-batches are "
            "padded with a warning. On by default: the same results (to 1e-5) without the padding's compute; "
            "on this project's 2-core CPU machine, tiny model, one thread, packed took 0.25-0.67x the padded "
            "seconds per iteration wherever lengths differ (64 to 2,048 samples, 4 to 512 tokens) and tied "
            "where all are equal (benchmarks/learner_packing.py)."
        ),
    ] = True
    max_restarts: Annotated[
        int,
        doc(
            "Times a learner group that lost a rank (its process died) is rebuilt from the newest checkpoint "
            "during a run; the updates since that checkpoint are redone on later iterations.",
            ge=0,
        ),
    ] = 3
    stall_timeout_s: Annotated[
        float,
        doc(
            "A learner rank that, while learning, finishes no micro-batch (or, in any call, does not answer) "
            "for this long is killed, and the group rebuilt from the newest checkpoint as after a death.",
            gt=0,
        ),
    ] = 120.0
    call_timeout_s: Annotated[
        float,
        doc(
            "Longest a learner call (a whole iteration's learning, a checkpoint) may take before the job "
            "fails naming the rank that did not answer.",
            gt=0,
        ),
    ] = 3600.0
    gradient_checkpointing: Annotated[
        bool,
        doc(
            "Recompute each layer's activations in the backward pass instead of keeping them: "
            "less memory per micro-batch, about a third more compute."
        ),
    ] = False
    estimator: Annotated[
        str,
        doc(
            "Advantage estimator, a name registered in learner/estimators.py. `gae` uses the critic; `grpo` "
            "and `rloo` compare each sample's KL-penalised return with the other samples of its prompt "
            "(rollout.n_samples >= 2) and `reinforce_pp` whitens the KL-penalised returns over the batch; "
            "those three build no critic (archived values are 0)."
        ),
    ] = "gae"
    grpo_normalize_std: Annotated[
        bool,
        doc(
            "GRPO divides each group's centred rewards by the group's standard deviation; false only centres "
            "them (Dr. GRPO: the division up-weights prompts whose samples barely differ)."
        ),
    ] = True
    lr: Annotated[float, doc("Policy learning rate.", gt=0)] = 1e-6
    critic_lr: Annotated[float, doc("Critic learning rate.", gt=0)] = 1e-5
    shared_critic: Annotated[
        bool, doc("Value head on the policy backbone (true) or a separate critic backbone (false).")
    ] = False
    ppo_epochs: Annotated[int, doc("Passes over each iteration's samples.", ge=1)] = 2
    minibatch_size: Annotated[int, doc("Samples per optimizer step.", ge=1)] = 64
    gamma: Annotated[float, doc("Discount factor of GAE.", ge=0.0, le=1.0)] = 1.0
    lam: Annotated[float, doc("GAE lambda.", ge=0.0, le=1.0)] = 0.95
    clip_eps: Annotated[
        float, doc("PPO policy ratio clip range: the ratio is clipped to [1 - clip_eps, 1 + clip_eps].", gt=0.0)
    ] = 0.2
    clip_eps_high: Annotated[
        Annotated[float, Meta(gt=0.0)] | None,
        doc(
            "Clip-higher (DAPO): the upper bound of the ratio clip is 1 + clip_eps_high, so tokens the policy "
            "starts to favour can keep rising and exploration stays alive (DAPO uses 0.28 with clip_eps 0.2). "
            "null: clip_eps, symmetric. The metrics clip_frac_high and clip_frac_low count each side."
        ),
    ] = None
    policy_loss: Annotated[
        str,
        doc(
            "Policy objective, a name registered in learner/losses.py. `ppo_clip`: PPO's clipped surrogate. "
            "`dual_clip`: the same, with the loss of a negative-advantage token bounded by dual_clip_c·|A|, so "
            "a ratio far above 1 + clip_eps (a sample from much older weights) cannot dominate a minibatch "
            "(Ye et al. 2020)."
        ),
    ] = "ppo_clip"
    dual_clip_c: Annotated[float, doc("The bound c of `dual_clip`, more than 1.", gt=1.0)] = 3.0
    old_logprobs: Annotated[
        Literal["recompute", "behaviour"],
        doc(
            "Where PPO's old logprobs (the ratio's denominator, and the KL penalty's policy side) come from. "
            "`recompute`: a no-grad pass of the policy before the update. `behaviour`: the engine's own "
            "logprobs of the tokens it sampled, which saves that pass; they come from the same weights only "
            "at rollout.max_staleness 0, and differ from the learner's by the engine's numerics (the "
            "iteration's behaviour_logprob_mismatch is then 0, and the entropy figure is not measured, "
            "as no pass computes it)."
        ),
    ] = "recompute"
    ratio_level: Annotated[
        Literal["token", "sequence"],
        doc(
            "The importance ratio the policy loss clips. `token`: each token's π / π_old (PPO). `sequence` "
            "(GSPO, Zheng et al. 2025): the sequence's length-normalised ratio s_i = exp(mean_t(log π - log "
            "π_old)) on every token of it, clipped at sequence level by clip_eps/clip_eps_high (GSPO's ranges "
            "are small: 3e-4 and 4e-4), each token's gradient s_i·∇log π_t (GSPO-token); a sequence-level "
            "advantage (grpo, rloo) makes it GSPO's. The metric clipped_sequences is the share of sequences "
            "clipped."
        ),
    ] = "token"
    rollout_correction: Annotated[
        RolloutCorrectionConfig,
        doc(
            "Correction for the engine sampling from π_behaviour (older weights with rollout.max_staleness > 0, "
            "and the engine's numerics always) while the loss is taken against the learner's π_old."
        ),
    ] = field(default_factory=RolloutCorrectionConfig)
    value_clip: Annotated[float, doc("Value prediction clip range around the old values.", gt=0.0)] = 0.2
    vf_coef: Annotated[float, doc("Value loss coefficient (shared critic).", ge=0.0)] = 0.5
    entropy_coef: Annotated[float, doc("Entropy bonus coefficient.", ge=0.0)] = 0.0
    max_grad_norm: Annotated[float, doc("Gradient clipping norm.", gt=0.0)] = 1.0
    max_nonfinite_steps: Annotated[
        int,
        doc(
            "Optimizer steps in a row whose loss or gradient norm is inf or NaN before the job fails naming "
            "the figure; each such step is skipped (no update) and counted in the metric skipped_steps.",
            ge=1,
        ),
    ] = 3
    whiten_advantages: Annotated[bool, doc("Normalise advantages over valid tokens.")] = True
    loss_agg_mode: Annotated[
        str,
        doc(
            "How the policy loss of a minibatch's tokens is reduced, a name registered in learner/losses.py. token_mean: Σ L / tokens (every token "
            "alike; long responses weigh more). seq_mean_token_sum: Σ_i (Σ_t L) / sequences. "
            "seq_mean_token_mean: Σ_i (Σ_t L / T_i) / sequences (every response alike). "
            "seq_mean_token_sum_norm: Σ_i (Σ_t L / loss_agg_norm_tokens) / sequences (Dr. GRPO)."
        ),
    ] = "token_mean"
    mask_truncated: Annotated[
        bool,
        doc(
            "Samples that hit rollout.sampling.max_tokens (finish_reason length) carry no loss: cut, their "
            "rewards judge an answer that was never finished (DAPO's over-long filtering). They still count "
            "in their group's baseline and are archived with trained false."
        ),
    ] = False
    loss_agg_norm_tokens: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        doc("The constant of seq_mean_token_sum_norm; null: rollout.sampling.max_tokens."),
    ] = None
    kl: Annotated[KLConfig, doc("KL penalty toward the reference model.")] = field(default_factory=KLConfig)
    lora: Annotated[LoraConfig, doc("Low-rank adapters instead of full fine-tuning.")] = field(
        default_factory=LoraConfig
    )
    teacher: Annotated[
        TeacherConfig | None,
        doc(
            "On-policy distillation {path, coef}: a frozen teacher (path: a model directory, a checkpoint, a "
            "run directory meaning its latest checkpoint's policy, or builtin:) scores the sampled tokens "
            "beside the reference (sharded alike), and −coef·(log π − log π_teacher) (coef default 1.0) is "
            "added to each token's reward (metric distill/reverse_kl); reward.rules may then be empty. null: "
            "no teacher."
        ),
    ] = None
