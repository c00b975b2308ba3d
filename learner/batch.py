"""Rollout records as padded (batch, time) tensors for the learner.

Prompts are left-padded and responses right-padded, so every response starts in the same column
`P` and the logits predicting response token t sit at column `P - 1 + t` for every row: slicing
replaces a gather over the whole vocabulary. Position ids count real tokens only, so a padded row
sees the same positions the engine saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rollout.record import RolloutRecord


@dataclass
class TokenBatch:
    input_ids: torch.Tensor       # (B, P + T) left-padded prompt, right-padded response
    attention_mask: torch.Tensor  # (B, P + T) 1 on real tokens
    position_ids: torch.Tensor    # (B, P + T)
    responses: torch.Tensor       # (B, T) response token ids, pad 0
    mask: torch.Tensor            # (B, T) float, 1 on real response tokens
    prompt_width: int             # P

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(v.to(device) if isinstance(v, torch.Tensor) else v for v in vars(self).values()))

    def select(self, index: torch.Tensor) -> TokenBatch:
        return TokenBatch(self.input_ids[index], self.attention_mask[index], self.position_ids[index],
                          self.responses[index], self.mask[index], self.prompt_width)

    def response_slice(self, per_position: torch.Tensor) -> torch.Tensor:
        """(B, P + T, ...) per-position outputs -> (B, T, ...) aligned with the response tokens they predict."""
        T = self.responses.shape[1]
        return per_position[:, self.prompt_width - 1:self.prompt_width - 1 + T]


def collate(records: list[RolloutRecord], pad_id: int) -> TokenBatch:
    P = max(len(r.prompt_ids) for r in records)
    T = max(1, max(len(r.response_ids) for r in records))
    B = len(records)
    input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + T), dtype=torch.long)
    responses = torch.zeros((B, T), dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.float32)
    for i, r in enumerate(records):
        p, t = len(r.prompt_ids), len(r.response_ids)
        input_ids[i, P - p:P] = torch.tensor(r.prompt_ids)
        attention[i, P - p:P] = 1
        if t:
            input_ids[i, P:P + t] = torch.tensor(r.response_ids)
            attention[i, P:P + t] = 1
            responses[i, :t] = torch.tensor(r.response_ids)
            mask[i, :t] = 1.0
    position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return TokenBatch(input_ids, attention, position_ids, responses, mask, P)


def pad_rows(rows: list[list[float]], width: int) -> torch.Tensor:
    """Ragged per-token lists -> (B, width) float tensor, zero-padded."""
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    for i, row in enumerate(rows):
        out[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
    return out


def unpad_rows(x: torch.Tensor, mask: torch.Tensor) -> list[list[float]]:
    """(B, T) tensor -> per-row lists of the valid (mask == 1) prefix."""
    lengths = mask.sum(dim=1).long().tolist()
    x = x.detach().float().cpu()
    return [x[i, :n].tolist() for i, n in enumerate(lengths)]
