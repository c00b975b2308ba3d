"""Data sources beyond JSON: Parquet, Arrow IPC (file and stream), directories, globs, `datasets` directories
and `hf:`, each read into the job's prompts as `rollout run` reads them, with verl's layout and layouts named by
their columns. Everything is written in the test; nothing touches the network."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from contracts.config import DataConfig
from contracts.data_sources import DataSourceError, data_source, read_data, read_table
from contracts.formats import read_prompts
from contracts.rendering import PromptRenderer
from rollout.driver import prompts as prompts_module
from rollout.driver.prompts import PromptDataError, PromptSampler, job_prompts
from rollout.offline.validate import validate_files

ROOT = Path(__file__).resolve().parents[1]


def verl_rows(count: int) -> pa.Table:
    """Rows as verl's GSM8K preprocessing writes them."""
    return pa.table(
        {
            "data_source": ["openai/gsm8k"] * count,
            "prompt": [[{"role": "user", "content": f"{i}+1="}] for i in range(count)],
            "ability": ["math"] * count,
            "reward_model": [{"style": "rule", "ground_truth": str(i + 1)} for i in range(count)],
            "extra_info": [{"split": "train", "index": i} for i in range(count)],
        }
    )


@pytest.fixture(scope="module")
def renderer(tiny_model_path):
    return PromptRenderer(AutoTokenizer.from_pretrained(tiny_model_path), 64)


def load(renderer, log=None, **data):
    return job_prompts(DataConfig(**data), 0, renderer, log=log or io.StringIO())


def test_a_verl_parquet_runs_with_only_data_prompts_set(tmp_path, renderer):
    path = tmp_path / "train.parquet"
    pq.write_table(verl_rows(5), path)
    prompts = load(renderer, prompts=str(path))
    assert len(prompts) == 5 and data_source(path) == "parquet"
    record = prompts.record(3)
    assert [(m.role, m.content) for m in record.messages] == [("user", "3+1=")]
    assert record.reference == "4" and record.source == f"{path}:3"
    assert record.metadata == {
        "data_source": "openai/gsm8k",
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "4"},
        "extra_info": {"split": "train", "index": 3},
    }
    assert prompts.task(3).prompt == renderer.text(record)
    assert len({prompts.record(i).prompt_id for i in range(5)}) == 5
    # the same rows through the row-wise path (`rollout validate`, rescoring) get the same ids
    assert [r.prompt_id for r in read_prompts(path)] == [prompts.record(i).prompt_id for i in range(5)]


def test_repeated_rows_of_a_table_get_distinct_ids(tmp_path, renderer):
    path = tmp_path / "same.parquet"
    pq.write_table(pa.table({"prompt": ["1+1="] * 3, "completion": ["2"] * 3}), path)
    prompts = load(renderer, prompts=str(path))
    assert len({prompts.record(i).prompt_id for i in range(3)}) == 3


@pytest.mark.parametrize("form", ["file", "stream"])
def test_arrow_ipc_in_the_file_and_the_stream_format(tmp_path, renderer, form):
    table = pa.table({"prompt": ["1+1=", "2+2="], "completion": ["2", "4"]})
    path = tmp_path / "p.arrow"
    with pa.OSFile(str(path), "wb") as sink:
        writer = ipc.new_file(sink, table.schema) if form == "file" else ipc.new_stream(sink, table.schema)
        writer.write_table(table)
        writer.close()
    prompts = load(renderer, prompts=str(path))
    assert [prompts.record(i).reference for i in range(2)] == ["2", "4"]


def test_a_directory_and_a_glob_read_every_file_in_name_order(tmp_path, renderer):
    for i, part in enumerate(["b", "a"]):
        pq.write_table(
            pa.table({"prompt": [f"{part}{j}" for j in range(2)], "completion": ["x", "y"]}),
            tmp_path / f"{part}.parquet",
        )
    (tmp_path / "notes.txt").write_text("ignored by the directory source")
    by_dir = load(renderer, prompts=str(tmp_path))
    assert [by_dir.record(i).messages[0].content for i in range(4)] == ["a0", "a1", "b0", "b1"]
    by_glob = load(renderer, prompts=str(tmp_path / "*.parquet"))
    assert [by_glob.record(i).messages[0].content for i in range(4)] == ["a0", "a1", "b0", "b1"]
    with pytest.raises(DataSourceError, match="no files match"):
        read_table(str(tmp_path / "*.jsonl"))
    with pytest.raises(DataSourceError, match="not a Parquet or Arrow file"):
        read_table(str(tmp_path / "*"))


def test_a_datasets_save_to_disk_directory(tmp_path, renderer):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(
        [
            {"messages": [{"role": "user", "content": f"{i}*2="}, {"role": "assistant", "content": str(2 * i)}]}
            for i in range(6)
        ]
    ).save_to_disk(str(tmp_path / "saved"))
    prompts = load(renderer, prompts=str(tmp_path / "saved"))
    assert len(prompts) == 6 and prompts.record(5).reference == "10"


def test_hf_without_a_hub_fails_in_one_line_naming_the_dataset(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = "from contracts.data_sources import read_table; read_table('hf:nobody/no-such-set:train')"
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert time.monotonic() - start < 60
    last = done.stderr.strip().splitlines()[-1]
    assert "DataSourceError: hf:nobody/no-such-set:train: cannot load dataset 'nobody/no-such-set'" in last
    assert "HF_HUB_OFFLINE is set" in last


def test_hf_takes_only_its_own_params():
    with pytest.raises(DataSourceError, match="hf: takes name and revision, not split"):
        read_table("hf:gsm8k", {"split": "test"})


def test_columns_name_any_other_layout(tmp_path, renderer):
    path = tmp_path / "custom.parquet"
    pq.write_table(
        pa.table(
            {
                "question": ["What is 2+3?", "What is 4+4?"],
                "answer": [{"final": 5, "steps": "2+3"}, {"final": 8, "steps": "4+4"}],
                "source": ["a", "b"],
                "difficulty": [1, 2],
            }
        ),
        path,
    )
    prompts = load(renderer, prompts=str(path), prompt_key="question", reference_key="answer.final")
    record = prompts.record(1)
    assert record.messages[0].content == "What is 4+4?" and record.reference == "8"
    assert record.metadata == {"answer": {"final": 8, "steps": "4+4"}, "source": "b", "difficulty": 2}
    only = load(renderer, prompts=str(path), prompt_key="question", metadata_keys=["source"])
    assert only.record(0).metadata == {"source": "a"} and only.record(0).reference is None


def test_a_table_with_no_known_layout_or_a_missing_column_is_one_line(tmp_path, renderer):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"question": ["q"], "label": ["a"]}), path)
    with pytest.raises(
        PromptDataError, match=r"no prompt / conversation / messages column; set data.prompt_key .*question, label"
    ):
        load(renderer, prompts=str(path))
    with pytest.raises(PromptDataError, match="data.prompt_key 'text' is not a column; its columns: question, label"):
        load(renderer, prompts=str(path), prompt_key="text")
    with pytest.raises(PromptDataError, match="data.reference_key 'gold.answer' is not a column"):
        load(renderer, prompts=str(path), prompt_key="question", reference_key="gold.answer")


def test_a_file_that_is_not_what_its_name_says_is_one_line(tmp_path):
    parquet_as_text = tmp_path / "data.jsonl"
    pq.write_table(pa.table({"prompt": ["a"]}), parquet_as_text)
    with pytest.raises(DataSourceError, match="is a Parquet file, not JSON or JSONL: name it .parquet"):
        list(read_data(parquet_as_text))
    text_as_parquet = tmp_path / "data.parquet"
    text_as_parquet.write_text('{"prompt": "a"}\n')
    with pytest.raises(DataSourceError, match="not a Parquet file .*it looks like JSON: name it .jsonl"):
        read_table(text_as_parquet)
    with pytest.raises(DataSourceError, match="no such file"):
        read_table(tmp_path / "missing.parquet")


def bad_rows_table(path: Path) -> None:
    pq.write_table(
        pa.table({"prompt": ["1+1=", "", "2+2=", "x" * 500, "3+3="], "completion": ["2", "0", "4", "1", "6"]}), path
    )


def test_bad_rows_of_a_small_table_are_all_reported_at_load(tmp_path, renderer):
    path = tmp_path / "bad.parquet"
    bad_rows_table(path)
    log = io.StringIO()
    with pytest.raises(PromptDataError, match="2 bad record"):
        load(renderer, log, prompts=str(path))
    lines = log.getvalue().splitlines()
    assert lines[0] == f'{path}:1: field "prompt" is empty'
    assert lines[1].startswith(f"{path}:3: prompt is ") and "model.max_prompt_tokens" in lines[1]
    log = io.StringIO()
    prompts = load(renderer, log, prompts=str(path), on_bad_record="skip")
    assert prompts.bad == {1, 3} and "skipped 2 bad record(s)" in log.getvalue()
    drawn = prompts.draw(PromptSampler(size=len(prompts), seed=0), 3)
    assert sorted(drawn) == [0, 2, 4]


def test_bad_rows_of_a_large_table_are_found_when_drawn(tmp_path, renderer, monkeypatch):
    monkeypatch.setattr(prompts_module, "CHECK_ROWS", 2)  # "large": not read whole at load
    path = tmp_path / "bad.parquet"
    bad_rows_table(path)
    log = io.StringIO()
    prompts = load(renderer, log, prompts=str(path), on_bad_record="skip")
    assert prompts.bad == set() and log.getvalue() == ""
    drawn = prompts.draw(PromptSampler(size=len(prompts), seed=0, shuffle=False), 3)
    assert drawn == [0, 2, 4] and prompts.bad == {1, 3}
    assert f'{path}:1: field "prompt" is empty' in log.getvalue()
    stopping = load(renderer, prompts=str(path))
    with pytest.raises(PromptDataError, match="a bad record, above"):
        stopping.draw(PromptSampler(size=len(stopping), seed=0, shuffle=False), 3)


def test_a_large_tables_cache_keeps_the_recent_rows(tmp_path, renderer, monkeypatch):
    monkeypatch.setattr(prompts_module, "CHECK_ROWS", 2)
    monkeypatch.setattr(prompts_module, "CACHED_ROWS", 3)
    path = tmp_path / "many.parquet"
    pq.write_table(
        pa.table({"prompt": [f"{i}+0=" for i in range(10)], "completion": [str(i) for i in range(10)]}), path
    )
    prompts = load(renderer, prompts=str(path))
    first = prompts.record(0)
    for row in range(1, 10):
        prompts.task(row)
    assert len(prompts._rows) == 3
    assert prompts.record(0) == first  # read again, the same record


def test_the_sampler_order_is_the_seeded_shuffle_of_every_index():
    import random

    sampler = PromptSampler(size=50, seed=3)
    order = list(range(50))
    random.Random(3 * 7919).shuffle(order)
    assert sampler.next_batch(20) + sampler.next_batch(30) == order


def test_validate_takes_every_source(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(verl_rows(3), path)
    bad = tmp_path / "bad.parquet"
    bad_rows_table(bad)
    out = io.StringIO()
    assert validate_files([str(path)], out=out) == 0
    assert out.getvalue().strip() == f"{path}: 3 records, 0 bad"
    out = io.StringIO()
    assert validate_files([str(bad), str(tmp_path / "*.arrow")], out=out) == 1
    lines = out.getvalue().splitlines()
    assert f'{bad}:1: field "prompt" is empty' in lines
    assert f"{tmp_path / '*.arrow'}: no files match; check the pattern in data.prompts" in lines


def test_rollout_run_stops_on_a_table_without_a_layout_with_exit_2(tmp_path):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"question": ["q"] * 4}), path)
    done = subprocess.run(
        [sys.executable, "-m", "rollout", "run", "--config", "configs/tiny-arith.yaml", "--out", str(tmp_path / "run")]
        + ["--set", f"data.prompts={path}", "--set", "model.sft_warmup=false"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{path}: no prompt / conversation / messages column; set data.prompt_key" in done.stderr


@pytest.mark.e2e
@pytest.mark.vllm
def test_a_job_trains_on_a_verl_parquet_with_the_math_rule_and_a_rule_reading_metadata(tmp_path):
    """verl's layout end to end: only data.prompts set, the reference its ground truth, and a team's rule given
    the row's data_source and extra_info."""
    from e2e_common import ROOT as E2E_ROOT  # noqa: F401 - puts benchmarks/ on the path
    from job_process import rollout_cli, rollout_env, run_args

    from rollout.archive import read_table as read_archive

    rows = [
        {
            "data_source": "arith" if i % 2 else "other",
            "prompt": [{"role": "user", "content": f"{i % 10}+{i // 10}="}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(i % 10 + i // 10)},
            "extra_info": {"index": i},
        }
        for i in range(40)
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    (tmp_path / "team_rules.py").write_text(
        "def by_source(prompt, response, reference, metadata):\n"
        "    return float(metadata['data_source'] == 'arith') + metadata['extra_info']['index'] / 1000\n"
    )
    rules = '[{"name": "math", "params": {"last_number_fallback": true}}, {"name": "team_rules:by_source"}]'
    out = tmp_path / "run"
    settings = (f"data.prompts={tmp_path / 'train.parquet'}", f"reward.rules={rules}", "iterations=2")
    env = rollout_env(PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    rollout_cli(*run_args(out, *settings, "model.sft_warmup=false"), env=env, timeout=900)
    archived = read_archive(out).to_pylist()
    assert len(archived) == 2 * 16 * 2
    for sample in archived:
        components = sample["reward_components"]
        assert set(components) == {"math", "by_source"} and components["math"] in (0.0, 1.0)
        assert 0.0 <= components["by_source"] < 1.04
    assert len({round(s["reward_components"]["by_source"], 3) for s in archived}) > 2  # each row's own metadata


def test_a_bad_source_fails_before_ray_starts(tmp_path, monkeypatch):
    """No layout, a missing prompt_key column, a file that is not what its name says, an unknown task: the
    job's quick source checks run before `init_ray` is called."""
    from contracts.config.load import load_config
    from rollout.driver import startup

    started = []
    monkeypatch.setattr(startup, "init_ray", lambda *a, **k: started.append(1))
    odd = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"question": ["q"] * 4}), odd)
    misnamed = tmp_path / "rows.jsonl"
    pq.write_table(pa.table({"prompt": ["q"] * 4}), misnamed)
    for settings, error, message in (
        ([f"data.prompts={odd}"], PromptDataError, "no prompt / conversation / messages column"),
        ([f"data.prompts={odd}", "data.prompt_key=text"], PromptDataError, "data.prompt_key 'text' is not a column"),
        ([f"data.prompts={misnamed}"], DataSourceError, "is a Parquet file, not JSON or JSONL"),
        ([f"data.prompts={tmp_path / 'none.parquet'}"], DataSourceError, "no such file"),
    ):
        cfg = load_config(None, settings)
        with pytest.raises(error, match=message):
            startup.read_data_starting_ray(cfg, tmp_path / "run", io.StringIO(), learner=True)
    assert started == [] and not (tmp_path / "run").exists()
