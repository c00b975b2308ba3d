"""The environment registry (`env.name`): built-ins by name, a user's own class written into tmp_path, and
the start-up check that stops a bad `env` before Ray, and renders the prompt an episode opens with."""

from __future__ import annotations

import sys
import textwrap

import pytest

from contracts.config import ConfigError, EnvConfig
from contracts.environment import Environment, StepResult
from contracts.formats import parse_prompt
from rollout.environments.calculator import Calculator
from rollout.environments.conversation import Conversation
from rollout.environments.registry import ENVIRONMENTS, check_environment, environment_class

XTUNER = {
    "system": "Be kind.",
    "conversation": [
        {"input": "hi there", "output": "hello friend"},
        {"input": "how are you", "output": "i am fine thanks"},
    ],
}

# --- registry ----------------------------------------------------------------------------------


def test_built_ins_are_found_by_name_and_single_turn_has_no_environment():
    assert environment_class("calculator") is Calculator and environment_class("conversation") is Conversation
    assert {"calculator", "conversation"} <= set(ENVIRONMENTS)
    assert check_environment(EnvConfig()) is None
    assert check_environment(EnvConfig(name="calculator", params={"max_calls": 3})) is Calculator


USER_MODULE = textwrap.dedent(
    """
    from contracts.environment import Environment, StepResult


    class Echo(Environment):
        def __init__(self, times=1):
            if times < 1:
                raise ValueError("times must be at least 1")
            self.times = times

        def step(self, text):
            return StepResult(observation=text * self.times, reward=0.5, done=len(text) > 3)


    class Lazy(Environment):
        pass


    class NotAnEnvironment:
        def reset(self, record):
            return None

        def step(self, text):
            return None


    NUMBER = 3
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_envs.py").write_text(USER_MODULE)
    (tmp_path / "broken_envs.py").write_text("raise RuntimeError('no licence server')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_envs"
    sys.modules.pop("my_envs", None)
    sys.modules.pop("broken_envs", None)


def test_a_users_class_is_loaded_by_module_and_name_and_played(user_module):
    cls = check_environment(EnvConfig(name="my_envs:Echo", params={"times": 2}))
    assert cls.__name__ == "Echo" and issubclass(cls, Environment)
    env = cls(times=2)
    assert env.reset(None) is None
    assert env.step("ab") == StepResult(observation="abab", reward=0.5, done=False)


@pytest.mark.parametrize(
    "name, message",
    [
        (
            "nope",
            "env.name: unknown environment 'nope'; known: calculator, conversation, openai_agent, reasoning_gym, or your own as package.module:ClassName",
        ),
        ("no_such_module_at_all:Env", "env.name: no_such_module_at_all:Env: cannot import no_such_module_at_all"),
        ("broken_envs:Env", "env.name: broken_envs:Env: importing broken_envs raised RuntimeError: no licence"),
        ("my_envs:Missing", "env.name: my_envs:Missing: module my_envs has no 'Missing'"),
        ("my_envs:NotAnEnvironment", "env.name: my_envs:NotAnEnvironment is not a subclass of "),
        ("my_envs:NUMBER", "env.name: my_envs:NUMBER is not a class but an object of type int"),
        ("my_envs:Lazy", "env.name: my_envs:Lazy does not define step(text)"),
        ("my envs:Echo", "is not package.module:ClassName"),
    ],
)
def test_a_name_that_does_not_give_an_environment_is_a_config_error_naming_env_name(user_module, name, message):
    with pytest.raises(ConfigError) as e:
        check_environment(EnvConfig(name=name))
    assert str(e.value).startswith("env.name: ") and message in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("calculator", {"max_calls": 0}, "env.params: calculator: calculator: max_calls must be a whole number >= 1"),
        ("calculator", {"max_call": 2}, "env.params: calculator: "),
        ("my_envs:Echo", {"times": 0}, "env.params: my_envs:Echo: times must be at least 1"),
        ("my_envs:Echo", {"speed": 1}, "unexpected keyword argument 'speed'"),
    ],
)
def test_params_the_class_refuses_are_a_config_error_naming_env_params(user_module, name, params, message):
    with pytest.raises(ConfigError, match="^env.params: ") as e:
        check_environment(EnvConfig(name=name, params=params))
    assert message in str(e.value)


# --- start-up: the prompt an episode opens with --------------------------------------------------


def test_with_an_environment_the_prompt_length_check_sees_the_opening_not_the_whole_record(tmp_path, tiny_model_path):
    import io
    import json

    from transformers import AutoTokenizer

    from contracts.config.load import load_config
    from contracts.formats import FormatError
    from contracts.rendering import PromptRenderer
    from rollout.driver.startup import read_data

    long_turns = [{"input": "tell me more " * 20, "output": "there is more " * 20}] * 2
    prompts = tmp_path / "talk.jsonl"
    prompts.write_text(json.dumps({**XTUNER, "conversation": XTUNER["conversation"] + long_turns}) + "\n")
    record = parse_prompt(json.loads(prompts.read_text()), "xtuner", "x:1")
    renderer = PromptRenderer(AutoTokenizer.from_pretrained(tiny_model_path), 10_000)
    opening = renderer.render(record, Conversation.opening(record)).prompt_ids
    assert len(renderer.render(record).prompt_ids) > 2 * len(opening)
    overrides = [f"model.path={tiny_model_path}", f"data.prompts={prompts}", f"model.max_prompt_tokens={len(opening)}"]

    with pytest.raises(FormatError, match="1 prompt\\(s\\) longer than model.max_prompt_tokens"):
        read_data(load_config(None, overrides), io.StringIO())  # single turn: the whole record is the prompt
    data = read_data(load_config(None, [*overrides, "env.name=conversation"]), io.StringIO())
    task = data.prompts.task(0)
    assert data.prompts.record(0).prompt_id == record.prompt_id
    assert task.prompt_ids == opening and task.prompt == renderer.text(record, Conversation.opening(record))
    assert task.prompt.endswith("<|user|>hi there\n<|assistant|>")


def test_an_unknown_environment_stops_rollout_run_in_one_line_before_ray_starts(tmp_path, capfd):
    import ray

    from rollout.cli import main

    out = tmp_path / "run"
    assert main(["run", "--set", "env.name=nope", "--out", str(out)]) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("config error: env.name: unknown environment 'nope'") and len(err.splitlines()) == 1, err
    assert not ray.is_initialized() and not out.exists()


def test_bad_env_params_stop_rollout_run_in_one_line_before_ray_starts(tmp_path, capfd):
    import ray

    from rollout.cli import main

    out = tmp_path / "run"
    argv = ["run", "--set", "env.name=calculator", "--set", "env.params={max_calls: 0}", "--out", str(out)]
    assert main(argv) == 2
    err = capfd.readouterr().err.strip()
    assert err.startswith("config error: env.params: calculator: ") and len(err.splitlines()) == 1, err
    assert not ray.is_initialized() and not out.exists()


def test_rollout_config_checks_the_environment_and_explain_lists_the_built_ins(capfd):
    from rollout.cli import main

    assert main(["config", "--set", "env.name=calculator", "--set", "env.params={max_calls: 0}"]) == 2
    assert capfd.readouterr().err.startswith("config error: env.params: calculator: ")
    assert main(["config", "--explain"]) == 0
    (line,) = [line for line in capfd.readouterr().out.splitlines() if line.startswith("env.name =")]
    assert line.endswith(f"Registered: {', '.join(ENVIRONMENTS)}.") and "calculator" in line
