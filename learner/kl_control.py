"""The KL-penalty coefficient β: fixed, or adapted so the measured KL tracks a target, following the
proportional rule of Ziegler et al. (2019), "Fine-Tuning Language Models from Human Preferences".

Both controllers carry their coefficient through checkpoints with `state_dict`/`load_state_dict`;
loading restores the coefficient only, since target and horizon are configuration.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol


class KLController(Protocol):
    coef: float

    def update(self, current_kl: float, n_samples: int) -> None: ...

    def state_dict(self) -> dict[str, float]: ...

    def load_state_dict(self, state: Mapping[str, float]) -> None: ...


class FixedKLController:
    """A coefficient that never changes."""

    def __init__(self, coef: float) -> None:
        if coef < 0:
            raise ValueError(f"KL coefficient must be non-negative, got {coef}")
        self.coef = float(coef)

    def update(self, current_kl: float, n_samples: int) -> None:
        """Does nothing: the signature matches AdaptiveKLController so callers need not branch."""

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.coef = float(state["coef"])


class AdaptiveKLController:
    """Raises β when the KL runs above `target` and lowers it when below, by at most 20% of the
    ratio error per `horizon` samples, so one noisy batch cannot swing it far."""

    def __init__(self, init_coef: float, target: float, horizon: float) -> None:
        # The update is multiplicative: a zero coefficient could never move again.
        if init_coef <= 0:
            raise ValueError(f"initial KL coefficient must be positive, got {init_coef}")
        if target <= 0:
            raise ValueError(f"KL target must be positive, got {target}")
        if horizon <= 0:
            raise ValueError(f"KL horizon must be positive, got {horizon}")
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_samples: int) -> None:
        """Move β after a batch of `n_samples` samples whose mean KL was `current_kl`."""
        if not math.isfinite(current_kl):
            raise ValueError(f"cannot adapt the KL coefficient to a non-finite KL ({current_kl})")
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)  # e = clip(KL/target − 1, ±0.2)
        factor = 1.0 + error * n_samples / self.horizon  # β ← β·(1 + e·n/H)
        if factor <= 0:
            raise ValueError(
                f"{n_samples} samples in one update against a KL horizon of {self.horizon:g} would "
                "make the coefficient non-positive; raise the horizon above 5x the batch size"
            )
        self.coef *= factor

    def state_dict(self) -> dict[str, float]:
        return {"coef": self.coef}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.coef = float(state["coef"])


def make_kl_controller(coef: float, target: float | None, horizon: float) -> KLController:
    """The adaptive controller starting at `coef` when a `target` is given, else a fixed one."""
    if target is None:
        return FixedKLController(coef)
    return AdaptiveKLController(coef, target, horizon)
