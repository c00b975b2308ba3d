"""`rollout replay`: recompute a run's token rewards, advantages and returns offline, into a new archive.

What is recomputed, and from what:
- GAE with the run's own settings: the stored `token_rewards` and `values`, with γ/λ from the
  archive metadata (or --gamma/--lam). The learner built those token rewards from the KL between
  *its own* recomputed old-policy logprobs and the reference; the archive keeps only the engine's
  behaviour `response_logprobs`, which differ slightly, so a KL rebuilt from them would not give
  the run's numbers. Keeping the stored token rewards reproduces the stored returns exactly (to
  float32 rounding).
- --kl-coef or --reward-config change the token rewards: −β·kl_t plus the (new) score on the last
  token. With --kl-coef, β is the new coefficient and kl_t the learner's per-token KL (`kl`); with
  --reward-config alone, the KL part of the stored token rewards (r_t − [t last]·old score) is
  kept as it is. Where `kl` is null because the run's β was 0 (a v1 archive), kl_t is estimated
  from `response_logprobs` and `ref_logprobs` instead, with a warning. A run with a teacher
  (`learner.teacher`, metadata `distill_coef`) keeps its per-token distillation reward, which only the
  stored token rewards hold: r_t − [t last]·old score + (β_run − β)·kl_t.
- --reward-config FILE re-scores every sample with the rule functions of the file's `reward:`
  section (rules only: a reward model is not loaded). Rules read the sample's data record
  (reference answer, metadata), looked up by `prompt_id` in --prompts (a prompt file or
  `builtin:arith`), by default the run's own `data.prompts`; a sample without one is scored
  against its rendered prompt and no reference, so rules that need a reference fail that
  component (NaN), as they would in a run.
- --estimator grpo|rloo: critic-free advantages from the sequence rewards (`reward`, re-scored if
  asked) within each prompt group, i.e. all samples with the same iteration and `prompt_id`,
  broadcast over the response tokens; returns equal the advantages. `values` stay as stored;
  `token_rewards` are the (rebuilt) ones, null where the archive has none, so group estimators
  also work on `rollout generate` archives.
- --estimator reinforce_pp: the discounted return-to-go of the (rebuilt) token rewards, as the
  learner computes it (`learner.estimators`); an archive without token rewards gets the score on
  each row's last token.

Record batches stream from the source archive to the new one (`ArchiveWriter`), each one padded to
(batch, time) tensors from the Arrow list buffers, computed at once and cut back to lists: no loop
over tokens. Group estimators read the rewards of the whole archive first, since a batch boundary
can cut a prompt group.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO, cast

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import yaml

from contracts.config import ConfigError, LearnerConfig, RewardConfig
from contracts.schema import components_of
from learner.advantages import KL_ESTIMATORS, KLEstimator, last_token_mask
from learner.estimators import estimate, estimator
from rollout.archive import ArchiveWriter, archive_files, iter_batches, read_metadata, read_schema, read_table
from rollout.archive.metadata import learner_settings
from rollout.offline.ragged import floats, lengths_of, padded, ragged, required, required_column
from rollout.offline.rescore import ReplayError, Rescorer, Scores, reward_config, run_config
from rollout.offline.token_rewards import rebuilt_token_rewards, turn_rewards


@dataclass(frozen=True)
class ReplayOptions:
    """What to change; None keeps the run's own setting from the archive metadata."""

    gamma: float | None = None
    lam: float | None = None
    estimator: str = "gae"
    kl_coef: float | None = None
    reward_config: str | Path | None = None
    prompts: str | None = None
    grpo_normalize_std: bool | None = None  # grpo's division by the group's std


@dataclass(frozen=True)
class ReplayReport:
    rows: int
    out: Path
    max_return_diff: float | None  # max |new − stored| over the returns the source archive holds
    unmatched_prompts: int  # re-scored samples whose data record was not found


@dataclass(frozen=True)
class _Plan:
    gamma: float
    lam: float
    estimator: str
    kl_coef: float | None  # the new β, or None to keep each iteration's own
    kl_estimator: KLEstimator
    rescore: bool
    grpo_normalize_std: bool
    distilled: bool = False  # the run had learner.teacher: its token rewards hold the teacher's reward

    @property
    def settings(self) -> LearnerConfig:
        """The learner settings the estimator reads."""
        return LearnerConfig(
            estimator=self.estimator, gamma=self.gamma, lam=self.lam, grpo_normalize_std=self.grpo_normalize_std
        )


def replay(
    archive: str | Path, out: str | Path, options: ReplayOptions = ReplayOptions(), *, log: TextIO | None = None
) -> ReplayReport:
    """Replay `archive` (run dir, rollouts/ or a file) into `out`/rollouts; see the module docstring."""
    log = log or sys.stderr
    metadata = read_metadata(archive)
    plan = _plan(metadata, options)
    target = _check_out(archive, out)
    rescorer = Rescorer.open(options.reward_config, options.prompts, metadata, log) if plan.rescore else None
    schema = read_schema(archive)
    components = rescorer.components if rescorer else components_of(schema)
    scored = rescorer.columns(schema.names) if rescorer else ["reward", "reward_components"]
    batches = iter_batches(archive, scored)
    scores: Iterable[Scores] = rescorer.scores(batches) if rescorer else (_stored_scores(b) for b in batches)
    group_advantages = None
    if estimator(plan.estimator).grouped:
        scores = list(scores)  # scored once, used twice: for the group baselines, then per batch
        group_advantages = _group_advantages(archive, [reward for reward, _ in scores], plan)

    rows, max_diff = 0, None
    # Written under a temporary name and renamed when whole: a failed replay leaves no partial archive.
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with ArchiveWriter(partial, _new_metadata(metadata, plan, archive, options), components) as writer:
            for batch, batch_scores in zip(iter_batches(archive), scores):
                group = None if group_advantages is None else group_advantages[rows : rows + batch.num_rows]
                replayed, diff = _replay_batch(batch, batch_scores, plan, group, writer.schema)
                writer.write_batch(replayed)
                rows += batch.num_rows
                if diff is not None:
                    max_diff = diff if max_diff is None else max(max_diff, diff)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        if rescorer:
            rescorer.close()
    if target.exists():
        target.rmdir()  # empty: `_check_out` refused one that holds an archive
    os.replace(partial, target)
    return ReplayReport(rows, target, max_diff, rescorer.unmatched if rescorer else 0)


# --- settings ------------------------------------------------------------------------------------


def _plan(metadata: dict[str, str], options: ReplayOptions) -> _Plan:
    try:
        estimator(options.estimator)
    except ConfigError as e:
        raise ReplayError(str(e).replace("learner.estimator:", "--estimator", 1)) from None
    gamma = options.gamma if options.gamma is not None else _metadata_float(metadata, "gamma", "--gamma")
    lam = options.lam if options.lam is not None else _metadata_float(metadata, "lam", "--lam")
    for name, value in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= value <= 1.0:
            raise ReplayError(f"--{name} must lie in [0, 1], got {value}")
    if options.kl_coef is not None and options.kl_coef < 0:
        raise ReplayError(f"--kl-coef must be >= 0, got {options.kl_coef}")
    kl_estimator = metadata.get("kl_estimator", "k1")
    if kl_estimator not in KL_ESTIMATORS:
        raise ReplayError(f"the archive's kl_estimator {kl_estimator!r} is not one of {', '.join(KL_ESTIMATORS)}")
    return _Plan(
        gamma,
        lam,
        options.estimator,
        options.kl_coef,
        cast(KLEstimator, kl_estimator),
        rescore=options.reward_config is not None,
        grpo_normalize_std=_run_setting(metadata, options.grpo_normalize_std, "grpo_normalize_std"),
        distilled="distill_coef" in metadata,
    )


def _run_setting(metadata: dict[str, str], given: bool | None, name: str) -> bool:
    """`given`, or the run's own learner.`name` (its config in the metadata), or the default."""
    if given is not None:
        return given
    run = run_config(metadata)
    return getattr(run.learner if run is not None else LearnerConfig(), name)


def _metadata_float(metadata: dict[str, str], key: str, flag: str) -> float:
    try:
        return float(metadata[key])
    except (KeyError, ValueError):
        raise ReplayError(f"the archive metadata has no usable {key!r} ({metadata.get(key)!r}); pass {flag}") from None


def _check_out(archive: str | Path, out: str | Path) -> Path:
    target = Path(out) / "rollouts"
    source = archive_files(archive)[0].parent.resolve()
    if target.resolve() == source:
        raise ReplayError(f"--out {out} is the source archive's own directory; choose another")
    if any(target.glob("part-*.arrow")):
        raise ReplayError(f"{target} already holds an archive; replay into an empty directory")
    return target


def _new_metadata(metadata: dict[str, str], plan: _Plan, archive: str | Path, options: ReplayOptions) -> dict[str, str]:
    new = {k: v for k, v in metadata.items() if k != "schema_version"}
    settings = learner_settings(plan.gamma, plan.lam, plan.kl_coef, plan.kl_estimator, kl_target=None)
    new.update(settings, advantage_estimator=plan.estimator, replayed_from=str(Path(archive).resolve()))
    if plan.rescore:
        new["reward_config"] = str(Path(options.reward_config).resolve())
    if "config" in new:
        new["config"] = _updated_config(
            new["config"], plan, reward_config(options.reward_config, run_config(metadata)) if plan.rescore else None
        )
    return new


def _updated_config(text: str, plan: _Plan, reward: RewardConfig | None) -> str:
    """The run's config YAML with the replay's settings in place of the run's."""
    tree = yaml.safe_load(text) or {}
    learner = tree.setdefault("learner", {})
    learner.update(gamma=plan.gamma, lam=plan.lam, grpo_normalize_std=plan.grpo_normalize_std)
    if plan.kl_coef is not None:
        learner.setdefault("kl", {}).update(coef=plan.kl_coef, target=None)
    if reward is not None:
        tree["reward"] = msgspec.to_builtins(reward)
    return yaml.safe_dump(tree, sort_keys=False)


# --- one batch -----------------------------------------------------------------------------------


def _replay_batch(
    batch: pa.RecordBatch, scores: Scores, plan: _Plan, group_advantages: np.ndarray | None, schema: pa.Schema
) -> tuple[pa.RecordBatch, float | None]:
    """The batch with new reward, token rewards, advantages and returns; and max |Δ returns|."""
    lengths = lengths_of(batch.column("response_ids"))
    width = max(1, int(lengths.max(initial=0)))
    mask = torch.arange(width) < torch.from_numpy(lengths).unsqueeze(1)  # (B, T)
    model = mask & (padded(batch.column("response_mask"), width) > 0)  # the model's tokens, not an environment's
    reward, components = scores
    rewards = rebuilt_token_rewards(batch, reward, plan, lengths, model)
    entry = estimator(plan.estimator)
    if entry.grouped:
        advantages = torch.where(model, torch.from_numpy(group_advantages).float().unsqueeze(1), 0)
        returns = advantages
    else:
        values = padded(required(batch, "values", lengths), width) if entry.needs_critic else None
        if rewards is None:  # no stored token rewards and no KL to rebuild them: the score on the last token
            score = torch.from_numpy(floats(reward, "reward")).unsqueeze(1)
            token_rewards = torch.where(last_token_mask(model), score, 0) + turn_rewards(batch, width)
        else:
            token_rewards = rewards
        # An episode's environment tokens are holes in `model`: the estimator runs over the model's tokens.
        advantages, returns = estimate(token_rewards, values, model, None, plan.settings)
    columns = {name: batch.column(name) for name in schema.names}
    columns.update(
        reward=reward,
        reward_components=components,
        token_rewards=ragged(rewards, mask) if rewards is not None else batch.column("token_rewards"),
        advantages=ragged(advantages, mask),
        returns=ragged(returns, mask),
    )
    if plan.kl_coef is not None:
        columns["kl_coef"] = pa.array(np.full(batch.num_rows, plan.kl_coef, dtype=np.float32))
    replayed = pa.RecordBatch.from_arrays([columns[n] for n in schema.names], schema=schema.remove_metadata())
    return replayed, _max_diff(batch.column("returns"), returns, lengths, mask)


def _max_diff(stored: pa.Array, returns: torch.Tensor, lengths: np.ndarray, mask: torch.Tensor) -> float | None:
    if stored.null_count:
        return None
    old = padded(required_column(stored, "returns", lengths), mask.shape[1])
    return float(torch.where(mask, (returns - old).abs(), 0).max()) if mask.any() else 0.0


# --- scores --------------------------------------------------------------------------------------


def _stored_scores(batch: pa.RecordBatch) -> Scores:
    return batch.column("reward"), batch.column("reward_components")


def _group_advantages(archive: str | Path, rewards: list[pa.Array], plan: _Plan) -> np.ndarray:
    """(N,) sequence advantages over the whole archive, grouped by (iteration, prompt_id): the estimator
    runs on every sample at once, each return (the reward, plus an episode's turn rewards) a one-token row."""
    keys = read_table(archive, ["iteration", "prompt_id", "turn_rewards"])
    reward = pa.chunked_array(rewards, type=pa.float32())
    if reward.null_count:
        raise ReplayError(f"{reward.null_count} samples have no reward: score them (--reward-config) first")
    # One string key per (iteration, prompt_id) pair; its dictionary index is the group number.
    joined = pc.binary_join_element_wise(keys["iteration"].cast(pa.string()), keys["prompt_id"], "\x1f")
    groups = pc.dictionary_encode(joined).combine_chunks().indices.to_numpy().astype(np.int64)
    turns = pc.list_value_length(keys["turn_rewards"]).to_numpy()
    turn_sums = np.zeros(len(turns), dtype=np.float32)
    if turns.sum():
        rows = np.repeat(np.arange(len(turns)), turns)
        np.add.at(turn_sums, rows, pc.list_flatten(keys["turn_rewards"]).to_numpy().astype(np.float32))
    sequence_rewards = torch.from_numpy(floats(reward, "reward") + turn_sums).unsqueeze(1)  # (N, 1)
    one_token = torch.ones_like(sequence_rewards, dtype=torch.bool)
    try:
        advantages, _ = estimator(plan.estimator).fn(
            sequence_rewards, None, one_token, torch.from_numpy(groups), plan.settings
        )
    except ValueError as e:
        raise ReplayError(f"--estimator {plan.estimator}: {e}") from None
    return advantages[:, 0].numpy()
