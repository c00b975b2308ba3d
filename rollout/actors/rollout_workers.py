"""The rollout workers: `RolloutActor`, the Ray edge of a `RolloutWorker` (one engine each), and the
group that queues an iteration's chunks on them and brings back the ones that died.

An iteration's prompts go out at once, in `chunks_per_worker` chunks per worker (more where a chunk
would exceed `max_chunk_prompts`), dealt round robin, one streaming call per worker: its engine holds
all of them, and each chunk comes back as soon as it is done (`Launch`). The group generates only:
which weights a worker serves is the weight sync's business (`rollout.weight_sync.sync`), which it
tells through `on_revived` what to load into a worker Ray restarted.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator

import pyarrow as pa
import ray

from contracts.config import EnvConfig, JobConfig, RolloutConfig, SamplingConfig
from contracts.console import actor_env
from contracts.device import resolve_device
from contracts.rendering import PromptTask
from rollout.actors.group import ActorGroup
from rollout.actors.launch import Launch, PartialShare, Share
from rollout.actors.member import CONCURRENCY_GROUPS, Member
from rollout.actors.reward_workers import Scoring
from rollout.generation.worker import GenerationSummary, RolloutWorker
from rollout.runtime.heap import trim_heap
from rollout.runtime.telemetry import record_queue_depth
from rollout.weight_sync.check import Served
from rollout.weight_sync.wire import GroupAddress, SyncPlan


class RolloutActor(Member):
    """A streaming call that yields each chunk's batch, then its summary; and the weight-loading calls.

    Both yields are plain values, so their object-store copies belong to the caller: refs the actor made
    itself and nested in a yield are not reliably kept alive once the actor drops them (seen with Ray
    2.60: "The object has already been deleted by the reference counting protocol")."""

    kind = "rollout"

    def __init__(
        self,
        name: str,
        model_path: str,
        cfg: RolloutConfig,
        *,
        env: EnvConfig,
        dtype: str,
        seed: int,
        process_env: dict[str, str],
    ):
        super().__init__(
            name, process_env, lambda: RolloutWorker(name, model_path, cfg, env=env, dtype=dtype, seed=seed)
        )

    def stream(
        self,
        chunks: list[list[PromptTask]],
        seeds: list[int | None],
        *,
        run_id: str,
        iteration: int,
        records: list[list] | None = None,
        sampling: SamplingConfig | None = None,
        n_samples: int | None = None,
    ) -> Iterator[pa.RecordBatch | tuple[int, GenerationSummary]]:
        """Each chunk as it completes (in any order): its batch, then (its index, its summary)."""
        for index, batch, summary in self.core.generate(
            chunks, seeds, run_id=run_id, iteration=iteration, records=records, sampling=sampling, n_samples=n_samples
        ):
            yield batch
            yield index, summary
        trim_heap()

    def stream_partial(
        self, tasks: list[PromptTask], seeds: list[int | None], *, quota: int, oldest: int, run_id: str, iteration: int
    ) -> Iterator[pa.RecordBatch | tuple[int, GenerationSummary]]:
        """Partial rollouts: each chunk of completed groups as it is handed out: its batch, then (-1, its
        summary, which names its prompts)."""
        for batch, summary in self.core.generate_partial(
            tasks, seeds, quota=quota, oldest=oldest, run_id=run_id, iteration=iteration
        ):
            yield batch
            yield -1, summary
        trim_heap()

    def update_weights(self, version: int, weights: list[tuple[str, object]]) -> Served:
        return self.core.update_weights(version, weights)

    def load_versioned(self, versioned: tuple[int, list[tuple[str, object]]]) -> Served:
        return self.core.load_versioned(versioned)

    def join_weight_group(self, address: GroupAddress, rank_offset: int) -> bool:
        return self.core.join_weight_group(address, rank_offset)

    def receive_weights(self, version: int, plan: SyncPlan, sync: int) -> Served | None:
        return self.core.receive_weights(version, plan, sync)

    def serving_version(self) -> int:
        return self.core.version


class RolloutWorkers(ActorGroup):
    kind = "rollout"
    stall_setting = "rollout.stall_timeout_s"
    on_stall = "killing it; restarted, it loads the newest weights and redoes its work"

    def __init__(
        self,
        cfg: RolloutConfig,
        model_path: str,
        *,
        env: EnvConfig | None = None,
        dtype: str,
        seed: int,
        start_timeout_s: float,
        node_wait_timeout_s: float,
        log=None,
        wait: bool = True,
    ):
        """Spawn the workers; with `wait`, return once every engine is up (else call `wait_started`, so
        the caller starts the learner while the engines load). `env`: with a name, the workers roll out
        episodes against that environment, which reads each prompt's data record."""
        self.cfg = cfg
        self.episodes = env is not None and env.name is not None
        self.start_timeout_s, self.node_wait_timeout_s = start_timeout_s, node_wait_timeout_s
        gpus = cfg.num_gpus_per_worker if resolve_device(cfg.device) == "cuda" else 0
        self.asked = f"{cfg.num_cpus_per_worker} CPU and {gpus} GPU"
        actor = ray.remote(concurrency_groups=CONCURRENCY_GROUPS)(RolloutActor)
        names = [f"rollout-{i}" for i in range(cfg.num_workers)]
        handles = [
            actor.options(num_cpus=cfg.num_cpus_per_worker, num_gpus=gpus, max_restarts=cfg.max_restarts).remote(
                name, model_path, cfg, env=env, dtype=dtype, seed=seed + i, process_env=actor_env(name)
            )
            for i, name in enumerate(names)
        ]
        super().__init__(names, handles, stall_timeout_s=cfg.stall_timeout_s, max_restarts=cfg.max_restarts, log=log)
        self._ready = {h.ready.remote(): name for h, name in zip(handles, names)}
        # Partial rollouts: the prompts each worker holds (given and not handed back), by id: what is generated
        # again if the worker dies.
        self.held: list[dict[str, list[PromptTask]]] = [{} for _ in handles]
        self._revive_lock = threading.Lock()  # the collector thread and a weight sync may find the same death
        # Called with a revived worker's name: brings it up to date; True if it counted as a restart (the
        # weight sync's `restore`; here, with no weights to load, every revival counts).
        self.on_revived: Callable[[str], bool] = lambda name: True
        if wait:
            self.wait_started()

    @classmethod
    def of_job(cls, cfg: JobConfig, model_path: str, *, log=None, wait: bool = True) -> RolloutWorkers:
        """The job's workers (`cfg.rollout` and `cfg.env`) on `model_path`, with the job's dtype, seed and
        Ray timeouts."""
        return cls(
            cfg.rollout,
            model_path,
            env=cfg.env,
            dtype=cfg.model.dtype,
            seed=cfg.seed,
            start_timeout_s=cfg.ray.actor_start_timeout_s,
            node_wait_timeout_s=cfg.ray.node_wait_timeout_s,
            log=log,
            wait=wait,
        )

    def wait_started(self) -> None:
        """Every engine up, or ActorStartError naming the late or failed ones and what they asked for."""
        super().wait_started(self._ready, self.start_timeout_s, "ray.actor_start_timeout_s", self.asked)

    def submit(
        self,
        tasks: list[PromptTask],
        *,
        run_id: str,
        iteration: int,
        score: Callable[[ray.ObjectRef, list[PromptTask]], Scoring] | None = None,
        records: dict | None = None,
        sampling: SamplingConfig | None = None,
        n_samples: int | None = None,
        what: str | None = None,
    ) -> Launch:
        """Queue the iteration's chunks, one streaming call per worker; the Launch collects them and hands
        each to `score` with its prompts as it completes. `records`: the data records by prompt id, which
        episodes' environments read. `sampling`, `n_samples`: in place of the rollout's (an evaluation);
        `what`: what a time-out names."""
        r = self.cfg
        size = max(1, min(r.max_chunk_prompts, math.ceil(len(tasks) / (len(self.handles) * r.chunks_per_worker))))
        base_seed = (sampling or r.sampling).seed
        shares: list[tuple[list, list]] = [([], []) for _ in self.handles]
        for n, start in enumerate(range(0, len(tasks), size)):
            chunks, seeds = shares[n % len(self.handles)]
            chunks.append(tasks[start : start + size])
            seeds.append(None if base_seed is None else (base_seed * 1_000_003 + iteration) * 10_007 + n)
        record_queue_depth(sum(len(chunks) for chunks, _ in shares))

        def stream(share: Share) -> ray.ObjectRefGenerator:
            chunk_records = [[records[t.prompt_id] for t in chunk] for chunk in share.chunks] if self.episodes else None
            return (
                self.handles[share.worker]
                .stream.options(num_returns="streaming")
                .remote(
                    share.chunks,
                    share.seeds,
                    run_id=run_id,
                    iteration=iteration,
                    records=chunk_records,
                    sampling=sampling,
                    n_samples=n_samples,
                )
            )

        return self._launch(
            [Share(i, chunks, seeds) for i, (chunks, seeds) in enumerate(shares) if chunks],
            stream,
            score,
            what or f"generation of iteration {iteration}",
        )

    def submit_partial(
        self,
        tasks: list[PromptTask],
        quota: int,
        *,
        oldest: int,
        run_id: str,
        iteration: int,
        score: Callable[[ray.ObjectRef, list[PromptTask]], Scoring],
    ) -> Launch:
        """Partial rollouts: `tasks` dealt round robin, one call per worker (each, holding groups from earlier
        iterations, takes part even with no new prompt); the workers hand out `quota` completed groups in all,
        in proportion, and every group started before version `oldest`."""
        r, count = self.cfg, len(self.handles)
        base_seed = r.sampling.seed
        shares = []
        for w in range(count):
            mine = tasks[w::count]
            seeds = [
                None if base_seed is None else (base_seed * 1_000_003 + iteration) * 10_007 + w * 65_537 + k
                for k in range(len(mine))
            ]
            for t in mine:
                self.held[w].setdefault(t.prompt_id, []).append(t)
            share_quota = quota // count + (1 if w < quota % count else 0)
            shares.append(PartialShare(w, mine, seeds, share_quota, oldest, self.held[w]))
        record_queue_depth(len(tasks))

        def stream(share: PartialShare) -> ray.ObjectRefGenerator:
            return (
                self.handles[share.worker]
                .stream_partial.options(num_returns="streaming")
                .remote(
                    share.tasks_given,
                    share.seeds,
                    quota=share.quota,
                    oldest=share.oldest,
                    run_id=run_id,
                    iteration=iteration,
                )
            )

        return self._launch(shares, stream, score, f"generation of iteration {iteration}")

    def _launch(self, shares: list, stream: Callable, score, what: str) -> Launch:
        """The shares' streams read by one Launch, which restarts a dead worker's and streams its share again."""

        def restart(share) -> ray.ObjectRefGenerator:
            self.revive(self.names[share.worker])
            self.watch.reset(self.names[share.worker])
            return stream(share)

        return Launch(
            {stream(share): share for share in shares},
            score,
            self.cfg.iteration_timeout_s,
            what,
            restart,
            lambda busy: self.kill_stalled(self.names[i] for i in busy),
            self.names,
        )

    def held_groups(self) -> int:
        """Prompts the workers hold for later iterations (partial rollouts)."""
        return sum(len(tasks) for held in self.held for tasks in held.values())

    def revive(self, name: str) -> None:
        """`name` died: wait for Ray to restart it (as long as a lost node's replacement may take), then
        bring it up to date (`on_revived`). ActorStartError when it does not come back."""
        with self._revive_lock:
            self.wait_back(name, self.node_wait_timeout_s, "ray.node_wait_timeout_s", self.asked)
            if self.on_revived(name):
                self.restarts += 1

    def serving(self, name: str, timeout_s: float) -> int:
        """The weights version `name` serves."""
        return ray.get(self.handle(name).serving_version.remote(), timeout=timeout_s)
