"""`rollout run` reads its data while Ray starts: the same data, the data's error first, nothing in the run
directory, and a Ray started for data that failed is stopped again."""

import io
import json
import os
import subprocess
import sys

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


def test_the_driver_imports_no_torch_transformers_or_vllm_before_it_reads_the_data():
    """Torch's import costs the driver seconds before Ray starts; it belongs in the data's thread, where
    the learner's names are checked while Ray starts, and in the actors."""
    probe = "import sys, rollout.cli, rollout.commands, rollout.driver.job; print(sorted(set(sys.modules) & {M}))"
    done = subprocess.run(
        [sys.executable, "-c", probe.replace("{M}", "{'torch', 'transformers', 'vllm'}")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


IDLE_WORKERS = """
import os, subprocess
import ray
from contracts.config.load import load_config
from rollout.driver.startup import init_ray

init_ray(load_config(None, ["ray.num_cpus=2"]), learner=True)

@ray.remote(num_cpus=1)
class Member:
    def ready(self):
        return True

ray.get(Member.remote().ready.remote(), timeout=300)
rows = [line.split(None, 2) for line in subprocess.run(["ps", "-eo", "pid=,ppid=,args="], capture_output=True,
        text=True).stdout.splitlines()]
parent = {int(pid): int(ppid) for pid, ppid, *_ in rows}

def mine(pid):
    while pid > 1:
        if pid == os.getpid():
            return True
        pid = parent.get(pid, 0)
    return False

print("WORKERS", sum(1 for pid, _, *args in rows if mine(int(pid)) and args and args[0].startswith("ray::")))
print("IDLE", sum(1 for pid, _, *args in rows if mine(int(pid)) and args and args[0].startswith("ray::IDLE")))
ray.shutdown()
"""


def test_a_ray_the_run_starts_prestarts_no_idle_workers():
    """The run's Ray starts no idle workers ahead: each would take a core for a second or more while the
    engines load, for no earlier start of the run's actors on a small machine."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-c", IDLE_WORKERS], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    counts = dict(line.split() for line in done.stdout.splitlines() if line.startswith(("WORKERS", "IDLE")))
    assert int(counts["WORKERS"]) >= 1  # the member's process is seen, so an idle one would be too
    assert counts["IDLE"] == "0"


LOAD_TWICE = """
import json, sys
from contracts.builtin_model import load_tokenizer
conversation = [{"role": "user", "content": "What is 12 plus 30?"}, {"role": "assistant", "content": "42"}]
first = load_tokenizer(sys.argv[1])
print(json.dumps([type(first).__name__, first.apply_chat_template(conversation, tokenize=False),
                  first("12+30= <tool_call></s>")["input_ids"], first.all_special_ids]))
"""


@pytest.mark.parametrize("family", ["tiny-llama", "tiny-qwen2"])
def test_a_builtin_tokenizer_loads_as_autotokenizer_loads_it_without_its_class_map(family, tmp_path):
    """The class AutoTokenizer picks (the generic one for a Llama, Qwen2's own for a Qwen2) is recorded the
    first time and loaded by name after: the same tokenizer, without the seconds of AutoTokenizer's imports."""
    from transformers import AutoTokenizer

    from contracts.builtin_model import build_builtin

    directory = build_builtin(family)
    (directory / "tokenizer_class").unlink(missing_ok=True)
    runs = []
    for _ in range(2):
        probe = LOAD_TWICE + "print(json.dumps('transformers.models.auto.tokenization_auto' in sys.modules))"
        done = subprocess.run(
            [sys.executable, "-c", probe, f"builtin:{family}"], capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append([json.loads(line) for line in done.stdout.splitlines()])
    (first, auto_imported), (second, auto_imported_again) = runs
    assert auto_imported and not auto_imported_again
    assert first == second
    auto = AutoTokenizer.from_pretrained(directory)
    assert first[0] == type(auto).__name__ == (directory / "tokenizer_class").read_text().split()[0]
    assert first[2] == auto("12+30= <tool_call></s>")["input_ids"]
