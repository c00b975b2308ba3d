"""`rollout plan`: the job's actors, what each asks of Ray, how they are placed, and the memory each
GPU will hold, printed before any cluster time is spent.

Memory per GPU, from the model's config (its `config.json`; a few hub models are known by name for
machines that cannot reach the hub) and the job's settings:
- a rollout engine holds its weights in `model.dtype` and, in what `rollout.gpu_memory_utilization`
  leaves, a KV cache of 2 x layers x kv_heads x head_dim values per token; the plan shows the cache
  one engine batch (`rollout.generation.engine_sizing`: max_num_seqs sequences of `rollout.max_model_len` tokens)
  takes, and the batch and cache sizes the engine will use;
- a learner rank holds what `learner.memory.estimate` counts (sharded states, the gathered working
  set, one micro-batch of activations, a logit chunk, the iteration's per-token columns), with LoRA
  (`learner.lora`) a frozen base and the adapters' states, and no reference copy.
With `--address`, the plan is also checked against the cluster's CPUs and GPUs; with
`--gpu-memory-gb`, each GPU's estimate against that size. Either failing exits 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts.config import JobConfig
from learner.estimators import estimator
from learner.memory import GIB, QWEN25_05B, QWEN25_7B, Shape, estimate
from rollout.driver.resources import actor_requests, check_fits, resolve_devices
from rollout.generation.engine_sizing import engine_sizing
from rollout.weight_sync.path import weight_sync_path

GPU_DEFAULT_MAX_NUM_SEQS = 1024  # the largest batch vLLM picks by itself (large GPUs, offline LLM class)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# Hub models whose shapes are known without downloading their config.
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-0.5B": QWEN25_05B,
    "Qwen/Qwen2.5-0.5B-Instruct": QWEN25_05B,
    "Qwen/Qwen2.5-7B": QWEN25_7B,
    "Qwen/Qwen2.5-7B-Instruct": QWEN25_7B,
}


@dataclass
class Plan:
    lines: list[str]
    problems: list[str]


def model_shape(path: str) -> Shape | None:
    """The model's shape from its config.json (local, builtin, or the hub cache); None if unreachable."""
    if path in KNOWN_SHAPES:
        return KNOWN_SHAPES[path]
    try:
        from transformers import AutoConfig

        from contracts.builtin_model import resolve_model_path

        config = AutoConfig.from_pretrained(resolve_model_path(path))
    except (OSError, ValueError):
        return None
    heads = config.num_attention_heads
    return Shape(
        hidden=config.hidden_size,
        layers=config.num_hidden_layers,
        intermediate=config.intermediate_size,
        vocab=config.vocab_size,
        heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        tied=bool(getattr(config, "tie_word_embeddings", False)),
    )


def make_plan(
    cfg: JobConfig,
    cluster: dict[str, float] | None = None,
    gpu_memory_gb: float | None = None,
    *,
    nodes: dict[str, dict[str, float]] | None = None,
) -> Plan:
    lines, problems = [], []
    if cluster is not None:
        try:
            cfg = resolve_devices(cfg, cluster)  # `auto` as the cluster decides it, as a run would
        except ValueError as e:
            problems.append(str(e))
    requests = actor_requests(cfg)
    lines.append(f"{'actor':<16}{'count':>6}{'CPU each':>10}{'GPU each':>10}  placement")
    for what, count, each in requests:
        placement = {
            "learner rank": f"one placement group of {count} bundle(s), PACK (ranks join one process group)",
            "rollout worker": "one actor each, anywhere with room",
            "reward worker": "one actor each, anywhere with room",
        }[what]
        lines.append(f"{what:<16}{count:>6}{each['CPU']:>10g}{each['GPU']:>10g}  {placement}")
    total = {r: sum(count * each[r] for _, count, each in requests) for r in ("CPU", "GPU")}
    lines.append(f"{'total':<16}{'':>6}{total['CPU']:>10g}{total['GPU']:>10g}")

    shape = model_shape(cfg.model.path)
    lines.append("")
    if shape is None:
        lines.append(
            f"memory: no config.json reachable for model.path {cfg.model.path!r}; give a local directory "
            "(or a cached hub model) for the per-GPU estimate"
        )
    else:
        lines += _memory(cfg, shape, requests, gpu_memory_gb, problems)
    if cluster is not None:
        lines.append("")
        lines.append(
            "cluster: "
            + ", ".join(f"{k} {v:g}" for k, v in sorted(cluster.items()) if k in ("CPU", "GPU"))
            + (f" on {len(nodes)} nodes" if nodes else "")
        )
        try:
            check_fits(cfg, cluster, nodes=nodes)
            lines.append("fits: the cluster holds every actor at once")
        except ValueError as e:
            problems.append(str(e))
    return Plan(lines, problems)


def _memory(cfg: JobConfig, shape: Shape, requests, gpu_memory_gb: float | None, problems: list[str]) -> list[str]:
    dtype = DTYPE_BYTES[cfg.model.dtype]
    rollout_gpus = next(each["GPU"] for what, _, each in requests if what == "rollout worker")
    learner_gpus = next((each["GPU"] for what, _, each in requests if what == "learner rank"), 0.0)
    lines = [f"memory (model {cfg.model.path}: {shape.params / 1e9:.3f}B parameters, {cfg.model.dtype}; GiB):"]

    weights = shape.params * dtype / GIB
    head_dim = shape.hidden // shape.heads
    kv_per_token = 2 * shape.layers * shape.kv_heads * head_dim * dtype
    r = cfg.rollout
    device = "cuda" if rollout_gpus else "cpu"
    sizing = engine_sizing(r, device, kv_per_token)
    # On GPU with no setting, vLLM picks its batch by the GPU; the largest it picks is shown.
    sequences = sizing.max_num_seqs or GPU_DEFAULT_MAX_NUM_SEQS
    kv = sequences * r.max_model_len * kv_per_token / GIB
    where = "per GPU" if rollout_gpus else "CPU memory"
    lines.append(
        f"  rollout worker ({where}): weights {weights:.2f} + KV cache for {sequences} sequences x "
        f"{r.max_model_len} tokens {kv:.2f} ({kv_per_token / 2**10:.0f} KiB per token)"
    )
    lines.append(f"    {sizing.describe(device)}")
    if r.n_samples > sequences:
        lines.append(
            f"    rollout.n_samples {r.n_samples} exceeds the engine batch ({sequences} sequences): each prompt's "
            "completions take several engine steps; raise rollout.max_num_seqs to run them side by side"
        )
    if rollout_gpus and gpu_memory_gb:
        budget = r.gpu_memory_utilization * gpu_memory_gb
        verdict = "fits" if weights < budget else "does not fit"
        lines.append(
            f"    gpu_memory_utilization {r.gpu_memory_utilization} of {gpu_memory_gb:g} GiB = {budget:.1f}: "
            f"{verdict}; {max(0.0, budget - weights):.1f} left for the KV cache "
            f"({'all' if budget - weights >= kv else 'part'} of a full batch)"
        )
        if weights >= budget:
            problems.append(
                f"a rollout engine's weights ({weights:.1f} GiB) exceed rollout.gpu_memory_utilization x "
                f"GPU memory ({budget:.1f} GiB): raise gpu_memory_utilization or use larger GPUs"
            )

    path = weight_sync_path(cfg)
    if path == "collective":
        extra = (
            f"up to one {r.weight_sync_bucket_mb:g} MiB bucket (or the largest tensor) on each engine while it loads"
        )
    else:
        extra = f"a {weights:.2f} GiB copy of the weights in each worker's host memory while it loads"
    lines.append(f"  weight sync: {path} (rollout.weight_sync {r.weight_sync}); {extra}")

    lc = cfg.learner
    e = estimate(
        shape,
        num_ranks=lc.num_ranks,
        micro_batch_tokens=lc.micro_batch_tokens,
        compute_bytes=dtype,
        separate_critic=estimator(lc.estimator).needs_critic and not lc.shared_critic,
        gradient_checkpointing=lc.gradient_checkpointing,
        samples=r.prompts_per_iteration * r.n_samples,
        response_tokens=r.sampling.max_tokens,
        lora_rank=lc.lora.rank,
        lora_targets=lc.lora.target_modules,
        lora_critic=lc.lora.critic == "lora",
        teacher_params=_teacher_params(cfg, shape, lines),
    )
    where = "per GPU" if learner_gpus else "CPU memory"
    parts = ", ".join(f"{k} {v:.2f}" for k, v in e.items() if k != "total")
    lines.append(f"  learner rank ({where}): {e['total']:.2f} ({parts}); framework overhead not included")
    if learner_gpus and gpu_memory_gb:
        verdict = "fits" if e["total"] * 1.15 <= gpu_memory_gb else "does not fit"
        lines.append(f"    with 15% headroom on {gpu_memory_gb:g} GiB: {verdict}")
        if verdict != "fits":
            problems.append(
                f"a learner rank needs about {e['total']:.1f} GiB (+15% headroom) and a GPU has "
                f"{gpu_memory_gb:g}: raise learner.num_ranks, lower learner.micro_batch_tokens or set "
                "learner.gradient_checkpointing"
            )
    return lines


def _teacher_params(cfg: JobConfig, policy: Shape, lines: list[str]) -> int:
    """The teacher's parameters (learner.teacher), 0 without one; its line added to `lines`. A teacher whose
    config.json is out of reach is counted at the policy's size."""
    if cfg.learner.teacher is None:
        return 0
    from contracts.config import ConfigError
    from rollout.driver.teacher import teacher_model_path

    try:
        shape = model_shape(teacher_model_path(cfg) or "")
    except ConfigError as e:
        lines.append(f"  teacher: {e}")
        shape = None
    if shape is None:
        lines.append("  teacher: no config.json reachable; counted at the policy's size")
        return policy.params
    lines.append(
        f"  teacher {cfg.learner.teacher.path}: {shape.params / 1e9:.3f}B parameters, frozen like the reference"
    )
    return shape.params


def format_plan(plan: Plan) -> str:
    text = "\n".join(plan.lines) + "\n"
    if plan.problems:
        text += "\ndoes not fit:\n" + "\n".join(f"  - {p}" for p in plan.problems) + "\n"
    return text
