"""Reading prompt data in constant memory: large JSONL files and JSON arrays stream record by record."""

import itertools
import sys
import tracemalloc
from collections.abc import Callable, Iterator

from contracts.formats import (
    PromptRecord,
    read_prompts,
)

# --- streaming ----------------------------------------------------------------------------------


def consume_in_constant_memory(read: Callable[[], Iterator], size: int) -> int:
    """Read all records of `read()`, checking memory stays far below the file's `size`; return the count.

    Tracing every allocation of a 200k-record read takes too long, so the start (where reading
    the whole file, or all its records, at once would show) runs under tracemalloc, and the rest
    is checked for growth in the interpreter's count of allocated blocks.
    """
    tracemalloc.start()
    try:
        records = read()
        count = sum(1 for _ in itertools.islice(records, 10_000))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    blocks = sys.getallocatedblocks()
    count += sum(1 for _ in records)
    growth = sys.getallocatedblocks() - blocks
    assert peak < size / 10, f"peak {peak} bytes while reading a {size}-byte file"
    assert growth < 2_000, f"{growth} more memory blocks held after reading {count} records"
    return count


def test_a_large_jsonl_file_streams_in_constant_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for i in range(200_000):
            f.write(f'{{"prompt": "What is {i} + {i}? 请回答。", "completion": "{2 * i}"}}\n')

    def read() -> Iterator[PromptRecord]:
        return (r for r in read_prompts(path) if isinstance(r, PromptRecord))

    assert consume_in_constant_memory(read, path.stat().st_size) == 200_000


def test_a_large_array_streams_in_constant_memory(tmp_path):
    path = tmp_path / "big.json"
    with path.open("w", encoding="utf-8") as f:
        f.write("[\n")
        answer = "。这是一个较长的参考答案,让文件大一些" * 3
        f.write(
            ",\n".join(
                f'  {{"conversation": [{{"input": "{i} 加 {i}?", "output": "{2 * i}{answer}"}}]}}'
                for i in range(50_000)
            )
        )
        f.write("\n]\n")

    def read() -> Iterator[PromptRecord]:  # element i starts on line i + 2, after the "["
        return (r for i, r in enumerate(read_prompts(path)) if r.source == f"{path}:{i + 2}")

    assert consume_in_constant_memory(read, path.stat().st_size) == 50_000
