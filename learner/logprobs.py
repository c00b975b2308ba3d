"""Token logprobs (and entropies) from hidden states, without a (tokens x vocab) tensor.

The LM head is applied here, to response positions only, a chunk of tokens at a time: each chunk's
logits live only while its logsumexp, gathered logit and entropy are taken, in the forward pass and
again, recomputed, in the backward pass. Peak memory is one (chunk, vocab) block in float32, not
(batch x length x vocab) kept three times by autograd.
"""

from __future__ import annotations

import torch

from learner.memory import LOGIT_CHUNK_BYTES


def chunk_tokens(vocab_size: int) -> int:
    return max(1, LOGIT_CHUNK_BYTES // (4 * vocab_size))


def token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float,
    *,
    with_entropy: bool = False,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(h·Wᵀ / τ) at each token, and the distribution's entropy when asked.

    hidden: (N, H); weight: (V, H), the LM head; tokens: (N,) integer -> (logprobs (N,) float32,
    entropy (N,) float32 or None). Differentiable in hidden and weight; the matmuls run in hidden's
    dtype, the softmax in float32.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    chunk = chunk or chunk_tokens(weight.shape[0])
    logprobs, entropy = _ChunkedLogprobs.apply(hidden, weight, tokens, temperature, chunk, with_entropy)
    return logprobs, (entropy if with_entropy else None)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, temperature: float) -> torch.Tensor:
    """h (c, H) and w (V, H) in one dtype -> (c, V) float32 logits."""
    z = (h @ w.T).float()
    return z if temperature == 1.0 else z.div_(temperature)  # z = h·Wᵀ / τ


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, tokens, temperature, chunk, with_entropy):
        n = hidden.shape[0]
        logprobs = hidden.new_empty(n, dtype=torch.float32)
        entropy = hidden.new_zeros(n, dtype=torch.float32)
        normalisers = hidden.new_empty(n, dtype=torch.float32)
        w = weight.to(hidden.dtype)  # once: cast per chunk, the whole head would be read and written each time
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, n, chunk):
                z = _chunk_logits(hidden[s : s + chunk], w, temperature)
                lse = torch.logsumexp(z, dim=-1)
                normalisers[s : s + chunk] = lse
                logprobs[s : s + chunk] = (
                    z.gather(-1, tokens[s : s + chunk, None].long()).squeeze(-1) - lse
                )  # z_a − log Σ e^z
                if with_entropy:
                    logp = z.sub_(lse[:, None])
                    entropy[s : s + chunk] = -(logp.exp() * logp).sum(-1)  # H = −Σ p·log p
        ctx.save_for_backward(hidden, weight, tokens, normalisers)
        ctx.set_materialize_grads(False)  # an unused entropy then costs nothing in the backward pass
        ctx.temperature, ctx.chunk, ctx.with_entropy = temperature, chunk, with_entropy
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        """Per chunk, with g and e the incoming gradients of log p_a and H:
        ∂(g·log p_a + e·H)/∂z = g·onehot(a) − p·(g + e·(log p + H)), in as few passes over the
        (chunk, V) logits as that takes, most of them in place."""
        hidden, weight, tokens, normalisers = ctx.saved_tensors
        temperature, c = ctx.temperature, ctx.chunk
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if ctx.needs_input_grad[1] else None
        )
        w = weight.to(hidden.dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], c):
                h = hidden[s : s + c]
                logp = _chunk_logits(h, w, temperature).sub_(normalisers[s : s + c, None])
                p = torch.exp(logp)
                g = None if grad_logprobs is None else grad_logprobs[s : s + c, None] / temperature
                if grad_entropy is None:
                    factor = -g
                else:
                    H = -(p * logp).sum(-1, keepdim=True)  # H = −Σ p·log p
                    factor = logp.add_(H).mul_(-grad_entropy[s : s + c, None] / temperature)  # −e·(log p + H)
                    if g is not None:
                        factor.sub_(g)
                grad_z = p.mul_(factor)  # −p·(g + e·(log p + H)), over τ: z = h·Wᵀ / τ
                if g is not None:
                    grad_z.scatter_add_(-1, tokens[s : s + c, None].long(), g)  # + g·onehot(a)
                grad_z = grad_z.to(h.dtype)
                if grad_hidden is not None:
                    grad_hidden[s : s + c] = grad_z @ w
                if grad_weight is not None:
                    grad_weight.add_(grad_z.T @ h)  # float32 sum of the chunks' compute-dtype products
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None
