"""End to end, partial rollouts: one real job, 2 workers, whose answers run long enough to be cut by a weight
load (no SFT warm-up: the raw tiny model rambles to `max_tokens`), with one rollout worker killed mid-run.
Every test reads the same run."""

import json
import os
import re
import signal
from collections import Counter

import pytest
from e2e_common import SMOKE
from job_process import RolloutProcess, rollout_cli, run_args  # noqa: E402

from rollout.archive import read_table

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

ITERATIONS = 6
STALENESS = 1
PAIRS = 16 * 2  # prompts_per_iteration x n_samples, the smoke config's
KILL_AFTER = 2  # iterations logged before a rollout worker is killed
KEY = ["iteration", "prompt_id", "sample_index", "segment"]
VERSIONS = ["policy_version", "policy_version_last", "resumed_at", "resumed_versions", "trained"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The run's directory, its log and the name of the worker killed; the job long done."""
    out = tmp_path_factory.mktemp("partial") / "run"
    settings = [
        "rollout.partial_rollouts=true",
        f"rollout.max_staleness={STALENESS}",
        "rollout.num_workers=2",
        f"iterations={ITERATIONS}",
        "model.sft_warmup=false",
        "rollout.max_model_len=240",
        "rollout.sampling.max_tokens=200",
        "rollout.sampling.temperature=1.0",
        # 4 sequences a step: a worker's groups run in waves, so those left when its quota is met are still
        # generating when the learner's weights load after the update, and are cut and resumed.
        "rollout.max_num_seqs=4",
    ]
    log = out.parent / "run.log"
    with RolloutProcess(run_args(out, *settings, config=SMOKE), log) as job:
        job.wait_for_iterations(out, KILL_AFTER)
        # Answers of up to 200 tokens keep both engines generating: the worker dies with groups in flight.
        victim = job.session_pids("ray::RolloutActor")[0]
        os.kill(victim, signal.SIGKILL)
        assert job.wait(timeout=400) == 0, job.tail()
        text = job.text()
    [killed] = re.findall(r"(rollout-\d): restarted after its process died", text)
    return out, text, killed


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_iteration_is_archived_whole_and_no_sample_twice(run):
    out, _, _ = run
    table = read_table(out, KEY)
    keys = list(zip(*(table[c].to_pylist() for c in KEY)))
    assert len(keys) == len(set(keys))
    assert Counter(table["iteration"].to_pylist()) == {i: PAIRS for i in range(ITERATIONS)}


def test_each_rows_versions_are_consistent(run):
    out, _, _ = run
    for row in read_table(out, [*KEY, *VERSIONS]).to_pylist():
        first, last, at, versions = (row[c] for c in VERSIONS[:4])
        assert first <= last and len(at) == len(versions), row
        assert versions == sorted(versions) and at == sorted(at) and all(v >= first for v in versions), row
        assert last == (versions[-1] if versions else first), row


def test_trained_rows_are_within_max_staleness_of_the_learner_that_trains_them(run):
    out, _, _ = run
    manifest = json.loads((out / "manifest.json").read_text())
    after = {it["iteration"]: it["policy_version"] for it in manifest["iterations"]}
    assert after == {i: i + 1 for i in range(ITERATIONS)}  # one update each: the learner trains iteration i at i
    rows = read_table(out, ["iteration", *VERSIONS]).to_pylist()
    trained = [r for r in rows if r["trained"]]
    assert trained
    assert all(after[r["iteration"]] - 1 - r["policy_version"] <= STALENESS for r in trained)
    # Carried-over groups do train a version behind: the staleness bound is used, not vacuous.
    assert any(after[r["iteration"]] - 1 - r["policy_version"] == STALENESS for r in trained)
    dropped = sum(m["partial/dropped_stale"] for m in metrics_of(out))
    assert len(rows) - len(trained) >= dropped


def test_partial_metrics_agree_with_the_archive_and_samples_were_resumed(run):
    out, _, _ = run
    rows = read_table(out, ["iteration", *VERSIONS]).to_pylist()
    metrics = metrics_of(out)
    assert [m["iteration"] for m in metrics] == list(range(ITERATIONS))
    for m in metrics:
        mine = [r for r in rows if r["iteration"] == m["iteration"]]
        assert m["partial/resumed_samples"] == sum(1 for r in mine if r["resumed_versions"]), m
        spread = max(r["policy_version_last"] for r in mine) - min(r["policy_version"] for r in mine)
        assert m["partial/version_spread"] == spread, m
        assert m["partial/carried_over"] >= 0 and m["partial/dropped_stale"] >= 0
    # The last wave's 200-token answers outlast a learner update: weight loads cut them, and they resume.
    assert sum(m["partial/resumed_samples"] for m in metrics) > 0
    assert any(r["policy_version_last"] > r["policy_version"] for r in rows)


def test_a_killed_worker_is_restarted_and_what_it_held_is_redone(run):
    out, text, killed = run
    metrics = metrics_of(out)
    assert sum(m["restarts/rollout"] for m in metrics) == 1
    # The workers hold the spare half of the first launch from then on. Had the dead worker's held groups been
    # lost rather than generated again, they would stay held (counted, never handed back) to the end.
    carried = [m["partial/carried_over"] for m in metrics]
    assert carried[-1] == carried[KILL_AFTER - 1], carried
    rows = read_table(out, ["iteration", "worker"]).to_pylist()
    assert any(r["worker"] == killed and r["iteration"] >= KILL_AFTER + 1 for r in rows)  # its replacement works


def test_stats_show_the_version_spread(run):
    out, _, _ = run
    shown = rollout_cli("stats", str(out), "--json").stdout
    stats = json.loads(shown)
    rows = read_table(out, ["iteration", "policy_version", "policy_version_last"]).to_pylist()
    for item in stats["iterations"]:
        mine = [r for r in rows if r["iteration"] == item["iteration"]]
        assert item["version_min"] == min(r["policy_version"] for r in mine)
        assert item["version_last_max"] == max(r["policy_version_last"] for r in mine)
    assert stats["totals"]["resumed"] > 0
    header = rollout_cli("stats", str(out)).stdout.splitlines()[1].split()
    assert "resumed" in header and "last" in header
