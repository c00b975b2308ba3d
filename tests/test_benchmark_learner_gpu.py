"""`benchmarks/learner_gpu.py` is what a session lent a GPU runs first, in a few minutes of device time: here
it runs as it would there, on CPU with the tiny shape, so that it cannot have rotted by then. Its figures are
not judged (this machine's times say nothing of a GPU's); that every one the issue names is printed, and
that packed and padded passes agree, are."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e  # a whole benchmark process, about 20 s

ROOT = Path(__file__).resolve().parents[1]
RUN_FIGURES = ("tokens_per_s", "tflops", "mfu", "ratio_to_plain", "predicted_gib")
SHAPE_FIGURES = ("export_s", "checkpoint_blocked_s", "checkpoint_write_s", "checkpoint_blocked_to_write")


def test_the_gpu_learner_benchmark_prints_every_figure_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "benchmarks/learner_gpu.py", "--device", "cpu", "--shapes", "tiny", "--samples", "16"]
        + ["--tmp-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    tiny = figures["shapes"]["tiny"]
    runs = {(r["mix"], r["gradient_checkpointing"], r["pack_sequences"]) for r in tiny["runs"]}
    assert runs == {
        (mix, gc, packed) for mix in ("uniform", "realistic") for gc in (False, True) for packed in (False, True)
    }
    for run in tiny["runs"]:
        for key in RUN_FIGURES:
            assert math.isfinite(run[key]) and run[key] > 0, (key, run)
        assert set(run["stages"]) >= {"values", "advantages", "update"}
    for key in SHAPE_FIGURES:
        assert math.isfinite(tiny[key]) and tiny[key] >= 0, key
    assert tiny["packed_vs_padded_logprob_max_abs_diff"] < 1e-5
    assert figures["peak_tflops"] > 0 and len(tiny["plain"]) == 4  # plain transformers, both mixes, with and without
