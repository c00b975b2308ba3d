"""`eval`: held-out evaluation during training (and the defaults of `rollout eval`)."""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

from contracts.config.base import Base, doc
from contracts.config.reward import RuleSpec
from contracts.config.rollout import SamplingConfig


class EvalConfig(Base):
    prompts: Annotated[
        str | None,
        doc(
            "Held-out prompts, any source data.prompts takes (a file, a table, a directory or glob, hf:NAME[:SPLIT], "
            "reasoning_gym:, builtin:arith, read with the data section's format, keys and source_params; a builtin "
            "source is generated with seed + 1, so not the training draw). Null: no evaluation."
        ),
    ] = None
    every: Annotated[
        int,
        doc(
            "Iterations between evaluations: after iterations every-1, 2*every-1, ... (the weights those iterations' "
            "updates made); 0: only at the start and the end.",
            ge=0,
        ),
    ] = 10
    at_start: Annotated[
        bool, doc("Evaluate the weights before any update, on iteration 0's metrics line (a fresh run only).")
    ] = True
    at_end: Annotated[bool, doc("Evaluate the final weights, after the last iteration.")] = True
    max_prompts: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        doc("The first this many usable prompts of the source are evaluated; null: all of them."),
    ] = None
    n_samples: Annotated[
        int, doc("k: samples per prompt, from which eval/pass@k and eval/mean@k are computed.", ge=1, le=64)
    ] = 1
    sampling: Annotated[
        SamplingConfig | None,
        doc(
            "Sampling of the evaluation; null: the rollout's (rollout.sampling), at temperature 0 (greedy) when "
            "n_samples is 1."
        ),
    ] = None
    rules: Annotated[
        list[RuleSpec] | None,
        doc(
            "Rules that score the evaluation ({name, weight, params}, as reward.rules); null: the run's reward "
            "(its rules, model and server)."
        ),
    ] = None
    correct_threshold: Annotated[
        float, doc("A sample counts as correct (pass@k, mean@k) where its reward is at least this.")
    ] = 1.0


def eval_sampling(cfg: EvalConfig, rollout_sampling: SamplingConfig) -> SamplingConfig:
    """The evaluation's sampling: its own, else the rollout's, greedy when one sample per prompt."""
    import msgspec

    if cfg.sampling is not None:
        return cfg.sampling
    if cfg.n_samples == 1:
        return msgspec.structs.replace(rollout_sampling, temperature=0.0)
    return rollout_sampling
