"""`builtin:calc`: problems for the calculator environment with a demonstration of the tool, and the SFT
warm-up example a demonstration makes (the whole episode, loss on the model's turns only)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from contracts.arith_parser import evaluate
from contracts.config import DataConfig
from contracts.formats import Message, parse_prompt
from contracts.rendering import PromptRenderer
from learner.sft import sft_batch, sft_examples
from reward.rules import arithmetic
from rollout.driver.prompts import calc_records, load_prompts
from rollout.environments.calculator import Calculator

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_builtin_calc_records_are_problems_with_their_answers_and_a_demonstration():
    cfg = DataConfig(prompts="builtin:calc", builtin_size=200, builtin_max_operand=999)
    records = load_prompts(cfg, seed=3)
    assert len(records) == 200 and len({r.prompt_id for r in records}) == 200
    assert [r.prompt_id for r in load_prompts(cfg, seed=3)] == [r.prompt_id for r in records]
    assert [r.prompt_id for r in load_prompts(cfg, seed=4)] != [r.prompt_id for r in records]
    operators = set()
    for i, record in enumerate(records):
        (message,) = record.messages
        problem = message.content
        assert message.role == "user" and problem.endswith("=") and record.source == f"builtin:calc:{i + 1}"
        operator = next(op for op in "+-*" if op in problem[1:])  # a - at 0 would be a sign; operands are >= 0
        operators.add(operator)
        a, b = (int(x) for x in problem[:-1].split(operator))
        assert 0 <= a <= 999 and 0 <= b <= 999
        assert record.reference == str(evaluate(problem[:-1]))
        assert record.metadata["demonstration"] == [
            {"role": "assistant", "content": f"<calc>{problem[:-1]}</calc>"},
            {"role": "user", "content": f"<result>{record.reference}</result>"},
            {"role": "assistant", "content": record.reference},
        ]
    assert operators == {"+", "-", "*"}
    assert max(len(r.messages[0].content) for r in records) <= len("999*999=")


def test_the_demonstration_is_what_the_calculator_answers_and_the_arithmetic_rule_rewards():
    for record in calc_records(50, 999, seed=0):
        call, result, answer = record.metadata["demonstration"]
        env = Calculator()
        env.reset(record)
        assert env.step(call["content"]).observation == result["content"]
        assert env.step(answer["content"]).done
        assert arithmetic(record.messages[0].content, answer["content"], record) == 1.0


def test_the_observation_role_changes_the_demonstration_not_the_prompt_id():
    as_user = calc_records(5, 99, seed=0)
    as_tool = calc_records(5, 99, seed=0, observation_role="tool")
    assert [r.prompt_id for r in as_user] == [r.prompt_id for r in as_tool]
    assert {r.metadata["demonstration"][1]["role"] for r in as_tool} == {"tool"}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return AutoTokenizer.from_pretrained(tiny_model_path)


def test_the_text_between_turns_is_the_templates_from_after_the_eos_to_the_next_generation_prompt(tokenizer):
    renderer = PromptRenderer(tokenizer, 64)
    history = [Message("user", "12*34=")]
    between = renderer.observation_text(history, "<calc>12*34</calc>", Message("user", "<result>408</result>"))
    assert between == "\n<|user|><result>408</result>\n<|assistant|>"
    # The prompt, the model's turn with its eos, and this text are the template's own rendering of it all.
    prompt = renderer.text(parse_prompt({"prompt": "12*34="}, "sft", "t:1"))
    whole = tokenizer.apply_chat_template(
        [
            {"role": "user", "content": "12*34="},
            {"role": "assistant", "content": "<calc>12*34</calc>"},
            {"role": "user", "content": "<result>408</result>"},
        ],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert prompt + "<calc>12*34</calc>" + tokenizer.eos_token + between == whole


def test_a_demonstration_is_one_sft_example_with_loss_on_the_models_turns_only(tokenizer):
    record = calc_records(1, 999, seed=0)[0]
    problem = record.messages[0].content
    call, result, answer = (m["content"] for m in record.metadata["demonstration"])
    plain = parse_prompt({"prompt": "1+2=", "completion": "3"}, "sft", "t:1")
    (prompt, episode, mask), (plain_prompt, plain_completion) = sft_examples([record, plain], tokenizer, 32)

    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    eos = tokenizer.eos_token_id
    between = ids("\n<|user|>" + result + "\n<|assistant|>")
    assert prompt == ids(f"<s><|user|>{problem}\n<|assistant|>")
    assert episode == ids(call) + [eos] + between + ids(answer) + [eos]
    assert mask == [1] * (len(ids(call)) + 1) + [0] * len(between) + [1] * (len(ids(answer)) + 1)
    assert tokenizer.decode(prompt + episode) == tokenizer.apply_chat_template(
        [{"role": "user", "content": problem}, *record.metadata["demonstration"]], tokenize=False
    ).rstrip("\n")  # the template ends the last turn with a newline the model does not write

    batch = sft_batch([(prompt, episode, mask), (plain_prompt, plain_completion)], tokenizer.pad_token_id)
    labels = batch["labels"][0]
    trained = labels != -100
    assert not trained[: len(prompt)].any()
    assert labels[trained].tolist() == ids(call) + [eos] + ids(answer) + [eos]  # no token of <result> carries loss
    width = len(prompt) + len(episode)
    assert batch["attention_mask"][0].tolist() == [1] * width + [0] * (batch["input_ids"].shape[1] - width)
    # A record without a demonstration is trained as before: its completion and eos.
    assert batch["labels"][1, len(plain_prompt) : len(plain_prompt) + len(plain_completion)].tolist() == ids("3") + [
        eos
    ]
    assert torch.equal(batch["input_ids"][0, :width], torch.tensor(prompt + episode))


@pytest.mark.parametrize(
    "demonstration, message",
    [
        ("<calc>1+2</calc>", "must be a non-empty list"),
        ([], "must be a non-empty list"),
        ([{"role": "assistant"}], r"\[0\] must be an object with string role and content"),
        ([{"role": "user", "content": "x"}], r"\[0\] has role 'user': the turns alternate"),
        ([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], r"\[1\] has role"),
        ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], "must end with the model's"),
    ],
)
def test_a_malformed_demonstration_is_an_error_naming_the_record(tokenizer, demonstration, message):
    record = parse_prompt(
        {"prompt": "1+2=", "completion": "3", "metadata": {"demonstration": demonstration}}, "sft", "f:7"
    )
    with pytest.raises(ValueError, match=message) as e:
        sft_examples([record], tokenizer, 32)
    assert str(e.value).startswith('f:7: metadata "demonstration"')


def test_the_tiny_calculator_config_passes_the_start_up_checks(tokenizer):
    from contracts.config.load import check, load_config
    from rollout.environments.registry import check_environment

    cfg = load_config(CONFIGS / "tiny-calc.yaml")
    check(cfg, cuda_available=False)
    assert check_environment(cfg.env) is Calculator and cfg.data.prompts == "builtin:calc"
    records = load_prompts(cfg.data, cfg.seed)
    renderer = PromptRenderer(tokenizer, cfg.model.max_prompt_tokens)
    longest = max(len(ex[1]) for ex in sft_examples(records, tokenizer, cfg.model.max_prompt_tokens))
    assert all(len(renderer.render(r).prompt_ids) <= cfg.model.max_prompt_tokens for r in records)
    # The demonstrated episode fits the episode budget, and each of its model turns the turn budget.
    assert longest <= cfg.env.max_episode_tokens
    longest_call = max(len(tokenizer(r.metadata["demonstration"][0]["content"])["input_ids"]) + 1 for r in records)
    assert longest_call <= cfg.rollout.sampling.max_tokens
