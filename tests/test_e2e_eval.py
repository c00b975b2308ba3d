"""End to end: a run with held-out evaluation (the eval section), its metrics lines and eval archive,
`rollout stats` over its evaluations, and `rollout eval` on its newest checkpoint."""

import json

import pytest
from e2e_common import SMOKE
from job_process import rollout_cli, run_args  # noqa: E402

from rollout.archive import read_table

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

EVAL_PROMPTS, K = 12, 2


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory):
    """4 iterations, an evaluation at the start, after iteration 1 (eval.every 2) and after the last; with
    rollout.max_staleness 1 the one after iteration 1 runs while the learner updates on 2, so it is on
    iteration 2's line."""
    out = tmp_path_factory.mktemp("eval") / "run"
    settings = (
        "iterations=4",
        "model.sft_warmup=false",
        "data.builtin_size=60",
        "rollout.prompts_per_iteration=8",
        "rollout.max_staleness=1",
        "eval.prompts=builtin:arith",
        "eval.every=2",
        f"eval.max_prompts={EVAL_PROMPTS}",
        f"eval.n_samples={K}",
    )
    proc = rollout_cli(*run_args(out, *settings, config=SMOKE))
    return out, proc


def test_evaluations_are_on_their_lines_archived_apart_and_never_trained_on(eval_run):
    out, proc = eval_run
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in lines] == [0, 1, 2, 3]
    evaluated = {line["iteration"]: line for line in lines if "eval/pass@k" in line}
    # the start's (weights before any update) on 0's line; none carried forward to 1's
    assert sorted(evaluated) == [0, 2, 3]
    assert [evaluated[i]["eval/iteration"] for i in (0, 2, 3)] == [-1, 1, 3]
    assert [evaluated[i]["eval/policy_version"] for i in (0, 2, 3)] == [0, 2, 4]
    assert not any(key.startswith("eval/") for key in lines[1])
    for line in evaluated.values():
        assert 0.0 <= line["eval/mean@k"] <= line["eval/pass@k"] <= 1.0
        assert line["eval/k"] == K and line["eval/prompts"] == EVAL_PROMPTS
        for key in ("eval/reward_mean", "eval/arithmetic/mean", "eval/response_tokens"):
            assert key in line
    assert proc.stderr.count("eval at start  v0  pass@2 ") == 1
    assert "eval after iter 1  v2  pass@2 " in proc.stderr and "eval after iter 3  v4  pass@2 " in proc.stderr

    held_out = read_table(out / "eval")
    assert held_out.num_rows == 3 * EVAL_PROMPTS * K
    assert not any(held_out["trained"].to_pylist())
    assert sorted(set(held_out["policy_version"].to_pylist())) == [0, 2, 4]
    assert held_out["reward"].null_count == 0
    trained = read_table(out)  # the run's own archive holds only what it generated to train on
    assert trained.num_rows == 4 * 8 * 2
    assert len((out / "eval" / "metrics.jsonl").read_text().splitlines()) == 3


def test_stats_shows_a_table_over_the_evaluations(eval_run):
    out, _ = eval_run
    table = rollout_cli("stats", str(out)).stdout
    assert "held-out evaluations (3):" in table
    assert "pass@2" in table and "start" in table
    shown = json.loads(rollout_cli("stats", str(out), "--json").stdout)
    assert [e["eval/iteration"] for e in shown["evaluations"]] == [-1, 1, 3]


def test_rollout_eval_on_the_runs_newest_checkpoint(eval_run):
    out, _ = eval_run
    proc = rollout_cli("eval", "--run", str(out), "--json", "--rule", "arithmetic")
    figures = json.loads(proc.stdout)
    assert figures["eval/iteration"] == 3 and figures["eval/policy_version"] == 4  # the checkpoint's weights
    assert figures["eval/prompts"] == EVAL_PROMPTS and figures["eval/k"] == K
    assert 0.0 <= figures["eval/mean@k"] <= figures["eval/pass@k"] <= 1.0
    archived = read_table(out / "evals" / "iter-000003" / "eval")
    assert archived.num_rows == EVAL_PROMPTS * K
