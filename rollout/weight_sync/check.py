"""The post-sync check: an engine that loaded a version must score a few fixed tokens as the learner does.

After every sync (and every restart's load) each worker reports what it serves (`Served`): the
version and its logprobs of `PROBE_IDS`. The learner scored the same tokens at that version; a gap
over `rollout.weight_sync_max_logprob_gap` means the engine holds other weights than those sent.
"""

from __future__ import annotations

import math

import msgspec

from contracts.errors import JobFailure

PROBE_IDS = tuple(range(1, 17))  # the tokens whose logprobs check a weight sync (any vocabulary has them)


class WeightSyncError(JobFailure):
    """A weight sync failed or timed out; the message names the workers and the setting to change."""


class Served(msgspec.Struct):
    """What a worker serves after it loaded weights: their version, and its logprobs of `PROBE_IDS`."""

    version: int
    probe: list[float]


class ProbeCheck:
    def __init__(self, max_gap: float | None):
        self.max_gap = max_gap
        self._expected: dict[int, list[float]] = {}  # the learner's probe logprobs, per version
        self.gap: float | None = None  # the largest since `start`: engines' probe logprobs vs the learner's

    def expect(self, version: int, logprobs: list[float]) -> None:
        """The learner's logprobs of `PROBE_IDS` at `version`: every engine that loads it must give the same."""
        self._expected = {v: p for v, p in self._expected.items() if v >= version - 4}
        self._expected[version] = logprobs

    def start(self) -> None:
        """A new sync: its gap is measured afresh."""
        self.gap = None

    def check(self, name: str, served: Served) -> int:
        """The version worker `name` serves, once its probe logprobs are checked against the learner's."""
        expected = self._expected.get(served.version)
        if expected is None:
            return served.version
        # A NaN compares false against any limit: non-finite logprobs make the gap inf, which fails.
        gap = max(
            (abs(a - b) if math.isfinite(a - b) else math.inf for a, b in zip(served.probe, expected)), default=0.0
        )
        self.gap = max(gap, self.gap or 0.0)
        if self.max_gap is not None and gap > self.max_gap:
            raise WeightSyncError(
                f"{name} serves version {served.version}, but its logprobs of the probe tokens "
                f"differ from the learner's by up to {gap:.3g} (rollout.weight_sync_max_logprob_gap "
                f"{self.max_gap:g}): the weights it loaded are not the ones sent"
            )
        return served.version
