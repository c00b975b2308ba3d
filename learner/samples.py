"""The learner's input and output as flat columns: one iteration's samples and their per-token results.

A `SampleBatch` is what the rollout side hands the learner: token ids, behaviour logprobs, scores
and prompt groups as numpy buffers with offsets (the archive's list columns, unpacked), cheap to
pickle and to slice. The learner lays out only the rows of one micro-batch at a time (`collate`).
`LearnerColumns` is what comes back: per-token float32 columns aligned with `response_ids`.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where a tensor is made: the driver unpickles these columns without it
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
    # Episodes: 1 at the model's tokens, 0 at an environment's (which are context: no loss, KL or value
    # at them); None when every response token is the model's.
    response_mask: np.ndarray | None = None  # (sum T_i,) uint8
    turn_rewards: np.ndarray | None = None  # (sum T_i,) float32: an environment's reward of a turn, at its last token
    selected: np.ndarray | None = None  # (N,) bool: the rows the update may use (dynamic sampling); None: all
    truncated: np.ndarray | None = None  # (N,) bool: the rows that hit max_tokens (learner.mask_truncated)
    policy_versions: np.ndarray | None = None  # (N,) int64: the weights' version each row was drawn with; None: current

    def current_rows(self, version: int) -> np.ndarray:
        """(N,) bool: the rows drawn with the weights of `version` (every row where versions are unknown)."""
        if self.policy_versions is None:
            return np.ones(len(self), dtype=bool)
        return self.policy_versions == version

    def trained_rows(self, mask_truncated: bool) -> np.ndarray:
        """(N,) bool: the rows the update trains on: those selected, less those that hit max_tokens when
        `mask_truncated` (they carry no loss, as DAPO's over-long filtering has it)."""
        rows = np.ones(len(self), dtype=bool) if self.selected is None else self.selected.astype(bool)
        if mask_truncated and self.truncated is not None:
            rows = rows & ~self.truncated
        return rows

    @classmethod
    def from_records(cls, records) -> SampleBatch:
        """From rollout records (anything with prompt_ids, response_ids, response_logprobs, reward, prompt_id)."""
        prompt_ids, prompt_offsets = flatten([r.prompt_ids for r in records], np.int32)
        response_ids, response_offsets = flatten([r.response_ids for r in records], np.int32)
        behaviour, _ = flatten([r.response_logprobs for r in records], np.float32)
        scores = np.array([np.nan if r.reward is None else r.reward for r in records], dtype=np.float32)
        _, groups = np.unique(np.array([r.prompt_id for r in records], dtype=object), return_inverse=True)
        masks = [getattr(r, "response_mask", None) for r in records]
        mask = (
            None
            if all(m is None for m in masks)
            else flatten([[1] * len(r.response_ids) if m is None else m for r, m in zip(records, masks)], np.uint8)[0]
        )
        turn_rewards = None
        if any(getattr(r, "turn_rewards", None) for r in records):
            turn_rewards = np.zeros(len(response_ids), dtype=np.float32)
            for start, r in zip(response_offsets, records):
                np.add.at(turn_rewards, start + np.asarray(r.turn_reward_at, dtype=np.int64), r.turn_rewards)
        return cls(
            prompt_ids,
            prompt_offsets,
            response_ids,
            response_offsets,
            behaviour,
            scores,
            groups.astype(np.int64),
            mask,
            turn_rewards,
            truncated=np.array([getattr(r, "finish_reason", None) == "length" for r in records], dtype=bool),
        )

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def prompt_lengths(self) -> np.ndarray:
        return np.diff(self.prompt_offsets)

    @property
    def response_lengths(self) -> np.ndarray:
        return np.diff(self.response_offsets)

    @functools.cached_property
    def model_tokens(self) -> np.ndarray:
        """(N,) int64: each sample's tokens the model wrote (its response tokens, but an episode's
        environment turns): what its losses average over."""
        if self.response_mask is None:
            return self.response_lengths
        running = offsets_of(self.response_mask.astype(np.int64))  # model tokens before each position
        return running[self.response_offsets[1:]] - running[self.response_offsets[:-1]]

    @functools.cached_property
    def loss_mask(self) -> np.ndarray:
        """(sum T_i,) float32: 1 at the model's response tokens."""
        if self.response_mask is None:
            return np.ones(len(self.response_ids), dtype=np.float32)
        return self.response_mask.astype(np.float32)

    def collate(self, rows: np.ndarray, pad_id: int, packed: bool = False) -> TokenBatch:
        """The given rows as one TokenBatch: padded (prompts left-padded, responses right-padded) or
        packed into one row (`learner.batch`).

        Vectorised over tokens: every token's place is computed from the offsets at once.
        """
        import torch

        from learner.batch import TokenBatch

        rows = np.asarray(rows, dtype=np.int64)
        p = self.prompt_lengths[rows]
        t = self.response_lengths[rows]
        T, B = padded_width(t), len(rows)
        responses = torch.zeros((B, T), dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.float32)
        p_row, p_src, p_within = token_spans(self.prompt_offsets[rows], p)
        row, src, within = token_spans(self.response_offsets[rows], t)
        ids = torch.from_numpy(self.response_ids[src].astype(np.int64))
        responses[row, within] = ids  # numpy index arrays index a tensor as tensors would
        mask[row, within] = 1.0 if self.response_mask is None else torch.from_numpy(self.loss_mask[src])
        prompt_ids = torch.from_numpy(self.prompt_ids[p_src].astype(np.int64))
        response_index = torch.from_numpy(row * T + within)
        if packed:
            starts = offsets_of(p + t)
            input_ids = torch.empty(int(starts[-1]), dtype=torch.long)
            input_ids[starts[p_row] + p_within] = prompt_ids
            input_ids[starts[row] + p[row] + within] = ids
            position_ids = np.arange(int(starts[-1]), dtype=np.int64) - np.repeat(starts[:-1], p + t)
            return TokenBatch(
                input_ids[None],
                torch.from_numpy(position_ids)[None],
                None,
                responses,
                mask,
                hidden_index=torch.from_numpy(starts[row] + p[row] - 1 + within),
                response_index=response_index,
                targets=ids,
                cu_seqlens=torch.from_numpy(starts.astype(np.int32)),
                max_length=int((p + t).max(initial=1)),
            )
        P = int(p.max(initial=1))
        input_ids = torch.full((B, P + T), pad_id, dtype=torch.long)
        attention = torch.zeros((B, P + T), dtype=torch.long)
        col = P - p[p_row] + p_within
        input_ids[p_row, col] = prompt_ids
        attention[p_row, col] = 1
        input_ids[row, P + within] = ids
        attention[row, P + within] = 1
        position_ids = (attention.cumsum(dim=1) - 1).clamp(min=0)
        return TokenBatch(
            input_ids,
            position_ids,
            attention,
            responses,
            mask,
            hidden_index=torch.from_numpy(row * (P + T) + P - 1 + within),
            response_index=response_index,
            targets=ids,
            prompt_width=P,
        )

    def flatten_column(self, rows) -> np.ndarray:
        """Per-sample lists of a per-response-token column -> one flat float32 buffer aligned with response_ids."""
        flat, offsets = flatten(rows, np.float32)
        if not np.array_equal(offsets, self.response_offsets):
            raise ValueError("a per-token column's lengths differ from the responses' lengths")
        return flat

    @functools.cached_property
    def _token_positions(self) -> torch.Tensor:
        """Each response token's index into the row-major (N, T) padded layout, in flat order."""
        import torch

        lengths = torch.from_numpy(self.response_lengths)
        mask = torch.arange(padded_width(self.response_lengths)) < lengths[:, None]
        return mask.reshape(-1).nonzero().squeeze(1)

    def padded(self, flat: np.ndarray | torch.Tensor) -> torch.Tensor:
        """A per-response-token flat column -> (N, T) float32 tensor, zero-padded; on the column's
        device when it is a tensor."""
        import torch

        from learner.batch import to_device

        flat = torch.as_tensor(flat, dtype=torch.float32)
        out = flat.new_zeros((len(self), padded_width(self.response_lengths)))
        out.view(-1)[to_device(self._token_positions, flat.device)] = flat
        return out

    def flat(self, padded: torch.Tensor) -> np.ndarray:
        """The inverse of `padded`: (N, T) -> (sum T_i,) float32."""
        return padded.detach().float().cpu().reshape(-1)[self._token_positions].numpy()


def single_sequence(token_ids: list[int]) -> SampleBatch:
    """One sample of the given tokens: the first as its prompt, the rest as its response (what a
    logprob probe scores)."""
    ids = np.asarray(token_ids, dtype=np.int32)
    n = len(ids) - 1
    zero = np.zeros(1, np.float32)
    return SampleBatch(
        ids[:1], np.array([0, 1]), ids[1:], np.array([0, n]), np.zeros(n, np.float32), zero, np.zeros(1, np.int64)
    )


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
    trained: np.ndarray | None = None  # (N,) bool: the samples the update used; None: all of them

    def rows(self, offsets: np.ndarray) -> dict[str, list[list[float]]]:
        """Per-sample Python lists of each per-token column (for records and small tools, not the hot path)."""
        cut = offsets[1:-1]
        return {
            f.name: [a.tolist() for a in np.split(getattr(self, f.name), cut)]
            for f in fields(self)
            if f.name not in ("kl_coef", "trained")
        }
