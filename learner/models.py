"""The learner's networks: the policy (a causal LM) and the critic (a backbone with a value head)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from learner.batch import TokenBatch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_policy(path: str, dtype: str, device: torch.device) -> nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return model.to(device)


def policy_logits(policy: nn.Module, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-aligned logits (B, T, V) and the last hidden states (B, T, H) of the same positions."""
    out = policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                 position_ids=batch.position_ids, output_hidden_states=True, use_cache=False)
    return batch.response_slice(out.logits).float(), batch.response_slice(out.hidden_states[-1])


class ValueHead(nn.Module):
    """Hidden state (B, T, H) -> value of the state before each response token (B, T)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)  # start at V = 0: no made-up baseline before any learning
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden.float()).squeeze(-1)


class Critic(nn.Module):
    """A separate backbone (initialised from the policy's weights) with its own value head."""

    def __init__(self, path: str, dtype: str):
        super().__init__()
        from transformers.utils import logging as hf_logging

        # Loading a causal LM checkpoint as a bare backbone leaves its lm_head unused, which
        # transformers reports at length; that is exactly what is intended here.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.backbone = AutoModel.from_pretrained(path, dtype=DTYPES[dtype])
        finally:
            hf_logging.set_verbosity(verbosity)
        self.head = ValueHead(self.backbone.config.hidden_size)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        out = self.backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=batch.position_ids, use_cache=False)
        return self.head(batch.response_slice(out.last_hidden_state))
