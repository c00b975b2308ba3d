"""One micro-batch as the models take it (`SampleBatch.collate` builds it), in one of two layouts.

Padded: (B, P + T) rows, prompts left-padded and responses right-padded, so every response starts in
column `P`; position ids count real tokens only, so a padded row sees the positions the engine saw.
Packed: one (1, Σ L_i) row, the sequences back to back with no padding, position ids restarting at 0
for each, and the boundaries `cu_seqlens` (B + 1,) that keep attention within each sequence
(`learner.packed_attention`).

Either way the response side is (B, T): `responses` and `mask`, what the losses take. Which hidden
states predict which response token is an index computed on the host while collating
(`hidden_index`, into the flattened hidden states), and so is where each valid token sits in (B, T)
(`response_index`): gathering and scattering by them needs no host sync, unlike boolean masking.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, P + T) padded, or (1, Σ L_i) packed
    position_ids: torch.Tensor  # the same shape
    attention_mask: torch.Tensor | None  # (B, P + T) 1 on real tokens; None when packed
    responses: torch.Tensor  # (B, T) response token ids, pad 0
    mask: torch.Tensor  # (B, T) float, 1 on real response tokens
    hidden_index: torch.Tensor  # (n,) long: the flattened position whose hidden state predicts each valid token
    response_index: torch.Tensor  # (n,) long: each valid token's place in the flattened (B, T)
    targets: torch.Tensor  # (n,) long: the valid response tokens, row by row
    prompt_width: int = 0  # P, padded only
    cu_seqlens: torch.Tensor | None = None  # (B + 1,) int32 sequence starts in the packed row
    max_length: int = 0  # the longest sequence, packed only

    @property
    def packed(self) -> bool:
        return self.cu_seqlens is not None

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(**{f.name: to_device(getattr(self, f.name), device) for f in fields(self)})

    def backbone_inputs(self) -> dict:
        """Keyword arguments of a transformers backbone's forward. The packed row's boundaries go in the
        kwargs transformers hands every attention function (those its own flash-attention path reads)."""
        inputs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "attention_mask": self.attention_mask}
        if self.packed:
            inputs.update(
                cu_seq_lens_q=self.cu_seqlens,
                cu_seq_lens_k=self.cu_seqlens,
                max_length_q=self.max_length,
                max_length_k=self.max_length,
            )
        return inputs

    def response_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """(rows, length, H) hidden states -> (n, H), the state before each valid response token."""
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, self.hidden_index)

    def scatter(self, values: torch.Tensor | None) -> torch.Tensor | None:
        """(n,) per valid token -> (B, T) float32, zero on padding."""
        if values is None:
            return None
        out = values.new_zeros(self.mask.numel(), dtype=torch.float32)
        out[self.response_index] = values.float()
        return out.view(self.mask.shape)

    def gather(self, per_token: torch.Tensor) -> torch.Tensor:
        """(B, T) -> (n,), the valid tokens row by row: the inverse of `scatter`."""
        return per_token.reshape(-1)[self.response_index]

    def response_slice(self, per_position: torch.Tensor) -> torch.Tensor:
        """Padded only: (B, P + T, ...) per-position outputs -> (B, T, ...) aligned with the response
        tokens they predict."""
        T = self.responses.shape[1]
        return per_position[:, self.prompt_width - 1 : self.prompt_width - 1 + T]


def to_device(value, device: torch.device | str):
    """A host tensor on `device`; to a GPU from pinned memory without blocking, so the host goes on to
    the next micro-batch while this one is copied and computed (a copy from pageable memory waits for
    the GPU to finish its queue). Anything else unchanged."""
    device = torch.device(device)
    if not isinstance(value, torch.Tensor) or value.device == device:
        return value
    if device.type == "cuda":
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)
