"""Reading prompt data: line-numbered JSON streaming and the SFT / XTuner / chat formats."""

import hashlib
import json
from pathlib import Path

import pytest

import contracts.jsonl
from contracts.formats import (
    UNKNOWN_PROMPT_SHAPE,
    FormatError,
    Message,
    PromptRecord,
    detect_prompt_format,
    parse_prompt,
    read_prompts,
    record_id,
)
from contracts.jsonl import BadRecord, iter_json_records

DATA = Path(__file__).parent / "data"


def data(name: str) -> str:
    return str(DATA / name)


def prompts(name: str, fmt: str = "auto") -> list[PromptRecord | BadRecord]:
    return list(read_prompts(data(name), fmt))


def good(records: list) -> list[PromptRecord]:
    assert not [r for r in records if isinstance(r, BadRecord)], "unexpected bad records"
    return records


def bad_lines(records: list) -> list[str]:
    return [str(r) for r in records if isinstance(r, BadRecord)]


# --- iter_json_records: JSONL -------------------------------------------------------------------


def test_jsonl_line_numbers_skip_blank_lines():
    lines = [line for line, _ in iter_json_records(data("sft_seed.jsonl"))]
    assert lines == [1, 2, 3, 5, 6]


def test_jsonl_goes_on_after_bad_utf8():
    records = list(iter_json_records(data("bad_utf8.jsonl")))
    assert [(line, type(r).__name__) for line, r in records] == [
        (1, "dict"),
        (2, "BadRecord"),
        (3, "dict"),
        (4, "BadRecord"),
    ]
    assert str(records[1][1]) == f"{data('bad_utf8.jsonl')}:2: not valid UTF-8 (byte 0xe9)"
    assert records[2][1] == {"prompt": "合同纠纷如何处理?"}


def test_jsonl_goes_on_after_bad_json(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": "b" "c"}\n\n{"prompt": "c"} x\n{"prompt": "d"}\r\n')
    records = list(iter_json_records(path))
    assert [str(r) if isinstance(r, BadRecord) else (line, r) for line, r in records] == [
        (1, {"prompt": "a"}),
        f"{path}:2: invalid JSON: Expecting ',' delimiter (column 16)",
        f"{path}:4: invalid JSON: Extra data (column 17)",
        (5, {"prompt": "d"}),
    ]


def test_utf8_bom_is_skipped(tmp_path):
    jsonl, array = tmp_path / "a.jsonl", tmp_path / "b.json"
    jsonl.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n')
    array.write_bytes(b'\xef\xbb\xbf\n[{"prompt": "a"}]')
    assert list(iter_json_records(jsonl)) == [(1, {"prompt": "a"})]
    assert list(iter_json_records(array)) == [(2, {"prompt": "a"})]


def test_empty_file_has_no_records(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n  \n")
    assert list(iter_json_records(tmp_path / "e.jsonl")) == []


# --- iter_json_records: JSON arrays -------------------------------------------------------------


def test_pretty_printed_array_reports_element_start_lines():
    records = list(iter_json_records(data("xtuner_seed.json")))
    assert [line for line, _ in records] == [2, 11, 23, 32]
    assert [r for _, r in records] == json.loads((DATA / "xtuner_seed.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64])
def test_array_reads_the_same_whatever_the_chunk_size(tmp_path, monkeypatch, chunk):
    # Chunk edges then fall inside multi-byte characters, escapes, strings and between elements.
    elements = [{"input": f'问题 "{i}" \\ ] }} [ {{', "n": [1, 2.5, None, True], "s": "\\" * i} for i in range(6)]
    elements += [7, "text", None, [], {}]
    text = json.dumps(elements, ensure_ascii=False, indent=1)
    path = tmp_path / "a.json"
    path.write_text(text, encoding="utf-8")
    starts = [n for n, line in enumerate(text.split("\n"), 1) if line[:2] in (" {", " 7", ' "', " n", " [")]
    monkeypatch.setattr(contracts.jsonl, "_CHUNK_BYTES", chunk)
    records = list(iter_json_records(path))
    assert [r for _, r in records] == elements
    assert [line for line, _ in records] == starts


def test_array_goes_on_after_bad_utf8():
    records = list(iter_json_records(data("bad_utf8.json")))
    assert [line for line, _ in records] == [2, 4, 5]
    assert str(records[1][1]) == f"{data('bad_utf8.json')}:4: not valid UTF-8 (byte 0xff)"
    assert records[2][1] == {"prompt": "still read"}


@pytest.mark.parametrize(
    "name, line, reason",
    [
        ("truncated.json", 13, "invalid JSON: unexpected end of file, the record starting at line 10 is not closed"),
        ("garbled.json", 7, "invalid JSON: Expecting ',' delimiter (column 40)"),
        ("missing_comma.json", 3, "invalid JSON: expected ',' or ']' after a record, got '{'"),
    ],
)
def test_broken_array_reports_once_where_it_broke_then_stops(name, line, reason):
    records = list(iter_json_records(data(name)))
    assert [type(r) for _, r in records] == [dict, BadRecord]
    assert records[-1] == (line, BadRecord(data(name), line, reason))


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ('[\n{"a": 1},\n]\n', 3, "expected a record after ',', got ']'"),
        ('[\n{"a": 1},\n\n', 2, "expected a record after ',', got end of file"),
        ('[\n{"a": 1}\n\n', 2, "unexpected end of file, the array is not closed with ']'"),
        ("[\n\n", 1, "unexpected end of file, the array is not closed with ']'"),
        ('[{"a": 1}]\n\n]', 3, "unexpected text after the end of the array: ']'"),
        ('[{"a": 1}, {"b": 2 x}]', 1, "Expecting ',' delimiter (column 20)"),
    ],
)
def test_array_structure_errors(tmp_path, text, line, reason):
    path = tmp_path / "a.json"
    path.write_text(text)
    assert list(iter_json_records(path))[-1] == (line, BadRecord(str(path), line, f"invalid JSON: {reason}"))


def test_empty_array_has_no_records(tmp_path):
    (tmp_path / "a.json").write_text(" [\n ]\n")
    assert list(iter_json_records(tmp_path / "a.json")) == []


# --- SFT ----------------------------------------------------------------------------------------


def test_sft_seed_examples_keep_the_prompt_as_written():
    records = good(prompts("sft_seed.jsonl"))
    assert [r.messages for r in records[:2]] == [
        [Message("user", "<|SYSTEM|>你是一名法律顾问。\n<|USER|>合同纠纷如何处理?")],
        [Message("user", "<|SYSTEM|>你是一名旅游助手。\n<|USER|>去巴黎有什么推荐?")],
    ]
    assert [r.reference for r in records] == [
        "首先,应当……并在必要时咨询专业律师。",
        "巴黎的必去景点包括埃菲尔铁塔……",
        "First, review the contract terms, and consult a qualified lawyer when needed.",
        "42",
        None,
    ]
    assert [r.source for r in records] == [f"{data('sft_seed.jsonl')}:{n}" for n in (1, 2, 3, 5, 6)]


def test_sft_metadata_and_unused_keys_are_kept():
    records = good(prompts("sft_seed.jsonl"))
    assert records[2].metadata == {"source": "manual", "category": "law", "difficulty": 2}
    assert records[3].metadata == {}
    assert records[4].metadata == {"id": "paris-1"}


# --- XTuner -------------------------------------------------------------------------------------


def test_xtuner_seed_examples_from_a_pretty_printed_array():
    records = good(prompts("xtuner_seed.json", "xtuner"))
    assert [r.source.rsplit(":", 1)[1] for r in records] == ["2", "11", "23", "32"]
    single, multi, top_system, first_turn_system = records
    assert single.messages == [Message("system", "你是一个有帮助的AI助手"), Message("user", "如何学习深度学习?")]
    assert single.reference == "学习深度学习可以从以下几个方面入手..."
    assert multi.messages == [
        Message("user", "深度学习的核心概念是什么?"),
        Message("assistant", "深度学习的核心概念包括..."),
        Message("user", "能详细解释一下神经网络吗?"),
    ]
    assert multi.reference == "神经网络是由多个神经元组成的..."
    assert top_system.messages == [
        Message("system", "你是一个专业的AI编程助手,擅长Python和深度学习"),
        Message("user", "如何用PyTorch实现一个CNN?"),
    ]
    assert first_turn_system.messages == [
        Message("system", "You are a patient math tutor."),
        Message("user", "What is a prime number?"),
        Message("assistant", "A whole number above 1 whose only divisors are 1 and itself."),
        Message("user", "Is 91 prime?"),
    ]
    assert first_turn_system.reference == "No: 91 = 7 * 13."


def test_xtuner_jsonl_multi_turn_with_top_level_system():
    records = good(prompts("xtuner.jsonl"))
    assert [m.role for m in records[1].messages] == ["system", "user", "assistant", "user"]
    assert records[1].messages[-1].content == "怎么加入批归一化?"
    assert records[1].reference == "在卷积层之后加入 nn.BatchNorm2d ..."


@pytest.mark.parametrize(
    "record, system",
    [
        ({"system": "S", "conversation": [{"system": "S", "input": "q", "output": "a"}]}, "S"),
        ({"system": "", "conversation": [{"system": "", "input": "q", "output": "a"}]}, None),
        ({"system": None, "conversation": [{"input": "q"}]}, None),
    ],
)
def test_xtuner_system_given_once_twice_alike_or_empty(record, system):
    parsed = parse_prompt(record, "xtuner", "f:1")
    assert [m.content for m in parsed.messages if m.role == "system"] == ([system] if system else [])
    assert parsed.messages[-1] == Message("user", "q")


def test_xtuner_last_output_is_optional_but_earlier_ones_are_not():
    assert parse_prompt({"conversation": [{"input": "q"}]}, "xtuner", "f:1").reference is None
    with pytest.raises(FormatError, match=r"^conversation\[0\]\.output is missing$"):
        parse_prompt({"conversation": [{"input": "q"}, {"input": "r"}]}, "xtuner", "f:1")


# --- chat ---------------------------------------------------------------------------------------


def test_chat_final_assistant_message_is_the_reference():
    records = good(prompts("chat.jsonl"))
    assert records[0].messages == [
        Message("system", "You are a helpful assistant."),
        Message("user", "What is the capital of France?"),
    ]
    assert records[0].reference == "Paris."
    assert [m.role for m in records[1].messages] == ["user", "assistant", "user"]
    assert records[1].reference is None
    assert records[2].metadata == {"split": "eval"}


# --- detection and bad records ------------------------------------------------------------------


def test_mixed_formats_in_one_file_are_detected_per_record():
    records = good(prompts("mixed_prompts.jsonl"))
    assert [
        detect_prompt_format(json.loads(line)) for line in (DATA / "mixed_prompts.jsonl").open(encoding="utf-8")
    ] == ["sft", "xtuner", "chat"]
    assert [r.reference for r in records] == ["巴黎的必去景点包括埃菲尔铁塔……", "42", "chat"]
    assert records[1].messages[0] == Message("system", "You are a math tutor.")


def test_each_kind_of_bad_prompt_record_is_reported_at_its_line():
    f = data("bad_prompts.jsonl")
    records = prompts("bad_prompts.jsonl")
    assert bad_lines(records) == [
        f'{f}:2: field "prompt" must be a string, got int',
        f'{f}:3: field "prompt" is empty',
        f'{f}:4: field "completion" must be a string, got list',
        f'{f}:5: field "metadata" must be an object, got string',
        f"{f}:6: conversation[1].input is missing",
        f"{f}:7: conversation[0].output is missing",
        f'{f}:8: field "conversation" is empty',
        f'{f}:9: field "conversation" must be a list, got string',
        f"{f}:10: conversation[1].system: a system prompt is only allowed at the top level or in the first turn",
        f'{f}:11: two different system prompts: field "system" and conversation[0].system',
        f"{f}:12: conversation[0] must be a JSON object, got string",
        f'{f}:13: messages[2].role must be one of system/user/assistant, got "tool"',
        f"{f}:14: messages[0].content is missing",
        f"{f}:15: messages[2].role must be user, got assistant (turns alternate user/assistant, starting with user)",
        f'{f}:16: field "messages" has no user message',
        f"{f}:17: messages[1].role is system: a system message is only allowed first",
        f"{f}:18: {UNKNOWN_PROMPT_SHAPE}",
        f"{f}:19: record must be a JSON object, got list",
        f"{f}:20: invalid JSON: Unterminated string starting at (column 12)",
        f"{f}:23: messages[0].content must be a string, got null",
        f"{f}:24: messages[0].content is empty",
    ]
    assert [r.source for r in records if isinstance(r, PromptRecord)] == [f"{f}:1", f"{f}:22"]


def test_a_named_format_reports_the_fields_it_needs():
    chat_record = {"messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(FormatError, match='^missing field "prompt"$'):
        parse_prompt(chat_record, "sft", "f:1")
    with pytest.raises(FormatError, match='^missing field "conversation"$'):
        parse_prompt(chat_record, "xtuner", "f:1")
    with pytest.raises(FormatError, match='^field "prompt" must be a string, got null$'):
        parse_prompt({"prompt": None}, "sft", "f:1")


def test_unknown_format_name_is_a_usage_error():
    with pytest.raises(ValueError, match="unknown prompt format 'alpaca'"):
        read_prompts(data("sft_seed.jsonl"), "alpaca")


# --- prompt_id ----------------------------------------------------------------------------------


def test_prompt_id_is_stable_and_distinct():
    first = [r.prompt_id for r in prompts("sft_seed.jsonl")]
    assert first == [r.prompt_id for r in prompts("sft_seed.jsonl")]
    assert len(set(first)) == len(first)
    assert all(len(i) == 16 and int(i, 16) >= 0 for i in first)


def test_prompt_id_is_the_hash_of_the_canonical_record():
    record = {"prompt": "什么?", "completion": "x", "metadata": {"b": 1, "a": 2}}
    reordered = {"metadata": {"a": 2, "b": 1}, "completion": "x", "prompt": "什么?"}
    canonical = '{"completion":"x","metadata":{"a":2,"b":1},"prompt":"什么?"}'
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert record_id(record) == record_id(reordered) == expected
    assert parse_prompt(record, "auto", "f:1").prompt_id == expected
    assert record_id({**record, "completion": "y"}) != expected


# --- data sources: the reader chosen by the path ------------------------------------------------


def test_the_json_source_reads_json_jsonl_and_any_suffix_no_other_source_claims(tmp_path):
    from contracts.data_sources import DATA_SOURCES, DEFAULT, data_source, read_data

    assert DATA_SOURCES.names()[0] == DEFAULT == "json"
    assert [data_source(p) for p in ("a.jsonl", "a.JSON", "a.txt", "no_suffix", "s3://b/k.jsonl")] == ["json"] * 5
    path = tmp_path / "prompts.data"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": "b"}\n]\n')
    assert list(read_data(path)) == [(2, {"prompt": "a"}), (3, {"prompt": "b"})]
    assert [r.reference for r in read_prompts(path)] == [None, None]


def test_a_new_format_is_one_entry_chosen_by_its_suffix(tmp_path, monkeypatch):
    from contracts.data_sources import DATA_SOURCES, data_source

    def tsv_records(path, params):  # a toy reader: one prompt per line
        with open(path) as f:
            yield from ((n, {"prompt": line.rstrip("\n")}) for n, line in enumerate(f, start=1))

    monkeypatch.setattr(DATA_SOURCES, "_entries", dict(DATA_SOURCES._entries))  # the test's entry goes with it
    DATA_SOURCES.register("tsv", suffixes=(".tsv",))(tsv_records)
    assert data_source("p.TSV") == "tsv" and data_source("p.jsonl") == "json"
    path = tmp_path / "p.tsv"
    path.write_text("1+1=\n2+2=\n")
    assert [(r.messages[0].content, r.source) for r in read_prompts(path)] == [
        ("1+1=", f"{path}:1"),
        ("2+2=", f"{path}:2"),
    ]
