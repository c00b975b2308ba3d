"""`archive`, `ray` and `tracking`: where a run writes, the cluster it joins, the trackers it feeds."""

from __future__ import annotations

from typing import Annotated, Literal

from msgspec import field

from contracts.config.base import Base, doc


class ArchiveConfig(Base):
    batch_rows: Annotated[int, doc("Rows per Arrow record batch written.", ge=1)] = 256
    rows_per_file: Annotated[int, doc("Rows before the writer rolls to a new file.", ge=1)] = 100_000


class RayConfig(Base):
    fail_if_short: Annotated[
        bool,
        doc(
            "Stop at start-up, naming what is missing, when the cluster's resources cannot hold every actor "
            "of the job; turn off on a cluster that adds nodes on demand."
        ),
    ] = True
    actor_start_timeout_s: Annotated[
        float,
        doc(
            "An actor (rollout worker, learner rank) not started in this time fails the job with its name: "
            "its resources are missing, or its model does not load.",
            gt=0,
        ),
    ] = 300.0
    node_wait_timeout_s: Annotated[
        float,
        doc(
            "After an actor's process or node was lost: how long its restart (a rollout worker) or rebuild "
            "(the learner ranks) waits for room on the cluster, a replacement node, before the job fails in "
            "one line (the same command resumes). Said on the console every 30 s while it waits.",
            gt=0,
        ),
    ] = 600.0
    address: Annotated[
        str | None,
        doc(
            "Ray cluster address (host:port, ray://..., or `auto` for the cluster `ray start` runs on this "
            "machine); null uses RAY_ADDRESS if set, else starts a Ray of the run's own, even beside a "
            "cluster `ray start` left running."
        ),
    ] = None
    num_cpus: Annotated[int | None, doc("CPUs of a local Ray; null lets Ray decide.")] = None
    metrics_export_port: Annotated[
        int | None,
        doc(
            "Port of a local Ray's Prometheus endpoint (http://127.0.0.1:PORT/metrics); null picks one. "
            "Clusters set it with `ray start --metrics-export-port`."
        ),
    ] = None


TrackerName = Literal["tensorboard", "wandb", "mlflow"]


class TensorBoardConfig(Base):
    logdir: Annotated[
        str | None,
        doc("Directory of the event files; null: RUN_DIR/tensorboard (`tensorboard --logdir RUN_DIR/tensorboard`)."),
    ] = None


class WandbConfig(Base):
    project: Annotated[str, doc("W&B project.")] = "ppo-rollout"
    entity: Annotated[str | None, doc("W&B entity (user or team); null: the API key's default.")] = None
    name: Annotated[str | None, doc("Display name of the W&B run; null: the run's id.")] = None
    run_id: Annotated[
        str | None, doc("W&B run id; null: the run's id (RUN_DIR/run_id), so a resumed job continues the same W&B run.")
    ] = None
    mode: Annotated[
        Literal["online", "offline"],
        doc(
            "online: stream to the W&B server (WANDB_API_KEY, WANDB_BASE_URL); offline: write the run under "
            "RUN_DIR/wandb/ only, for `wandb sync` later (no network needed)."
        ),
    ] = "online"


class MlflowConfig(Base):
    tracking_uri: Annotated[
        str | None,
        doc(
            "MLflow tracking URI (http://host:5000, sqlite:///path.db); null: MLFLOW_TRACKING_URI if set, else "
            "a SQLite store at RUN_DIR/mlflow.db (`mlflow ui --backend-store-uri sqlite:///RUN_DIR/mlflow.db`)."
        ),
    ] = None
    experiment: Annotated[str, doc("MLflow experiment, created if missing.")] = "ppo-rollout"
    run_name: Annotated[str | None, doc("Name of the MLflow run; null: the run's id.")] = None


class TrackingConfig(Base):
    backends: Annotated[
        list[TrackerName],
        doc(
            "Experiment trackers that get every figure of metrics.jsonl (same names, the iteration as step), "
            "the resolved config and the manifest, e.g. `--set 'tracking.backends=[tensorboard,wandb]'`. "
            "Installed with `pip install -e '.[tracking]'`. A backend that fails is one warning line; "
            "metrics.jsonl stays the record."
        ),
    ] = field(default_factory=list)
    samples_every: Annotated[
        int,
        doc(
            "Every K iterations, a table of sampled prompts, responses, rewards and components to the backends "
            "(W&B table, TensorBoard text, MLflow artifact); 0: none.",
            ge=0,
        ),
    ] = 10
    samples_rows: Annotated[int, doc("Rows of each sample table.", ge=1, le=1000)] = 8
    timeout_s: Annotated[
        float,
        doc(
            "At the end of a job, how long to wait for the backends to take the last figures before "
            "leaving without them (a tracker server that does not answer never holds up the job before that).",
            gt=0,
        ),
    ] = 60.0
    tensorboard: TensorBoardConfig = field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
