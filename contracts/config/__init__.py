"""The job's one typed config tree, a section per file (base, model, rollout, env, reward, learner, run).

Every field has a default and a description; constraints are checked when a file is loaded and
cross-field rules once at start-up (`contracts.config.load`, which reads YAML files and `--set a.b=v`
overrides as partial trees merged over these defaults; unknown keys are errors naming their path).
Every section's class is importable from here.
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta, field

from contracts.config.base import Base, ConfigError, doc
from contracts.config.env import EnvConfig
from contracts.config.evaluation import EvalConfig
from contracts.config.learner import KLConfig, LearnerConfig
from contracts.config.model import DataConfig, ModelConfig
from contracts.config.reward import RemoteRewardConfig, RewardConfig, RewardModelConfig, RuleSpec
from contracts.config.rollout import DynamicSamplingConfig, RolloutConfig, SamplingConfig
from contracts.config.run import (
    ArchiveConfig,
    MlflowConfig,
    RayConfig,
    TensorBoardConfig,
    TrackerName,
    TrackingConfig,
    WandbConfig,
)

__all__ = [
    "ArchiveConfig",
    "Base",
    "ConfigError",
    "DataConfig",
    "DynamicSamplingConfig",
    "EnvConfig",
    "EvalConfig",
    "JobConfig",
    "KLConfig",
    "LearnerConfig",
    "MlflowConfig",
    "ModelConfig",
    "RayConfig",
    "RemoteRewardConfig",
    "RewardConfig",
    "RewardModelConfig",
    "RolloutConfig",
    "RuleSpec",
    "SamplingConfig",
    "TensorBoardConfig",
    "TrackerName",
    "TrackingConfig",
    "WandbConfig",
    "doc",
]


class JobConfig(Base):
    run_name: Annotated[str, doc("Name of the run, recorded in the archive.")] = "run"
    seed: Annotated[int, doc("Seed of data order, initialisation and learning.")] = 0
    iterations: Annotated[int, doc("PPO iterations.", ge=1)] = 20
    checkpoint_every: Annotated[int, doc("Iterations between checkpoints.", ge=1)] = 5
    checkpoint_keep_last: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        doc(
            "Checkpoints kept in RUN_DIR/checkpoints, the newest; older ones are deleted after each save "
            "(a resume needs only the newest, and falls back to the one before when it is broken). "
            "null keeps them all."
        ),
    ] = 3
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
