"""The guard on optimizer steps whose loss or gradient norm is inf or NaN: such a step is skipped (the
caller drops its gradients); `learner.max_nonfinite_steps` of them in a row fail the job, naming the figure."""

from __future__ import annotations

import math

from learner.checkpoint import NonFiniteError


class FiniteSteps:
    def __init__(self, limit: int, lr: float):
        self.limit, self.lr = limit, lr
        self.in_a_row = 0  # optimizer steps skipped one after another

    def finite(self, figures: dict[str, float]) -> bool:
        """False when a figure of this step is inf or NaN: skip it. Raises NonFiniteError on the limit."""
        bad = [(name, value) for name, value in figures.items() if not math.isfinite(value)]
        if not bad:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        if self.in_a_row >= self.limit:
            name, value = bad[0]
            raise NonFiniteError(
                f"{self.limit} optimizer steps in a row had a non-finite {name} ({value}); each was "
                "skipped, so the weights are those before them (learner.max_nonfinite_steps): "
                f"check the rewards, or lower learner.lr ({self.lr:g})"
            )
        return False
