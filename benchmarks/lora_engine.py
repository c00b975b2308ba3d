"""How an engine should get a LoRA policy: merged weights loaded in place (what both sync paths do) against
vLLM's own LoRA loading (the adapter saved by peft, served through a `LoRARequest`), on this CPU.

    python benchmarks/lora_engine.py [--model builtin:small-llama] [--rank 8] [--repeats 5]
        [--prompts 64] [--n 4] [--max-tokens 32]

A LoRA learner (learner.lora.rank, every projection) with adapters moved off zero gives both forms of the
same policy: its merged export (`Learner.export_weights`) and its adapter (`save_pretrained` of its peft
model). Each engine runs in a process of its own (vLLM sets up process-wide state), as the job builds it
(`VLLMEngine`, one worker's settings):
- merged: seconds to load the merged weights in place (`reload_weights`, the object-store path's load;
  the collective path loads the same tensors bucket by bucket), median of `--repeats`;
- lora: `enable_lora` with `max_lora_rank`; seconds to switch to a new adapter version (saving it to disk,
  as a learner would, plus the first request that loads it, less the same request with it loaded), median
  of `--repeats`.
Both then generate the same batch (`--prompts` x `--n` completions of `--max-tokens` tokens each, eos
ignored so the work is equal), median seconds of `--repeats`, and report the probe logprobs' largest gap against the
learner's (how equal the two forms are). Prints one JSON object; no assertions on time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROBE = list(range(1, 17))


def policy(model: str, rank: int, out: Path) -> None:
    """A LoRA learner's policy with its adapters moved off zero: merged weights, the adapter, its probe."""
    import torch
    from safetensors.torch import save_file

    from contracts.builtin_model import resolve_model_path
    from contracts.config.load import load_config
    from learner.learner import Learner

    cfg = load_config(None, ["learner.device=cpu", f"learner.lora.rank={rank}", "learner.estimator=grpo"])
    learner = Learner(cfg.learner, resolve_model_path(model))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in learner.policy.named_parameters():
            if ".lora_B." in name:  # B starts at 0: a delta as an update would leave one
                p.copy_(0.02 * torch.randn(p.shape, generator=generator))
    save_file(dict(learner.export_weights()), str(out / "merged.safetensors"))
    learner.lora.peft_model.save_pretrained(out / "adapter")
    (out / "probe.json").write_text(json.dumps(learner.probe_logprobs(PROBE)))


def engine(kind: str, model: str, rank: int, out: Path, repeats: int, prompts: int, n: int, max_tokens: int) -> dict:
    """In its own process: one engine of `kind` (merged | lora); its load and generation seconds."""
    import shutil

    from safetensors.torch import load_file

    from contracts.builtin_model import resolve_model_path
    from contracts.config import RolloutConfig
    from rollout.generation.engine import VLLMEngine

    path = resolve_model_path(model)
    cfg = RolloutConfig(device="cpu", max_model_len=128)
    extra = {"enable_lora": True, "max_lora_rank": rank, "max_loras": 1} if kind == "lora" else None
    eng = VLLMEngine(path, cfg, extra_args=extra)
    vllm = eng._vllm
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    batch = [TokensPrompt(prompt_token_ids=[1] + [6 + (i * 7 + j) % 300 for j in range(12)]) for i in range(prompts)]
    # Every completion runs to max_tokens (ignore_eos): the same work for both engines.
    params = vllm.SamplingParams(n=n, temperature=1.0, max_tokens=max_tokens, ignore_eos=True, seed=0)
    probe_params = vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, seed=0)
    load_s, adapter = [], None
    if kind == "merged":
        weights = list(load_file(str(out / "merged.safetensors")).items())
        for _ in range(repeats):
            start = time.perf_counter()
            eng.reload_weights(weights)
            load_s.append(time.perf_counter() - start)
    else:
        for version in range(1, repeats + 1):
            start = time.perf_counter()
            target = out / f"adapter-v{version}"
            shutil.copytree(out / "adapter", target)  # what a learner writes per version: the adapter's files
            adapter = LoRARequest(f"policy-v{version}", version, str(target))
            eng.llm.generate(batch[:1], params, lora_request=adapter, use_tqdm=False)
            first = time.perf_counter() - start
            start = time.perf_counter()
            eng.llm.generate(batch[:1], params, lora_request=adapter, use_tqdm=False)
            load_s.append(first - (time.perf_counter() - start))
    generate_s = []
    for _ in range(repeats):
        start = time.perf_counter()
        outputs = eng.llm.generate(batch, params, lora_request=adapter, use_tqdm=False)
        generate_s.append(time.perf_counter() - start)
    tokens = sum(len(o.token_ids) for out_ in outputs for o in out_.outputs)
    probed = eng.llm.generate(
        [TokensPrompt(prompt_token_ids=PROBE)], probe_params, lora_request=adapter, use_tqdm=False
    )
    engine_probe = [entry[t].logprob for entry, t in zip(probed[0].prompt_logprobs[1:], PROBE[1:])]
    learner_probe = json.loads((out / "probe.json").read_text())
    return {
        "load_s": statistics.median(load_s),
        "generate_s": statistics.median(generate_s),
        "tokens": tokens,
        "tokens_per_s": tokens / statistics.median(generate_s),
        "probe_gap": max(abs(a - b) for a, b in zip(engine_probe, learner_probe)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="builtin:small-llama")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--engine", choices=("merged", "lora"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = (args.repeats, args.prompts, args.n, args.max_tokens)
    if args.engine:
        print(json.dumps(engine(args.engine, args.model, args.rank, Path(args.dir), *shape)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        policy(args.model, args.rank, Path(tmp))
        results = {}
        for kind in ("merged", "lora"):
            command = [sys.executable, __file__, "--engine", kind, "--dir", tmp, "--model", args.model]
            command += ["--rank", str(args.rank), "--repeats", str(args.repeats), "--prompts", str(args.prompts)]
            command += ["--n", str(args.n), "--max-tokens", str(args.max_tokens)]
            proc = subprocess.run(command, capture_output=True, text=True, timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(f"the {kind} engine failed:\n{proc.stderr[-3000:]}")
            results[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"  {kind}: {results[kind]}", file=sys.stderr, flush=True)
    merged, lora = results["merged"], results["lora"]
    print(
        json.dumps(
            {
                "model": args.model,
                "rank": args.rank,
                "lora_load_over_merged_load": lora["load_s"] / merged["load_s"],
                "lora_generate_over_merged_generate": lora["generate_s"] / merged["generate_s"],
                **results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
