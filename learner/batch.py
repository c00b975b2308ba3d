"""One micro-batch as padded (batch, time) tensors, as the models take it (`SampleBatch.collate` builds it).

Prompts are left-padded and responses right-padded, so every response starts in the same column
`P` and the logits predicting response token t sit at column `P - 1 + t` for every row: slicing
replaces a gather over the whole vocabulary. Position ids count real tokens only, so a padded row
sees the same positions the engine saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenBatch:
    input_ids: torch.Tensor  # (B, P + T) left-padded prompt, right-padded response
    attention_mask: torch.Tensor  # (B, P + T) 1 on real tokens
    position_ids: torch.Tensor  # (B, P + T)
    responses: torch.Tensor  # (B, T) response token ids, pad 0
    mask: torch.Tensor  # (B, T) float, 1 on real response tokens
    prompt_width: int  # P

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(*(v.to(device) if isinstance(v, torch.Tensor) else v for v in vars(self).values()))

    def select(self, index: torch.Tensor) -> TokenBatch:
        return TokenBatch(
            self.input_ids[index],
            self.attention_mask[index],
            self.position_ids[index],
            self.responses[index],
            self.mask[index],
            self.prompt_width,
        )

    def response_slice(self, per_position: torch.Tensor) -> torch.Tensor:
        """(B, P + T, ...) per-position outputs -> (B, T, ...) aligned with the response tokens they predict."""
        T = self.responses.shape[1]
        return per_position[:, self.prompt_width - 1 : self.prompt_width - 1 + T]
