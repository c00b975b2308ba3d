"""The learner's input and output as flat columns: one iteration's samples and their per-token results.

A `SampleBatch` is what the rollout side hands the learner: token ids, behaviour logprobs, scores
and prompt groups as numpy buffers with offsets (the archive's list columns, unpacked), cheap to
pickle and to slice. The learner pads only the rows of one micro-batch at a time (`collate`).
`LearnerColumns` is what comes back: per-token float32 columns aligned with `response_ids`.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, fields

import numpy as np
import torch

from learner.batch import TokenBatch


def padded_width(lengths: np.ndarray) -> int:
    return max(1, int(lengths.max(initial=0)))


def offsets_of(lengths: np.ndarray) -> np.ndarray:
    """(N,) lengths -> (N + 1,) int64 offsets, offsets[i]:offsets[i + 1] the span of row i."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def flatten(rows, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Ragged Python lists -> (flat values, offsets)."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    offsets = offsets_of(lengths)
    flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=dtype, count=int(offsets[-1]))
    return flat, offsets


@dataclass
class SampleBatch:
    prompt_ids: np.ndarray  # (sum P_i,) int32
    prompt_offsets: np.ndarray  # (N + 1,) int64
    response_ids: np.ndarray  # (sum T_i,) int32
    response_offsets: np.ndarray  # (N + 1,) int64
    behaviour_logprobs: np.ndarray  # (sum T_i,) float32, the engine's logprob of each response token
    scores: np.ndarray  # (N,) float32, the sequence reward
    groups: np.ndarray  # (N,) int64, index of the sample's prompt group (same prompt, same iteration)

    @classmethod
    def from_records(cls, records) -> SampleBatch:
        """From rollout records (anything with prompt_ids, response_ids, response_logprobs, reward, prompt_id)."""
        prompt_ids, prompt_offsets = flatten([r.prompt_ids for r in records], np.int32)
        response_ids, response_offsets = flatten([r.response_ids for r in records], np.int32)
        behaviour, _ = flatten([r.response_logprobs for r in records], np.float32)
        scores = np.array([np.nan if r.reward is None else r.reward for r in records], dtype=np.float32)
        _, groups = np.unique(np.array([r.prompt_id for r in records], dtype=object), return_inverse=True)
        return cls(
            prompt_ids, prompt_offsets, response_ids, response_offsets, behaviour, scores, groups.astype(np.int64)
        )

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.diff(self.prompt_offsets)

    @property
    def response_lengths(self) -> np.ndarray:
        return np.diff(self.response_offsets)

    def collate(self, rows: np.ndarray, pad_id: int) -> TokenBatch:
        """The given rows as one padded TokenBatch: prompts left-padded, responses right-padded.

        Vectorised over tokens: every token's (row, column) is computed from the offsets at once.
        """
        rows = np.asarray(rows, dtype=np.int64)
        p = self.prompt_lengths[rows]
        t = self.response_lengths[rows]
        P, T, B = int(p.max(initial=1)), padded_width(t), len(rows)
        input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
        attention = torch.zeros((B, P + T), dtype=torch.long)
        responses = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.float32)

        row, src, within = token_spans(self.prompt_offsets[rows], p)
        col = torch.from_numpy(P - p[row] + within)
        row = torch.from_numpy(row)
        input_ids[row, col] = torch.from_numpy(self.prompt_ids[src].astype(np.int64))
        attention[row, col] = 1

        row, src, within = token_spans(self.response_offsets[rows], t)
        ids = torch.from_numpy(self.response_ids[src].astype(np.int64))
        row, within = torch.from_numpy(row), torch.from_numpy(within)
        input_ids[row, P + within] = ids
        attention[row, P + within] = 1
        responses[row, within] = ids
        mask[row, within] = 1.0
        position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
        return TokenBatch(input_ids, attention, position_ids, responses, mask, P)

    def flatten_column(self, rows) -> np.ndarray:
        """Per-sample lists of a per-response-token column -> one flat float32 buffer aligned with response_ids."""
        flat, offsets = flatten(rows, np.float32)
        if not np.array_equal(offsets, self.response_offsets):
            raise ValueError("a per-token column's lengths differ from the responses' lengths")
        return flat

    @functools.cached_property
    def _token_positions(self) -> torch.Tensor:
        """Each response token's index into the row-major (N, T) padded layout, in flat order."""
        lengths = torch.from_numpy(self.response_lengths)
        mask = torch.arange(padded_width(self.response_lengths)) < lengths[:, None]
        return mask.reshape(-1).nonzero().squeeze(1)

    def padded(self, flat: np.ndarray) -> torch.Tensor:
        """A per-response-token flat column -> (N, T) float32 tensor, zero-padded."""
        out = torch.zeros((len(self), padded_width(self.response_lengths)), dtype=torch.float32)
        out.view(-1)[self._token_positions] = torch.from_numpy(np.asarray(flat, dtype=np.float32))
        return out

    def flat(self, padded: torch.Tensor) -> np.ndarray:
        """The inverse of `padded`: (N, T) -> (sum T_i,) float32."""
        return padded.detach().float().cpu().reshape(-1)[self._token_positions].numpy()


def token_spans(starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows whose tokens sit at flat[starts[i]:starts[i] + lengths[i]]: for every token, its row
    (position in `starts`), its index into the flat buffer and its position within the row."""
    row = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
    first = offsets_of(lengths)[:-1]
    within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(first, lengths)
    return row, np.repeat(starts, lengths) + within, within


@dataclass
class LearnerColumns:
    """Per-response-token float32 columns, aligned with the batch's `response_ids`, as the learner used them."""

    old_logprobs: np.ndarray  # the learner's own logprobs of the sampled tokens before the update
    ref_logprobs: np.ndarray
    values: np.ndarray  # critic values; 0 for the critic-free estimators
    kl: np.ndarray  # per-token KL estimate toward the reference
    token_rewards: np.ndarray  # -kl_coef * kl, plus the score on the last token
    advantages: np.ndarray
    returns: np.ndarray
    kl_coef: float  # the KL coefficient β of token_rewards

    def rows(self, offsets: np.ndarray) -> dict[str, list[list[float]]]:
        """Per-sample Python lists of each per-token column (for records and small tools, not the hot path)."""
        cut = offsets[1:-1]
        return {
            f.name: [a.tolist() for a in np.split(getattr(self, f.name), cut)]
            for f in fields(self)
            if f.name != "kl_coef"
        }
