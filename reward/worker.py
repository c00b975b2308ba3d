"""`RewardWorker`: scores a generation batch (Arrow columns) with the configured reward sources (rules,
reward model, reward server: `reward.sources`), reading each sample's data record (reference answer,
metadata) by its prompt id. A plain class; the job wraps it in a Ray actor. The data records of a
batch's prompts come with the batch, so a worker holds no state but its sources: Ray restarts a dead
one and runs the lost call again there."""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc

from contracts.config import RewardConfig
from contracts.schema import reward_batch
from reward.scorer import RewardResult
from reward.sources import REWARD_SOURCES, RewardSource, Sample

RESTARTED = "restarted"  # in score_batch's seconds: 1 on the first call after a restart


def configured_sources(cfg: RewardConfig) -> list[type[RewardSource]]:
    """The sources `cfg` sets, in archive order."""
    return [source for source in REWARD_SOURCES.values() if source.configured(cfg)]


def reward_components(cfg: RewardConfig) -> tuple[str, ...]:
    """The run's reward components, in archive order: each configured source's, in turn (each rule's,
    then the reward model's, then the reward server's)."""
    return tuple(name for source in configured_sources(cfg) for name in source.component_names(cfg))


class RewardWorker:
    def __init__(self, cfg: RewardConfig, *, name: str = "reward-0"):
        self.name = name
        self.cfg = cfg
        self.components = reward_components(cfg)
        self.sources: list[RewardSource] = [source(cfg) for source in configured_sources(cfg)]
        self.counts_tokens = any(source.counts_tokens for source in self.sources)  # score_batch reads token counts
        self.seconds = 0.0

    def progress(self) -> int:
        """What a stall watch sees move: samples the rules scored, model batches, server requests."""
        return sum(source.progress() for source in self.sources)

    def score(
        self,
        items: list[tuple[object, str, str]],
        response_tokens: list[int] | None = None,
        agent_rewards: list[float | None] | None = None,
    ) -> list[RewardResult]:
        """One result per (record, rendered prompt, response), every component kept; `response_tokens`
        (each response's length in tokens) for the sources that read it; `agent_rewards` what agents
        returned (component `agent`)."""
        start = time.perf_counter()
        counts = response_tokens if response_tokens is not None else [None] * len(items)
        agents = agent_rewards if agent_rewards is not None else [None] * len(items)
        samples = [
            Sample(record, prompt, response, n, agent)
            for (record, prompt, response), n, agent in zip(items, counts, agents)
        ]
        finishes = [source.begin(samples) for source in self.sources]  # all begun before any is waited on
        results = [RewardResult(total=0.0, components={}, failed=[]) for _ in samples]
        for finish in finishes:
            for result, part in zip(results, finish()):
                result.total += part.total
                result.components.update(part.components)
                result.failed.extend(part.failed)
        self.seconds += time.perf_counter() - start
        return results

    def score_batch(self, batch: pa.RecordBatch, records: list) -> tuple[pa.RecordBatch, dict[str, float]]:
        """The reward columns of a generation batch, row for row, and the seconds this call spent
        scoring it, in total and per rule (the caller adds them up per iteration). `records` are the
        data records of the batch's prompts (reference answers, metadata). An episode is scored on its
        final turn, the model's answer (`final_turn`; a batch without it, on `response`). An agent's episode
        of several rows (segments) is scored once, on its last segment, and that reward is each row's that
        takes it (`takes_reward`; the others get 0 and no components)."""
        before = self.latency()
        by_id = {record.prompt_id: record for record in records}
        names = batch.schema.names
        scored = "final_turn" if "final_turn" in names else "response"
        ids, prompts, responses = (batch.column(name).to_pylist() for name in ("prompt_id", "prompt", scored))
        lengths = pc.list_value_length(batch.column("response_ids")).to_pylist() if self.counts_tokens else None
        agents = batch.column("agent_reward").to_pylist() if "agent_reward" in names else None
        rows = last_segments(batch)
        if rows is None:
            results = self.score([(by_id[i], p, r) for i, p, r in zip(ids, prompts, responses)], lengths, agents)
        else:
            last = sorted(set(rows))
            scores = self.score(
                [(by_id[ids[k]], prompts[k], responses[k]) for k in last],
                None if lengths is None else [lengths[k] for k in last],
                None if agents is None else [agents[k] for k in last],
            )
            by_row = dict(zip(last, scores))
            takes = batch.column("takes_reward").to_pylist() if "takes_reward" in names else [True] * len(rows)
            nothing = RewardResult(total=0.0, components={}, failed=[])
            results = [by_row[k] if take else nothing for k, take in zip(rows, takes)]
        rewards = reward_batch(results, self.components)
        return rewards, {name: seconds - before.get(name, 0.0) for name, seconds in self.latency().items()}

    def close(self) -> None:
        for source in self.sources:
            source.close()

    def latency(self) -> dict[str, float]:
        """Cumulative scoring seconds: the whole call (`total`), then each source's (each rule's, the
        server's requests summed: they overlap)."""
        seconds = {"total": self.seconds}
        for source in self.sources:
            seconds.update(source.latency())
        return seconds


def last_segments(batch: pa.RecordBatch) -> list[int] | None:
    """Per row, the row of its episode's last segment, where the batch holds an agent's episode of several
    rows (segments); None where every row is a whole sample."""
    if "segment" not in batch.schema.names or pc.max(batch.column("segment")).as_py() in (None, 0):
        return None
    episodes = batch.column("episode_id").to_pylist()
    last = {episode: k for k, episode in enumerate(episodes) if episode is not None}  # segments are in order
    return [k if episode is None else last[episode] for k, episode in enumerate(episodes)]
