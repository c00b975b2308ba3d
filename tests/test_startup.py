"""`rollout run` reads its data while Ray starts: the same data, the data's error first, nothing in the run
directory, and a Ray started for data that failed is stopped again."""

import io

import pytest
import ray

from contracts.config import ConfigError
from contracts.config.load import load_config
from rollout.driver.startup import read_data, read_data_starting_ray

TOO_FEW_PROMPTS = ["data.builtin_size=8", "rollout.prompts_per_iteration=16", "model.sft_warmup=false"]


def test_bad_data_fails_with_its_own_error_and_stops_the_ray_started_for_it(tmp_path):
    if ray.is_initialized():
        pytest.skip("a Ray is up already: this test needs to see the run start its own")
    cfg = load_config(None, [*TOO_FEW_PROMPTS, "ray.num_cpus=2"])
    with pytest.raises(ConfigError, match="exceeds the 8 usable prompts"):
        read_data_starting_ray(cfg, tmp_path / "run", io.StringIO(), learner=True, prompts_needed=16)
    assert not ray.is_initialized()
    assert not (tmp_path / "run").exists()


def test_with_ray_up_the_data_is_read_as_alone_and_ray_left_running(tmp_path, local_ray):
    cfg = load_config(None, ["model.sft_warmup=false"])
    data = read_data_starting_ray(cfg, tmp_path / "run", io.StringIO(), learner=True, prompts_needed=64)
    alone = read_data(cfg, io.StringIO(), prompts_needed=64)
    assert [r.prompt_id for r in data.prompts.records()] == [r.prompt_id for r in alone.prompts.records()]
    assert [data.prompts.task(i) for i in range(len(data.prompts))] == [
        alone.prompts.task(i) for i in range(len(alone.prompts))
    ]
    assert ray.is_initialized()
    with pytest.raises(ConfigError, match="exceeds the 8 usable prompts"):
        read_data_starting_ray(
            load_config(None, TOO_FEW_PROMPTS), tmp_path / "run", io.StringIO(), learner=True, prompts_needed=16
        )
    assert ray.is_initialized()  # not this call's to stop
    assert not (tmp_path / "run").exists()
