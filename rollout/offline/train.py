"""PPO updates from an archive, off-policy: no generation, the stored samples are the batch.

The importance ratio's denominator is the stored behaviour logprob (`response_logprobs`, what
the engine sampled with), and advantages, returns and old values are the archive's own (as written
by the run, or by `rollout replay` with other settings). The policy starts from `model.path` or a
checkpoint's `policy/` directory and is saved, with its tokenizer, as a loadable model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from transformers import AutoTokenizer

from contracts.builtin_model import resolve_model_path
from contracts.config import JobConfig
from contracts.schema import from_record_batch
from learner.advantages import kl_penalty
from learner.evaluation import Evaluated
from learner.samples import SampleBatch
from rollout.actors.learner_spec import LearnerSpec
from rollout.archive import iter_batches, read_table
from rollout.driver.dynamic_sampling import group_signal

NEEDED = ("response_logprobs", "ref_logprobs", "values", "token_rewards", "advantages", "returns")


def train_offline(
    archive: str | Path, cfg: JobConfig, out: Path, *, model: str | None = None, epochs: int = 1, log=None
) -> Path:
    """PPO updates on `archive`'s batches with `cfg`'s learner settings (its loss aggregation, clip-higher,
    mask_truncated), leaving out, with rollout.dynamic_sampling on, the prompt groups whose rewards are
    all the same; the policy saved to `out`."""
    log = log or sys.stderr
    model_path = model or resolve_model_path(cfg.model.path)
    # No teacher loaded (learner.teacher): its reward is in the archive's token rewards, so in the advantages.
    learner = LearnerSpec.of_job(cfg, model_path).build()
    signal = _with_signal(archive) if cfg.rollout.dynamic_sampling.enabled else None
    for epoch in range(epochs):
        row = 0
        for batch in iter_batches(archive):
            records = from_record_batch(batch)
            missing = [c for c in NEEDED if any(getattr(r, c) is None for r in records)]
            if missing:
                raise ValueError(
                    f"{archive}: offline training needs the learner columns; {', '.join(missing)} "
                    "are null (a `rollout generate` archive? replay it with an estimator first)"
                )
            samples = SampleBatch.from_records(records)
            if signal is not None:
                samples.selected = signal[row : row + len(records)]
            row += len(records)
            stats = learner.update(samples, *_stored(samples, records, cfg, learner.device))
            print(
                f"offline epoch {epoch + 1}/{epochs}: trained on {stats['trained_samples']} of {len(records)} "
                + (
                    f"samples, policy loss {stats['policy_loss']:+.4f}  clip frac {stats['clip_frac']:.3f} "
                    f"(high {stats['clip_frac_high']:.3f}, low {stats['clip_frac_low']:.3f})  "
                    f"approx kl {stats['approx_kl']:.4f}  clipped sequences {stats['clipped_sequences']:.3f}"
                    if "policy_loss" in stats
                    else "samples"
                ),
                file=log,
            )
    out.mkdir(parents=True, exist_ok=True)
    learner.policy.lm.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out


def _with_signal(archive: str | Path) -> np.ndarray:
    """(N,) bool over the archive's rows: whether the row's prompt group (its iteration's samples of
    the prompt, wherever batches cut it) got rewards that differ, as dynamic sampling keeps them."""
    keys = read_table(archive, ["iteration", "prompt_id", "reward"])
    key = pc.binary_join_element_wise(pc.cast(keys["iteration"], pa.string()), keys["prompt_id"], "\x00")
    groups = pc.dictionary_encode(key).combine_chunks().indices.to_numpy().astype(np.int64)
    rewards = pc.fill_null(keys["reward"], float("nan")).to_numpy().astype(np.float64)
    return group_signal(rewards, groups)[groups]


def _stored(samples: SampleBatch, records, cfg: JobConfig, device) -> tuple:
    """The update's inputs from the archive's columns: (evaluated, advantages, returns, kl), over the model's
    tokens (an episode's environment tokens carry no loss)."""

    def column(name: str) -> torch.Tensor:
        return samples.padded(samples.flatten_column([getattr(r, name) for r in records])).to(device)

    model = samples.response_mask if samples.response_mask is not None else np.ones(len(samples.response_ids))
    mask = samples.padded(model.astype(np.float32)).to(device)
    behaviour, ref = column("response_logprobs"), column("ref_logprobs")
    evaluated = Evaluated(
        mask=mask,
        old_logprobs=behaviour,
        ref_logprobs=ref,
        values=column("values"),
        entropy=torch.zeros_like(mask),
        behaviour_logprobs=behaviour,
    )
    kl = kl_penalty(behaviour, ref, cfg.learner.kl.estimator) * mask
    return evaluated, column("advantages"), column("returns"), kl
