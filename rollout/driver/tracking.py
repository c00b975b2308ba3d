"""A job's figures to the experiment trackers its users already run, off the job loop's path.

`metrics.jsonl` stays the record. The loop hands each iteration's figures to `Tracking.log`, which
only queues them; one thread starts the backends (`rollout/driver/trackers.py`) and feeds them in order. A
backend that fails to start or to log is one warning line, and the job goes on without it; a tracker
server that does not answer holds up nothing but that thread, and the end of the job waits for it
at most `tracking.timeout_s`.

Resumes: `RUN_DIR/tracking.json` keeps each backend's run id and the last step it took, so a resumed
job continues the same tracker run and never logs a step twice (an iteration that is run again after
a crash keeps the figures the tracker has).
"""

from __future__ import annotations

import json
import math
import queue
import threading
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from contracts.config import TrackingConfig
from contracts.files import write_atomically
from rollout.driver.trackers import BACKENDS, SampleTable, TrackedRun

STATE_FILE = "tracking.json"
_CLOSE = object()


class Tracking:
    def __init__(self, cfg: TrackingConfig, run: TrackedRun, log):
        self.cfg = cfg
        self.log = log
        self._state_path = run.run_dir / STATE_FILE
        self._state: dict[str, dict[str, Any]] = self._read_state()
        self._trackers: dict[str, Any] = {}
        self._queue: queue.Queue = queue.Queue()
        self._busy: tuple[str, str] | None = None  # (backend, what it is doing), for the end-of-job message
        self._failed = False
        self._thread = threading.Thread(target=self._work, args=(run,), name="tracking", daemon=True)
        if cfg.backends:
            self._thread.start()

    def wants_samples(self, iteration: int) -> bool:
        every = self.cfg.samples_every
        return bool(self.cfg.backends) and every > 0 and iteration % every == 0

    def log_iteration(self, metrics: dict[str, Any], samples: SampleTable | None = None) -> None:
        if self.cfg.backends:
            self._queue.put((metrics, samples))

    def close(self, *, failed: bool = False) -> None:
        """Ends every backend's run (as failed when the job failed), waiting at most tracking.timeout_s."""
        if not self._thread.is_alive():
            return
        self._failed = failed
        self._queue.put(_CLOSE)
        self._thread.join(self.cfg.timeout_s)
        if self._thread.is_alive():
            backend, doing = self._busy or ("a backend", "work")
            self._warn(
                f"{backend} did not finish {doing} within tracking.timeout_s ({self.cfg.timeout_s:.0f}s); "
                f"leaving without it (metrics.jsonl has every figure)"
            )

    # -- the tracking thread -------------------------------------------------------------------------

    def _work(self, run: TrackedRun) -> None:
        for name in self.cfg.backends:
            state = self._state.setdefault(name, {})
            tracker = self._call(name, "starting", lambda: BACKENDS[name](getattr(self.cfg, name), run, state))
            if tracker is not None:
                self._trackers[name] = tracker
                state.update(tracker.state)
        self._save_state()
        while True:
            item = self._queue.get()
            if item is _CLOSE:
                for name, tracker in list(self._trackers.items()):
                    self._call(name, "closing its run", lambda: tracker.close(self._failed))
                return
            metrics, samples = item
            step, figures = int(metrics["iteration"]), figures_of(metrics)
            for name, tracker in list(self._trackers.items()):
                if step <= self._state[name].get("last_step", -1):
                    continue
                if (
                    self._call(name, f"logging iteration {step}", lambda: tracker.log(step, figures, samples))
                    is not None
                ):
                    self._state[name]["last_step"] = step
            self._save_state()

    def _call(self, name: str, doing: str, fn):
        """fn's result, or None after one warning line (and the backend is dropped)."""
        self._busy = (name, doing)
        try:
            result = fn()
            return True if result is None else result
        except ModuleNotFoundError as e:
            self._warn(f"{name}: {e.name} is not installed (pip install -e '.[tracking]'); going on without {name}")
        except Exception as e:  # any failure of a tracker library: the job goes on, metrics.jsonl has it all
            first = (str(e).strip().splitlines() or [""])[0][:300]
            self._warn(
                f"{name} failed {doing} ({type(e).__name__}: {first}); going on without it "
                f"(metrics.jsonl has every figure)"
            )
        finally:
            self._busy = None
        self._trackers.pop(name, None)
        return None

    def _warn(self, message: str) -> None:
        # From this thread, while the loop may be drawing a progress bar on the same terminal: tqdm's write
        # clears the bar, prints the line, and draws the bar again under it.
        tqdm.write(f"tracking: {message}", file=self.log)

    def _read_state(self) -> dict[str, dict[str, Any]]:
        if not self.cfg.backends or not self._state_path.exists():
            return {}
        try:
            state = json.loads(self._state_path.read_text())
            if isinstance(state, dict) and all(isinstance(v, dict) for v in state.values()):
                return state
        except (OSError, ValueError):
            pass
        self._warn(f"{self._state_path} is not readable JSON; each backend starts a new run")
        return {}

    def _save_state(self) -> None:
        write_atomically(self._state_path, json.dumps(self._state, indent=1))


def figures_of(metrics: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics line, the step (`iteration`) left out; non-finite ones are null in
    metrics.jsonl, so they are left out here too."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if key != "iteration"
        and isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    }


def sample_table(texts: pa.RecordBatch | pa.Table, rewards: pa.RecordBatch | pa.Table, rows: int) -> SampleTable:
    """The first `rows` samples: ids, prompt, response, finish reason, reward and each component.
    `texts` holds the generation columns, `rewards` the reward columns of the same rows (an archive
    batch holds both)."""
    n = min(rows, texts.num_rows)
    structs = rewards.column("reward_components")
    if isinstance(structs, pa.ChunkedArray):
        structs = structs.combine_chunks()
    components = {
        field.name: child.slice(0, n).to_numpy(zero_copy_only=False)
        for field, child in zip(structs.type, structs.flatten())
    }
    columns = ["prompt_id", "sample_index", "prompt", "response", "finish_reason"]
    table = [texts.column(c).slice(0, n).to_pylist() for c in columns]
    table.append(rewards.column("reward").slice(0, n).to_pylist())
    table += [[None if np.isnan(v) else float(v) for v in values] for values in components.values()]
    return SampleTable(
        columns=[*columns, "reward", *(f"reward/{name}" for name in components)],
        rows=[list(row) for row in zip(*table)],
    )
