"""Generated tokens/s: the raw engine (one `LLM.generate` over all prompts, in this process) against
the service end to end (a RolloutWorker actor through the pool, chunks queued ahead, generation
batches streamed to the archive),
on the same prompts and sampling. Prints one JSON object; the figure to watch is `ratio`.

Threads: the in-process engine keeps every core torch starts with (vLLM pins its threads), while
Ray gives a one-CPU actor one thread. Run with OMP_NUM_THREADS=1 to compare like with like.

    .venv/bin/python benchmarks/rollout_throughput.py [--prompts 256] [--n 4] [--max-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from contracts.builtin_model import build_tiny_llama  # noqa: E402
from contracts.config.load import load_config  # noqa: E402
from contracts.rendering import PromptRenderer  # noqa: E402
from reward.worker import reward_components  # noqa: E402
from rollout.actors.rollout_workers import RolloutWorkers  # noqa: E402
from rollout.archive import ArchiveWriter  # noqa: E402
from rollout.archive.columns import archive_batches  # noqa: E402
from rollout.driver.prompts import load_prompts  # noqa: E402
from rollout.generation.completions import generate_completions  # noqa: E402
from rollout.generation.engine import VLLMEngine  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--chunks-per-worker", type=int, default=2)
    args = parser.parse_args()

    model = str(build_tiny_llama())
    cfg = load_config(
        None,
        [
            f"rollout.n_samples={args.n}",
            f"rollout.sampling.max_tokens={args.max_tokens}",
            f"data.builtin_size={args.prompts}",
            f"rollout.prompts_per_iteration={args.prompts}",
            "rollout.device=cpu",
            "rollout.max_model_len=128",
            f"rollout.chunks_per_worker={args.chunks_per_worker}",
        ],
    )
    renderer = PromptRenderer(AutoTokenizer.from_pretrained(model), 64)
    tasks = [renderer.render(r) for r in load_prompts(cfg.data, seed=0)]
    ids = [t.prompt_ids for t in tasks]

    engine = VLLMEngine(model, cfg.rollout, seed=0)
    generate_completions(engine, ids, cfg.rollout.sampling, args.n)  # warm-up: the first call compiles kernels
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = RolloutWorkers(cfg.rollout, model, dtype="float32", seed=0, start_timeout_s=600, node_wait_timeout_s=600)
    pool.submit(tasks, run_id="bench", iteration=0).collect()  # warm-up
    raw, service = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # alternating, so drift in the machine's speed hits both alike
            start = time.perf_counter()
            outputs = generate_completions(engine, ids, cfg.rollout.sampling, args.n)
            seconds = time.perf_counter() - start
            raw.append(sum(len(c.token_ids) for cs in outputs for c in cs) / seconds)
            with ArchiveWriter(Path(tmp) / str(i), {}, reward_components(cfg.reward)) as archive:
                start = time.perf_counter()
                tokens = 0
                for chunk in pool.submit(tasks, run_id="bench", iteration=i + 1).chunks():
                    tokens += chunk.summary.generated_tokens
                    archive.write_later(
                        lambda ref=chunk.batch: archive_batches([ray.get(ref)], None, None, archive.components)
                    )
                archive.flush()
                service.append(tokens / (time.perf_counter() - start))
    pool.release()
    ray.shutdown()

    raw_tps, service_tps = statistics.median(raw), statistics.median(service)
    print(
        json.dumps(
            {
                "benchmark": "rollout_throughput",
                "prompts": args.prompts,
                "n": args.n,
                "max_tokens": args.max_tokens,
                "workers": 1,
                "chunks_per_worker": cfg.rollout.chunks_per_worker,
                "cpus": os.cpu_count(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "raw_engine_tokens_per_s": round(raw_tps, 1),
                "service_tokens_per_s": round(service_tps, 1),
                "ratio": round(service_tps / raw_tps, 3),
                "raw_runs": [round(x, 1) for x in raw],
                "service_runs": [round(x, 1) for x in service],
            }
        )
    )


if __name__ == "__main__":
    main()
