"""The chunked LM head: logprobs and entropies equal a full log_softmax, gradients included."""

import math

import pytest
import torch

from learner.logprobs import token_logprobs


def reference(hidden, weight, tokens, temperature):
    logp = torch.log_softmax((hidden @ weight.T) / temperature, -1)
    return logp.gather(-1, tokens[:, None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_chunked_logprobs_entropy_and_gradients_equal_a_full_log_softmax(temperature, chunk):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(13, 8, generator=gen, dtype=torch.float64).requires_grad_()
    weight = (torch.randn(29, 8, generator=gen, dtype=torch.float64) * 2).requires_grad_()
    tokens = torch.randint(0, 29, (13,), generator=gen)
    g_lp, g_ent = (
        torch.randn(13, generator=gen, dtype=torch.float64),
        torch.randn(13, generator=gen, dtype=torch.float64),
    )

    want_lp, want_ent = reference(hidden, weight, tokens, temperature)
    want_grads = torch.autograd.grad((want_lp * g_lp).sum() + (want_ent * g_ent).sum(), (hidden, weight))
    got_lp, got_ent = token_logprobs(hidden, weight, tokens, temperature, with_entropy=True, chunk=chunk)
    assert got_lp.dtype == torch.float32
    torch.testing.assert_close(got_lp.double(), want_lp.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_ent.double(), want_ent.detach(), atol=1e-5, rtol=0)
    got_grads = torch.autograd.grad((got_lp.double() * g_lp).sum() + (got_ent.double() * g_ent).sum(), (hidden, weight))
    for got, want in zip(got_grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_entropy_only_logprobs_carry_gradient():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(5, 4, generator=gen).requires_grad_()
    weight = torch.randn(7, 4, generator=gen).requires_grad_()
    tokens = torch.randint(0, 7, (5,), generator=gen)
    lp, entropy = token_logprobs(hidden, weight, tokens, 1.0, chunk=2)
    assert entropy is None
    want, _ = reference(hidden, weight, tokens, 1.0)
    got = torch.autograd.grad(lp.sum(), (hidden, weight))
    for g, w in zip(got, torch.autograd.grad(want.sum(), (hidden, weight))):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_uniform_logits_have_log_vocab_entropy_and_large_logits_do_not_overflow():
    eye = torch.eye(3)
    logits = torch.tensor([[7.0, 7.0, 7.0], [1e4, 0.0, 0.0], [100.0, 100.0 + math.log(3.0), -50.0]])
    lp, entropy = token_logprobs(logits, eye, torch.tensor([0, 0, 1]), 1.0, with_entropy=True)
    assert entropy[0].item() == pytest.approx(math.log(3))
    assert entropy[1].item() == pytest.approx(0.0, abs=1e-6) and lp[1].item() == pytest.approx(0.0, abs=1e-6)
    assert lp[2].item() == pytest.approx(math.log(0.75), rel=1e-5)


def test_bf16_hidden_states_give_float32_logprobs_of_the_bf16_logits():
    """The head's matmul runs in the compute dtype, as the engine's does; the softmax in float32."""
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(6, 16, generator=gen).bfloat16(), torch.randn(300, 16, generator=gen).bfloat16()
    tokens = torch.randint(0, 300, (6,), generator=gen)
    got, _ = token_logprobs(hidden, weight, tokens, 1.0)
    want = torch.log_softmax((hidden @ weight.T).double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def test_non_positive_temperature_is_refused():
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(torch.zeros(1, 2), torch.zeros(3, 2), torch.zeros(1, dtype=torch.long), 0.0)
