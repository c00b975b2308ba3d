"""Re-scoring for `rollout replay --reward-config`: archived samples scored again through the job's own
`RewardWorker`, each matched to its data record (reference answer) by prompt id."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import msgspec
import pyarrow as pa
import yaml

from contracts.config import ConfigError, JobConfig, RewardConfig
from contracts.config.load import load_config
from contracts.errors import UserError
from contracts.formats import Message, PromptRecord

Scores = tuple[pa.Array, pa.Array]  # per batch: reward (float32), reward_components (struct)


class ReplayError(UserError, ValueError):
    """The archive or the options do not allow this replay; the message says why and what to change."""


class Rescorer:
    """Scores archived samples again, as the job's reward workers do, with the rules of a reward config."""

    def __init__(self, cfg: RewardConfig, prompts: dict[str, PromptRecord]):
        from reward.worker import RewardWorker

        if cfg.model is not None:
            raise ReplayError(
                "re-scoring with a reward model is not supported by replay (rules only); "
                "remove reward.model from the reward config"
            )
        try:
            self.worker = RewardWorker(cfg, name="replay")
        except ValueError as e:
            raise ReplayError(f"reward config: {e}") from None
        self.prompts = prompts
        self.components = self.worker.components
        self.unmatched = 0

    def columns(self, archived: list[str]) -> list[str]:
        """The archive's columns a batch needs to be scored: an episode's final turn where the archive
        has one (the part scored), its token ids where a rule counts them."""
        wanted = [
            "prompt_id",
            "prompt",
            "response",
            "final_turn",
            "response_ids" if self.worker.counts_tokens else "",
        ]
        return [name for name in wanted if name in archived]

    def __call__(self, batch: pa.RecordBatch) -> Scores:
        records = []
        for prompt_id, rendered in zip(batch.column("prompt_id").to_pylist(), batch.column("prompt").to_pylist()):
            record = self.prompts.get(prompt_id)
            if record is None:  # the rules read the archived prompt; a reference answer is missing
                self.unmatched += 1
                record = PromptRecord(prompt_id, [Message("user", rendered)], None, {}, "archive")
            records.append(record)
        rewards, _ = self.worker.score_batch(batch, records)
        return rewards.column("reward"), rewards.column("reward_components")

    @classmethod
    def open(cls, config: str | Path, prompts: str | None, metadata: dict[str, str], log: TextIO) -> Rescorer:
        """From the reward config file `config` and the data records of `prompts` (by default the run's)."""
        return cls(reward_config(config, run_config(metadata)), load_prompt_records(prompts, metadata, log))

    def close(self) -> None:
        self.worker.close()


def reward_config(path: str | Path, run: JobConfig | None = None) -> RewardConfig:
    """The reward section of the config file at `path`; rules whose defaults are the run's own limits
    (overlong's max_tokens) take them from `run`, the archived run's config, where it is known."""
    limits = []
    if run is not None:
        limits = [f"rollout.sampling.max_tokens={run.rollout.sampling.max_tokens}"]
        if run.env.name is not None:
            limits += [f"env.name={run.env.name}", f"env.max_episode_tokens={run.env.max_episode_tokens}"]
    try:
        return load_config(path, limits).reward
    except ConfigError as e:
        raise ReplayError(f"--reward-config: {e}") from None


def load_prompt_records(source: str | None, metadata: dict[str, str], log: TextIO) -> dict[str, PromptRecord]:
    """Data records by prompt_id from `source` (a prompt file or builtin:arith), by default the
    run's own `data.prompts`; {} with a warning when the run's default cannot be read."""
    from rollout.driver.prompts import PromptDataError, load_prompts

    run = run_config(metadata)
    data = run.data if run else JobConfig().data
    explicit = source is not None
    data = msgspec.structs.replace(
        data, prompts=source or data.prompts, on_bad_record="skip", format="auto" if explicit else data.format
    )
    try:
        records = load_prompts(data, run.seed if run else 0, log=log)
    except (OSError, PromptDataError) as e:
        if explicit:
            raise ReplayError(f"--prompts {source}: {e}") from None
        print(
            f"replay: the run's prompts {data.prompts} are not readable here ({e}); re-scoring without "
            "references (pass --prompts)",
            file=log,
        )
        return {}
    return {r.prompt_id: r for r in records}


def run_config(metadata: dict[str, str]) -> JobConfig | None:
    """The run's config from the archive metadata, or None when absent or not readable."""
    try:
        return msgspec.convert(yaml.safe_load(metadata["config"]), JobConfig, strict=False)
    except (KeyError, yaml.YAMLError, msgspec.ValidationError):
        return None
