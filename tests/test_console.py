"""Console output: actors' library noise goes to their log files, real lines and warnings to the console."""

import subprocess
import sys
from pathlib import Path

from contracts.console import LOG_FILE_ENV, VERBOSE_ENV, is_noise

ROOT = Path(__file__).resolve().parents[1]

# What an actor prints, as seen in a run of the smoke job (Python, tqdm, torch C++ and vLLM output).
ACTOR = r"""
import os, sys, warnings
from contracts.console import route_actor_output
route_actor_output()
print("Loading weights:   0%|          | 0/21 [00:00<?, ?it/s]\rLoading weights: 100%|##| 21/21 [00:00<00:00, 5230.43it/s]")
print("INFO 11-23 15:09:08 [engine.py:12] Initializing a V1 LLM engine")
os.write(2, b"[W1123 15:09:09.469662874 utils.cpp:68] Warning: NUMA binding: Using MEMBIND policy\n")
warnings.warn("`torch.distributed.reduce_op` is deprecated, please use `torch.distributed.ReduceOp` instead",
              FutureWarning)
print()
print("reward rule 'vibes' timed out after 5s")
warnings.warn("a real warning", UserWarning)
sys.stdout.flush(); sys.stderr.flush()
import time; time.sleep(0.5)  # the filter threads pass the last lines on
"""


def run_actor(tmp_path, **env):
    log = tmp_path / "logs" / "rollout-0.log"
    proc = subprocess.run(
        [sys.executable, "-c", ACTOR],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", LOG_FILE_ENV: str(log), **env},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout + proc.stderr, log


def test_known_noise_and_real_lines():
    for line in [
        "Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 398.58it/s]",
        " 33%|###       | 1/3 [00:00<00:00,  5.00it/s]",
        "",
        "   ",
        "W1123 15:09:08.971000 28300 torch/_library/triton.py:53] Triton not available, find_triton_kernels = []",
    ]:
        assert is_noise(line), line
    for line in ["iter 3/9  reward +0.5", "RuntimeError: CUDA out of memory", "WARNING 11-23 vLLM: KV cache is full"]:
        assert not is_noise(line), line


def test_an_actors_noise_goes_to_its_log_and_the_rest_to_the_console(tmp_path):
    console, log = run_actor(tmp_path)
    lines = [line for line in console.splitlines() if line.strip()]
    assert lines[0] == "reward rule 'vibes' timed out after 5s"
    assert len(lines) == 2 and lines[1].endswith("UserWarning: a real warning")  # one line per warning
    logged = log.read_text()
    for text in (
        "Loading weights: 100%",
        "Initializing a V1 LLM engine",
        "NUMA binding",
        "reduce_op",
        "timed out after 5s",
        "a real warning",
    ):
        assert text in logged, text


def test_verbose_lets_everything_through(tmp_path):
    console, log = run_actor(tmp_path, **{VERBOSE_ENV: "1"})
    assert "Loading weights" in console and "NUMA binding" in console and "reduce_op" in console
    assert not log.exists()


# What vLLM's engine prints when it fails (vllm/logging_utils/dump_input.py): megabytes on one line.
DUMPING = r"""
import os, sys, time
from contracts.console import route_actor_output
route_actor_output()
state = "x" * 3_000_000
print("ERROR 12-02 12:00:00 [dump_input.py:72] Dumping input data for V1 LLM engine (v0.32.0) with config: " + state)
print("ERROR 12-02 12:00:00 [dump_input.py:79] Dumping scheduler output for model execution: " + state)
print("long " + "y" * 10_000)
print("RuntimeError: the engine died")
sys.stdout.flush(); time.sleep(0.5)
"""


def test_a_vllm_dump_goes_to_the_log_and_the_console_gets_one_line_naming_it(tmp_path):
    log = tmp_path / "logs" / "rollout-0.log"
    proc = subprocess.run(
        [sys.executable, "-c", DUMPING],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", LOG_FILE_ENV: str(log)},
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert len(lines) == 3, [line[:100] for line in lines]
    assert lines[0] == f"vllm: the engine failed and dumped its state to the actor's log ({log})"
    assert lines[1].startswith("long yyy") and "whole in the log" in lines[1] and len(lines[1]) < 400
    assert lines[2] == "RuntimeError: the engine died"
    assert log.stat().st_size > 6_000_000  # the log has the dumps whole
