"""`reward score --rule/--config`: records scored by rules only, through the real CLI entry, with
built-in rules, user rules written into tmp_path (the verl and TRL wrappers of docs/verifiers.md among
them), a job config's weights and params, bad records and bad flags."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reward.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "verifiers.md"

# The teams' own code: a verl-style compute_score and a TRL-style batch reward function, which the
# wrappers in docs/verifiers.md import, and a rule reading the record's metadata directly.
MY_REWARDS = textwrap.dedent(
    '''
    import re

    CALLS = []  # what compute_score was called with, for the test to read


    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        """As verl calls a custom reward function."""
        CALLS.append((data_source, solution_str, ground_truth, extra_info))
        if data_source != "openai/gsm8k":
            raise NotImplementedError(f"no scorer for {data_source}")
        found = re.findall(r"#### (\\-?[0-9\\.\\,]+)", solution_str)
        return 1.0 if found and found[-1].replace(",", "") == ground_truth else 0.0


    def accuracy(prompts, completions, solution, **kwargs):
        """As TRL's GRPOTrainer calls a reward function: lists in, one float (or None) per completion out."""
        assert len(prompts) == len(completions) == len(solution)
        assert all(len(column) == len(prompts) for column in kwargs.values())
        return [None if s is None else float(c.strip() == s) + 0.5 * kwargs.get("bonus", [0])[i]
                for i, (c, s) in enumerate(zip(completions, solution))]
    '''
)

TEAM_RULES = textwrap.dedent(
    """
    def by_source(prompt, response, reference, metadata):
        return {"gsm8k": 1.0, "math": 2.0}.get(metadata.get("data_source"), 0.0)


    def keys(prompt, response, reference, *, metadata, scale=1.0):
        return scale * len(metadata)


    def exact(prompt, response, reference, ignore_case=False):
        if reference is None:
            raise ValueError("no reference")
        if ignore_case:
            return float(response.lower() == reference.lower())
        return float(response == reference)


    def needs_threshold(prompt, response, reference, *, threshold):
        return float(len(response) >= threshold)
    """
)

MODULES = ("my_rewards", "verl_rules", "trl_rules", "team_rules")


def doc_wrapper(imported: str) -> str:
    """The Python block of docs/verifiers.md that imports `imported` from my_rewards, as it is printed."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.S)
    found = [b for b in blocks if f"from my_rewards import {imported}" in b]
    assert len(found) == 1, f"docs/verifiers.md has {len(found)} blocks importing {imported}"
    return found[0]


@pytest.fixture
def modules(tmp_path, monkeypatch) -> Path:
    """The teams' modules and the docs' wrappers, importable from tmp_path (for this test only)."""
    (tmp_path / "my_rewards.py").write_text(MY_REWARDS)
    (tmp_path / "verl_rules.py").write_text(doc_wrapper("compute_score"))
    (tmp_path / "trl_rules.py").write_text(doc_wrapper("accuracy"))
    (tmp_path / "team_rules.py").write_text(TEAM_RULES)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in MODULES:
        sys.modules.pop(name, None)
    yield tmp_path
    for name in MODULES:
        sys.modules.pop(name, None)


def write_records(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def score(args: list[str], capsys) -> tuple[int, list[dict], str]:
    """Exit code, the JSON lines written to stdout, and stderr."""
    code = main(["score", *args])
    captured = capsys.readouterr()
    return code, [json.loads(line) for line in captured.out.splitlines()], captured.err


SUMS = [
    {"prompt": "12+7=", "response": "19", "reference": "19"},
    {"prompt": "2+2=", "response": "5"},
    {"prompt": "What is 3 * (4 - 1)?", "response": "It is 9."},
]


def test_built_in_rules_score_each_record_in_order(tmp_path, capsys) -> None:
    data = write_records(tmp_path / "sums.jsonl", SUMS)
    out = tmp_path / "scored.jsonl"
    code, printed, err = score(
        ["--rule", "arithmetic", "--rule", "length", "--data", str(data), "--out", str(out)], capsys
    )
    assert code == 0 and printed == []
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"reward": 1.0, "components": {"arithmetic": 1.0, "length": 0.0}},
        {"reward": 0.0, "components": {"arithmetic": 0.0, "length": 0.0}},
        {"reward": 1.0, "components": {"arithmetic": 1.0, "length": 0.0}},
    ]
    assert err.strip() == f"scored 3 records into {out}"
    # Without --out the same lines go to stdout.
    code, printed, err = score(["--rule", "arithmetic", "--rule", "length", "--data", str(data)], capsys)
    assert code == 0 and printed == rows and err.strip() == "scored 3 records"


def test_a_failed_component_is_null_and_counted_in_the_summary(tmp_path, capsys) -> None:
    data = write_records(tmp_path / "sums.jsonl", SUMS)
    code, rows, err = score(["--rule", "similarity", "--rule", "arithmetic", "--data", str(data)], capsys)
    assert code == 0
    assert [r["components"]["similarity"] for r in rows] == [1.0, None, None]
    assert [r["reward"] for r in rows] == [2.0, 0.0, 1.0]  # failed_value 0 for the failed similarity
    assert "reward component similarity failed: ValueError: similarity: the record has no reference" in err
    assert "scored 3 records; failed: similarity on 2 records" in err


def test_a_user_rule_taking_metadata_gets_the_records_metadata(modules, tmp_path, capsys) -> None:
    records = [
        {"prompt": "p", "response": "r", "metadata": {"data_source": "math", "ability": "algebra"}},
        {"prompt": "p", "response": "r", "metadata": {"data_source": "gsm8k"}, "split": "test"},
        {"prompt": "p", "response": "r", "metadata": None},
        {"prompt": "p", "response": "r"},
    ]
    data = write_records(tmp_path / "records.jsonl", records)
    code, rows, _ = score(["--rule", "team_rules:by_source", "--rule", "team_rules:keys", "--data", str(data)], capsys)
    assert code == 0
    # The record's other keys ("split") join its metadata, as they do for a prompt record in a job.
    assert [(r["components"]["by_source"], r["components"]["keys"]) for r in rows] == [
        (2.0, 2.0),
        (1.0, 2.0),
        (0.0, 0.0),
        (0.0, 0.0),
    ]


def test_the_docs_verl_wrapper_runs_verls_compute_score(modules, tmp_path, capsys) -> None:
    verl = {"data_source": "openai/gsm8k", "ability": "math", "reward_model": {"style": "rule", "ground_truth": "72"}}
    records = [
        {
            "prompt": "3 boxes of 24?",
            "response": "3 * 24 = 72\n#### 72",
            "reference": "72",
            "metadata": {**verl, "extra_info": {"index": 0}},
        },
        {
            "prompt": "3 boxes of 24?",
            "response": "It is 72.",
            "reference": "72",
            "metadata": {**verl, "extra_info": {"index": 1}},
        },
        {"prompt": "12+7=", "response": "19", "reference": "19", "metadata": {"data_source": "arith"}},
    ]
    data = write_records(tmp_path / "verl.jsonl", records)
    code, rows, err = score(["--rule", "verl_rules:score", "--data", str(data)], capsys)
    assert code == 0
    assert [r["components"] for r in rows] == [{"score": 1.0}, {"score": 0.0}, {"score": None}]
    assert "reward component score failed: NotImplementedError: no scorer for arith" in err
    # verl's argument order: data_source, solution_str, ground_truth, extra_info.
    assert sys.modules["my_rewards"].CALLS == [
        ("openai/gsm8k", "3 * 24 = 72\n#### 72", "72", {"index": 0}),
        ("openai/gsm8k", "It is 72.", "72", {"index": 1}),
        ("arith", "19", "19", None),
    ]


def test_the_docs_trl_wrapper_runs_a_batch_reward_function(modules, tmp_path, capsys) -> None:
    records = [
        {"prompt": "q", "response": "42", "reference": "42", "metadata": {"bonus": 1}},
        {"prompt": "q", "response": "41", "reference": "42"},
        {"prompt": "q", "response": "41"},
    ]
    data = write_records(tmp_path / "trl.jsonl", records)
    code, rows, _ = score(["--rule", "trl_rules:score", "--data", str(data)], capsys)
    assert code == 0
    assert [r["components"]["score"] for r in rows] == [1.5, 0.0, None]  # None from TRL: failed


JOB = """\
rollout:
  sampling: {max_tokens: 100}
reward:
  failed_value: -0.5
  rules:
    - {name: arithmetic, weight: 2.0}
    - {name: "team_rules:exact", weight: 0.5, params: {ignore_case: true}}
    - {name: "team_rules:keys", weight: 0.25, params: {scale: 2.0}}
    - {name: overlong, params: {buffer_tokens: 20}}
  model: {path: /nowhere/rm}
"""


def test_a_job_configs_rules_are_scored_with_their_weights_and_params(modules, tmp_path, capsys) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(JOB)
    records = [
        {"prompt": "12+7=", "response": "NINETEEN 19", "reference": "nineteen 19", "response_tokens": 10},
        {"prompt": "2+2=", "response": "4", "reference": "4", "metadata": {"a": 1, "b": 2}, "response_tokens": 90},
        {"prompt": "2+2=", "response": "5", "response_tokens": 100},
    ]
    data = write_records(tmp_path / "records.jsonl", records)
    code, rows, err = score(["--config", str(config), "--data", str(data)], capsys)
    assert code == 0
    assert [r["components"] for r in rows] == [
        {"arithmetic": 1.0, "exact": 1.0, "keys": 0.0, "overlong": 0.0},
        # overlong's max_tokens is the job's own limit (rollout.sampling.max_tokens: 100), as in a run.
        {"arithmetic": 1.0, "exact": 1.0, "keys": 4.0, "overlong": -0.5},
        {"arithmetic": 0.0, "exact": None, "keys": 0.0, "overlong": -1.0},
    ]
    assert [r["reward"] for r in rows] == pytest.approx([2.5, 2.0 + 0.5 + 1.0 - 0.5, 0.0 - 0.5 + 0.0 - 1.0])
    assert f"note: {config}: reward.model is not scored here" in err
    assert "scored 3 records; failed: exact on 1 record (null there, -0.5 in the reward" in err


def test_rules_counting_tokens_need_response_tokens_in_every_record(tmp_path, capsys) -> None:
    data = write_records(
        tmp_path / "records.jsonl",
        [
            {"prompt": "q", "response": "a"},
            {"prompt": "q", "response": "b", "response_tokens": 3},
            {"prompt": "q", "response": "c", "response_tokens": -1},
        ],
    )
    out = tmp_path / "scored.jsonl"
    code, _, err = score(["--rule", "overlong", "--data", str(data), "--out", str(out)], capsys)
    assert code == 1
    assert (
        f'{data}:1: missing field "response_tokens": overlong counts the response\'s tokens and reward score has no tokenizer'
        in err
    )
    assert f'{data}:3: field "response_tokens" must be a whole number >= 0, got -1' in err
    assert f"{data}:2" not in err
    assert not out.exists()


BAD_LINES = [
    '{"prompt": "1+1=", "response": "2"}',
    "[1, 2]",
    '{"response": "2"}',
    '{"prompt": "1+1=", "response": 2}',
    '{"prompt": "1+1=", "response": "2", "metadata": ["a"]}',
    '{"prompt": "1+1=", "response": "2", "reference": 2}',
    '{"prompt": "1+1=", "response": "2"',
    '{"prompt": "1+1=", "response": ""}',
]


def test_bad_records_are_each_reported_and_nothing_is_scored(tmp_path, capsys) -> None:
    data = tmp_path / "bad.jsonl"
    data.write_text("\n".join(BAD_LINES) + "\n", encoding="utf-8")
    out = tmp_path / "scored.jsonl"
    code, rows, err = score(["--rule", "arithmetic", "--data", str(data), "--out", str(out)], capsys)
    assert code == 1 and rows == [] and not out.exists()
    lines = err.strip().splitlines()
    assert [line.split(": ")[0] for line in lines[:-1]] == [f"{data}:{n}" for n in (2, 3, 4, 5, 6, 7)]
    assert lines[0] == f"{data}:2: record must be a JSON object, got list"
    assert lines[1] == f'{data}:3: missing field "prompt"'
    assert lines[2] == f'{data}:4: field "response" must be a string, got int'
    assert lines[3] == f'{data}:5: field "metadata" must be an object, got list'
    assert lines[4] == f'{data}:6: field "reference" must be a string or null, got int'
    assert lines[-1] == f"data error: {data}: 6 bad record(s), listed above"


def test_a_json_array_is_read_like_jsonl(tmp_path, capsys) -> None:
    data = tmp_path / "sums.json"
    data.write_text(json.dumps(SUMS), encoding="utf-8")
    code, rows, _ = score(["--rule", "arithmetic", "--data", str(data)], capsys)
    assert code == 0 and [r["reward"] for r in rows] == [1.0, 0.0, 1.0]


def test_a_parquet_table_is_read_through_its_data_source(modules, tmp_path, capsys) -> None:
    """Any data source the job reads prompts from: a table's struct column is the metadata, and its other
    columns join it."""
    from contracts.data_sources import DEFAULT, data_source

    if data_source("x.parquet") == DEFAULT:
        pytest.skip("no data source reads Parquet in this checkout")
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "records.parquet"
    table = {
        "prompt": ["12+7=", "2+2="],
        "response": ["19", "5"],
        "reference": ["19", None],
        "metadata": [{"data_source": "math"}, None],
        "ability": ["arith", "arith"],
    }
    pq.write_table(pa.table(table), data)
    code, rows, _ = score(["--rule", "arithmetic", "--rule", "team_rules:keys", "--data", str(data)], capsys)
    assert code == 0
    assert [r["components"] for r in rows] == [{"arithmetic": 1.0, "keys": 2.0}, {"arithmetic": 0.0, "keys": 1.0}]


def test_a_missing_file_is_an_error(tmp_path, capsys) -> None:
    code, _, err = score(["--rule", "arithmetic", "--data", str(tmp_path / "none.jsonl")], capsys)
    assert code == 1 and "none.jsonl" in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rule", "bleu"], "config error: --rule: unknown reward rule 'bleu'; known: arithmetic"),
        (["--rule", "no_such_module_anywhere:f"], "config error: --rule: no_such_module_anywhere:f: cannot import"),
        (["--rule", "team_rules:needs_threshold"], "--rule team_rules:needs_threshold: reward rule .* needs parameter"),
        (["--rule", "arithmetic", "--batch-size", "4"], "config error: --batch-size and --device go with --model"),
    ],
)
def test_a_bad_rule_or_flag_is_exit_2(modules, tmp_path, capsys, args, message) -> None:
    data = write_records(tmp_path / "sums.jsonl", SUMS)
    code, rows, err = score([*args, "--data", str(data)], capsys)
    assert code == 2 and rows == []
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "rules, message",
    [
        (
            '[{name: arithmetic}, {name: "team_rules:missing"}]',
            r"job.yaml: reward.rules.1.name: team_rules:missing: module team_rules has no 'missing'",
        ),
        (
            '[{name: "team_rules:by_source", params: {metadata: {data_source: math}}}]',
            r"job.yaml: reward.rules.0.params: reward rule 'team_rules:by_source': metadata is the record's "
            r"metadata, given by the scorer, not set in params",
        ),
        (
            '[{name: length, params: {colour: 1}}, {name: "team_rules:needs_threshold"}]',
            r"job.yaml needs changes:\n  - reward.rules.0.params: .*colour.*\n  - reward.rules.1.params: .*threshold",
        ),
    ],
)
def test_a_bad_job_config_is_exit_2_naming_the_file_and_field(modules, tmp_path, capsys, rules, message) -> None:
    config = tmp_path / "job.yaml"
    config.write_text(f"reward:\n  rules: {rules}\n")
    data = write_records(tmp_path / "sums.jsonl", SUMS)
    code, rows, err = score(["--config", str(config), "--data", str(data)], capsys)
    assert code == 2 and rows == []
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--rule", "arithmetic", "--config", "job.yaml"], "argument --config: not allowed with argument --rule"),
        (["--model", "rm", "--rule", "arithmetic"], "argument --rule: not allowed with argument --model"),
        (["--config", "job.yaml", "--model", "rm"], "argument --model: not allowed with argument --config"),
        ([], "one of the arguments --model --rule --config is required"),
    ],
)
def test_model_rule_and_config_exclude_each_other(capsys, args, message) -> None:
    with pytest.raises(SystemExit) as e:
        main(["score", *args, "--data", "x.jsonl"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_command_imports_no_ray_torch_or_vllm(modules, tmp_path) -> None:
    """`python -m reward score --rule` in a process of its own: the team's module found on PYTHONPATH,
    and none of the heavy packages imported on the way."""
    data = write_records(tmp_path / "sums.jsonl", SUMS)
    out = tmp_path / "scored.jsonl"
    config = tmp_path / "job.yaml"
    config.write_text("reward:\n  rules: [{name: arithmetic}, {name: 'team_rules:exact', weight: 2}]\n")
    probe = (
        "import sys; from reward.cli import main; "
        f"code = main(['score', '--rule', 'arithmetic', '--rule', 'team_rules:exact', '--data', {str(data)!r}, "
        f"'--out', {str(out)!r}]); "
        f"code += main(['score', '--config', {str(config)!r}, '--data', {str(data)!r}, '--out', 'unused.jsonl']); "
        "print(sorted(m for m in ('ray', 'torch', 'vllm', 'transformers') if m in sys.modules)); sys.exit(code)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(modules), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert [json.loads(line)["components"] for line in out.read_text().splitlines()] == [
        {"arithmetic": 1.0, "exact": 1.0},
        {"arithmetic": 0.0, "exact": None},
        {"arithmetic": 1.0, "exact": None},
    ]
    # And through `python -m reward`, as the docs run it.
    result = subprocess.run(
        [sys.executable, "-m", "reward", "score", "--rule", "team_rules:by_source", "--data", str(data)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line) for line in result.stdout.splitlines()] == [
        {"reward": 0.0, "components": {"by_source": 0.0}}
    ] * 3
    assert result.stderr.strip() == "scored 3 records"


def test_a_rule_that_never_returns_is_abandoned_and_the_command_still_exits(tmp_path) -> None:
    """The rule's thread outlives its time limit; the process ends anyway, with the component failed."""
    (tmp_path / "stuck_rules.py").write_text(
        "import time\n\ndef never(prompt, response, reference):\n    time.sleep(3600)\n"
    )
    config = tmp_path / "job.yaml"
    config.write_text("reward:\n  timeout_s: 1\n  rules:\n    - name: stuck_rules:never\n")
    data = write_records(tmp_path / "records.jsonl", SUMS[:1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, "-m", "reward", "score", "--config", str(config), "--data", str(data)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"reward": 0.0, "components": {"never": None}}
    assert "timed out after 1" in result.stderr
