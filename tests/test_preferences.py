"""Reading preference data: pairwise, multi-choice and scored records, and their training pairs."""

import math
from pathlib import Path

import pytest

from contracts.formats import FormatError
from contracts.jsonl import BadRecord
from reward.preferences import PreferenceRecord, detect_preference_format, parse_preference, read_preferences

DATA = Path(__file__).parent / "data"


def read(name: str, fmt: str = "auto") -> list[PreferenceRecord | BadRecord]:
    return list(read_preferences(DATA / name, fmt))


def good(records: list) -> list[PreferenceRecord]:
    assert not [str(r) for r in records if isinstance(r, BadRecord)]
    return records


def test_pairwise_seed_example():
    seed, english = good(read("pairwise_seed.jsonl", "pairwise"))
    assert seed == PreferenceRecord(
        "如何写一封求职信?", ["尊敬的招聘经理……", "你好,我想要这份工作……"], 0, None, f"{DATA / 'pairwise_seed.jsonl'}:1"
    )
    assert seed.pairs() == [(0, 1, None)]
    assert english.best == 1
    assert english.pairs() == [(1, 0, None)]


def test_multi_choice_best_against_every_other():
    abc, chinese = good(read("multi_choice.jsonl", "multi"))
    assert abc.responses == ["A", "B", "C"]
    assert abc.best == 2
    assert abc.pairs() == [(2, 0, None), (2, 1, None)]
    assert chinese.responses == ["版本A", "版本B", "版本C", "版本D"]
    assert chinese.pairs() == [(0, 1, None), (0, 2, None), (0, 3, None)]


def test_scored_higher_score_wins_with_the_difference_as_margin():
    seed, english, tie = good(read("scored.jsonl", "scored"))
    assert seed.scores == [4.5, 3.2]
    assert seed.best == 0
    [(chosen, rejected, margin)] = seed.pairs()
    assert (chosen, rejected) == (0, 1) and margin == pytest.approx(1.3)
    assert english.best == 1
    assert english.pairs() == [(1, 0, 3.25)]
    assert tie.scores == [3.0, 3.0]
    assert tie.pairs() == []


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"prompt": "p", "response_a": "a", "response_b": "b", "label": 0}, "pairwise"),
        ({"prompt": "p", "responses": ["a", "b"], "label": 1}, "multi"),
        ({"prompt": "p", "response_a": "a", "response_b": "b", "score_a": 1, "score_b": 2}, "scored"),
        ({"prompt": "p", "completion": "c"}, None),
        (["p", "a"], None),
    ],
)
def test_detection_by_keys(record, fmt):
    assert detect_preference_format(record) == fmt


def test_a_file_may_mix_the_formats(tmp_path):
    lines = [
        (DATA / name).read_text(encoding="utf-8").splitlines()[0]
        for name in ("pairwise_seed.jsonl", "multi_choice.jsonl", "scored.jsonl")
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = good(list(read_preferences(path)))
    assert [r.best for r in records] == [0, 2, 0]
    assert [r.scores for r in records] == [None, None, [4.5, 3.2]]


def test_each_kind_of_bad_preference_record_is_reported_at_its_line():
    f = DATA / "bad_preferences.jsonl"
    records = read("bad_preferences.jsonl")
    assert [str(r) for r in records if isinstance(r, BadRecord)] == [
        f'{f}:2: field "label" is 2, out of range for 2 responses (0..1)',
        f'{f}:3: field "label" must be an int, got bool',
        f'{f}:4: missing field "label"',
        f'{f}:5: field "responses" must have at least 2 responses, got 1',
        f'{f}:6: field "label" is 3, out of range for 3 responses (0..2)',
        f"{f}:7: responses[1] must be a string, got int",
        f'{f}:8: field "score_a" must be a number, got string',
        f'{f}:9: field "score_a" must be a finite number, got NaN',
        f'{f}:10: field "response_b" is empty',
        f'{f}:11: field "score_b" must be a number, got bool',
        f'{f}:12: missing field "prompt"',
        f"{f}:14: unknown record shape: expected response_a/response_b with label or score_a/score_b, "
        "or responses with label",
        f'{f}:15: field "label" must be an int, got float',
    ]
    assert [r.source for r in records if isinstance(r, PreferenceRecord)] == [f"{f}:1", f"{f}:13"]


@pytest.mark.parametrize(
    "record, fmt, reason",
    [
        (
            {"prompt": "p", "responses": [], "label": 0},
            "multi",
            'field "responses" must have at least 2 responses, got 0',
        ),
        ({"prompt": "p", "responses": "ab", "label": 0}, "multi", 'field "responses" must be a list, got string'),
        ({"prompt": "p", "responses": ["a", " "], "label": 0}, "multi", "responses[1] is empty"),
        ({"prompt": "p", "responses": ["a", "b"], "label": -1}, "multi", 'field "label" is -1, out of range'),
        (
            {"prompt": "p", "response_a": "a", "response_b": "b", "score_a": math.inf, "score_b": 1},
            "scored",
            'field "score_a" must be a finite number, got Infinity',
        ),
        ({"prompt": "p", "response_a": "a", "response_b": "b", "score_a": 1}, "scored", 'missing field "score_b"'),
        ({"prompt": "p", "response_a": "a", "label": 0}, "pairwise", 'missing field "response_b"'),
        (
            {"prompt": 3, "response_a": "a", "response_b": "b", "label": 0},
            "pairwise",
            'field "prompt" must be a string, got int',
        ),
        ("text", "auto", "record must be a JSON object, got string"),
    ],
)
def test_bad_records_raise_a_specific_reason(record, fmt, reason):
    with pytest.raises(FormatError) as e:
        parse_preference(record, fmt, "f:1")
    assert str(e.value).startswith(reason)


def test_integer_scores_are_numbers():
    record = parse_preference(
        {"prompt": "p", "response_a": "a", "response_b": "b", "score_a": 2, "score_b": 7}, "scored", "f:1"
    )
    assert record.scores == [2.0, 7.0]
    assert record.pairs() == [(1, 0, 5.0)]


def test_unknown_format_name_is_a_usage_error():
    with pytest.raises(ValueError, match="unknown preference format 'ranked'"):
        read_preferences(DATA / "scored.jsonl", "ranked")
