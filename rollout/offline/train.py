"""PPO updates from an archive, off-policy: no generation, the stored samples are the batch.

The importance ratio's denominator is the stored behaviour logprob (`response_logprobs`, what
the engine sampled with), and advantages, returns and old values are the archive's own (as written
by the run, or by `rollout replay` with other settings). The policy starts from `model.path` or a
checkpoint's `policy/` directory and is saved, with its tokenizer, as a loadable model.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoTokenizer

from contracts.builtin_model import resolve_model_path
from contracts.config import JobConfig
from contracts.schema import from_record_batch
from learner.advantages import kl_penalty
from learner.evaluation import Evaluated
from learner.samples import SampleBatch
from rollout.actors.learner_spec import LearnerSpec
from rollout.archive import iter_batches

NEEDED = ("response_logprobs", "ref_logprobs", "values", "token_rewards", "advantages", "returns")


def train_offline(
    archive: str | Path, cfg: JobConfig, out: Path, *, model: str | None = None, epochs: int = 1, log=None
) -> Path:
    log = log or sys.stderr
    model_path = model or resolve_model_path(cfg.model.path)
    learner = LearnerSpec.of_job(cfg, model_path).build()
    for epoch in range(epochs):
        for batch in iter_batches(archive):
            records = from_record_batch(batch)
            missing = [c for c in NEEDED if any(getattr(r, c) is None for r in records)]
            if missing:
                raise ValueError(
                    f"{archive}: offline training needs the learner columns; {', '.join(missing)} "
                    "are null (a `rollout generate` archive? replay it with an estimator first)"
                )
            samples = SampleBatch.from_records(records)

            def column(name: str) -> torch.Tensor:
                return samples.padded(samples.flatten_column([getattr(r, name) for r in records])).to(learner.device)

            mask = samples.padded(torch.ones(len(samples.response_ids)).numpy()).to(learner.device)
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
            stats = learner.update(samples, evaluated, column("advantages"), column("returns"), kl)
            print(
                f"offline epoch {epoch + 1}/{epochs}, {len(records)} samples: policy loss "
                f"{stats['policy_loss']:+.4f}  clip frac {stats['clip_frac']:.3f}  approx kl {stats['approx_kl']:.4f}",
                file=log,
            )
    out.mkdir(parents=True, exist_ok=True)
    learner.policy.lm.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(out)
    return out
