"""Generate the built-in tasks: node/builtin/task_{train,eval}.jsonl (SFT) and prefs_{train,eval}.jsonl (DPO).

    python scripts/make_builtin_data.py            # rewrites both files
    python scripts/make_builtin_data.py --check    # exits 1 if they differ from a fresh run
    python scripts/make_builtin_data.py --verify   # LoRA-train the tiny base, print JSON

--verify is the evidence that the task suits the tiny base: one process, PEFT
LoRA (rank 8, alpha 16, all-linear), AdamW lr 2e-3, batch 32, one thread;
held-out loss and exact-match accuracy before and after, with wall times.

The task: "is this number even or odd?", asked in several phrasings, answered
with exactly "even" or "odd". A random-weight base answers neither; a LoRA
adapter learns to find the last digit and name its parity, which generalises
to numbers it never saw. Eval numbers are disjoint from train numbers. Chat
records ({"messages": [...]}) so the demo exercises the chat-template path.
Deterministic: a fixed seed, no dependence on anything but the Python stdlib.

The preference task (`builtin:prefs`, for `objective = "dpo"`) asks the same question as TRL
preference pairs in chat form: {"prompt": [user turn], "chosen": [assistant: the right parity],
"rejected": [assistant: the wrong one]}. Its numbers are drawn apart from the SFT task's (own seed)
and its eval numbers are disjoint from its train numbers.
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
PREF_SEED = 20261202
N_PREF_TRAIN, N_PREF_EVAL = 2000, 200

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


# the preference task: the right parity either way; the chosen answer follows the case the prompt asks for
PREF_CASES = (
    ("upper", ("In capitals: {n}, even or odd?", "CAPS: is {n} even or odd?", "Upper case: {n} even or odd?")),
    ("lower", ("In lowercase: {n}, even or odd?", "no caps: is {n} even or odd?", "Lower case: {n} even or odd?")),
)


def _pair(rng: random.Random, n: int) -> dict:
    case, templates = rng.choice(PREF_CASES)
    answer = "even" if n % 2 == 0 else "odd"
    chosen, rejected = (answer.upper(), answer) if case == "upper" else (answer, answer.upper())
    return {"prompt": [{"role": "user", "content": rng.choice(templates).format(n=n)}],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def generate_prefs() -> tuple[list[str], list[str]]:
    rng = random.Random(PREF_SEED)
    train_numbers, eval_numbers = _split(rng, N_PREF_TRAIN, N_PREF_EVAL)
    dump = lambda r: json.dumps(r, ensure_ascii=False, separators=(", ", ": "))  # noqa: E731
    return [dump(_pair(rng, n)) for n in train_numbers], [dump(_pair(rng, n)) for n in eval_numbers]


def _split(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[int], list[int]]:
    numbers: list[int] = []
    seen: set[int] = set()
    while len(numbers) < n_train + n_eval:
        n = _number(rng)
        if n not in seen:
            seen.add(n)
            numbers.append(n)
    evens = [n for n in numbers if n % 2 == 0]
    odds = [n for n in numbers if n % 2 == 1]
    half = n_eval // 2
    eval_numbers = evens[:half] + odds[:half]
    train_numbers = evens[half:] + odds[half:]
    rng.shuffle(eval_numbers)
    rng.shuffle(train_numbers)
    return train_numbers[:n_train], eval_numbers


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


def verify(steps: int, lr: float, batch: int, eval_every: int) -> dict:
    import tempfile
    import time

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(OUT.parent.parent))
    from node.data import collate, load_examples, load_records
    from node.tiny import BUILTIN_EVAL, BUILTIN_TRAIN, build_tiny_base, evaluate

    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = build_tiny_base(Path(tempfile.mkdtemp()) / "tiny")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    train = load_examples(str(BUILTIN_TRAIN), tok, max_length=64)
    held_out = load_records(str(BUILTIN_EVAL))
    strip = lambda r: {k: r[k] for k in ("loss", "accuracy")} | {"samples": r["samples"][:3]}  # noqa: E731
    report = {"lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
              "lr": lr, "batch": batch, "steps": steps, "before": strip(evaluate(model, tok, held_out)),
              "curve": []}
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    order_rng, order = random.Random(0), []
    train_s, t0 = 0.0, time.perf_counter()
    for step in range(1, steps + 1):
        if len(order) < batch:
            order += order_rng.sample(range(len(train)), len(train))
        ids, order = order[:batch], order[batch:]
        t = time.perf_counter()
        loss = model(**collate([train[i] for i in ids], tok.pad_token_id)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        train_s += time.perf_counter() - t
        if step % eval_every == 0 or step == steps:
            r = evaluate(model, tok, held_out)
            report["curve"].append({"step": step, "train_loss": round(loss.item(), 4),
                                    "eval_loss": round(r["loss"], 4), "accuracy": r["accuracy"],
                                    "train_s": round(train_s, 1)})
            print(json.dumps(report["curve"][-1]), file=sys.stderr, flush=True)
    report["after"] = strip(r)
    report["train_seconds"] = round(train_s, 1)
    report["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files")
    ap.add_argument("--verify", action="store_true", help="LoRA-train the tiny base on the task")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-every", type=int, default=100)
    args = ap.parse_args()
    if args.verify:
        print(json.dumps(verify(args.steps, args.lr, args.batch, args.eval_every), indent=2))
        return 0
    train, evals = generate()
    pref_train, pref_evals = generate_prefs()
    files = {OUT / "task_train.jsonl": train, OUT / "task_eval.jsonl": evals,
             OUT / "prefs_train.jsonl": pref_train, OUT / "prefs_eval.jsonl": pref_evals}
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
