"""On-policy distillation (`learner.teacher`): a frozen teacher's logprobs of the tokens the policy sampled
turn into a per-token reward, the negative reverse KL to the teacher, as pure functions on (batch, time)
response tensors (the conventions of learner/advantages.py: zero on padding whatever it holds).

On the policy's own samples, log π(y_t) − log π_teacher(y_t) is a one-sample estimate of the reverse KL
KL(π ‖ π_teacher) at each step; maximising −coef times it pulls the student toward the teacher's modes
(Agarwal et al. 2024, GKD; Thinking Machines' on-policy distillation). It is added to the token rewards
beside the sequence score and the reference KL penalty, so any advantage estimator sees it.
"""

from __future__ import annotations

import torch


def reverse_kl(logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token reverse KL estimate of the sampled tokens, zero off `mask`.

    logprobs, teacher_logprobs, mask: (B, T) -> (B, T)."""
    return torch.where(mask.bool(), logprobs - teacher_logprobs, 0)  # log π − log π_teacher


def distill_rewards(
    logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor, coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, reverse kl), both (B, T), zero off `mask`: each sampled token's distillation reward.

    logprobs (the policy's), teacher_logprobs, mask: (B, T)."""
    kl = reverse_kl(logprobs, teacher_logprobs, mask)
    return -coef * kl, kl  # r_t = −coef·(log π(y_t) − log π_teacher(y_t))


def load_teacher(path: str, policy_lm: torch.nn.Module, dtype: torch.dtype, attention: str) -> torch.nn.Module:
    """The teacher at `path` (a model directory) as a `PolicyModel` in `dtype`; ValueError when its vocabulary
    is not the policy's: it scores the policy's token ids, which mean nothing under another tokenizer."""
    from learner.models import PolicyModel, load_causal_lm

    lm = load_causal_lm(path, dtype, attention)
    theirs, ours = lm.config.vocab_size, policy_lm.config.vocab_size
    if theirs != ours:
        raise ValueError(
            f"learner.teacher.path: the teacher {path} has a vocabulary of {theirs} tokens and the policy one of "
            f"{ours}: a teacher scores the policy's token ids, so it needs the policy's tokenizer"
        )
    return PolicyModel(lm)
