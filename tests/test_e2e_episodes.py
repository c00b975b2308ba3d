"""End to end with an environment: `rollout run --config configs/tiny-calc.yaml`, as a user runs it (its SFT
warm-up, the calculator on the rollout worker's threads, rewards, the learner, the archive), then
`rollout stats` on the run. The SFT'd model writes a `<calc>` call first, so most episodes have two turns.
The rollout worker is killed once the first iteration is logged, amid later iterations' episodes: they are
redone whole, never archived half-played."""

import json
import os
import signal

import pytest
from e2e_common import LEARNER_COLUMNS, ROOT
from job_process import RolloutProcess, rollout_cli, run_args
from transformers import AutoTokenizer

from contracts.builtin_model import resolve_model_path
from rollout.archive import read_table

pytestmark = [pytest.mark.e2e, pytest.mark.vllm]

CALC = ROOT / "configs" / "tiny-calc.yaml"
ITERATIONS, PROMPTS, SAMPLES = 4, 16, 4


@pytest.fixture(scope="module")
def calc_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("calc") / "run"
    settings = (f"iterations={ITERATIONS}", f"rollout.prompts_per_iteration={PROMPTS}")
    with RolloutProcess(run_args(out, *settings, config=CALC), out.parent / "run.log") as job:
        job.wait_for_iterations(out, 1, timeout=600)
        os.kill(job.actor_pid("RolloutActor"), signal.SIGKILL)
        assert job.wait(timeout=600) == 0, job.tail()
        assert "rollout-0: restarted after its process died" in job.text()
    return out


def test_a_killed_workers_episodes_are_redone_whole(calc_run):
    columns = ["iteration", "prompt_id", "sample_index", "response_ids", "response_mask", "num_turns"]
    rows = read_table(calc_run, columns).to_pylist()
    keys = [(r["iteration"], r["prompt_id"], r["sample_index"]) for r in rows]
    assert len(keys) == len(set(keys)) == ITERATIONS * PROMPTS * SAMPLES  # each once, none missing
    for row in rows:
        mask = row["response_mask"]
        assert len(mask) == len(row["response_ids"]) and mask[0] == 1
        model_turns = sum(1 for i, m in enumerate(mask) if m == 1 and (i == 0 or mask[i - 1] == 0))
        assert model_turns == row["num_turns"]  # every turn the row counts is in it, model and environment alike
    lines = [json.loads(line) for line in (calc_run / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["restarts/rollout"] for m in lines) == 1


def test_episodes_are_archived_with_the_calculators_turns_as_context(calc_run):
    table = read_table(calc_run)
    assert table.num_rows == ITERATIONS * PROMPTS * SAMPLES
    assert table["env_error"].null_count == table.num_rows
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    rows = table.to_pylist()
    tool_calls = [r for r in rows if r["num_turns"] >= 2]
    assert len(tool_calls) > table.num_rows // 2, [r["response"] for r in rows[:4]]
    for row in tool_calls:
        mask = row["response_mask"]
        env = [i for i, m in enumerate(mask) if m == 0]
        assert env and len(mask) == len(row["response_ids"])
        assert "<calc>" in row["response"] and "<result>" in tokenizer.decode([row["response_ids"][i] for i in env])
        assert row["final_turn"] and row["final_turn"] in row["response"]
        # The environment's tokens are context: no logprob of the engine's, nothing of the learner's.
        for column in ("response_logprobs", *LEARNER_COLUMNS):
            assert all(row[column][i] == 0.0 for i in env), column
    # The model's tokens carry the learner's figures (a group whose rewards are all alike has no advantage).
    assert any(a != 0.0 for row in tool_calls for a, m in zip(row["advantages"], row["response_mask"]) if m)


def test_episode_metrics_show_turns_and_the_earlier_turns_kv_cache_reused(calc_run):
    lines = [json.loads(line) for line in (calc_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == list(range(ITERATIONS))
    for m in lines:
        assert m["episode/turns_mean"] > 1.5 and m["episode/env_errors"] == 0
        assert m["episode/env_step_seconds"] > 0
        # A second turn's prompt is the first turn's whole context: whole blocks of it come from the cache.
        assert 0 < m["episode/prefix_cached_fraction"] <= 1


def test_stats_show_turns_per_episode(calc_run):
    text = rollout_cli("stats", str(calc_run)).stdout
    header = text.splitlines()[1].split()
    assert "turns" in header and "env" in header
    total = text.splitlines()[2 + ITERATIONS].split()
    assert total[0] == "all" and float(total[header.index("turns")]) > 1.5
