"""reasoning-gym's tasks (the `tasks` extra): `data.prompts: reasoning_gym:TASK[,TASK...]` generates records,
the `reasoning_gym` rule scores a response with the task's own scorer (never running it as code), and the
`reasoning_gym` environment gives a wrong answer its verdict and another turn. Without the extra, each says
what to install in one line."""

from __future__ import annotations

import builtins
import inspect
import json
import re
import sys
from collections import Counter

import pytest

rg = pytest.importorskip("reasoning_gym")

from e2e_common import ROOT  # noqa: E402,I001
from job_process import rollout_cli, run_args  # noqa: E402

from contracts.config import ConfigError, EnvConfig, RewardConfig, RuleSpec  # noqa: E402
from contracts.config.load import load_config  # noqa: E402
from contracts.data_sources import DataSourceError, data_source, read_data  # noqa: E402
from contracts.formats import parse_prompt  # noqa: E402
from contracts.reasoning_gym_source import plan  # noqa: E402
from reward.checks import check_reward_config  # noqa: E402
from reward.reasoning_gym_rule import (  # noqa: E402
    ARITHMETIC_ONLY,
    LITERAL_ONLY,
    extract_answer,
    reasoning_gym,
    task_scorer,
)
from reward.rules import RULES  # noqa: E402
from reward.scorer import RuleScorer  # noqa: E402
from rollout.environments.registry import ENVIRONMENTS, check_environment  # noqa: E402

CONFIG = ROOT / "configs" / "tiny-rg.yaml"
ADDITION = {"min_terms": 2, "max_terms": 2, "max_digits": 1, "operators": ["+"], "allow_parentheses": False}
ONE_TASK = "reasoning_gym:basic_arithmetic"


def environment(**params):
    """The environment as a job makes one, by name: importing its module here would register it ahead of the
    other built-ins, and change the order the registry lists them in."""
    return ENVIRONMENTS.lookup("reasoning_gym")(**params)


def records(spec: str, **params) -> list[dict]:
    return [record for _, record in read_data(spec, params)]


def prompt_record(spec: str, **params):
    (n, obj), *_ = read_data(spec, params)
    return parse_prompt(obj, "auto", f"{spec}:{n}")


# --- the data source -----------------------------------------------------------------------------


def test_one_task_is_reasoning_gyms_own_dataset_with_the_answer_as_reference_and_the_entry_kept():
    params = {"size": 12, "seed": 5, "tasks": {"basic_arithmetic": ADDITION}}
    assert data_source(ONE_TASK) == "reasoning_gym"
    rows = list(read_data(ONE_TASK, params))
    own = rg.create_dataset("basic_arithmetic", size=12, seed=5, **ADDITION)
    assert [n for n, _ in rows] == list(range(12))
    for (n, obj), entry in zip(rows, own):
        assert obj == {"prompt": entry["question"], "completion": entry["answer"], "metadata": {"entry": entry}}
        record = parse_prompt(obj, "auto", f"{ONE_TASK}:{n}")
        assert [m.content for m in record.messages] == [entry["question"]]
        assert record.reference == entry["answer"] and record.metadata["entry"]["metadata"]["source_dataset"] == (
            "basic_arithmetic"
        )
        json.dumps(obj)  # the prompt id hashes the record's JSON


def test_generation_is_deterministic_for_tasks_size_and_seed():
    params = {"size": 30, "seed": 1, "tasks": {"chain_sum": {"weight": 2}}}
    spec = "reasoning_gym:chain_sum,basic_arithmetic"
    first = records(spec, **params)
    assert records(spec, **params) == first and len(first) == 30
    assert records(spec, **{**params, "seed": 2}) != first
    assert records(spec, **{**params, "size": 10}) == first[:10]  # an entry depends on its index, not the size


def test_several_tasks_mix_by_weight_as_reasoning_gyms_composite_does():
    spec = "reasoning_gym:chain_sum,basic_arithmetic"
    params = {"size": 400, "seed": 3, "tasks": {"chain_sum": {"weight": 9}, "basic_arithmetic": ADDITION}}
    rows = records(spec, **params)
    tasks = Counter(row["metadata"]["entry"]["metadata"]["source_dataset"] for row in rows)
    assert set(tasks) == {"chain_sum", "basic_arithmetic"} and 0.85 < tasks["chain_sum"] / 400 < 0.95
    for row in rows:  # each task's own settings apply to its entries
        entry = row["metadata"]["entry"]
        if entry["metadata"]["source_dataset"] == "basic_arithmetic":
            assert entry["metadata"]["num_terms"] == 2 and "+" in entry["question"]
    from reasoning_gym.composite import CompositeConfig, CompositeDataset, DatasetSpec

    composite = CompositeDataset(
        CompositeConfig(
            size=400,
            seed=3,
            datasets=[DatasetSpec("chain_sum", 9.0, {}), DatasetSpec("basic_arithmetic", 1.0, dict(ADDITION))],
        )
    )
    assert [row["metadata"]["entry"] for row in rows] == list(composite)


def test_a_task_without_one_answer_has_no_reference():
    (row, *_) = records("reasoning_gym:propositional_logic", size=2)
    assert "completion" not in row and row["metadata"]["entry"]["answer"] is None
    assert parse_prompt(row, "auto", "x:0").reference is None


@pytest.mark.parametrize(
    "spec, params, message",
    [
        (
            "reasoning_gym:chian_sum",
            {},
            "data.prompts: reasoning_gym:chian_sum: reasoning-gym has no task 'chian_sum'; did you mean chain_sum",
        ),
        ("reasoning_gym:", {}, "data.prompts: 'reasoning_gym:' names no task; write reasoning_gym:TASK[,TASK...]"),
        ("reasoning_gym:chain_sum,,leg_counting", {}, "has an empty task name"),
        ("reasoning_gym:chain_sum,chain_sum", {}, "names chain_sum twice"),
        ("reasoning_gym:composite", {}, "reasoning-gym has no task 'composite'"),
        (ONE_TASK, {"sise": 3}, "data.source_params: the reasoning_gym source has no setting 'sise'; its settings"),
        (ONE_TASK, {"size": 0}, "data.source_params.size must be a whole number >= 1, got 0"),
        (ONE_TASK, {"seed": "x"}, "data.source_params.seed must be a whole number >= 0"),
        (ONE_TASK, {"tasks": ["basic_arithmetic"]}, "data.source_params.tasks must map task names to their settings"),
        (ONE_TASK, {"tasks": {"chain_sum": {}}}, "data.source_params.tasks: chain_sum is not among the tasks"),
        (ONE_TASK, {"tasks": {"basic_arithmetic": 3}}, "data.source_params.tasks.basic_arithmetic must be a mapping"),
        (
            ONE_TASK,
            {"tasks": {"basic_arithmetic": {"weight": 0}}},
            "tasks.basic_arithmetic.weight must be a number > 0",
        ),
        (ONE_TASK, {"tasks": {"basic_arithmetic": {"seed": 1}}}, "set seed once, in data.source_params.seed"),
        (
            ONE_TASK,
            {"tasks": {"basic_arithmetic": {"max_termz": 2}}},
            "data.source_params.tasks.basic_arithmetic: reasoning-gym rejects these settings (TypeError",
        ),
        (
            ONE_TASK,
            {"tasks": {"basic_arithmetic": {"min_terms": 3, "max_terms": 2}}},
            "rejects these settings (AssertionError: max_terms must be >= min_terms); its settings: weight, min_terms",
        ),
    ],
)
def test_a_spec_or_params_it_cannot_read_is_one_line_naming_the_field(spec, params, message):
    with pytest.raises(DataSourceError) as e:
        read_data(spec, params)  # before the first record is asked for
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_check_reads_the_spec_and_params_without_generating():
    checked = plan("reasoning_gym:chain_sum,leg_counting", {"size": 5, "tasks": {"leg_counting": {"weight": 3}}})
    assert (checked.tasks, checked.weights, checked.size, checked.seed) == (
        ["chain_sum", "leg_counting"],
        {"chain_sum": 1.0, "leg_counting": 3.0},
        5,
        0,
    )


# --- the rule ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sum_record():
    return prompt_record(ONE_TASK, size=1, seed=0, tasks={"basic_arithmetic": ADDITION})


@pytest.mark.parametrize(
    "response, score",
    [
        ("4", 1.0),
        (" 4\n", 1.0),
        ("5", 0.0),
        ("0 + 4 is <answer>4</answer>", 1.0),
        ("<answer>5</answer> no, <answer> 4 </answer>", 1.0),  # the last tagged answer counts
        ("<answer>5</answer> 4", 0.0),
        ("14", 0.5),  # basic_arithmetic's scorer: partial credit when the answer holds the right one
    ],
)
def test_the_rule_scores_the_answer_with_the_tasks_own_scorer(sum_record, response, score):
    assert sum_record.reference == "4"  # "Calculate 0 + 4."
    assert reasoning_gym("", response, sum_record) == pytest.approx(score)


def test_the_answer_is_the_last_tagged_one_or_the_whole_response():
    assert extract_answer("a <answer>1</answer> b <answer>2</answer>") == "2"
    assert extract_answer("<answer>\n 7 \n</answer>") == "7"
    assert extract_answer(" 7 ") == "7"
    assert extract_answer("<result>3</result>", "result") == "3"
    assert extract_answer("<answer>3</answer>", "") == "<answer>3</answer>"


def test_countdown_is_scored_right_for_any_expression_that_reaches_the_target():
    record = prompt_record("reasoning_gym:countdown", size=1, seed=1)
    metadata = record.metadata["entry"]["metadata"]
    numbers, target = metadata["numbers"], metadata["target"]
    assert record.reference == "94*4 - 61 - 6" and (numbers, target) == ([6, 61, 94, 4], 309)
    other = "4*94 - 6 - 61"  # not the stored answer, and as right
    assert reasoning_gym("", f"<answer>{other}</answer>", record) == 1.0
    assert reasoning_gym("", record.reference, record) == 1.0
    assert reasoning_gym("", "94*4 - 61 + 6", record) < 0.1  # the wrong value
    assert reasoning_gym("", "94*4 - 61", record) < 0.1  # not every number used


@pytest.mark.parametrize("task", LITERAL_ONLY + ARITHMETIC_ONLY)
def test_no_scorer_runs_what_the_model_wrote_as_code(task, monkeypatch):
    """The tasks whose scorers call eval (or sympy's parse_expr, which does) still score their right answers,
    and text that is code never reaches Python's eval."""
    seen = []
    real_eval = builtins.eval

    def spy(source, *args, **kwargs):
        if isinstance(source, str) and "MARK" in source:
            seen.append(source)
        return real_eval(source, *args, **kwargs)

    monkeypatch.setattr(builtins, "eval", spy)
    entry = rg.create_dataset(task, size=1, seed=0)[0]
    record = parse_prompt({"prompt": entry["question"], "metadata": {"entry": entry}}, "auto", "x:0")
    assert reasoning_gym("", entry["answer"], record) == 1.0
    for attack in ["__import__('os').getpid() # MARK", "[MARK]", "MARK**2", "exec('MARK')", "(9**9**9) + 0*MARK"]:
        assert reasoning_gym("", attack, record) < 0.1
    assert seen == []


def test_a_task_whose_scorer_would_run_the_answer_as_code_is_refused():
    with pytest.raises(ValueError, match="simple_integration's scorer reads the answer with parse_expr, which can"):
        task_scorer("simple_integration")


def test_the_tables_of_guarded_tasks_match_the_scorers_that_run_code():
    """Every scorer of this reasoning-gym that names eval, exec, parse_expr or sympify is guarded or refused:
    a new version's scorer that does is caught here (and refused by the rule)."""
    from reasoning_gym.factory import DATASETS

    names = re.compile(r"\b(?:eval|exec)\s*\(|parse_expr|sympify")  # literal_eval is safe
    runs_code = {name for name, (cls, _) in DATASETS.items() if names.search(inspect.getsource(cls.score_answer))}
    guarded = set(LITERAL_ONLY) | set(ARITHMETIC_ONLY)
    assert guarded <= runs_code
    for name in sorted(runs_code - guarded):
        with pytest.raises(ValueError, match="which can run it as code"):
            task_scorer(name)


def test_a_record_without_an_entry_is_a_failed_component_not_a_score(tmp_path):
    plain = parse_prompt({"prompt": "1+1=", "completion": "2"}, "auto", "x:0")
    with pytest.raises(ValueError, match=r'no reasoning-gym entry in metadata\["entry"\]'):
        reasoning_gym("", "2", plain)
    scorer = RuleScorer([RuleSpec(name="reasoning_gym", params={"answer_tag": "final"})], timeout_s=30.0)
    assert scorer.score("", "2", plain).failed == ["reasoning_gym"]
    record = prompt_record(ONE_TASK, size=1, tasks={"basic_arithmetic": ADDITION})
    assert scorer.score("", "<final>4</final>", record).total == 1.0


def test_the_rules_params_are_checked_at_start_up():
    assert "reasoning_gym" in RULES
    check_reward_config(RewardConfig(rules=[RuleSpec(name="reasoning_gym")]))
    with pytest.raises(ConfigError, match="reward.rules.0.params: reasoning_gym: answer_tag must be a tag name"):
        check_reward_config(RewardConfig(rules=[RuleSpec(name="reasoning_gym", params={"answer_tag": "<a>"})]))


# --- the environment -----------------------------------------------------------------------------


def test_a_wrong_answer_gets_the_verdict_and_another_turn_and_a_right_one_ends(sum_record):
    env = environment()
    assert env.reset(sum_record) is None
    wrong = env.step("<answer>5</answer>")
    assert not wrong.done and wrong.reward is None
    assert wrong.observation == "That is not right (score 0.00). Try again."
    assert wrong.info == {"score": 0.0, "correct": False, "tries": 1}
    right = env.step("<answer>4</answer>")
    assert right.done and right.observation is None and right.info == {"score": 1.0, "correct": True, "tries": 2}
    assert env.reset(sum_record) is None and env.step("4").done  # a new episode starts over


def test_the_environment_can_penalise_each_retry_and_take_partial_credit(sum_record):
    env = environment(threshold=0.5, retry_penalty=0.1)
    env.reset(sum_record)
    assert env.step("7").reward == -0.1
    assert env.step("14").done  # 0.5: right enough at this threshold


def test_the_environment_is_a_built_in_with_its_params_checked_at_start_up(sum_record):
    cls = ENVIRONMENTS.lookup("reasoning_gym")
    assert cls.__module__ == "rollout.environments.reasoning_gym" and cls.__name__ == "ReasoningGym"
    assert check_environment(EnvConfig(name="reasoning_gym", params={"retry_penalty": 0.5})) is cls
    with pytest.raises(ConfigError, match="env.params: reasoning_gym: reasoning_gym: retry_penalty must be"):
        check_environment(EnvConfig(name="reasoning_gym", params={"retry_penalty": -1}))
    with pytest.raises(ConfigError, match="env.params: reasoning_gym: .*unexpected keyword argument 'tries'"):
        check_environment(EnvConfig(name="reasoning_gym", params={"tries": 3}))
    env = environment()
    with pytest.raises(ValueError, match="no reasoning-gym entry"):
        env.reset(parse_prompt({"prompt": "1+1="}, "auto", "x:0"))


# --- without the extra ---------------------------------------------------------------------------


def test_without_the_extra_each_part_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # `import reasoning_gym` now fails
    with pytest.raises(DataSourceError) as e:
        read_data(ONE_TASK, {})
    message = str(e.value)
    assert message.startswith(
        "data.prompts: reasoning_gym:basic_arithmetic needs reasoning-gym, which is not installed"
    )
    assert message.endswith("install the tasks extra: pip install 'ppo-rollout[tasks]' (or pip install reasoning-gym)")
    assert "\n" not in message
    with pytest.raises(
        ConfigError, match=r"reward.rules.0.params: the reasoning_gym rule needs reasoning-gym, .*\[tasks\]"
    ):
        check_reward_config(RewardConfig(rules=[RuleSpec(name="reasoning_gym")]))
    with pytest.raises(
        ConfigError, match=r"env.params: reasoning_gym: the reasoning_gym environment needs reasoning-gym"
    ):
        check_environment(EnvConfig(name="reasoning_gym"))


# --- the shipped config --------------------------------------------------------------------------


def test_the_shipped_config_reads_short_prompts_with_answers():
    cfg = load_config(str(CONFIG), [])
    assert cfg.data.prompts == ONE_TASK and cfg.reward.rules[0].name == "reasoning_gym"
    rows = list(read_data(cfg.data.prompts, cfg.data.source_params))
    assert len(rows) == cfg.data.source_params["size"] == 2000
    questions = {row["prompt"] for _, row in rows}
    assert all(q.startswith("Calculate ") and " + " in q for q in questions) and len(questions) == 121  # 0..10 each


def test_rollout_run_with_an_unknown_task_exits_2_with_one_line(tmp_path):
    proc = rollout_cli(*run_args(tmp_path / "run", f"data.prompts={ONE_TASK}c", config=CONFIG), check=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "rollout run: data.prompts: reasoning_gym:basic_arithmeticc: reasoning-gym has no task 'basic_arithmeticc'; "
        "did you mean basic_arithmetic, bitwise_arithmetic or decimal_arithmetic?"
    )
    assert not (tmp_path / "run").exists()


# --- a job ---------------------------------------------------------------------------------------

RETRIES = ("iterations=2", "rollout.prompts_per_iteration=16", "model.sft_steps=60", "env.name=reasoning_gym")
RETRY_EPISODES = ("env.max_turns=2", "env.max_episode_tokens=64", "rollout.max_model_len=96")


@pytest.fixture(scope="module")
def retry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rg") / "run"
    rollout_cli(*run_args(out, *RETRIES, *RETRY_EPISODES, config=CONFIG), timeout=900)
    return out


@pytest.mark.e2e
@pytest.mark.vllm
def test_a_job_retries_wrong_answers_and_rewards_the_last_by_the_tasks_scorer(retry_run):
    """configs/tiny-rg.yaml with the environment: a right first answer ends its episode with reward 1, a wrong
    one is told so and answers again; the archive keeps the verdict as the environment's tokens."""
    from transformers import AutoTokenizer

    from contracts.builtin_model import resolve_model_path
    from rollout.archive import read_table

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    rows = read_table(retry_run).to_pylist()
    assert len(rows) == 2 * 16 * 4
    for row in rows:
        assert set(row["reward_components"]) == {"reasoning_gym"} and row["env_error"] is None
        assert 0.0 <= row["reward"] <= 1.0
        env_text = tokenizer.decode([t for t, m in zip(row["response_ids"], row["response_mask"]) if m == 0])
        if row["num_turns"] == 1:
            assert row["reward"] == 1.0 and env_text == ""
        else:
            assert row["num_turns"] == 2 and "That is not right (score " in env_text
    assert any(row["num_turns"] == 2 for row in rows)
