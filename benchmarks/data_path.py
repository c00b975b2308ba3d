"""The data path of one iteration at the seeds' scale, with model compute left out; prints JSON.

20,000 samples of 512 prompt + 512 response tokens go through the functions the job runs:

- `worker_columns_seconds`: a rollout worker's completions -> its generation batch
  (`rollout.archive.columns.generation_batch`); on the workers, in parallel, next to generation;
- through Ray's object store, as the job moves them: a worker actor returns the generation batches
  and a reward actor their reward columns (`contracts.schema.reward_batch`), both as refs;
- `driver_seconds`: what the driver itself does for the iteration: fetch the chunk summaries and
  reward columns, compute the iteration's metrics, queue the archive write;
- `plumbing_seconds`: the reshaping on the learner's critical path: generation + reward batches ->
  `SampleBatch` (`rollout.archive.columns.sample_batch`), every micro-batch's padded tensors
  (`SampleBatch.collate`, one pass at `--micro-batch-tokens`), the learner's (N, T) outputs -> flat
  `LearnerColumns`, and the archive's record batches (`rollout.archive.columns.archive_batches`);
- `archive_rows_per_s`: `ArchiveWriter` joining and writing those columns (write_later + flush),
  against `raw_ipc_rows_per_s`, pyarrow's IPC stream writer on the same finished batches.

    python benchmarks/data_path.py [--samples 20000 --prompt-tokens 512 --response-tokens 512]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

from contracts.schema import archive_schema, reward_batch  # noqa: E402
from learner.microbatch import plan  # noqa: E402
from learner.samples import LearnerColumns  # noqa: E402
from reward.scorer import RewardResult  # noqa: E402
from rollout.archive import ArchiveWriter  # noqa: E402
from rollout.archive.columns import archive_batches, generation_batch, sample_batch  # noqa: E402
from rollout.driver.metrics import iteration_metrics  # noqa: E402
from rollout.generation.completions import Completion  # noqa: E402

COMPONENTS = ("arithmetic", "length")
from contracts.rendering import PromptTask  # noqa: E402
from rollout.generation.worker import GenerationSummary  # noqa: E402


def engine_outputs(prompts: int, n: int, prompt_tokens: int, response_tokens: int, seed: int):
    """What vLLM hands a worker: token-id lists and per-token logprob lists, lengths 3/4 to all."""
    rng = np.random.default_rng(seed)
    tasks, completions = [], []
    for i in range(prompts):
        p = int(rng.integers(prompt_tokens * 3 // 4, prompt_tokens + 1))
        tasks.append(
            PromptTask(prompt_id=f"s{seed}-p{i}", prompt="x" * 64, prompt_ids=rng.integers(0, 32000, p).tolist())
        )
        samples = []
        for _ in range(n):
            t = int(rng.integers(response_tokens * 3 // 4, response_tokens + 1))
            samples.append(
                Completion(
                    token_ids=rng.integers(0, 32000, t).tolist(),
                    logprobs=(-rng.random(t)).tolist(),
                    text="y" * 64,
                    finish_reason="stop",
                )
            )
        completions.append(samples)
    return tasks, completions


class Worker:
    """Stands in for a RolloutWorker (and a RewardWorker) with the model left out: same conversions."""

    def __init__(self, args):
        self.args = args

    def generate(self, chunk: int):
        a = self.args
        tasks, completions = engine_outputs(a.prompts_per_chunk, a.n, a.prompt_tokens, a.response_tokens, chunk)
        start = time.perf_counter()
        batch = generation_batch(
            tasks,
            completions,
            run_id="bench",
            iteration=0,
            policy_version=0,
            worker="w",
            generated_at=dt.datetime.now(dt.timezone.utc),
        )
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for s in completions for c in s)
        return batch, GenerationSummary("w", seconds, batch.num_rows, tokens, batch.num_rows, 0)

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        rewards = np.random.default_rng(0).random(batch.num_rows)
        return reward_batch(
            [
                RewardResult(total=float(r), components={"arithmetic": float(r), "length": 0.0}, failed=[])
                for r in rewards
            ],
            COMPONENTS,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--response-tokens", type=int, default=512)
    parser.add_argument("--micro-batch-tokens", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    args.prompts_per_chunk = args.samples // args.n // args.chunks
    torch.set_num_threads(1)

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    worker = ray.remote(Worker).remote(args)
    chunks = [worker.generate.options(num_returns=2).remote(c) for c in range(args.chunks)]
    rewards = [worker.score.remote(batch) for batch, _ in chunks]
    ray.wait(rewards, num_returns=len(rewards), timeout=1800)

    # The learner's side: its input, its micro-batches' tensors, its output columns back to the store.
    refs = [b for b, _ in chunks]
    reward_batches = ray.get(rewards, timeout=600)
    generations = ray.get(refs, timeout=600)
    sample_batch(generations[:1], reward_batches[:1])  # once: pyarrow's kernels initialise on first use
    stages = {}
    start = time.perf_counter()
    samples = sample_batch(generations, reward_batches)
    stages["sample_batch"] = time.perf_counter() - start
    start = time.perf_counter()
    micro = plan(np.arange(len(samples)), samples.prompt_lengths, samples.response_lengths, args.micro_batch_tokens, 1)[
        0
    ]
    for m in micro:
        samples.collate(m.rows, 0)
    stages["collate"] = time.perf_counter() - start
    padded = samples.padded(samples.behaviour_logprobs)  # stands in for any (N, T) output of the learner
    start = time.perf_counter()
    columns_ref = ray.put(LearnerColumns(*(samples.flat(padded) for _ in range(7)), kl_coef=0.05))
    stages["learner_columns"] = time.perf_counter() - start
    start = time.perf_counter()
    batches = archive_batches(generations, reward_batches, ray.get(columns_ref), COMPONENTS)
    stages["archive_batches"] = time.perf_counter() - start
    plumbing_seconds = sum(stages.values())
    rows = sum(b.num_rows for b in batches)

    driver, archive_seconds, raw_seconds = [], [], []
    for attempt in range(args.repeats):  # alternating, best of each: the disk's write-back is noisy
        with tempfile.TemporaryDirectory() as tmp:
            archive = ArchiveWriter(Path(tmp) / "archive", {}, COMPONENTS, batch_rows=4096, rows_per_file=10**9)
            # The driver, as `Session.collect`, `record_metrics` and `archive_iteration` do it.
            start = time.perf_counter()
            summaries = ray.get([s for _, s in chunks], timeout=600)
            fetched = ray.get(rewards, timeout=600)
            iteration_metrics(0, summaries, fetched, {}, {}, 1)
            queued = time.perf_counter()
            archive.write_later(
                lambda: archive_batches(
                    ray.get(refs, timeout=600), fetched, ray.get(columns_ref, timeout=600), COMPONENTS
                )
            )
            driver.append(time.perf_counter() - start)
            archive.flush()  # the writer thread: fetch from the object store, join, write
            archive_seconds.append(time.perf_counter() - queued)
            archive.close()
            archive_bytes = sum(p.stat().st_size for p in (Path(tmp) / "archive").glob("*.arrow"))
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            with (
                pa.OSFile(str(Path(tmp) / "raw.arrow"), "wb") as sink,
                pa.ipc.new_stream(sink, archive_schema(COMPONENTS)) as writer,
            ):
                for b in batches:
                    for s in range(0, b.num_rows, 4096):
                        writer.write_batch(b.slice(s, 4096))
            raw_seconds.append(time.perf_counter() - start)
    driver_seconds, archive_seconds, raw_seconds = min(driver), min(archive_seconds), min(raw_seconds)

    worker_seconds = sum(s.seconds for s in summaries)
    ray.shutdown()
    print(
        json.dumps(
            {
                "samples": rows,
                "prompt_tokens": args.prompt_tokens,
                "response_tokens": args.response_tokens,
                "driver_seconds": round(driver_seconds, 4),
                "plumbing_seconds": round(plumbing_seconds, 3),
                "plumbing_stages": {k: round(v, 3) for k, v in stages.items()},
                "micro_batches": len(micro),
                "worker_columns_seconds": round(worker_seconds, 3),
                "archive_rows_per_s": round(rows / archive_seconds),
                "raw_ipc_rows_per_s": round(rows / raw_seconds),
                "archive_vs_raw": round(raw_seconds / archive_seconds, 3),
                "archive_mb": round(archive_bytes / 1e6, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
