"""Packed micro-batches (`learner.pack_sequences`): one row per micro-batch, attention within each
sequence, equal to the padded layout and to each sequence run alone, on every builtin family."""

import warnings

import numpy as np
import pytest
import torch
from transformers import AttentionInterface

from contracts.builtin_model import build_builtin
from contracts.config.load import load_config
from learner import packed_attention
from learner.learner import Learner
from learner.microbatch import plan
from learner.models import CriticModel, PolicyModel, load_causal_lm
from learner.samples import SampleBatch, offsets_of

FAMILIES = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-mistral"]
# An empty response and a one-token response among longer ones, prompts of different lengths.
PROMPTS = [5, 3, 7, 4, 6, 2, 9]
RESPONSES = [0, 1, 6, 3, 11, 2, 1]


def samples(prompts=PROMPTS, responses=RESPONSES, vocab=300, seed=0) -> SampleBatch:
    rng = np.random.default_rng(seed)
    p, t = np.array(prompts), np.array(responses)
    return SampleBatch(
        rng.integers(6, vocab, int(p.sum())).astype(np.int32),
        offsets_of(p),
        rng.integers(6, vocab, int(t.sum())).astype(np.int32),
        offsets_of(t),
        np.full(int(t.sum()), -1.0, dtype=np.float32),
        rng.random(len(p)).astype(np.float32),
        np.arange(len(p)),
    )


def randomise(head: torch.nn.Module, seed: int) -> None:
    """Value heads start at zero; a zero head would hide a wrong hidden state."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def outputs_and_gradients(model: torch.nn.Module, backbone, tokens, weights: list[torch.Tensor], attention: str):
    """Per-token outputs (B, T) and every parameter's gradient of Σ outputs·weights."""
    backbone.set_attn_implementation(attention)
    model.zero_grad(set_to_none=True)
    if isinstance(model, PolicyModel):
        out = model(tokens, temperature=0.7, with_entropy=True)
        columns = [out.logprobs, out.entropy, out.values]
    else:
        columns = [model(tokens)]
    sum(((c * w).sum() for c, w in zip(columns, weights)), torch.zeros(())).backward()
    return [c.detach() for c in columns], {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("network", ["policy_with_value_head", "critic"])
def test_packed_and_padded_give_the_same_outputs_and_gradients(family, network):
    path = str(build_builtin(family))
    if network == "critic":
        model = CriticModel(path, torch.float32).train()
        backbone, head, n_out = model.backbone, model.head, 1
    else:
        model = PolicyModel(load_causal_lm(path, torch.float32), value_head=True).train()
        backbone, head, n_out = model.lm, model.value_head, 3
    randomise(head, 1)
    batch = samples()
    rows = np.arange(len(batch))
    padded, packed = batch.collate(rows, pad_id=0), batch.collate(rows, pad_id=0, packed=True)
    assert packed.input_ids.shape == (1, sum(PROMPTS) + sum(RESPONSES))
    gen = torch.Generator().manual_seed(2)
    # Means over the tokens, as the losses take them: gradients of order 1, where float32 keeps 1e-5.
    weights = [torch.randn(padded.mask.shape, generator=gen) / padded.mask.sum() for _ in range(n_out)]
    want, want_grads = outputs_and_gradients(model, backbone, padded, weights, "sdpa")
    got, got_grads = outputs_and_gradients(model, backbone, packed, weights, packed_attention.SEGMENTS)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    assert want_grads.keys() == got_grads.keys() and len(want_grads) > 10
    for name in want_grads:
        torch.testing.assert_close(got_grads[name], want_grads[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_logprobs_equal_each_sequence_run_alone(family):
    path = str(build_builtin(family))
    lm = load_causal_lm(path, torch.float32, packed_attention.SEGMENTS).eval()
    plain = load_causal_lm(path, torch.float32).eval()  # transformers' own SDPA path, unpadded
    batch = samples(seed=3)
    with torch.no_grad():
        got = PolicyModel(lm)(batch.collate(np.arange(len(batch)), 0, packed=True), temperature=1.0).logprobs
        for i, (p, t) in enumerate(zip(PROMPTS, RESPONSES)):
            prompt = batch.prompt_ids[batch.prompt_offsets[i] : batch.prompt_offsets[i + 1]]
            response = batch.response_ids[batch.response_offsets[i] : batch.response_offsets[i + 1]]
            ids = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))[None]
            logp = torch.log_softmax(plain(input_ids=ids).logits[0, p - 1 : p - 1 + t], -1)
            want = logp.gather(-1, ids[0, p:, None]).squeeze(-1)
            torch.testing.assert_close(got[i, :t], want, atol=1e-5, rtol=1e-5)
            assert (got[i, t:] == 0).all()


def test_packed_plan_budgets_real_tokens_and_needs_fewer_micro_batches():
    rng = np.random.default_rng(0)
    n = 200
    p = rng.integers(32, 257, n)
    t = np.where(rng.random(n) < 0.3, rng.integers(0, 33, n), rng.integers(32, 513, n))
    budget = 4096
    counts = {}
    for packed in (False, True):
        micro = plan(np.arange(n), p, t, budget, 1, packed=packed)[0]
        assert np.array_equal(np.sort(np.concatenate([m.rows for m in micro])), np.arange(n))
        for m in micro:
            padded_size = len(m.rows) * (p[m.rows].max() + max(1, t[m.rows].max()))
            size = (p[m.rows] + t[m.rows]).sum() if packed else padded_size
            assert size <= budget or len(m.rows) == 1
        counts[packed] = len(micro)
    assert counts[True] < 0.8 * counts[False]


def test_packed_and_padded_learners_make_the_same_update(tiny_model_path):
    """A whole iteration, shared critic with entropy bonus: the same columns and the same weights."""
    batch = samples(PROMPTS * 4, RESPONSES * 4, seed=5)
    results = []
    for packed in ("false", "true"):
        cfg = load_config(
            None,
            [
                "learner.device=cpu",
                "learner.minibatch_size=14",
                "learner.lr=1e-4",
                "learner.micro_batch_tokens=40",
                "learner.shared_critic=true",
                "learner.entropy_coef=0.01",
                f"learner.pack_sequences={packed}",
            ],
        )
        learner = Learner(cfg.learner, tiny_model_path, temperature=0.8)
        assert learner.packed == (packed == "true")
        randomise(learner.policy.value_head, 4)
        columns, stats, _ = learner.learn(batch)
        results.append((columns, stats, dict(learner.export_weights())))
    (c1, s1, w1), (c2, s2, w2) = results
    for name in ("old_logprobs", "ref_logprobs", "values", "advantages"):
        np.testing.assert_allclose(getattr(c2, name), getattr(c1, name), atol=1e-5, rtol=1e-5, err_msg=name)
    assert s1["grad_norm"] == pytest.approx(s2["grad_norm"], rel=1e-5)
    assert s1["entropy"] == pytest.approx(s2["entropy"], rel=1e-5)
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-5


def test_the_probe_scores_a_sequence_like_an_unpadded_forward(tiny_model_path):
    cfg = load_config(None, ["learner.device=cpu"])
    learner = Learner(cfg.learner, tiny_model_path)
    ids = [1, 40, 41, 42, 99, 7]
    plain = load_causal_lm(tiny_model_path, torch.float32).eval()
    with torch.no_grad():
        logp = torch.log_softmax(plain(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
    want = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    torch.testing.assert_close(torch.tensor(learner.probe_logprobs(ids)), want, atol=1e-5, rtol=1e-5)


def test_the_attention_for_packed_rows_by_device_dtype_and_kernels():
    bf16 = torch.bfloat16
    both = (packed_attention.TORCH_VARLEN, packed_attention.FLASH_ATTN_VARLEN)
    assert packed_attention.choose("cpu", torch.float32) == packed_attention.SEGMENTS
    assert packed_attention.choose("cuda", bf16, both) == packed_attention.TORCH_VARLEN
    flash_only = (packed_attention.FLASH_ATTN_VARLEN,)
    assert packed_attention.choose("cuda", bf16, flash_only) == packed_attention.FLASH_ATTN_VARLEN
    for dtype, kernels, says in ((bf16, (), "neither"), (torch.float32, both, "float32")):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert packed_attention.choose("cuda", dtype, kernels) is None
        assert len(caught) == 1 and says in str(caught[0].message) and "padded" in str(caught[0].message)


def test_a_padded_batch_of_several_rows_is_refused_by_a_packed_model(tiny_model_path):
    model = PolicyModel(load_causal_lm(tiny_model_path, torch.float32, packed_attention.SEGMENTS))
    batch = samples()
    with pytest.raises(ValueError, match="padded batch of several rows"):
        model(batch.collate(np.arange(len(batch)), 0), temperature=1.0)


def per_sequence_attention(query, key, value, cu_seq, scale=None):
    """The reference: (1, H, L, D) packed -> (1, L, Hq, D), causal SDPA on each sequence alone."""
    starts = cu_seq.tolist()
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(
            *(x[:, :, s:e] for x in (query, key, value)),
            is_causal=True,
            scale=scale,
            enable_gqa=query.shape[1] != key.shape[1],
        )
        for s, e in zip(starts[:-1], starts[1:])
    ]
    return torch.cat(pieces, dim=2).transpose(1, 2)


def padded_attention(query, key, value, cu_seq, scale=None):
    """The padded layout's attention: sequences right-padded to the longest, a causal and key-padding
    mask, the valid positions put back in packed order."""
    lengths = cu_seq.diff().tolist()
    width = max(lengths)
    rows = [
        torch.nn.functional.pad(x[0, :, s : s + n], (0, 0, 0, width - n))
        for x in (query, key, value)
        for s, n in zip(cu_seq.tolist(), lengths)
    ]
    q, k, v = (torch.stack(rows[i * len(lengths) : (i + 1) * len(lengths)]) for i in range(3))
    valid = torch.arange(width)[None] < torch.tensor(lengths)[:, None]
    mask = torch.ones(width, width).tril().bool()[None, None] & valid[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return torch.cat([out[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])[None]


PACKED_ROWS = {
    "short": [3, 1, 17, 9, 4, 12, 2, 30, 8, 8, 5],
    "one long among short": [5, 2, 300, 7, 1, 11, 6],
    "sorted, as micro-batches come": sorted(np.random.default_rng(0).integers(4, 41, 60).tolist()),
    "all one length": [16] * 9,
    "one sequence": [23],
}


@pytest.mark.parametrize("lengths", PACKED_ROWS.values(), ids=PACKED_ROWS.keys())
@pytest.mark.parametrize("heads", [(4, 4), (6, 2)], ids=["mha", "gqa"])
def test_bucketed_attention_equals_each_sequence_alone_and_the_padded_layout(lengths, heads):
    gen = torch.Generator().manual_seed(len(lengths))
    cu_seq = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32)
    total, (hq, hkv) = int(cu_seq[-1]), heads
    # (1, H, L, D) views of (1, L, H, D) tensors, as transformers' attention layers hand them over.
    inputs = [torch.randn(1, total, h, 8, generator=gen).transpose(1, 2).requires_grad_() for h in (hq, hkv, hkv)]
    weight = torch.randn(1, total, hq, 8, generator=gen)
    attention = AttentionInterface()[packed_attention.SEGMENTS]
    results = []
    for attend in (
        lambda q, k, v: attention(None, q, k, v, None, scaling=0.3, cu_seq_lens_q=cu_seq, max_length_q=max(lengths))[0],
        lambda q, k, v: per_sequence_attention(q, k, v, cu_seq, scale=0.3),
        lambda q, k, v: padded_attention(q, k, v, cu_seq, scale=0.3),
    ):
        out = attend(*inputs)
        assert out.shape == (1, total, hq, 8)
        results.append((out.detach(), torch.autograd.grad((out * weight).sum(), inputs)))
    (got, got_grads), *references = results
    for want, want_grads in references:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_buckets_are_few_and_waste_little():
    rng = np.random.default_rng(1)
    lengths = np.concatenate([rng.integers(4, 41, 1000), rng.integers(41, 513, 24)])
    cu_seq = np.concatenate([[0], np.cumsum(lengths)])
    layout = packed_attention.grids(cu_seq)
    assert len(layout.shapes) < 30
    cells = sum(n * width for n, width in layout.shapes)
    assert layout.gather.shape == (cells,) and cells < 1.25 * lengths.sum()
    # Every packed position is read from its own place and written back from one cell.
    assert torch.equal(layout.gather[layout.scatter], torch.arange(lengths.sum()))
    for members in packed_attention.buckets(lengths):
        shortest, longest = lengths[members].min(), lengths[members].max()
        assert longest <= max(packed_attention.GROWTH * shortest, shortest + packed_attention.SLACK)


def varlen_reference(q, k, v, cu_seq, scale, causal, gqa):
    """What the varlen kernels compute, by their documented contract: (L, H, D) tokens-first inputs,
    attention within each cu_seq segment."""
    assert q.dim() == 3 and q.is_contiguous() and k.is_contiguous() and causal
    if k.shape[1] != q.shape[1] and not gqa:
        raise ValueError("key-value heads differ from query heads without GQA")
    starts = cu_seq.tolist()
    pieces = [
        torch.nn.functional.scaled_dot_product_attention(
            *(x[s:e].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale, enable_gqa=gqa
        ).transpose(0, 1)
        for s, e in zip(starts[:-1], starts[1:])
    ]
    return torch.cat(pieces)


# torch's varlen_attn as each release spells it, and flash-attn's varlen function.
def torch_2_10(q, k, v, cu_q, cu_k, max_q, max_k, *, is_causal=False, return_aux=None, scale=None):
    return varlen_reference(q, k, v, cu_q, scale, is_causal, gqa=False)


def torch_2_11(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    return varlen_reference(q, k, v, cu_q, scale, tuple(window_size) == (-1, 0), gqa=False)


def torch_2_13(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    return varlen_reference(q, k, v, cu_q, scale, tuple(window_size) == (-1, 0), gqa=enable_gqa)


def flash_attn(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    return varlen_reference(q, k, v, cu_q, softmax_scale, causal, gqa=True)


@pytest.mark.parametrize(
    "kernel, name",
    [
        (torch_2_10, packed_attention.TORCH_VARLEN),
        (torch_2_11, packed_attention.TORCH_VARLEN),
        (torch_2_13, packed_attention.TORCH_VARLEN),
        (flash_attn, packed_attention.FLASH_ATTN_VARLEN),
    ],
)
def test_the_cuda_varlen_paths_hand_the_kernels_what_they_take(monkeypatch, kernel, name):
    """On CPU, with a stand-in of each kernel's contract: layout, causality, grouped-query heads and the
    signature of each torch release reach the kernel right; outputs and gradients equal the padded ones."""
    monkeypatch.setattr(packed_attention, "_torch_varlen", lambda: kernel)
    monkeypatch.setattr(packed_attention, "_flash_varlen", lambda: kernel)
    model = PolicyModel(load_causal_lm(str(build_builtin("tiny-qwen2")), torch.float32), value_head=True).train()
    randomise(model.value_head, 1)
    batch = samples(seed=7)
    rows = np.arange(len(batch))
    mask = batch.collate(rows, 0).mask
    weights = [torch.randn(mask.shape, generator=torch.Generator().manual_seed(3)) / mask.sum()] * 3
    want, want_grads = outputs_and_gradients(model, model.lm, batch.collate(rows, 0), weights, "sdpa")
    got, got_grads = outputs_and_gradients(model, model.lm, batch.collate(rows, 0, packed=True), weights, name)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    for n in want_grads:
        torch.testing.assert_close(got_grads[n], want_grads[n], atol=1e-5, rtol=1e-5, msg=n)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: torch's varlen attention")
@pytest.mark.parametrize("family", ["tiny-qwen2", "tiny-llama"])
def test_cuda_varlen_packed_logprobs_match_padded_ones_in_bfloat16(family):
    path = str(build_builtin(family))
    name = packed_attention.choose("cuda", torch.bfloat16)
    assert name is not None
    model = PolicyModel(load_causal_lm(path, torch.float32, name), value_head=True).cuda().train()
    randomise(model.value_head, 1)
    batch = samples(seed=6)
    rows = np.arange(len(batch))
    got = {}
    for packed, attention in ((False, "sdpa"), (True, name)):
        model.lm.set_attn_implementation(attention)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(batch.collate(rows, 0, packed=packed).to("cuda"), temperature=1.0, with_entropy=True)
        (out.logprobs.sum() + out.values.sum()).backward()
        got[packed] = (out.logprobs, out.values, model.lm.get_output_embeddings().weight.grad.clone())
    for a, b in zip(got[True], got[False]):
        torch.testing.assert_close(a, b, atol=0.05, rtol=0.05)
