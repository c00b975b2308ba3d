"""Re-scoring for `rollout replay --reward-config`: archived samples scored again through the job's own
`RewardWorker`, each matched to its data record (reference answer) by prompt id."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import msgspec
import pyarrow as pa
import yaml

from contracts.config import ConfigError, JobConfig, RewardConfig
from contracts.config.env import REWARD_TO
from contracts.config.load import load_config
from contracts.errors import UserError
from contracts.formats import Message, PromptRecord

Scores = tuple[pa.Array, pa.Array]  # per batch: reward (float32), reward_components (struct)


class ReplayError(UserError, ValueError):
    """The archive or the options do not allow this replay; the message says why and what to change."""


class Rescorer:
    """Scores archived samples again, as the job's reward workers do, with the rules of a reward config."""

    def __init__(self, cfg: RewardConfig, prompts: dict[str, PromptRecord], *, reward_to: str | None = None):
        """`reward_to`: the archived run's `env.params.reward_to`, which of an agent's segments took its
        episode's reward (None: the default, every segment)."""
        from reward.sources import AGENT_COMPONENT
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
        # An agent's own reward cannot be asked again offline: the archived `agent` component is what it returned.
        self.agent_component = AGENT_COMPONENT if AGENT_COMPONENT in self.components else None
        self.every_segment = (reward_to or REWARD_TO[0]) == REWARD_TO[0]
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
            "episode_id",
            "segment",
            "reward_components" if self.agent_component else "",
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
        rewards, _ = self.worker.score_batch(self._with_agent_columns(batch), records)
        return rewards.column("reward"), rewards.column("reward_components")

    def scores(self, batches: Iterable[pa.RecordBatch]) -> Iterator[Scores]:
        """Per archive batch, its rows' scores. An agent's episode whose segments straddle two batches is
        scored whole (on its last segment, as the job scored it): a batch is held until the next one
        starts another episode."""
        held: list[pa.RecordBatch] = []
        for batch in batches:
            if held and not _continues(held[-1], batch):
                yield from self._score_together(held)
                held = []
            held.append(batch)
        if held:
            yield from self._score_together(held)

    def _score_together(self, batches: list[pa.RecordBatch]) -> Iterator[Scores]:
        reward, components = self(batches[0] if len(batches) == 1 else pa.concat_batches(batches))
        start = 0
        for batch in batches:
            yield reward.slice(start, batch.num_rows), components.slice(start, batch.num_rows)
            start += batch.num_rows

    def _with_agent_columns(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The columns an agent's rows are scored by, as the job gave them: `agent_reward` (the archived
        `agent` component) and, for rows of several segments, `takes_reward` (which of them take the
        episode's reward)."""
        from reward.worker import last_segments

        if self.agent_component and "reward_components" in batch.schema.names:
            components = batch.column("reward_components")
            if components.type.get_field_index(self.agent_component) >= 0:
                batch = batch.append_column("agent_reward", components.field(self.agent_component))
        last = last_segments(batch)
        if last is not None:
            takes = [self.every_segment or k == row for k, row in enumerate(last)]
            batch = batch.append_column("takes_reward", pa.array(takes, pa.bool_()))
        return batch

    @classmethod
    def open(cls, config: str | Path, prompts: str | None, metadata: dict[str, str], log: TextIO) -> Rescorer:
        """From the reward config file `config` and the data records of `prompts` (by default the run's)."""
        run = run_config(metadata)
        reward_to = run.env.params.get("reward_to") if run is not None else None
        return cls(reward_config(config, run), load_prompt_records(prompts, metadata, log), reward_to=reward_to)

    def close(self) -> None:
        self.worker.close()


def _continues(batch: pa.RecordBatch, after: pa.RecordBatch) -> bool:
    """Whether `after` begins with more segments of the agent's episode that `batch` ends with."""
    if "episode_id" not in batch.schema.names or batch.num_rows == 0 or after.num_rows == 0:
        return False
    last = batch.column("episode_id")[-1].as_py()
    return last is not None and last == after.column("episode_id")[0].as_py()


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
