"""Generate the built-in task: node/builtin/task_train.jsonl and task_eval.jsonl.

    python scripts/make_builtin_data.py            # rewrites both files
    python scripts/make_builtin_data.py --check    # exits 1 if they differ from a fresh run

The task: "is this number even or odd?", asked in several phrasings, answered
with exactly "even" or "odd". A random-weight base answers neither; a LoRA
adapter learns to find the last digit and name its parity, which generalises
to numbers it never saw. Eval numbers are disjoint from train numbers. Chat
records ({"messages": [...]}) so the demo exercises the chat-template path.
Deterministic: a fixed seed, no dependence on anything but the Python stdlib.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "node" / "builtin"
SEED = 20261129
N_TRAIN, N_EVAL = 4000, 400

TEMPLATES = (
    "Is {n} even or odd?",
    "Is the number {n} odd or even?",
    "{n}: even or odd?",
    "Tell me whether {n} is even or odd.",
    "Even or odd: {n}",
    "Classify {n} as even or odd.",
)


def _number(rng: random.Random) -> int:
    digits = rng.randint(1, 6)  # lengths 1..6 equally likely
    return rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits)


def _record(rng: random.Random, n: int) -> dict:
    question = rng.choice(TEMPLATES).format(n=n)
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": "even" if n % 2 == 0 else "odd"}]}


def generate() -> tuple[list[str], list[str]]:
    rng = random.Random(SEED)
    numbers: list[int] = []
    seen: set[int] = set()
    while len(numbers) < N_TRAIN + N_EVAL:
        n = _number(rng)
        if n not in seen:
            seen.add(n)
            numbers.append(n)
    # Balance classes within each split: exactly half even, half odd.
    evens = [n for n in numbers if n % 2 == 0]
    odds = [n for n in numbers if n % 2 == 1]
    half = N_EVAL // 2
    eval_numbers = evens[:half] + odds[:half]
    train_numbers = evens[half:] + odds[half:]
    rng.shuffle(eval_numbers)
    rng.shuffle(train_numbers)
    train_numbers = train_numbers[:N_TRAIN]
    dump = lambda r: json.dumps(r, ensure_ascii=False, separators=(", ", ": "))  # noqa: E731
    train = [dump(_record(rng, n)) for n in train_numbers]
    evals = [dump(_record(rng, n)) for n in eval_numbers]
    return train, evals


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files")
    args = ap.parse_args()
    train, evals = generate()
    files = {OUT / "task_train.jsonl": train, OUT / "task_eval.jsonl": evals}
    if args.check:
        stale = [p for p, lines in files.items()
                 if not p.exists() or p.read_text() != "\n".join(lines) + "\n"]
        for p in stale:
            print(f"{p} is stale: run python scripts/make_builtin_data.py", file=sys.stderr)
        return 1 if stale else 0
    OUT.mkdir(parents=True, exist_ok=True)
    for p, lines in files.items():
        p.write_text("\n".join(lines) + "\n")
        print(f"wrote {p} ({len(lines)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
