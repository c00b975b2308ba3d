"""Rules of your own (`package.module:function`): a real module written into tmp_path, imported by
name and scored through `RuleScorer` and `RewardWorker`, with the built-ins' isolation."""

from __future__ import annotations

import math
import sys
import textwrap

import pyarrow as pa
import pytest

from contracts.config import ConfigError, RewardConfig, RuleSpec
from contracts.formats import Message, PromptRecord
from reward.checks import check_reward_config
from reward.scorer import RuleScorer, rule_component_names
from reward.worker import RewardWorker

MODULE = "team_verifiers"

SOURCE = textwrap.dedent(
    '''
    """A team's verifiers, as a user would write them."""
    import math
    import threading

    import numpy

    RELEASE = threading.Event()  # set by the test, so an abandoned sleeper ends with it
    NOT_CALLABLE = 3


    def exact(prompt, response, reference, bonus=0.0):
        if reference is None:
            return -1.0
        return (1.0 if response.strip() == reference.strip() else 0.0) + bonus


    def prompt_echo(prompt, response, reference):
        return float(prompt in response)


    def explodes(prompt, response, reference):
        raise RuntimeError("the verifier crashed")


    def dawdles(prompt, response, reference, seconds=60.0):
        RELEASE.wait(seconds)
        return 1.0


    def gives_nan(prompt, response, reference):
        return math.nan


    def gives_inf(prompt, response, reference):
        return -math.inf


    def gives_text(prompt, response, reference):
        return "1.0"


    def gives_numpy(prompt, response, reference):
        return numpy.float32(0.5)


    def needs_threshold(prompt, response, reference, *, threshold):
        return float(len(response) >= threshold)


    def takes_any(prompt, response, reference, **params):
        return float(len(params))


    def two_args(prompt, response):
        return 1.0


    def reward_model(prompt, response, reference):
        return 0.0


    def remote(prompt, response, reference):
        return 0.0


    def total(prompt, response, reference):
        return 0.0


    def by_source(prompt, response, reference, metadata):
        return {"gsm8k": 1.0, "math": 2.0}.get(metadata.get("data_source"), 0.0)


    def counts_metadata(prompt, response, reference, *, metadata, scale=1.0):
        return scale * len(metadata)


    def pops_metadata(prompt, response, reference, metadata):
        metadata.pop("topic", None)
        return float(len(metadata))


    def any_keywords_only(prompt, response, reference, **metadata):
        return float(len(metadata))


    def metadata_third(prompt, response, metadata):
        return 0.0


    def metadata_positional(prompt, response, reference, metadata, /):
        return 0.0
    '''
)


@pytest.fixture
def verifiers(tmp_path, monkeypatch) -> str:
    """The module's name, importable from tmp_path for this test only."""
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('no licence server')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield MODULE
    module = sys.modules.pop(MODULE, None)
    if module is not None:
        module.RELEASE.set()
    sys.modules.pop("raises_on_import", None)


def user(function: str, **fields) -> RuleSpec:
    return RuleSpec(name=f"{MODULE}:{function}", **fields)


def record(reference: str | None, prompt: str = "12+7=", prompt_id: str = "p0") -> PromptRecord:
    return PromptRecord(prompt_id, [Message("user", prompt)], reference, {"topic": "sums"}, "test:1")


def test_a_user_rule_is_scored_with_the_reference_and_params(verifiers: str) -> None:
    s = RuleScorer([user("exact", weight=2.0, params={"bonus": 0.25}), RuleSpec(name="arithmetic")], timeout_s=5.0)
    result = s.score("12+7=", "19", record("19"))
    assert result.components == {"exact": 1.25, "arithmetic": 1.0}
    assert result.total == pytest.approx(2.0 * 1.25 + 1.0)
    assert result.failed == []
    # `reference` is the record's reference string, or None, not the record itself.
    assert s.score("12+7=", "19", record(None)).components["exact"] == -1.0
    assert s.score("12+7=", "19", None).components["exact"] == -1.0


def test_user_rules_are_named_by_function_and_numbered_when_repeated(verifiers: str) -> None:
    specs = [user("exact"), user("exact", params={"bonus": 1.0}), RuleSpec(name="length"), RuleSpec(name="length")]
    assert rule_component_names(specs) == ["exact", "exact#1", "length", "length#1"]
    s = RuleScorer(specs, timeout_s=5.0)
    assert s.score("", "a", record("a")).components == {"exact": 1.0, "exact#1": 2.0, "length": 0.0, "length#1": 0.0}


@pytest.mark.parametrize("function", ["explodes", "gives_nan", "gives_inf", "gives_text"])
def test_a_failing_user_rule_is_a_counted_nan_and_the_others_are_intact(verifiers: str, function: str) -> None:
    s = RuleScorer([user(function), user("exact")], timeout_s=5.0, failed_value=-0.5)
    results = s.score_batch([("q", "19", record("19")), ("q", "20", record("19"))])
    for result, exact in zip(results, [1.0, 0.0]):
        assert result.failed == [function]
        assert math.isnan(result.components[function])
        assert result.components["exact"] == exact
        assert result.total == pytest.approx(-0.5 + exact)
    assert s.failures == {function: 2, "exact": 0}


def test_a_user_rule_past_the_timeout_is_abandoned_and_scoring_goes_on(verifiers: str) -> None:
    s = RuleScorer([user("dawdles"), user("exact")], timeout_s=0.2)
    result = s.score("q", "19", record("19"))
    assert result.failed == ["dawdles"] and math.isnan(result.components["dawdles"])
    assert result.components["exact"] == 1.0
    assert s.failures == {"dawdles": 1, "exact": 0}
    s.close()


def test_a_numpy_number_counts_as_a_number(verifiers: str) -> None:
    result = RuleScorer([user("gives_numpy")], timeout_s=5.0).score("", "", None)
    assert result.components == {"gives_numpy": 0.5} and result.failed == []


def test_params_reach_a_rule_taking_any_keywords(verifiers: str) -> None:
    s = RuleScorer(
        [user("takes_any", params={"a": 1, "b": "x"}), user("needs_threshold", params={"threshold": 2})], timeout_s=5.0
    )
    assert s.score("", "abc", None).components == {"takes_any": 2.0, "needs_threshold": 1.0}


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("no_such_module_anywhere:f", {}, "cannot import no_such_module_anywhere .*No module named"),
        (f"{MODULE}:missing", {}, f"module {MODULE} has no 'missing'"),
        (f"{MODULE}:NOT_CALLABLE", {}, "NOT_CALLABLE is a int, not a function"),
        (f"{MODULE}:two_args", {}, r"cannot be called as two_args\(prompt, response, reference, \*\*params\)"),
        ("raises_on_import:f", {}, "importing raises_on_import raised RuntimeError: no licence server"),
        (f"{MODULE}:exact()", {}, "is not package.module:function"),
        (f"{MODULE}:exact", {"colour": 1}, "has no parameter 'colour'; its parameters: bonus"),
        (f"{MODULE}:exact", {"bonus": "high"}, "parameter 'bonus' must be a number"),
        (f"{MODULE}:needs_threshold", {}, "needs parameter.*threshold"),
    ],
)
def test_a_bad_user_rule_is_refused_when_the_scorer_is_built(verifiers: str, name, params, message) -> None:
    with pytest.raises(ValueError, match=message):
        RuleScorer([RuleSpec(name=name, params=params)], timeout_s=1.0)


def test_the_reward_worker_scores_user_rules_into_the_archive_columns(verifiers: str) -> None:
    cfg = RewardConfig(rules=[user("exact"), user("prompt_echo", weight=0.5), RuleSpec(name="arithmetic")])
    worker = RewardWorker(cfg)
    assert worker.components == ("exact", "prompt_echo", "arithmetic")
    records = [record("19", prompt_id="a"), record(None, prompt="2+2=", prompt_id="b")]
    batch = pa.record_batch(
        {
            "prompt_id": ["a", "b", "a"],
            "prompt": ["<|user|>12+7=", "<|user|>2+2=", "<|user|>12+7="],
            "response": ["19", "2+2= 4", "18"],
        }
    )
    rewards, seconds = worker.score_batch(batch, records)
    components = rewards.column("reward_components")
    assert [f.name for f in components.type] == ["exact", "prompt_echo", "arithmetic"]
    # The rules read the final user turn as the prompt, without the template's markup.
    assert components.to_pylist() == [
        {"exact": 1.0, "prompt_echo": 0.0, "arithmetic": 1.0},
        {"exact": -1.0, "prompt_echo": 1.0, "arithmetic": 1.0},
        {"exact": 0.0, "prompt_echo": 0.0, "arithmetic": 0.0},
    ]
    assert rewards.column("reward").to_pylist() == [2.0, 0.5, 0.0]
    assert set(seconds) == {"total", "exact", "prompt_echo", "arithmetic"}
    worker.close()


# --- rules that read the record's metadata -----------------------------------------------------


def verl_record(metadata: dict, prompt_id: str = "v0") -> PromptRecord:
    return PromptRecord(prompt_id, [Message("user", "1+1=")], "2", metadata, "test:1")


def test_a_rule_declaring_metadata_gets_the_records_metadata(verifiers: str) -> None:
    s = RuleScorer([user("by_source"), user("counts_metadata", params={"scale": 0.5})], timeout_s=5.0)
    result = s.score("1+1=", "2", verl_record({"data_source": "math", "ability": "arith", "extra_info": {"i": 3}}))
    assert result.components == {"by_source": 2.0, "counts_metadata": 1.5}
    # No record, or a record without metadata: an empty dict, never None.
    assert s.score("", "", None).components == {"by_source": 0.0, "counts_metadata": 0.0}
    assert s.score("", "", verl_record({})).components == {"by_source": 0.0, "counts_metadata": 0.0}


def test_a_rule_changing_its_metadata_leaves_the_record_as_it_was(verifiers: str) -> None:
    shared = verl_record({"topic": "sums", "data_source": "gsm8k"})
    s = RuleScorer([user("pops_metadata")], timeout_s=5.0)
    assert [r.components["pops_metadata"] for r in s.score_batch([("", "a", shared), ("", "b", shared)])] == [1.0, 1.0]
    assert shared.metadata == {"topic": "sums", "data_source": "gsm8k"}


def test_only_a_parameter_named_metadata_asks_for_it(verifiers: str) -> None:
    # **metadata collects params; the record's metadata goes only to a rule that names the parameter.
    s = RuleScorer([user("any_keywords_only"), user("exact")], timeout_s=5.0)
    assert s.score("", "2", verl_record({"data_source": "gsm8k"})).components == {
        "any_keywords_only": 0.0,
        "exact": 1.0,
    }


def test_the_job_gives_user_rules_the_metadata_its_data_source_read(verifiers: str, tmp_path) -> None:
    """The config as `rollout run` loads it, the records as the job parses them, and both the scorer and
    the reward worker the job runs: each record's metadata reaches the rule."""
    from contracts.config.load import load_config
    from contracts.formats import parse_prompt

    config = tmp_path / "job.yaml"
    config.write_text(f"reward:\n  rules:\n    - {{name: '{MODULE}:by_source', weight: 3}}\n")
    cfg = load_config(config)
    records = [
        parse_prompt({"prompt": "1+1=", "completion": "2", "metadata": {"data_source": source}}, "sft", f"p:{i}")
        for i, source in enumerate(["math", "gsm8k", "other"])
    ]
    assert [r.metadata for r in records] == [{"data_source": s} for s in ["math", "gsm8k", "other"]]
    scorer = RuleScorer(cfg.reward.rules, timeout_s=cfg.reward.timeout_s, failed_value=cfg.reward.failed_value)
    assert [r.total for r in scorer.score_batch([("1+1=", "2", r) for r in records])] == [6.0, 3.0, 0.0]
    worker = RewardWorker(cfg.reward)
    batch = pa.record_batch(
        {"prompt_id": [r.prompt_id for r in records], "prompt": ["1+1="] * 3, "response": ["2"] * 3}
    )
    rewards, _ = worker.score_batch(batch, records)
    assert rewards.column("reward").to_pylist() == [6.0, 3.0, 0.0]
    worker.close()


@pytest.mark.parametrize(
    "rule, params, message",
    [
        ("by_source", {"metadata": {"data_source": "math"}}, "metadata is the record's metadata, given by the scorer"),
        ("takes_any", {"metadata": {}}, "metadata is the record's metadata, given by the scorer"),
        ("exact", {"metadata": {}}, "metadata is the record's metadata, given by the scorer"),
    ],
)
def test_metadata_is_never_a_param_a_config_sets(verifiers: str, rule, params, message) -> None:
    with pytest.raises(ConfigError, match=f"reward.rules.0.params: reward rule '{MODULE}:{rule}': {message}"):
        check_reward_config(RewardConfig(rules=[user(rule, params=params)]))


@pytest.mark.parametrize(
    "rule, message",
    [
        ("metadata_third", r"its metadata parameter takes one of \(prompt, response, reference\); declare it after"),
        ("metadata_positional", "its metadata parameter is positional-only; .* passed by keyword"),
    ],
)
def test_a_metadata_parameter_where_it_cannot_be_given_is_refused(verifiers: str, rule, message) -> None:
    with pytest.raises(ConfigError, match=f"reward.rules.0.name: {MODULE}:{rule}: {message}"):
        check_reward_config(RewardConfig(rules=[user(rule)]))


# --- the start-up check -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rules, message",
    [
        ([RuleSpec(name="length"), RuleSpec(name="no_such_module_anywhere:f")], "reward.rules.1.name: .*cannot import"),
        ([user("missing")], f"reward.rules.0.name: {MODULE}:missing: module {MODULE} has no 'missing'"),
        ([user("two_args")], r"reward.rules.0.name: .*cannot be called as two_args\(prompt, response, reference"),
        ([user("exact", params={"colour": 1})], "reward.rules.0.params: reward rule .* has no parameter 'colour'"),
        ([user("needs_threshold")], "reward.rules.0.params: .*needs parameter.*threshold"),
        ([RuleSpec(name="format", params={"pattern": "["})], "reward.rules.0.params: .*invalid regular expression"),
        ([user("reward_model")], "reward.rules.0.name: .* would score into the component 'reward_model'"),
        ([user("remote")], "reward.rules.0.name: .* 'remote', a name kept for the reward server's component"),
        ([user("total")], "reward.rules.0.name: .* 'total', a name kept for the reward worker's whole-call latency"),
    ],
)
def test_a_bad_rule_is_a_config_error_naming_its_field(verifiers: str, rules, message) -> None:
    with pytest.raises(ConfigError, match=message):
        check_reward_config(RewardConfig(rules=rules))


def test_every_bad_rule_is_listed_at_once(verifiers: str) -> None:
    with pytest.raises(ConfigError) as e:
        check_reward_config(RewardConfig(rules=[user("missing"), user("exact"), user("exact", params={"x": 1})]))
    lines = str(e.value).splitlines()
    assert lines[0] == "the config needs changes:"
    assert [line.split(":")[0] for line in lines[1:]] == ["  - reward.rules.0.name", "  - reward.rules.2.params"]


def test_good_user_and_built_in_rules_pass(verifiers: str) -> None:
    check_reward_config(
        RewardConfig(
            rules=[user("exact", params={"bonus": 1}), user("takes_any", params={"k": 1}), RuleSpec(name="safety")]
        )
    )


def test_rollout_run_refuses_an_unimportable_rule_before_ray_starts(tmp_path, capfd) -> None:
    from rollout.cli import main

    out = tmp_path / "run"
    assert main(["run", "--set", "reward.rules=[{name: no_such_module_anywhere:score}]", "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reward.rules.0.name: no_such_module_anywhere:score: cannot import" in err, (
        err
    )
    assert not out.exists()
