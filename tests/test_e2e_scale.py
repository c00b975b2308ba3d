"""End to end at the seeds' scale: one 2,000 x 4 iteration of the default job, every process watched.

Before the engine was sized by its settings, 500 x 4 already took the rollout worker past 6 GB on
its way to the OOM killer; here its peak must stay what its KV cache and engine batch make it.
"""

import sys
from pathlib import Path

import pytest

from rollout.archive import read_table
from rollout.offline.stats import compute_stats

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from job_watch import metrics, watch_run  # noqa: E402

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

PROMPTS, N = 2000, 4


def test_a_2000_x_4_iteration_runs_with_every_process_bounded_by_its_settings(tmp_path):
    out = tmp_path / "run"
    watched = watch_run(
        out,
        ROOT / "configs" / "tiny-arith-smoke.yaml",
        [
            f"rollout.prompts_per_iteration={PROMPTS}",
            f"rollout.n_samples={N}",
            f"data.builtin_size={PROMPTS}",
            "iterations=1",
            "learner.minibatch_size=1000",
        ],
        timeout_s=1200,
    )
    assert watched.returncode == 0, watched.log.read_text()[-3000:]
    table = read_table(out)
    assert table.num_rows == PROMPTS * N
    assert len(set(zip(table["prompt_id"].to_pylist(), table["sample_index"].to_pylist()))) == PROMPTS * N
    [line] = metrics(out)
    assert line["samples"] == PROMPTS * N and line["reward/arithmetic"] == line["reward/arithmetic"]
    stats = compute_stats(out)
    assert stats.totals["samples"] == PROMPTS * N
    peaks = watched.peak_by_kind()
    assert peaks.keys() >= {"driver", "rollout", "reward", "learner"}
    # The engine's memory: 1 GiB of KV cache, its batch of 256 sequences, the weights; nothing per prompt.
    assert peaks["rollout"] < 3000, peaks
    assert max(peaks.values()) < 3000, peaks
