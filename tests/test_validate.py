"""`rollout validate`: one `FILE:LINE: reason` line per bad record, a summary, and the exit code."""

import io
from pathlib import Path

import pytest

from contracts.formats import PromptRecord
from rollout.offline.validate import detect_data_kind, reason_category, validate_files

DATA = Path(__file__).parent / "data"
VALID = [
    "sft_seed.jsonl",
    "xtuner_seed.json",
    "xtuner.jsonl",
    "chat.jsonl",
    "mixed_prompts.jsonl",
    "pairwise_seed.jsonl",
    "multi_choice.jsonl",
    "scored.jsonl",
]


def data(name: str) -> str:
    return str(DATA / name)


def run(paths: list[str], **kwargs) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = validate_files(paths, out=out, **kwargs)
    return code, out.getvalue().splitlines()


def test_valid_files_pass_with_a_summary_and_no_reports():
    code, lines = run([data(n) for n in VALID])
    assert code == 0
    assert lines == [
        f"{data('sft_seed.jsonl')}: 5 records, 0 bad",
        f"{data('xtuner_seed.json')}: 4 records, 0 bad",
        f"{data('xtuner.jsonl')}: 2 records, 0 bad",
        f"{data('chat.jsonl')}: 3 records, 0 bad",
        f"{data('mixed_prompts.jsonl')}: 3 records, 0 bad",
        f"{data('pairwise_seed.jsonl')}: 2 records, 0 bad",
        f"{data('multi_choice.jsonl')}: 2 records, 0 bad",
        f"{data('scored.jsonl')}: 3 records, 0 bad",
    ]


@pytest.mark.parametrize(
    "name, kind",
    [
        ("sft_seed.jsonl", "prompt"),
        ("xtuner_seed.json", "prompt"),
        ("chat.jsonl", "prompt"),
        ("pairwise_seed.jsonl", "preference"),
        ("multi_choice.jsonl", "preference"),
        ("scored.jsonl", "preference"),
        ("bad_preferences.jsonl", "preference"),
        ("bad_prompts.jsonl", "prompt"),
    ],
)
def test_file_kind_comes_from_the_first_recognised_record(name, kind):
    assert detect_data_kind(data(name)) == kind


def test_a_preference_file_opening_with_broken_records_is_still_preference_data(tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": \n{"text": "?"}\n{"prompt": "p", "response_a": "a", "response_b": "b", "label": 1}\n')
    code, lines = run([str(path)])
    assert code == 1
    assert lines[:2] == [
        f"{path}:1: invalid JSON: Expecting value (column 12)",
        f"{path}:2: unknown record shape: expected response_a/response_b with label or score_a/score_b, "
        "or responses with label",
    ]


def test_bad_prompt_file_reports_every_bad_record_then_the_summary():
    f = data("bad_prompts.jsonl")
    code, lines = run([f])
    assert code == 1
    assert len(lines) == 21 + 2
    assert lines[0] == f'{f}:2: field "prompt" must be a string, got int'
    assert lines[18] == f"{f}:20: invalid JSON: Unterminated string starting at (column 12)"
    assert lines[-2:] == [
        f"{f}: 23 records, 21 bad",
        "bad records by reason: wrong type 5, bad turn order 3, empty text 3, missing field 3, "
        "bad system prompt 2, not a JSON object 2, bad JSON 1, bad role 1, unknown record shape 1",
    ]


def test_bad_preference_file_counts_by_reason():
    f = data("bad_preferences.jsonl")
    code, lines = run([f])
    assert code == 1
    assert lines[:3] == [
        f'{f}:2: field "label" is 2, out of range for 2 responses (0..1)',
        f'{f}:3: field "label" must be an int, got bool',
        f'{f}:4: missing field "label"',
    ]
    assert lines[-2:] == [
        f"{f}: 15 records, 13 bad",
        "bad records by reason: non-numeric score 3, wrong type 3, label out of range 2, missing field 2, "
        "empty text 1, fewer than 2 responses 1, unknown record shape 1",
    ]


@pytest.mark.parametrize(
    "name, reports",
    [
        ("bad_utf8.jsonl", ["2: not valid UTF-8 (byte 0xe9)", "4: not valid UTF-8 (byte 0xe5)"]),
        ("bad_utf8.json", ["4: not valid UTF-8 (byte 0xff)"]),
        ("truncated.json", ["13: invalid JSON: unexpected end of file, the record starting at line 10 is not closed"]),
        ("garbled.json", ["7: invalid JSON: Expecting ',' delimiter (column 40)"]),
    ],
)
def test_unreadable_records_are_reported_with_their_line(name, reports):
    code, lines = run([data(name)])
    assert code == 1
    assert lines[: len(reports)] == [f"{data(name)}:{r}" for r in reports]
    assert lines[len(reports)].startswith(f"{data(name)}: ")


def test_missing_and_empty_files_fail_but_the_others_are_still_checked(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    missing = str(tmp_path / "missing.jsonl")
    code, lines = run([missing, str(empty), data("scored.jsonl")])
    assert code == 1
    assert lines == [f"{missing}: no such file", f"{empty}: no records", f"{data('scored.jsonl')}: 3 records, 0 bad"]


def test_a_directory_without_data_files_says_what_it_can_read(tmp_path):
    code, lines = run([str(tmp_path)])
    assert code == 1 and len(lines) == 1
    assert lines[0].startswith(f"{tmp_path}: a directory with no Parquet or Arrow files")


def characters(record: PromptRecord) -> int:
    return sum(len(m.content) for m in record.messages)


def test_prompts_longer_than_the_maximum_are_reported():
    f = data("sft_seed.jsonl")
    code, lines = run([f], prompt_length=characters, max_prompt_tokens=50)
    assert code == 1
    assert lines == [
        f"{f}:3: prompt is 84 tokens, longer than the maximum 50",
        f"{f}: 5 records, 1 bad",
        "bad records by reason: prompt too long 1",
    ]
    assert run([f], prompt_length=characters, max_prompt_tokens=84)[0] == 0


def test_length_is_not_checked_for_preference_files():
    assert run([data("pairwise_seed.jsonl")], prompt_length=characters, max_prompt_tokens=1)[0] == 0


def test_a_prompt_the_template_cannot_render_is_a_bad_record():
    def strict_template(record: PromptRecord) -> int:
        if record.messages[0].role == "system":
            raise ValueError("System role not supported")
        return 1

    f = data("chat.jsonl")
    code, lines = run([f], prompt_length=strict_template, max_prompt_tokens=10)
    assert code == 1
    assert lines[0] == f"{f}:1: prompt could not be rendered: ValueError: System role not supported"


@pytest.mark.parametrize(
    "reason, category",
    [
        ("not valid UTF-8 (byte 0xff)", "not UTF-8"),
        ("invalid JSON: Expecting value (column 1)", "bad JSON"),
        ('missing field "prompt"', "missing field"),
        ("conversation[1].input is missing", "missing field"),
        ('field "prompt" must be a string, got int', "wrong type"),
        ('field "prompt" is empty', "empty text"),
        ('field "label" is 2, out of range for 2 responses (0..1)', "label out of range"),
        ('field "responses" must have at least 2 responses, got 1', "fewer than 2 responses"),
        ('field "score_a" must be a number, got string', "non-numeric score"),
        ('field "score_a" must be a finite number, got NaN', "non-numeric score"),
        ("prompt is 300 tokens, longer than the maximum 128", "prompt too long"),
        (
            "messages[2].role must be assistant, got user (turns alternate user/assistant, starting with user)",
            "bad turn order",
        ),
        ('messages[0].role must be one of system/user/assistant, got "bot"', "bad role"),
        ("record must be a JSON object, got list", "not a JSON object"),
    ],
)
def test_reason_categories(reason, category):
    assert reason_category(reason) == category
