"""The Python API (`import rollout`): what the `rollout` commands do, called from a script, a notebook or
a test, in-process. The commands (`rollout.commands`) are a thin layer over it.

    import rollout

    cfg = rollout.load_config("configs/tiny-arith.yaml", {"iterations": 4, "learner.lr": 1e-4})
    run = rollout.run(cfg, out="runs/try", on_iteration=lambda m: m["reward_mean"] < 0.9)
    run.metrics.to_pandas()                      # one row per iteration (metrics.jsonl)
    run.archive(columns=["iteration", "reward"], iterations=[3])
    run.latest_checkpoint                        # runs/try/checkpoints/iter-000003

Errors are `contracts.errors`' classes (`UserError`: fix what was passed; `JobFailure`: the job failed on
its way) carrying the one line the command prints; nothing here raises SystemExit. A stop signal (Ctrl-C,
SIGTERM) during `run` raises `JobStopped` (a BaseException, like KeyboardInterrupt) once every finished
iteration is archived; the same call resumes.

Importing this module imports no torch, Ray or vLLM: each function imports what it needs when called.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from contracts.config import ConfigError, JobConfig
from contracts.config.load import load_config as _load_config
from contracts.errors import JobFailure, UserError, first_line
from rollout.errors import exit_code, one_line

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["Run", "evaluate", "generate", "load_config", "open_run", "replay", "run"]

ConfigLike = str | os.PathLike | Mapping[str, Any] | JobConfig | None
Overrides = Mapping[str, Any] | Sequence[str] | None

CHECKPOINTS = "checkpoints"  # rollout.driver.checkpoints' layout, read here without importing the driver
LATEST = "latest"
EVAL = "eval"  # <run>/eval/: the held-out evaluations' archive
METRICS = "metrics.jsonl"


# -- config ----------------------------------------------------------------------------------------


def load_config(config: ConfigLike = None, overrides: Overrides = None) -> JobConfig:
    """A job config: from a YAML file's path, a dict of sections (`{"iterations": 2, "learner": {"lr": 1e-4}}`)
    or a `JobConfig`, with `overrides` on top: a dict of dotted keys, as `--set` takes them
    (`{"iterations": 2, "learner.lr": 1e-4}`), or `--set`'s own "KEY=VALUE" strings. None: the defaults.

    A bad key or value raises `ConfigError` (a `UserError`) with the message `rollout run` prints."""
    items = _override_items(overrides)
    if isinstance(config, JobConfig):
        if not items:
            return config
        import msgspec

        config = msgspec.to_builtins(config)
    elif config is not None and not isinstance(config, (str, os.PathLike, Mapping)):
        raise ConfigError(
            f"config: expected a YAML file's path, a dict of sections or a JobConfig, not {type(config).__name__}"
        )
    return _load_config(config, items)


def _override_items(overrides: Overrides) -> list[str]:
    """`--set`'s KEY=VALUE strings: a dict's values written as one-line YAML, which `--set` reads back."""
    if overrides is None:
        return []
    if isinstance(overrides, str):
        raise ConfigError(
            f"overrides: a dict of dotted keys or a list of KEY=VALUE strings, not the string {overrides!r}"
        )
    if not isinstance(overrides, Mapping):
        return [str(item) for item in overrides]
    items = []
    for key, value in overrides.items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"overrides: {key!r}: keys are dotted field names, e.g. learner.lr")
        text = "null" if value is None else yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
        if text.endswith("\n...") or text.endswith("..."):  # a scalar's document end marker
            text = text.removesuffix("...").strip()
        items.append(f"{key}={text}")
    return items


# -- the job ---------------------------------------------------------------------------------------


def run(
    config: ConfigLike,
    *,
    out: str | os.PathLike | None = None,
    overrides: Overrides = None,
    on_iteration: Callable[[dict], bool | None] | None = None,
    resume: bool | str | os.PathLike = True,
) -> Run:
    """Run the PPO job (`rollout run`) in this process and return its run directory as a `Run`.

    `out`: the run directory (default runs/RUN_NAME), or a URI pyarrow opens (s3://bucket/run). `resume`:
    True resumes from the run directory's newest whole checkpoint (if any), False starts from the model
    whatever it holds, a path resumes from that checkpoint. `on_iteration(metrics)` is called here after each
    iteration with its metrics line; returning False ends the run after that iteration as a finished one
    (its checkpoint written); an exception it raises ends the run (as failed) and is raised from here.

    Ray: joins the one this process is connected to, else `ray.address` / RAY_ADDRESS, else starts a local
    one, and stops a Ray it started before it returns, so several runs in one process each get their own."""
    from rollout.driver.checkpoints import AUTO, NEVER
    from rollout.driver.job import run_job
    from rollout.driver.run_storage import RunStorage, is_uri

    cfg = load_config(config, overrides)
    start = AUTO if resume is True else NEVER if resume is False else Path(resume)
    with _errors_as_the_cli_says(), _signals_kept(), _own_ray():
        if out is not None and is_uri(str(out)):
            storage = RunStorage(str(out))
            run_job(cfg, storage.staging, resume=start, storage=storage, on_iteration=on_iteration)
            return Run(storage.staging, uri=storage.uri)
        path = local_out(Path(out) if out is not None else Path("runs") / cfg.run_name)
        run_job(cfg, path, resume=start, on_iteration=on_iteration)
        return Run(path)


def generate(
    config: ConfigLike, *, out: str | os.PathLike, prompts: str | None = None, overrides: Overrides = None
) -> Run:
    """Rollouts and rewards, no learning (`rollout generate`): one pass over `prompts` (any data source,
    default the config's `data.prompts`) into OUT/rollouts. The returned `Run`'s `summary` holds the figures
    the command prints (samples, tokens, tokens/s, mean reward)."""
    from rollout.driver.generate import generate as _generate

    items = _override_items(overrides) + ([f"data.prompts={prompts}"] if prompts is not None else [])
    cfg = load_config(config, items)
    path = local_out(Path(out))
    with _errors_as_the_cli_says(), _signals_kept(), _own_ray():
        summary = _generate(cfg, path)
    return Run(path, summary=summary)


def replay(
    archive: str | os.PathLike,
    out: str | os.PathLike,
    *,
    gamma: float | None = None,
    lam: float | None = None,
    estimator: str = "gae",
    kl_coef: float | None = None,
    reward_config: str | os.PathLike | None = None,
    prompts: str | None = None,
    grpo_normalize_std: bool | None = None,
    train: bool = False,
    config: ConfigLike = None,
    overrides: Overrides = None,
    model: str | None = None,
    train_epochs: int = 1,
) -> Run:
    """Recompute token rewards, advantages and returns of an archive (`rollout replay`; a run directory, its
    rollouts/ or one .arrow file) into OUT/rollouts; None keeps the run's own setting. The returned `Run`'s
    `summary` holds `rows`, `max_return_diff` and `unmatched_prompts`.

    With `train` (`--train`), PPO updates on the replayed archive follow, saved to OUT/policy (`summary`'s
    `policy`): `config` is the learner's job config (default: the run's), with `overrides` (e.g.
    `{"learner.loss_agg_mode": "token_mean"}`), from `model` (default: the run's) for `train_epochs` passes."""
    from rollout.offline.replay import ReplayOptions
    from rollout.offline.replay import replay as _replay
    from rollout.offline.rescore import ReplayError

    if not train and (config is not None or overrides or model is not None or train_epochs != 1):
        raise ReplayError("config, overrides, model and train_epochs set how train=True trains: add train=True")
    options = ReplayOptions(
        gamma=gamma,
        lam=lam,
        estimator=estimator,
        kl_coef=kl_coef,
        reward_config=reward_config,
        prompts=prompts,
        grpo_normalize_std=grpo_normalize_std,
    )
    with _errors_as_the_cli_says():
        try:
            report = _replay(archive, out, options)
        except FileNotFoundError as e:  # the archive or a file its options name
            raise ReplayError(str(e)) from e
        summary = {"rows": report.rows, "max_return_diff": report.max_return_diff}
        summary["unmatched_prompts"] = report.unmatched_prompts
        if train:
            items = _override_items(overrides)
            if grpo_normalize_std is not None:
                items.append(f"learner.grpo_normalize_std={str(grpo_normalize_std).lower()}")
            summary["policy"] = _train_offline(archive, Path(out), config, items, model, train_epochs)
    return Run(Path(report.out).parent, summary=summary)  # report.out: OUT/rollouts


def _train_offline(archive, out: Path, config: ConfigLike, overrides: list[str], model, epochs: int) -> Path:
    from rollout.archive import read_metadata
    from rollout.offline.train import train_offline

    metadata = read_metadata(archive)
    if config is None:
        config = out / "run-config.yaml"
        config.write_text(metadata["config"])
    cfg = load_config(config, overrides)
    return train_offline(out / "rollouts", cfg, out / "policy", model=model or metadata.get("model"), epochs=epochs)


def evaluate(
    run: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    model: str | None = None,
    config: ConfigLike = None,
    overrides: Overrides = None,
    prompts: str | None = None,
    n_samples: int | None = None,
    rules: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
) -> Run:
    """One held-out evaluation (`rollout eval`) of exactly one of: `run`'s newest whole checkpoint (a run
    directory or a `Run`), a `checkpoint` directory, or a `model` (a directory, Hugging Face id or builtin:).

    The config is `config` (default: the checkpoint's run's config.yaml, else the defaults) with `overrides`;
    `prompts` (any data source), `n_samples` (k of pass@k) and `rules` (rule names) set its `eval` section.
    The rows are archived in OUT/eval (default RUN/evals/CHECKPOINT, or runs/eval-MODEL); the returned `Run`
    is OUT, its `summary` the figures `rollout eval` prints (`eval/pass@k`, `eval/mean@k`, `eval/reward_mean`,
    ...), its `eval_archive()` the rows. Ray as `run` starts and stops it."""
    from rollout.driver.evaluation import checkpoint_of, version_at
    from rollout.driver.evaluation import evaluate as _evaluate

    given = [name for name, value in (("run", run), ("checkpoint", checkpoint), ("model", model)) if value is not None]
    if len(given) != 1:
        raise UserError(f"evaluate: give one of run, checkpoint or model{f', not {given}' if given else ''}")
    items, iteration, version = _override_items(overrides), -1, None
    with _errors_as_the_cli_says():
        if model is not None:
            default_out = Path("runs") / f"eval-{Path(model).name}"
        else:
            found, run_dir = checkpoint_of(Path(run) if run is not None else None, checkpoint)
            config = config if config is not None else run_dir / "config.yaml" if run_dir else None
            model = str(found / "policy")
            default_out = (run_dir or found.parent) / "evals" / found.name
            number = found.name.split("-")[-1]
            iteration = int(number) if number.isdigit() else -1
            version = version_at(run_dir, iteration)
        if prompts is not None:
            items.append(f"eval.prompts={prompts}")
        if n_samples is not None:
            items.append(f"eval.n_samples={n_samples}")
        if rules:
            items += _override_items({"eval.rules": [{"name": str(rule)} for rule in rules]})
        cfg = load_config(config, items)
        if cfg.eval.prompts is None:
            raise ConfigError(
                "rollout eval: no prompts: give --prompts SOURCE (prompts= in Python) or a config with eval.prompts"
            )
        path = Path(out) if out is not None else default_out
        with _signals_kept(), _own_ray():
            figures = _evaluate(cfg, model, path, log=sys.stderr, iteration=iteration, policy_version=version)
    return Run(path, summary=figures)


def open_run(path: str | os.PathLike) -> Run:
    """A run directory written by `rollout run` (or `generate`, `replay`), to read: its metrics, archive and
    checkpoints. A UserError if `path` holds none of a run's files."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    if not any((path / name).exists() for name in (METRICS, "rollouts", "manifest.json", "config.yaml")):
        raise UserError(f"{path}: not a run directory (no metrics.jsonl, rollouts/, manifest.json or config.yaml)")
    return Run(path)


# -- a run directory -------------------------------------------------------------------------------


class Run:
    """A run directory, read as its files are now (each property reads again).

    `path` is the directory (for a run at a URI, this machine's staging copy; `uri` names the URI)."""

    def __init__(self, path: str | os.PathLike, *, uri: str | None = None, summary: dict | None = None):
        self.path = Path(path)
        self.uri = uri
        self.summary = summary

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> JobConfig:
        """The config the run last started with (its config.yaml), devices resolved."""
        path = self.path / "config.yaml"
        if not path.is_file():
            raise UserError(f"{self.path}: no config.yaml (the run never started)")
        return _load_config(path)

    @property
    def metrics(self) -> pa.Table:
        """One row per iteration (the last line written for it wins: a resume rewrites lost iterations), a
        column per metric of any line, null where a line lacks it."""
        return _table(sorted(self._metric_lines().values(), key=lambda m: m["iteration"]))

    @property
    def eval_metrics(self) -> pa.Table:
        """One row per held-out evaluation: `iteration` (the line it ran after) and its `eval/...` metrics."""
        rows = [
            {"iteration": m["iteration"], **{k: v for k, v in m.items() if k.startswith("eval/")}}
            for m in sorted(self._metric_lines().values(), key=lambda m: m["iteration"])
            if any(k.startswith("eval/") for k in m)
        ]
        if not rows:  # `rollout eval`'s directory: the evaluations' own lines
            rows = list(_json_lines(self.path / EVAL / METRICS).values())
        return _table(rows)

    def archive(self, columns: Sequence[str] | None = None, iterations: Iterable[int] | int | None = None) -> pa.Table:
        """The rollout archive (rollouts/) as one table, read with `rollout.archive`'s reader: `columns` only
        (default all), rows of `iterations` only (default all)."""
        return _read_archive(self.path / "rollouts", columns, iterations, "rollout archive")

    def eval_archive(
        self, columns: Sequence[str] | None = None, iterations: Iterable[int] | int | None = None
    ) -> pa.Table:
        """The held-out evaluations' rows (eval/), as `archive` reads them; `iterations` are those the
        evaluations ran after."""
        return _read_archive(self.path / EVAL, columns, iterations, "eval archive (the run has no eval section?)")

    @property
    def checkpoints(self) -> list[Path]:
        """The whole (committed) checkpoints, oldest first."""
        root = self.path / CHECKPOINTS
        if not root.is_dir():
            return []
        return sorted(p for p in root.glob("iter-*") if p.is_dir() and p.suffix != ".partial")

    @property
    def latest_checkpoint(self) -> Path | None:
        """The checkpoint `latest` names (what a resume takes), else the newest whole one; None if none."""
        pointer = self.path / CHECKPOINTS / LATEST
        named = pointer.read_text().strip() if pointer.is_file() else ""
        if named and (self.path / CHECKPOINTS / named).is_dir():
            return self.path / CHECKPOINTS / named
        whole = self.checkpoints
        return whole[-1] if whole else None

    def _metric_lines(self) -> dict[int, dict]:
        """metrics.jsonl's lines by iteration, the last written for each."""
        lines = _json_lines(self.path / METRICS)
        return {int(m["iteration"]): m for m in lines.values() if "iteration" in m}


def _json_lines(path: Path) -> dict[int, dict]:
    """A JSON-lines file's objects by line number ({} when there is none); a last line cut by a crash is left out."""
    if not path.is_file():
        return {}
    texts = path.read_text(encoding="utf-8").splitlines()
    lines: dict[int, dict] = {}
    for number, line in enumerate(texts, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError:
            if number == len(texts):
                continue
            raise UserError(f"{path}:{number}: not a JSON line") from None
        if isinstance(value, dict):
            lines[number] = value
    return lines


def _table(rows: list[dict]) -> pa.Table:
    """Rows of differing keys as one table: the union of their keys, in the order first seen."""
    import pyarrow as pa

    names = list(dict.fromkeys(k for row in rows for k in row))
    return pa.table({name: [row.get(name) for row in rows] for name in names})


def _read_archive(folder: Path, columns, iterations, what: str) -> pa.Table:
    import pyarrow as pa
    import pyarrow.compute as pc

    from rollout.archive import iter_batches, read_schema

    try:
        schema = read_schema(folder)
    except FileNotFoundError:
        raise UserError(f"{folder}: no {what} here") from None
    columns = list(columns) if columns is not None else None
    unknown = [c for c in columns or () if c not in schema.names]
    if unknown:
        raise UserError(f"{folder}: no column {', '.join(unknown)} in the archive; it has {', '.join(schema.names)}")
    wanted = None
    if iterations is not None:
        wanted = pa.array([iterations] if isinstance(iterations, int) else list(iterations), pa.int64())
    read = columns if wanted is None or columns is None or "iteration" in columns else [*columns, "iteration"]
    batches = []
    for batch in iter_batches(folder, read):
        if wanted is not None:
            batch = batch.filter(pc.is_in(pc.cast(batch.column("iteration"), pa.int64()), value_set=wanted))
        batches.append(batch.select(columns) if columns is not None else batch)
    shown = schema if columns is None else pa.schema([schema.field(c) for c in columns])
    return pa.Table.from_batches(batches, schema=shown)


# -- how each call starts and ends -----------------------------------------------------------------


def local_out(out: Path) -> Path:
    """A run directory on this machine's disk. A URI (s3://, gs://: argparse has made it `s3:/...`) would
    be a local folder named `s3:`; under `ray job submit` a relative path is inside Ray's temporary
    copy of the working directory, which Ray deletes with the job."""
    import re

    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:/", str(out)):
        raise ConfigError(
            f"--out {str(out).replace(':/', '://', 1)}: a URI; only `rollout run` keeps its run on an object store "
            "so far: give a local path (on a cluster, one every node mounts)"
        )
    if not out.is_absolute() and "runtime_resources" in Path.cwd().parts:
        print(
            f"rollout: warning: --out {out} is inside Ray's temporary copy of the working directory "
            f"({Path.cwd()}), which Ray deletes with the job; give an absolute path",
            file=sys.stderr,
        )
    return out


@contextlib.contextmanager
def _errors_as_the_cli_says() -> Iterator[None]:
    """What the command would report as a one-line error, raised as `UserError` or `JobFailure` with that
    line (the original as its cause); a bug's error, a stop signal and the errors of these classes pass as
    they are."""
    try:
        yield
    except (UserError, JobFailure) as e:
        kind = UserError if exit_code(e) == 2 else JobFailure
        if isinstance(e, kind) and one_line(e) == first_line(e):
            raise
        raise _translated(e) from e  # an actor's UserError, carried by a JobFailure that names the actor
    except Exception as e:
        if exit_code(e) is None:
            raise
        raise _translated(e) from e


def _translated(error: BaseException) -> Exception:
    return (UserError if exit_code(error) == 2 else JobFailure)(one_line(error))


@contextlib.contextmanager
def _own_ray() -> Iterator[None]:
    """Ray as the call finds it: one this process is connected to stays; one the call starts is stopped."""
    import ray

    connected = ray.is_initialized()
    try:
        yield
    finally:
        if not connected and ray.is_initialized():
            ray.shutdown()


@contextlib.contextmanager
def _signals_kept() -> Iterator[None]:
    """The job turns SIGINT and SIGTERM into a clean stop (and Ray installs its own handlers); the caller's
    handlers (a notebook's interrupt, a script's own) are back once the call returns."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in kept.items():
            if handler is not None:
                signal.signal(s, handler)
