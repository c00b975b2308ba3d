"""The learner's networks, each one module whose forward returns per-response-token outputs.

`PolicyModel` runs a causal LM's backbone, keeps the hidden states at response positions only and
takes token logprobs through the chunked LM head (`learner.logprobs`): no full-vocabulary logits.
With a shared critic it also carries the value head. `CriticModel` is a separate backbone with a
value head. Being one module each, they are what FSDP2 shards (per decoder layer, then the root).
`Trained` pairs a network that trains with its optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM

from learner.batch import TokenBatch
from learner.logprobs import token_logprobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_causal_lm(path: str, dtype: torch.dtype, attention: str = "sdpa") -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attention)


@dataclass
class PolicyOutput:
    logprobs: torch.Tensor  # (B, T) float32, zero on padding
    entropy: torch.Tensor | None  # (B, T) float32, when asked
    values: torch.Tensor | None  # (B, T) float32, shared critic only


@dataclass
class Trained:
    """A network the update trains, with its optimizer: the policy, and the separate critic where there is one."""

    name: str  # its key in the checkpoint's training state
    model: nn.Module
    optimizer: torch.optim.Optimizer


class ValueHead(nn.Module):
    """Hidden state (..., H) -> value of the state before each response token (...)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.proj = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.proj.weight)  # start at V = 0: no made-up baseline before any learning
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(hidden).squeeze(-1).float()


class PolicyModel(nn.Module):
    def __init__(self, lm: nn.Module, value_head: bool = False):
        super().__init__()
        self.lm = lm
        self.value_head = ValueHead(lm.config.hidden_size) if value_head else None

    def forward(self, batch: TokenBatch, temperature: float, with_entropy: bool = False) -> PolicyOutput:
        hidden = self.lm.get_decoder()(**batch.backbone_inputs(), use_cache=False).last_hidden_state
        hidden = batch.response_hidden(hidden)  # (n valid tokens, H): the LM head sees nothing else
        logprobs, entropy = token_logprobs(
            hidden, self.lm.get_output_embeddings().weight, batch.targets, temperature, with_entropy=with_entropy
        )
        values = self.value_head(hidden) if self.value_head is not None else None
        return PolicyOutput(batch.scatter(logprobs), batch.scatter(entropy), batch.scatter(values))


class CriticModel(nn.Module):
    """A separate backbone (initialised from the policy's weights) with its own value head."""

    def __init__(self, path: str, dtype: torch.dtype, attention: str = "sdpa"):
        super().__init__()
        from transformers.utils import logging as hf_logging

        # Loading a causal LM checkpoint as a bare backbone leaves its lm_head unused, which
        # transformers reports at length; that is exactly what is intended here.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            self.backbone = AutoModel.from_pretrained(path, dtype=dtype, attn_implementation=attention)
        finally:
            hf_logging.set_verbosity(verbosity)
        self.head = ValueHead(self.backbone.config.hidden_size).to(dtype)

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        """(B, T) float32 values, zero on padding."""
        hidden = self.backbone(**batch.backbone_inputs(), use_cache=False).last_hidden_state
        return batch.scatter(self.head(batch.response_hidden(hidden)))
