"""Archive throughput: `ArchiveWriter` against raw Arrow IPC stream writes, the replay scan rate,
`rollout stats` and `rollout replay` on the result; prints JSON.

The records look like a PPO run's: every column filled, `--prompt-tokens` prompt ids and
`--response-tokens` response tokens with the six per-token float columns, samples in groups of 4 per
prompt, `--iterations` iterations. Token lists come from a small pool shared between records, which
keeps the process small without changing any conversion cost.

- `to_record_batch`: Python records -> Arrow batches, the part of archiving that is Python work.
- `raw_ipc_write`: `pyarrow.ipc.new_stream` writing those same batches, already converted.
- `archive_writer`: `ArchiveWriter.write` + `close` of the records (conversion, writes, flushes);
  `vs_raw` is its rows/s over the raw rows/s.
- `scan`: `iter_batches` over the written archive (memory-mapped, the file still in the page cache).
- `stats`: `rollout.offline.stats.compute_stats` on the whole archive.
- `replay`: `rollout.offline.replay.replay` with the run's settings on the first `--replay-rows` rows.

MB are file bytes / 1e6. Torch runs on one thread, as on the shared machines this is measured on.

    python benchmarks/archive_throughput.py [--rows 100000 --prompt-tokens 64 --response-tokens 128]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch

from contracts.schema import SCHEMA_VERSION, RolloutRecord, archive_schema, to_record_batch
from rollout.archive import ArchiveWriter, iter_batches

COMPONENTS = ("arithmetic", "length")
from rollout.offline.replay import replay
from rollout.offline.stats import compute_stats

BATCH_ROWS = 256
POOL = 64
METADATA = {
    "run_id": "bench",
    "gamma": "1.0",
    "lam": "0.95",
    "kl_coef": "0.05",
    "kl_estimator": "k1",
    "kl_target": "None",
    "temperature": "1.0",
    "model": "synthetic",
}


def make_records(
    rows: int, prompt_tokens: int, response_tokens: int, iterations: int, seed: int
) -> list[RolloutRecord]:
    rng = random.Random(seed)
    ids = [[rng.randrange(32_000) for _ in range(response_tokens)] for _ in range(POOL)]
    prompt_ids = [[rng.randrange(32_000) for _ in range(prompt_tokens)] for _ in range(POOL)]
    floats = [[rng.uniform(-3, 0) for _ in range(response_tokens)] for _ in range(POOL)]
    start = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    per_iteration = -(-rows // iterations)
    records = []
    for i in range(rows):
        k = i % POOL
        iteration = i // per_iteration
        records.append(
            RolloutRecord(
                run_id="bench",
                prompt_id=f"prompt-{i // 4:08d}",
                iteration=iteration,
                policy_version=iteration,
                sample_index=i % 4,
                prompt="word " * (prompt_tokens // 2),
                response="word " * (response_tokens // 2),
                prompt_ids=prompt_ids[k],
                response_ids=ids[k],
                response_logprobs=floats[k],
                ref_logprobs=floats[(k + 1) % POOL],
                values=floats[(k + 2) % POOL],
                kl=floats[(k + 6) % POOL],
                kl_coef=0.05,
                token_rewards=floats[(k + 3) % POOL],
                advantages=floats[(k + 4) % POOL],
                returns=floats[(k + 5) % POOL],
                reward=float(i % 2),
                reward_components={"arithmetic": float(i % 2), "length": 0.0},
                finish_reason="stop",
                worker=f"rollout-{i % 4}",
                generated_at=start + dt.timedelta(milliseconds=i),
            )
        )
    return records


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def convert(records: list[RolloutRecord]) -> list[pa.RecordBatch]:
    return [to_record_batch(records[i : i + BATCH_ROWS], COMPONENTS) for i in range(0, len(records), BATCH_ROWS)]


def write_raw(path: Path, batches: list[pa.RecordBatch], metadata: dict[str, str]) -> None:
    schema = archive_schema(COMPONENTS).with_metadata({"schema_version": str(SCHEMA_VERSION), **metadata})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for batch in batches:
            writer.write_batch(batch)


def write_archive(directory: Path, records: list[RolloutRecord]) -> None:
    with ArchiveWriter(directory, METADATA, COMPONENTS, batch_rows=BATCH_ROWS) as writer:
        writer.write(records)


def scan(directory: Path) -> int:
    return sum(batch.nbytes for batch in iter_batches(directory))


def rates(rows: int, seconds: float, nbytes: int | None = None) -> dict[str, float]:
    out = {"seconds": round(seconds, 3), "rows_per_s": round(rows / seconds)}
    if nbytes is not None:
        out["mb_per_s"] = round(nbytes / 1e6 / seconds, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--response-tokens", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--replay-rows", type=int, default=10_240)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    records = make_records(args.rows, args.prompt_tokens, args.response_tokens, args.iterations, args.seed)
    convert(records[:BATCH_ROWS])  # pyarrow's first list conversion pays a one-off set-up cost
    with tempfile.TemporaryDirectory(prefix="archive-bench-") as tmp:
        tmp = Path(tmp)
        convert_s, batches = timed(lambda: convert(records))
        raw_file = tmp / "raw.arrow"
        raw_s, _ = timed(lambda: write_raw(raw_file, batches, METADATA))
        archive = tmp / "run" / "rollouts"
        writer_s, _ = timed(lambda: write_archive(archive, records))
        archive_bytes = sum(p.stat().st_size for p in archive.glob("part-*.arrow"))
        raw_bytes = raw_file.stat().st_size
        scan_s, _ = timed(lambda: scan(archive))
        stats_s, _ = timed(lambda: compute_stats(archive))
        subset = tmp / "subset" / "rollouts"
        subset.mkdir(parents=True)
        replay_rows = min(args.replay_rows, args.rows)
        write_raw(subset / "part-00000.arrow", batches[: -(-replay_rows // BATCH_ROWS)], METADATA)
        replay_s, report = timed(lambda: replay(subset, tmp / "replayed"))

    writer = rates(args.rows, writer_s, archive_bytes)
    raw = rates(args.rows, raw_s, raw_bytes)
    writer["vs_raw"] = round(writer["rows_per_s"] / raw["rows_per_s"], 4)
    print(
        json.dumps(
            {
                "rows": args.rows,
                "prompt_tokens": args.prompt_tokens,
                "response_tokens": args.response_tokens,
                "archive_mb": round(archive_bytes / 1e6, 1),
                "to_record_batch": rates(args.rows, convert_s),
                "raw_ipc_write": raw,
                "archive_writer": writer,
                "scan": rates(args.rows, scan_s, archive_bytes),
                "stats": rates(args.rows, stats_s),
                "replay": {"rows": report.rows, **rates(report.rows, replay_s)},
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
