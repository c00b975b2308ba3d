"""Loading a large prompt table: how long until a job's prompts are ready, and what memory it takes.

    .venv/bin/python benchmarks/data_sources.py                  # 1,000,000 rows, Parquet and JSONL
    .venv/bin/python benchmarks/data_sources.py --rows 100000

Writes `--rows` short prompts (`{"prompt": "12+7=", "completion": "19", "data_source": ..., ...}`) once as
Parquet and once as JSONL, then for each, in a fresh process, takes the steps a job takes before its first
iteration: the prompts loaded as `rollout run` loads them (`job_prompts`, the tiny model's tokenizer), the
sampler made, and the first batch of `--batch` prompts drawn and rendered.

Each line: {"source", "rows", "ready_s" (load to the first batch served), "load_s", "first_batch_s",
"rss_growth_mb" (the process's resident memory after, less before), "arrow_mb" (the table's Arrow buffers,
for the Parquet), "rss_over_arrow"}; the JSONL line is the same rows read the row-wise way, beside it.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_sources(rows: int, out: Path) -> tuple[Path, Path]:
    """The same rows as Parquet and as JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(0)
    a = [rng.randint(0, 99) for _ in range(rows)]
    b = [rng.randint(0, 99) for _ in range(rows)]
    table = pa.table(
        {
            "prompt": [f"{x}+{y}=" for x, y in zip(a, b)],
            "completion": [str(x + y) for x, y in zip(a, b)],
            "data_source": ["arith"] * rows,
            "level": [rng.randint(1, 5) for _ in range(rows)],
        }
    )
    parquet, jsonl = out / "prompts.parquet", out / "prompts.jsonl"
    pq.write_table(table, parquet)
    pq.write_table(table.slice(0, 10), out / "warm_up.parquet")
    with open(jsonl, "w") as f:
        for record in table.to_pylist():
            f.write(json.dumps(record) + "\n")
    return parquet, jsonl


def measure(source: str, batch: int) -> dict:
    """In this process: the job's load of `source`, then its first batch, timed, with RSS before and after."""
    import io

    from transformers import AutoTokenizer

    from contracts.data_sources import read_table

    if Path(source).suffix == ".parquet":
        read_table(Path(source).with_name("warm_up.parquet"))  # the reader's code paged in first: not data
    from contracts.builtin_model import resolve_model_path
    from contracts.config import DataConfig
    from contracts.rendering import PromptRenderer
    from rollout.driver.prompts import PromptSampler, job_prompts

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    renderer = PromptRenderer(tokenizer, 1024)
    before = rss_mb()
    start = time.perf_counter()
    prompts = job_prompts(DataConfig(prompts=source), 0, renderer, log=io.StringIO())
    loaded = time.perf_counter()
    sampler = PromptSampler(size=len(prompts), seed=0)
    tasks = [prompts.task(i) for i in prompts.draw(sampler, batch)]
    served = time.perf_counter()
    assert len(tasks) == batch
    growth = rss_mb() - before
    figures = {
        "source": Path(source).suffix.lstrip("."),
        "rows": len(prompts),
        "ready_s": round(served - start, 3),
        "load_s": round(loaded - start, 3),
        "first_batch_s": round(served - loaded, 3),
        "rss_growth_mb": round(growth, 1),
    }
    if Path(source).suffix == ".parquet":
        import pyarrow.parquet as pq

        arrow_mb = pq.read_table(source).nbytes / 2**20
        figures |= {"arrow_mb": round(arrow_mb, 1), "rss_over_arrow": round(growth / arrow_mb, 2)}
    return figures


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=256, help="prompts in the first batch")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # the child process: one source
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.batch)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        print(f"writing {args.rows} rows as Parquet and JSONL...", file=sys.stderr)
        for source in write_sources(args.rows, Path(tmp)):
            child = [sys.executable, __file__, "--measure", str(source), "--batch", str(args.batch)]
            done = subprocess.run(child, capture_output=True, text=True, timeout=3600, check=False)
            if done.returncode:
                raise SystemExit(f"{source.name}: the measuring process failed:\n{done.stderr[-3000:]}")
            print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
