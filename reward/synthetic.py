"""Synthetic preference data: `a+b=` prompts where the correct sum is the preferred response.

Each record has one correct response and wrong ones a small distance away from the sum (never
negative), so a reward model has to add to tell them apart. The prompts are the same `a+b=` text
as `builtin:arith`, so a model trained on them scores that job's completions. Formats:

- pairwise: the correct and one wrong response, the correct one at a random side (`label` 0 or 1);
- multi:    3 or 4 distinct responses, the correct one at a random index (`label`);
- scored:   the correct and one wrong response with scores that fall with the distance from the
            sum, `10 - 2 * |response - sum| - u` with u uniform in [0, 1), so the correct one
            always scores highest and a farther miss lower.

    python -m reward.synthetic --format pairwise --count 2000 --out prefs.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from reward.preferences import PREFERENCE_FORMATS

MAX_DISTANCE = 3  # how far a wrong response may be from the sum


def preference_records(fmt: str, count: int, *, max_operand: int = 9, seed: int = 0) -> Iterator[dict]:
    """`count` records of format `fmt`; the same arguments always give the same records."""
    if fmt not in PREFERENCE_FORMATS:
        raise ValueError(f"unknown preference format {fmt!r}; expected one of {', '.join(PREFERENCE_FORMATS)}")
    rng = random.Random(seed)
    make = {"pairwise": _pairwise, "multi": _multi, "scored": _scored}[fmt]
    for _ in range(count):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        yield make(rng, f"{a}+{b}=", a + b)


def wrong_answers(rng: random.Random, total: int, count: int) -> list[int]:
    """`count` distinct non-negative numbers within MAX_DISTANCE of `total`, none equal to it."""
    candidates = [total + d for d in range(-MAX_DISTANCE, MAX_DISTANCE + 1) if d and total + d >= 0]
    return rng.sample(candidates, count)


def _pairwise(rng: random.Random, prompt: str, total: int) -> dict:
    wrong = str(wrong_answers(rng, total, 1)[0])
    label = rng.randint(0, 1)
    a, b = (str(total), wrong) if label == 0 else (wrong, str(total))
    return {"prompt": prompt, "response_a": a, "response_b": b, "label": label}


def _multi(rng: random.Random, prompt: str, total: int) -> dict:
    responses = [str(n) for n in wrong_answers(rng, total, rng.randint(2, 3))]
    label = rng.randint(0, len(responses))
    responses.insert(label, str(total))
    return {"prompt": prompt, "responses": responses, "label": label}


def _scored(rng: random.Random, prompt: str, total: int) -> dict:
    answers = [total, wrong_answers(rng, total, 1)[0]]
    rng.shuffle(answers)
    scores = [round(10 - 2 * abs(n - total) - rng.random(), 2) for n in answers]
    return {
        "prompt": prompt,
        "response_a": str(answers[0]),
        "response_b": str(answers[1]),
        "score_a": scores[0],
        "score_b": scores[1],
    }


def write_jsonl(records: Iterator[dict], path: Path) -> int:
    """Write one JSON object per line; returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reward.synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--format", required=True, choices=PREFERENCE_FORMATS)
    parser.add_argument("--count", type=int, required=True, help="number of records")
    parser.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    parser.add_argument("--max-operand", type=int, default=9, help="largest operand (default 9)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.count < 1 or args.max_operand < 0:
        parser.error("--count must be >= 1 and --max-operand >= 0")
    n = write_jsonl(preference_records(args.format, args.count, max_operand=args.max_operand, seed=args.seed), args.out)
    print(f"wrote {n} {args.format} records to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
