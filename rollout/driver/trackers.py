"""The experiment trackers a job's figures go to: TensorBoard, Weights & Biases, MLflow.

Each backend is a class with the same three calls, made in order from one thread (`rollout/driver/tracking.py`):
the constructor starts or continues the tracker's run, `log(step, figures, samples)` writes one
iteration, `close(failed)` ends the run. Each imports its library when it starts, so a job that uses
none needs none installed (`pip install -e '.[tracking]'` installs all three).

`state` is what a resumed job needs to continue the same run (the run id); the caller keeps it in
RUN_DIR/tracking.json beside the last step each backend took.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.config import MlflowConfig, TensorBoardConfig, WandbConfig
from contracts.console import verbose


@dataclass
class TrackedRun:
    """What every backend records about the run, once per start."""

    run_dir: Path
    run_id: str
    config: dict[str, Any]  # the resolved config tree, as plain JSON
    config_yaml: str
    manifest: dict[str, Any]  # this start's manifest entry: code, versions, seeds, model, lineage


@dataclass
class SampleTable:
    columns: list[str]
    rows: list[list[Any]]


class TensorBoardTracker:
    """Event files: one scalar per figure; the config and manifest as text at the start's first step;
    the sample table as a markdown table (TensorBoard's Text tab)."""

    def __init__(self, cfg: TensorBoardConfig, run: TrackedRun, state: dict[str, Any]):
        from torch.utils.tensorboard import SummaryWriter

        logdir = Path(cfg.logdir) if cfg.logdir else run.run_dir / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(logdir))
        self.state = {"logdir": str(logdir)}
        self._start_texts = {
            "config": _code_block(run.config_yaml),
            "manifest": _code_block(json.dumps(run.manifest, indent=1)),
        }

    def log(self, step: int, figures: dict[str, float], samples: SampleTable | None) -> None:
        for name, value in figures.items():
            self.writer.add_scalar(name, value, step)
        for name, text in self._start_texts.items():
            self.writer.add_text(name, text, step)
        self._start_texts = {}
        if samples is not None:
            self.writer.add_text("sample_table", _markdown_table(samples), step)
        self.writer.flush()

    def close(self, failed: bool) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run whose id is the job's run id: a resumed job continues it (offline mode writes a new
    offline-run directory with the same id, which `wandb sync` joins to the first)."""

    def __init__(self, cfg: WandbConfig, run: TrackedRun, state: dict[str, Any]):
        import wandb

        run_id = state.get("run_id") or cfg.run_id or run.run_id
        settings = wandb.Settings(
            console="off", silent=not verbose(), x_disable_stats=True, disable_git=True, save_code=False
        )
        self.wandb = wandb
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run.run_id,
            id=run_id,
            resume="allow",
            mode=cfg.mode,
            dir=str(run.run_dir),
            settings=settings,
        )
        self.run.config.update({**run.config, "manifest": run.manifest}, allow_val_change=True)
        self.state = {"run_id": run_id}

    def log(self, step: int, figures: dict[str, float], samples: SampleTable | None) -> None:
        row: dict[str, Any] = dict(figures)
        if samples is not None:
            row["sample_table"] = self.wandb.Table(columns=samples.columns, data=samples.rows)
        self.run.log(row, step=step)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowTracker:
    """An MLflow run: figures as metrics, the flattened config as parameters (first start only: MLflow
    refuses a changed parameter), config.yaml and manifest.json as artifacts, sample tables as JSON
    artifacts under sample_tables/."""

    _BATCH = 100  # MLflow takes at most 100 parameters and 1000 metrics per log_batch

    def __init__(self, cfg: MlflowConfig, run: TrackedRun, state: dict[str, Any]):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        if not verbose():  # its store's INFO lines and deprecation warnings say nothing to a user of this job
            for name in ("mlflow", "alembic"):
                logging.getLogger(name).setLevel(logging.WARNING)
            warnings.filterwarnings("ignore", module=r"mlflow\.")
        uri = (
            cfg.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(run.run_dir / 'mlflow.db').resolve()}"
        )
        artifacts = None  # a server's experiments keep their artifacts where the server says
        if uri.startswith("sqlite:///"):  # beside the database, not under the working directory (MLflow's default)
            artifacts = (Path(uri[len("sqlite:///") :]).resolve().parent / "mlflow-artifacts").as_uri()
        self.client = client = MlflowClient(tracking_uri=uri)
        self.run_id = state.get("run_id")
        if self.run_id:
            client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = client.get_experiment_by_name(cfg.experiment)
            experiment_id = (
                experiment.experiment_id
                if experiment
                else client.create_experiment(cfg.experiment, artifact_location=artifacts)
            )
            self.run_id = client.create_run(
                experiment_id, run_name=cfg.run_name or run.run_id, tags={"rollout.run_id": run.run_id}
            ).info.run_id
            params = [Param(key, value[:6000]) for key, value in _flatten(run.config).items()]
            for i in range(0, len(params), self._BATCH):
                client.log_batch(self.run_id, params=params[i : i + self._BATCH])
        client.log_text(self.run_id, run.config_yaml, "config.yaml")
        client.log_dict(self.run_id, run.manifest, "manifest.json")
        self.state = {"run_id": self.run_id, "tracking_uri": uri}

    def log(self, step: int, figures: dict[str, float], samples: SampleTable | None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        # MLflow's names allow [/\w.\- :] only: eval/pass@k is logged as eval/pass_at_k.
        metrics = [Metric(name.replace("@", "_at_"), value, now, step) for name, value in figures.items()]
        for i in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000])
        if samples is not None:
            self.client.log_dict(
                self.run_id,
                {"columns": samples.columns, "rows": samples.rows},
                f"sample_tables/iteration-{step:06d}.json",
            )

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


BACKENDS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"learner": {"lr": 1e-4}} -> {"learner.lr": "0.0001"}; lists as JSON."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value if isinstance(value, str) else json.dumps(value)
    return flat


def _code_block(text: str) -> str:
    """Markdown preformatted text (TensorBoard renders text summaries as markdown)."""
    return "\n".join("    " + line for line in text.splitlines())


def _markdown_table(table: SampleTable) -> str:
    def cell(value: Any) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", " ⏎ ")

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)
