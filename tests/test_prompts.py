import pytest

from contracts.config import DataConfig
from rollout.driver.prompts import PromptDataError, PromptSampler, arith_problems, load_prompts


def test_sampler_batches_are_distinct_and_cover_each_epoch():
    sampler = PromptSampler(size=10, seed=3)
    seen = []
    for _ in range(5):
        batch = sampler.next_batch(4)
        assert len(set(batch)) == 4
        seen.extend(batch)
    assert set(seen[:8]) <= set(range(10))
    assert sampler.epoch >= 1


def test_sampler_state_resumes_the_same_order():
    a = PromptSampler(size=50, seed=1)
    a.next_batch(7)
    b = PromptSampler(size=50, seed=1, epoch=a.epoch, position=a.position)
    assert a.next_batch(30) == b.next_batch(30)


def test_sampler_rejects_batches_bigger_than_the_data():
    with pytest.raises(ValueError, match="prompts_per_iteration"):
        PromptSampler(size=3, seed=0).next_batch(4)


def test_builtin_arith_has_unique_stable_ids_and_references():
    cfg = DataConfig(builtin_size=300, builtin_max_operand=5)
    records = load_prompts(cfg, seed=0)
    assert len(records) == 300 and len({r.prompt_id for r in records}) == 300
    assert [r.prompt_id for r in load_prompts(cfg, seed=0)] == [r.prompt_id for r in records]
    first = next(arith_problems(1, 5, 0))
    assert records[0].messages[-1].content == first["prompt"] and records[0].reference == first["completion"]


def test_bad_records_stop_by_default_and_are_skipped_when_allowed(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": ""}\n{"prompt": "2+2="}\n')
    with pytest.raises(PromptDataError, match="1 bad record"):
        load_prompts(DataConfig(prompts=str(path)), seed=0)
    assert f"{path}:2:" in capsys.readouterr().err
    records = load_prompts(DataConfig(prompts=str(path), on_bad_record="skip"), seed=0)
    assert len(records) == 2
    assert "skipped 1 bad record" in capsys.readouterr().err
