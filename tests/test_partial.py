"""Partial rollouts on the real engine: groups carry over between calls, a weight load cuts and resumes them,
and every archived logprob is the one its own weights give."""

import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from contracts.config import SamplingConfig
from contracts.rendering import PromptTask
from rollout.generation.partial import PartialRollouts, completions

pytestmark = pytest.mark.vllm

PROMPTS = ["3+4=", "What is 12+30?", "hello there", "7*6=", "count to ten", "2+2="]


def _tasks(path) -> list[PromptTask]:
    tok = AutoTokenizer.from_pretrained(path)
    tasks = []
    for i, p in enumerate(PROMPTS):
        text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        tasks.append(
            PromptTask(prompt_id=f"p{i}", prompt=text, prompt_ids=tok(text, add_special_tokens=False)["input_ids"])
        )
    return tasks


@pytest.fixture
def weights(vllm_engine, tiny_model_path):
    """The tiny model's weights and a perturbed copy; the session's engine gets the originals back after."""
    original = load_file(f"{tiny_model_path}/model.safetensors")
    torch.manual_seed(0)
    other = {k: (v + 0.3 * torch.randn_like(v) if "mlp" in k else v) for k, v in original.items()}
    yield original, other
    vllm_engine.reload_weights(list(original.items()))


def test_a_call_hands_out_its_quota_and_the_rest_carry_over(vllm_engine, tiny_model_path):
    pool = PartialRollouts(vllm_engine, SamplingConfig(max_tokens=16, seed=3), 2, lambda: 0)
    try:
        tasks = _tasks(tiny_model_path)
        first = [g for chunk in pool.take(tasks, [11 * i for i in range(len(tasks))], 2, 0, 1) for g in chunk]
        assert len(first) == 2 and all(g.complete for g in first)
        held = pool.held()
        assert len(held) == len(tasks) - 2 and not set(held) & {g.task.prompt_id for g in first}
        rest = [g for chunk in pool.take([], [], 10, 0, 3) for g in chunk]
        assert sorted(g.task.prompt_id for g in first + rest) == sorted(t.prompt_id for t in tasks)
        assert pool.held() == []
        for g in first + rest:
            assert all(len(s.token_ids) == len(s.logprobs) <= 16 and s.finish in ("stop", "length") for s in g.samples)
    finally:
        pool.close()


def test_a_weight_load_cuts_and_resumes_samples_token_exact(vllm_engine, tiny_model_path, weights):
    original, other = weights
    version = {"now": 0}
    sampling = SamplingConfig(max_tokens=40, temperature=1.0, seed=3)
    pool = PartialRollouts(vllm_engine, sampling, 2, lambda: version["now"])
    try:
        tasks = _tasks(tiny_model_path)
        out = []
        steps = vllm_engine.steps
        reader = threading.Thread(target=lambda: out.extend(g for c in pool.take(tasks, [7] * 6, 6, 0, 6) for g in c))
        reader.start()
        deadline = time.monotonic() + 60
        while vllm_engine.steps < steps + 6 and time.monotonic() < deadline:
            time.sleep(0.001)
        with pool.paused():  # a weight load while every group is in flight: they are cut, their tokens kept
            vllm_engine.reload_weights(list(other.items()))
            version["now"] = 1
        reader.join(timeout=120)
        assert not reader.is_alive() and sorted(g.task.prompt_id for g in out) == sorted(t.prompt_id for t in tasks)
        resumed = [(g, s) for g in out for s in g.samples if s.resumed_at]
        assert resumed and pool.resumed == len(resumed)
        rows = completions(vllm_engine, out)
        assert any(c.policy_version == 0 and c.resumed_versions == [1] for row in rows for c in row)

        # Each token's logprob again, under the weights that sampled it (temperature 1: the model's own).
        def recompute(group, sample, state):
            with pool.paused():
                vllm_engine.reload_weights(list(state.items()))
                return vllm_engine.probe_logprobs(list(group.task.prompt_ids) + sample.token_ids)

        checked = 0
        for group, sample in resumed[:4]:
            start, cut = len(group.task.prompt_ids), sample.resumed_at[0]
            under = {0: recompute(group, sample, original), 1: recompute(group, sample, other)}
            assert 0 < cut < len(sample.token_ids) or sample.finish == "stop"
            for t, logprob in enumerate(sample.logprobs):
                v = group.version if t < cut else sample.resumed_versions[0]
                assert abs(under[v][start - 1 + t] - logprob) < 1e-5, (t, cut, v)
                checked += 1
        assert checked > 20
    finally:
        pool.close()


def test_a_call_finishes_the_groups_that_would_be_too_stale_later(vllm_engine, tiny_model_path):
    """A group started before `oldest` is handed out in this call even past the quota."""
    version = {"now": 0}
    pool = PartialRollouts(vllm_engine, SamplingConfig(max_tokens=24, seed=5), 2, lambda: version["now"])
    try:
        tasks = _tasks(tiny_model_path)
        first = [g for chunk in pool.take(tasks, [None] * len(tasks), 1, 0, 1) for g in chunk]
        assert len(first) == 1
        with pool.paused():
            version["now"] = 1
        # Quota 1, but every group left started under version 0 < oldest 1: all of them come out now.
        second = [g for chunk in pool.take([], [], 1, 1, 1) for g in chunk]
        assert len(second) == len(tasks) - 1 and pool.held() == []
        assert all(g.version == 0 for g in second)
    finally:
        pool.close()


def test_a_failed_weight_load_leaves_the_cut_samples_waiting_until_a_load_succeeds(vllm_engine, tiny_model_path):
    pool = PartialRollouts(vllm_engine, SamplingConfig(max_tokens=40, seed=9), 2, lambda: 0)
    try:
        tasks = _tasks(tiny_model_path)
        out = []
        start = vllm_engine.steps
        reader = threading.Thread(
            target=lambda: out.extend(g for c in pool.take(tasks, [None] * 6, 6, 0, 6) for g in c)
        )
        reader.start()
        deadline = time.monotonic() + 60
        while vllm_engine.steps < start + 4 and time.monotonic() < deadline:
            time.sleep(0.001)
        with pytest.raises(RuntimeError, match="load failed"):
            with pool.paused():
                raise RuntimeError("load failed")
        steps = vllm_engine.steps
        time.sleep(0.5)
        assert vllm_engine.steps == steps and not out and len(pool.held()) == len(tasks)
        with pool.paused():  # the sync's retry
            pass
        reader.join(timeout=120)
        assert len(out) == len(tasks) and vllm_engine.steps > steps
    finally:
        pool.close()
