"""The learner's PPO iteration against plain transformers training of the same tokens, on one device.

    python benchmarks/learner_gpu.py --device cuda                       # Qwen2.5-0.5B and 1.5B shapes
    python benchmarks/learner_gpu.py --device cuda --shapes 0.5b         # the smaller one only
    python benchmarks/learner_gpu.py --device cpu --shape tiny --samples 32   # a check on CPU

Shapes (Qwen2.5-0.5B and 1.5B with random weights, or the builtin tiny Llama) and length mixes
(`uniform`, `realistic`) are in `learner_workload.py`; `plain`, the yardstick, in `learner_plain.py`.

For each shape, mix and gradient checkpointing off and on, one PPO iteration (`Learner.learn`, one
epoch, gae with a separate critic, bfloat16 compute on CUDA) with `learner.pack_sequences` on and off,
timed after one warm-up iteration per learner, against `plain`: an ideal PPO iteration with a critic
in plain transformers on the same device and tokens, timed in the same process: 3 no-grad forward
passes (policy, reference, critic) and 2 training passes (policy with its LM loss, critic with a value
head), padded micro-batches of the same token budget sorted by length over the whole batch, autocast
bfloat16, fused AdamW. Figures per run: `tokens_per_s` (real tokens, prompt and response), `tflops`,
`mfu` (against a bfloat16 matmul timed here, median of 10 after warm-up), `ratio_to_plain` (seconds
over plain's, whole iteration and per stage `values` and `update`), `peak_gib`
(torch.cuda.max_memory_allocated) and `predicted_gib` (`learner.memory.estimate`). FLOPs of an
iteration = tokens x P x (2 x 3 + 6 x 2): 2·P per token for a no-grad pass, 6·P for a training pass,
P the causal LM's parameters (tied embeddings once: the LM head's matmul), attention left out;
gradient checkpointing's recompute is not counted. Per shape also `export_s`, `checkpoint_blocked_s`
and `checkpoint_write_s` (`measure_export`, `measure_checkpoint`), and the largest difference between
packed and padded old logprobs of the same fresh weights, and on CUDA `host_syncs`: the synchronizing
calls of one iteration on 64 samples (torch's sync debug mode) by the line that made them, against
its micro-batches.

Progress goes to stderr, one JSON object last on stdout. No assertions on time. On an H200 both
shapes take about 6 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from learner_plain import PlainIteration, set_checkpointing, synchronize  # noqa: E402
from learner_workload import SHAPES, build_model, sample_batch, shape_of  # noqa: E402

from contracts.config.load import load_config  # noqa: E402
from learner import packed_attention  # noqa: E402
from learner.learner import Learner  # noqa: E402
from learner.memory import GIB, estimate  # noqa: E402
from learner.samples import SampleBatch  # noqa: E402
from rollout.weight_sync.sender import WeightSender  # noqa: E402
from rollout.weight_sync.wire import fill_buckets  # noqa: E402

MICRO_BATCH_TOKENS = {"tiny": 4096, "0.5b": 16384, "1.5b": 8192}
PASSES = 2 * 3 + 6 * 2  # FLOPs per token and parameter: 3 no-grad passes, 2 training passes


def log(start: float, message: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)


def matmul_tflops(device: torch.device, size: int, dtype: torch.dtype) -> float:
    """Dense matmul TFLOP/s on `device`: median of 10 after 3 warm-ups."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def measure_export(learner: Learner, bucket_mb: float = 256.0) -> dict[str, float]:
    """`export_s`: a collective sync's sender side without its peers: the policy streamed tensor by tensor
    into broadcast buckets on the learner's device, cast there (`WeightSender`'s path, less the broadcast);
    `object_store_export_s`: `Learner.export_weights()`, cast on the device and copied once to the host."""
    plan = WeightSender(learner).plan(str(learner.compute_dtype).removeprefix("torch."), int(bucket_mb * 2**20))
    timings = {}
    for name, run in (
        ("export_s", lambda: [None for _ in fill_buckets(plan, learner.named_weights(), learner.device)]),
        ("object_store_export_s", learner.export_weights),
    ):
        run()  # warm-up: the first call allocates
        synchronize(learner.device)
        start = time.perf_counter()
        run()
        synchronize(learner.device)
        timings[name] = time.perf_counter() - start
    return timings


def measure_checkpoint(learner: Learner, tmp_dir: Path, count: int = 6) -> dict[str, float]:
    """`checkpoint_blocked_s`: how long a checkpoint holds the training loop (its states staged);
    `checkpoint_write_s`: the background write after it. Medians over `count` - 1 checkpoints after the
    first, which makes the staging memory (its blocked time is given too): one checkpoint's figures vary
    by 2x on a busy CPU."""
    runs = []
    for attempt in range(count):
        directory = Path(tmp_dir) / f"checkpoint-{attempt}"
        start = time.perf_counter()
        pending = learner.save_async(directory, {"iteration": 0})
        blocked = time.perf_counter() - start
        write = pending.wait()
        runs.append((blocked, write, sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())))
        shutil.rmtree(directory)
    later = runs[1:]
    return {
        "checkpoint_blocked_s": statistics.median(r[0] for r in later),
        "checkpoint_write_s": statistics.median(r[1] for r in later),
        "checkpoint_blocked_to_write": statistics.median(r[0] / r[1] for r in later),
        "checkpoint_blocked_first_s": runs[0][0],
        "checkpoint_gib": runs[0][2] / GIB,
    }


def host_syncs(learner: Learner, batch: SampleBatch) -> dict | None:
    """The synchronizing CUDA calls of one iteration, counted by torch's sync debug mode, by the line
    that made them; what should remain are a few per stage and per optimizer step, none per micro-batch."""
    if learner.device.type != "cuda":
        return None
    before = learner.micro_batches_done
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            learner.learn(batch)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    lines = Counter(f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message))
    return {"count": sum(lines.values()), "micro_batches": learner.micro_batches_done - before, "by_line": lines}


def make_learner(path: str, device: torch.device, budget: int, minibatch: int, packed: bool) -> Learner:
    cfg = load_config(
        None,
        [
            f"learner.device={device.type}",
            f"learner.micro_batch_tokens={budget}",
            f"learner.minibatch_size={minibatch}",
            f"learner.pack_sequences={str(packed).lower()}",
            "learner.ppo_epochs=1",
            "learner.estimator=gae",
            "learner.shared_critic=false",
        ],
    )
    return Learner(cfg.learner, path, dtype="bfloat16" if device.type == "cuda" else "float32", seed=0)


def timed(device: torch.device, run, repeats: int) -> tuple[float, dict[str, float], float | None]:
    """(seconds, stage seconds, peak GiB) of the median of `repeats` runs of `run()` -> stage seconds."""
    results = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        start = time.perf_counter()
        stages = run()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None
        results.append((time.perf_counter() - start, stages, peak))
    return sorted(results, key=lambda r: r[0])[len(results) // 2]


def stage_seconds(learner: Learner, batch: SampleBatch) -> dict[str, float]:
    return learner.learn(batch)[2]


def figures(seconds: float, tokens: int, params: int, peak_tflops: float) -> dict[str, float]:
    tflops = tokens * params * PASSES / seconds / 1e12
    return {"seconds": seconds, "tokens_per_s": tokens / seconds, "tflops": tflops, "mfu": tflops / peak_tflops}


def learner_runs(args, shape: str, path: str, device: torch.device, batches: dict, start: float) -> dict:
    """Every (mix, checkpointing, packing) run of the Learner on this shape, plus export and checkpoint."""
    out = {"runs": [], "logprobs": {}}
    budget = args.micro_batch_tokens or MICRO_BATCH_TOKENS[shape]
    for packed in (True, False):
        learner = make_learner(path, device, budget, args.minibatch_size, packed)
        model_config = learner.policy.lm.config
        params = sum(p.numel() for p in learner.policy.lm.parameters())
        out.update(params=params, micro_batch_tokens=budget)
        if packed:  # where no varlen kernel fits, the "packed" learner pads: its runs say pack_sequences false
            out["packed_attention"] = model_config._attn_implementation if learner.packed else None
        # Fresh weights, before any update: the same logprobs either way (up to rounding).
        out["logprobs"][packed] = learner.evaluate(batches["realistic"]).old_logprobs.cpu()
        learner.learn(sample_batch("realistic", 16, model_config.vocab_size, seed=1))  # warm-up
        syncs = host_syncs(learner, sample_batch("realistic", 64, model_config.vocab_size, seed=2))
        out.setdefault("host_syncs", {})["packed" if learner.packed else "padded"] = syncs
        for mix, batch in batches.items():
            tokens = int(batch.prompt_lengths.sum() + batch.response_lengths.sum())
            for checkpointing in (False, True):
                set_checkpointing([learner.policy.lm, learner.critic.backbone], checkpointing)
                seconds, stages, peak = timed(device, partial(stage_seconds, learner, batch), args.repeats)
                predicted = estimate(
                    shape_of(model_config),
                    num_ranks=1,
                    micro_batch_tokens=budget,
                    compute_bytes=2 if device.type == "cuda" else 4,
                    gradient_checkpointing=checkpointing,
                    samples=len(batch),
                    response_tokens=int(batch.response_lengths.max()),
                )["total"]
                run = {"mix": mix, "gradient_checkpointing": checkpointing, "pack_sequences": learner.packed}
                run.update(figures(seconds, tokens, params, args.peak_tflops), stages=stages)
                run.update(peak_gib=peak, predicted_gib=predicted)
                out["runs"].append(run)
                log(start, f"{shape} {mix} checkpointing={checkpointing} packed={learner.packed}: {seconds:.2f} s")
        if packed:
            out.update(measure_export(learner))
            if shape in args.checkpoint_shapes:
                with tempfile.TemporaryDirectory(dir=args.tmp_dir) as tmp:
                    out.update(measure_checkpoint(learner, Path(tmp)))
            log(start, f"{shape} export {out['export_s']:.3f} s, checkpoint {out.get('checkpoint_blocked_s')}")
        del learner
        release(device)
    return out


def plain_runs(args, shape: str, path: str, device: torch.device, batches: dict, start: float, budget: int):
    plain = PlainIteration(path, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    plain.run(sample_batch("realistic", 16, plain.vocab_size, seed=1), budget, args.minibatch_size)  # warm-up
    runs = []
    for mix, batch in batches.items():
        for checkpointing in (False, True):
            set_checkpointing([plain.policy, plain.critic], checkpointing)
            seconds, stages, peak = timed(device, partial(plain.run, batch, budget, args.minibatch_size), args.repeats)
            runs.append({"mix": mix, "gradient_checkpointing": checkpointing, "seconds": seconds, "stages": stages})
            runs[-1]["peak_gib"] = peak
            log(start, f"{shape} {mix} checkpointing={checkpointing} plain transformers: {seconds:.2f} s")
    del plain
    release(device)
    return runs


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def one_shape(args, shape: str, device: torch.device, start: float) -> dict:
    with tempfile.TemporaryDirectory(dir=args.tmp_dir) as model_dir:
        path = build_model(shape, device, Path(model_dir))
        release(device)
        log(start, f"{shape}: model at {path}")
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(path).vocab_size
        batches = {mix: sample_batch(mix, args.samples, vocab) for mix in args.mixes}
        result = learner_runs(args, shape, path, device, batches, start)
        plain = plain_runs(args, shape, path, device, batches, start, result["micro_batch_tokens"])
    logprobs = result.pop("logprobs")
    if len(logprobs) == 2:
        result["packed_vs_padded_logprob_max_abs_diff"] = (logprobs[True] - logprobs[False]).abs().max().item()
    for run in result["runs"]:
        base = next(
            p for p in plain if (p["mix"], p["gradient_checkpointing"]) == (run["mix"], run["gradient_checkpointing"])
        )
        run["ratio_to_plain"] = run["seconds"] / base["seconds"]
        run["stages"] = {
            stage: {"seconds": seconds, "ratio_to_plain": seconds / base["stages"][stage]}
            if stage in base["stages"]
            else {"seconds": seconds}
            for stage, seconds in run["stages"].items()
        }
    tokens = {mix: int(b.prompt_lengths.sum() + b.response_lengths.sum()) for mix, b in batches.items()}
    for p in plain:
        p.update(figures(p["seconds"], tokens[p["mix"]], result["params"], args.peak_tflops))
    result.setdefault("export_s", None)
    for name in ("checkpoint_blocked_s", "checkpoint_write_s"):
        result.setdefault(name, None)  # filled for --checkpoint-shapes only: a checkpoint is 26 bytes a parameter
    result.update(samples=args.samples, tokens=tokens, plain=plain)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--shapes", "--shape", nargs="+", choices=("tiny", *SHAPES), default=None)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--mixes", nargs="+", choices=("uniform", "realistic"), default=["uniform", "realistic"])
    parser.add_argument(
        "--micro-batch-tokens", type=int, default=None, help="default: per shape, " + str(MICRO_BATCH_TOKENS)
    )
    parser.add_argument("--minibatch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="timed iterations per point; the median is kept")
    parser.add_argument(
        "--checkpoint-shapes", nargs="*", default=None, help="shapes whose checkpoint is timed (default: the first)"
    )
    parser.add_argument(
        "--tmp-dir", default=None, help="where models and checkpoints are written (default: the system's)"
    )
    parser.add_argument("--out", default=None, help="also write the JSON here, after each shape")
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device(args.device)
    args.shapes = args.shapes or (["0.5b", "1.5b"] if device.type == "cuda" else ["tiny"])
    args.checkpoint_shapes = args.shapes[:1] if args.checkpoint_shapes is None else args.checkpoint_shapes
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    peak_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.peak_tflops = matmul_tflops(device, 8192 if device.type == "cuda" else 1024, peak_dtype)
    log(start, f"{device}: matmul {args.peak_tflops:.3g} TFLOP/s ({peak_dtype})")
    import transformers

    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "varlen_kernels": list(packed_attention.available_kernels()),
        "peak_tflops": args.peak_tflops,
        "flops_per_token_and_param": PASSES,
        "shapes": {},
    }
    for shape in args.shapes:
        out["shapes"][shape] = one_shape(args, shape, device, start)
        out["wall_s"] = time.perf_counter() - start
        if args.out:  # what is done survives a run cut short
            Path(args.out).write_text(json.dumps(out))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
