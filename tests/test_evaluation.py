"""Held-out evaluation's pure parts: pass@k against hand-computed values, the figures of an evaluation,
when one is due, and the `eval` config section."""

import math

import numpy as np
import pyarrow as pa
import pytest

from contracts.config import ConfigError
from contracts.config.evaluation import eval_sampling
from contracts.config.load import check, explain, load_config
from rollout.driver.eval_metrics import eval_figures, eval_line, pass_at_k, reward_arrays
from rollout.driver.evaluation import is_due


@pytest.mark.parametrize(
    "n, c, k, expected",
    [
        (4, 1, 4, 1.0),  # n = k: any correct sample passes
        (4, 0, 4, 0.0),  # n = k, none correct
        (5, 2, 2, 1 - 3 / 10),  # n > k: 1 - C(3,2)/C(5,2)
        (10, 3, 1, 0.3),  # pass@1 is the fraction correct
        (10, 3, 5, 1 - 21 / 252),  # 1 - C(7,5)/C(10,5)
        (6, 0, 3, 0.0),  # c = 0
        (6, 6, 3, 1.0),  # c = n
        (1, 1, 1, 1.0),
        (1, 0, 1, 0.0),
    ],
)
def test_pass_at_k_matches_hand_computed_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_pass_at_k_refuses_impossible_counts():
    for n, c, k in [(4, 5, 1), (4, 1, 5), (4, 1, 0), (4, -1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_eval_figures_average_over_prompts_and_mean_at_k_is_at_most_pass_at_k():
    # two prompts, k = 3: p0 has 1 of 3 correct, p1 none; a NaN reward is not correct
    ids = ["p0", "p0", "p0", "p1", "p1", "p1"]
    rewards = np.array([1.0, 0.0, 0.5, 0.0, np.nan, 0.9])
    components = {"arithmetic": rewards.copy()}
    figures = eval_figures(ids, rewards, components, tokens=60, k=3, threshold=1.0)
    assert figures["eval/pass@k"] == pytest.approx((1.0 + 0.0) / 2)
    assert figures["eval/mean@k"] == pytest.approx((1 / 3 + 0.0) / 2)
    assert figures["eval/mean@k"] <= figures["eval/pass@k"]
    assert figures["eval/reward_mean"] == pytest.approx(np.nanmean(rewards))
    assert figures["eval/arithmetic/mean"] == pytest.approx(np.nanmean(rewards))
    assert figures["eval/response_tokens"] == 10
    assert (figures["eval/prompts"], figures["eval/samples"], figures["eval/k"]) == (2, 6, 3)
    # a lower threshold counts 0.9 as correct
    assert eval_figures(ids, rewards, components, 60, 3, 0.9)["eval/pass@k"] == 1.0


def test_reward_arrays_read_the_total_and_components_of_reward_batches():
    comps = pa.StructArray.from_arrays([pa.array([1.0, 0.0]), pa.array([0.5, np.nan])], names=["a", "b"])
    batch = pa.RecordBatch.from_arrays([pa.array([1.5, 0.0]), comps], names=["reward", "reward_components"])
    total, components = reward_arrays([batch, batch])
    assert total.tolist() == [1.5, 0.0, 1.5, 0.0]
    assert components["a"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert math.isnan(components["b"][1])


def test_eval_line_names_the_weights_and_the_figures():
    figures = eval_figures(["p"], np.array([1.0]), {"arithmetic": np.array([1.0])}, 4, 1, 1.0)
    line = eval_line({**figures, "eval/iteration": 4, "eval/policy_version": 5})
    assert line.startswith("eval after iter 4  v5  pass@1 1.000  mean@1 1.000")
    assert "arithmetic 1.000" in line
    assert eval_line({**figures, "eval/iteration": -1, "eval/policy_version": 0}).startswith("eval at start  v0")


def test_eval_is_off_by_default_and_due_every_n_iterations_and_after_the_last():
    assert not any(is_due(load_config(), i, 19) for i in range(20))
    cfg = load_config(None, ["eval.prompts=builtin:arith", "eval.every=5"])
    assert [i for i in range(12) if is_due(cfg, i, 11)] == [4, 9, 11]
    cfg = load_config(None, ["eval.prompts=builtin:arith", "eval.every=0", "eval.at_end=false"])
    assert not any(is_due(cfg, i, 11) for i in range(12))
    cfg = load_config(None, ["eval.prompts=builtin:arith", "eval.every=0"])
    assert [i for i in range(12) if is_due(cfg, i, 11)] == [11]


def test_eval_section_defaults_explain_and_sampling():
    cfg = load_config(None, ["eval.prompts=builtin:arith"])
    ev = cfg.eval
    assert (ev.every, ev.at_start, ev.at_end, ev.max_prompts, ev.n_samples, ev.rules) == (10, True, True, None, 1, None)
    assert ev.correct_threshold == 1.0
    # k = 1: the rollout's sampling, greedy; k > 1: the rollout's as it is; or the section's own
    assert eval_sampling(ev, cfg.rollout.sampling).temperature == 0.0
    assert eval_sampling(ev, cfg.rollout.sampling).max_tokens == cfg.rollout.sampling.max_tokens
    cfg = load_config(None, ["eval.prompts=builtin:arith", "eval.n_samples=8"])
    assert eval_sampling(cfg.eval, cfg.rollout.sampling) == cfg.rollout.sampling
    cfg = load_config(None, ["eval.prompts=x.jsonl", "eval.sampling={temperature: 0.7, max_tokens: 9}"])
    assert eval_sampling(cfg.eval, cfg.rollout.sampling).temperature == 0.7
    check(cfg, cuda_available=False)
    lines = "\n".join(explain())
    for name in ("prompts", "every", "at_start", "at_end", "max_prompts", "n_samples", "sampling", "rules"):
        assert f"\neval.{name} = " in lines
    assert "eval.correct_threshold = 1.0" in lines


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.n_samples=0"], "eval.n_samples"),
        (["eval.n_samples=65"], "eval.n_samples"),
        (["eval.every=-1"], "eval.every"),
        (["eval.max_prompts=0"], "eval.max_prompts"),
    ],
)
def test_eval_fields_out_of_range_are_refused_on_load(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_eval_cross_field_rules():
    greedy_k = load_config(None, ["eval.prompts=builtin:arith", "eval.n_samples=4", "eval.sampling={temperature: 0}"])
    with pytest.raises(ConfigError, match="eval.n_samples is 4"):
        check(greedy_k, cuda_available=False)
    long = load_config(None, ["eval.prompts=builtin:arith", "eval.sampling={max_tokens: 5000}"])
    with pytest.raises(ConfigError, match="eval.sampling.max_tokens"):
        check(long, cuda_available=False)
    with pytest.raises(ConfigError, match="eval.rules is an empty list"):
        check(load_config(None, ["eval.prompts=builtin:arith", "eval.rules=[]"]), cuda_available=False)
    # off: nothing checked
    check(load_config(None, ["eval.n_samples=4", "eval.sampling={temperature: 0}"]), cuda_available=False)


def test_eval_rules_get_the_overlong_limit_of_the_evaluation():
    cfg = load_config(
        None, ["eval.prompts=builtin:arith", "eval.sampling={max_tokens: 12}", "eval.rules=[{name: overlong}]"]
    )
    assert cfg.eval.rules[0].params["max_tokens"] == 12


def test_the_reports_eval_chart_puts_held_out_figures_beside_the_training_reward():
    from rollout.offline.eval_series import eval_chart_specs, joined

    rows = [{"iteration": i, "reward_mean": 0.1 * i} for i in range(4)]
    assert eval_chart_specs(rows, {0: {}, 1: {}}) == []
    metrics = {
        0: {"eval/pass@k": 0.5, "eval/mean@k": 0.25, "eval/reward_mean": 0.3, "eval/k": 4},
        2: {"eval/pass@k": 0.75, "eval/mean@k": 0.5, "eval/reward_mean": 0.6, "eval/k": 4},
    }
    [spec] = eval_chart_specs(rows, metrics)
    assert spec["series"]["training reward"] == [0.0, 0.1, 0.2, pytest.approx(0.3)]
    assert spec["series"]["eval pass@4"] == [0.5, None, 0.75, None]  # never carried forward
    assert "pass@4" in spec["title"]
    assert joined([None, 1.0, None, 3.0, None]) == [None, 1.0, 2.0, 3.0, None]


class _FakeEvaluator:
    """Launches and collects nothing: an evaluation's figures are just which iteration it followed."""

    def __init__(self):
        self.collected = []

    def launch(self, iteration):
        from rollout.driver.evaluation import Pending

        return Pending(iteration, None, False, 0.0)

    def collect(self, pending):
        self.collected.append(pending.iteration)
        return {"eval/iteration": pending.iteration, "time/eval": 0.0}


def _lines(overrides, last):
    """{metrics line: eval/iteration} as the job's loop takes them, and the evaluations no line took."""
    from rollout.driver.evaluation import Evaluations

    cfg = load_config(None, ["eval.prompts=builtin:arith", *overrides])
    evaluator = _FakeEvaluator()
    evaluations, lines = Evaluations(cfg, evaluator), {}
    for iteration in range(last + 1):
        evaluations.at_start(iteration)
        evaluations.after(iteration, last)
        timings = {}
        taken = evaluations.take(iteration, last, timings)
        if taken is not None:
            lines[iteration] = taken["eval/iteration"]
            assert "eval_wait" in timings and taken["time/eval_wait"] == timings["eval_wait"]
    before = len(evaluator.collected)
    evaluations.finish()
    return lines, evaluator.collected[before:]


def test_each_evaluation_lands_on_the_line_of_the_iteration_it_ran_after():
    assert _lines(["eval.every=2"], 5) == ({0: -1, 1: 1, 3: 3, 5: 5}, [])
    assert _lines(["eval.every=0"], 5) == ({0: -1, 5: 5}, [])
    assert _lines(["eval.every=0", "eval.at_start=false", "eval.at_end=false"], 5) == ({}, [])
    assert _lines(["eval.every=4", "eval.at_end=false"], 9) == ({0: -1, 3: 3, 7: 7}, [])


def test_with_max_staleness_an_evaluation_lands_on_the_next_line_unless_that_one_has_its_own():
    staleness = "rollout.max_staleness=1"
    # after 1 on 2's line (it ran while the learner updated on 2); after 3 (the last) on its own
    assert _lines([staleness, "eval.every=2"], 3) == ({0: -1, 2: 1, 3: 3}, [])
    # after 2, with 3 due too (the last): on its own line, the overlap given up
    assert _lines([staleness, "eval.every=3"], 3) == ({0: -1, 2: 2, 3: 3}, [])


def test_two_evaluations_due_on_one_line_each_move_one_line_on():
    lines, left = _lines(["eval.every=1"], 2)
    assert lines == {0: -1, 1: 0, 2: 1} and left == [2]  # the last only in RUN/eval/metrics.jsonl


def test_a_resumed_run_does_not_evaluate_at_the_start_again():
    from rollout.driver.evaluation import Evaluations

    evaluator = _FakeEvaluator()
    evaluations = Evaluations(load_config(None, ["eval.prompts=builtin:arith"]), evaluator)
    evaluations.at_start(7)
    assert evaluations.pending == []
