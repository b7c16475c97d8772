"""Preference pairs for DPO: records -> tokenized (chosen, rejected) pairs, and the DPO loss of a microbatch.

Records are TRL's preference format, one JSON object per line (or per `hf:` row):

    {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}                                  plain text
    {"prompt": [{"role": "user", "content": "2+2?"}],                                   chat, explicit prompt
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}
    {"chosen": [...whole conversation...], "rejected": [...]}                            implicit prompt

Every record is checked before training starts; a bad one raises DataError("file:line: reason"),
as for SFT data (node.data). The implicit prompt is split off by TRL's own `maybe_extract_prompt`
(the longest common prefix), and conversational records are recognised by TRL's `is_conversational`.

Tokenisation follows TRL's DPOTrainer (trl 1.16, `_prepare_dataset` and its collator): plain text
gets the eos token appended to chosen and rejected (unless it ends them already) and is tokenized
with the tokenizer's own special tokens (`tokenizer(text)`); chat records are rendered and
tokenized by the chat template, the prompt with the generation prompt. The prompt, prompt+chosen
and prompt+rejected are tokenized whole, and the completion starts where the prompt's tokens and
both full sequences stop agreeing (TRL's `common_prefix_length`). Each sequence is then cut to
max_length from the end (TRL's default truncation, "keep_start"); a pair left without a completion
token on either side is refused (TRL drops it silently).

Loss (`dpo_loss`), per pair, with logratio = log pi(y|x) - log pi_ref(y|x) summed over completion
tokens and delta = logratio(chosen) - logratio(rejected), as TRL computes them:
    sigmoid: -log sigmoid(beta * delta)          (DPO)
    hinge:   max(0, 1 - beta * delta)            (SLiC)
    ipo:     (delta_avg - 1 / (2 beta))^2        (IPO; log-ratios averaged over each completion's tokens)
The reference is the base with the adapter switched off (PEFT's `disable_adapter`), or the swarm's
start adapter (node.trainer keeps its bits); no second model is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.data import IGNORE, ROLES, DataError, Example, iter_records

PAIR_KEYS = ("prompt", "chosen", "rejected")


@dataclass
class PairExample:
    """One preference pair: chosen and rejected, each a whole sequence with its completion labelled."""

    chosen: Example
    rejected: Example
    num_tokens: int = field(init=False)  # completion tokens of both sides (what a record counts)
    ref: tuple[float, float] | None = field(default=None, compare=False)  # reference log-probs, once computed

    def __post_init__(self) -> None:
        self.num_tokens = self.chosen.num_tokens + self.rejected.num_tokens


# ---------------------------------------------------------------- records


def _check_messages(where: str, key: str, msgs: Any, *, ends_with_assistant: bool) -> None:
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: {key!r} must be a non-empty string or a non-empty list of messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise DataError(f"{where}: {key}[{i}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise DataError(f"{where}: {key}[{i}] has unknown role {m['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(m["content"], str):
            raise DataError(f"{where}: {key}[{i}].content must be a string, got {type(m['content']).__name__}")
    if ends_with_assistant and (msgs[-1]["role"] != "assistant" or not msgs[-1]["content"]):
        raise DataError(f"{where}: {key!r} must end with a non-empty assistant message (the answer being rated)")


def check_preference_record(where: str, record: dict[str, Any]) -> dict[str, Any]:
    """Validate one preference record's shape; return it. Raises DataError naming `where`."""
    if "chosen" not in record and "rejected" not in record:
        raise DataError(f"{where}: expected TRL's preference keys 'chosen' and 'rejected' (and optionally 'prompt'), "
                        f"got {sorted(record)}; a swarm with objective 'dpo' trains on preference pairs")
    for key in ("chosen", "rejected"):
        if key not in record:
            raise DataError(f"{where}: missing key {key!r}")
    chat = isinstance(record["chosen"], list)
    for key in PAIR_KEYS:
        if key not in record:
            continue
        value = record[key]
        if chat:
            _check_messages(where, key, value, ends_with_assistant=key != "prompt")
        elif not isinstance(value, str):
            raise DataError(f"{where}: {key!r} must be a string like 'chosen', got {type(value).__name__} "
                            "(use text for prompt, chosen and rejected, or message lists for all three)")
        elif key != "prompt" and not value:
            raise DataError(f"{where}: empty {key!r}, nothing to rate")
    if chat and "prompt" in record and record["prompt"][-1]["role"] not in ("user", "tool", "system"):
        raise DataError(f"{where}: 'prompt' must end with a user, tool or system message (the answers follow it)")
    if record["chosen"] == record["rejected"]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are the same; a pair must prefer one answer over another")
    return record


def load_preference_records(source: str | Path) -> list[dict[str, Any]]:
    """All records of a source, validated (no tokenizer needed)."""
    return [check_preference_record(where, rec) for where, rec in iter_records(source)]


# ---------------------------------------------------------------- tokenizing


def _ids(tokenizer, value, **chat_kwargs) -> list[int]:
    """Token ids of a text (with the tokenizer's special tokens) or of a conversation (chat template),
    as TRL's `_tokenize` makes them."""
    if isinstance(value, list):
        return list(tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **chat_kwargs)["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def tokenize_preference(where: str, record: dict[str, Any], tokenizer, *, max_length: int) -> PairExample:
    """One validated record -> PairExample (each side truncated to max_length from its end)."""
    from trl.data_utils import common_prefix_length, is_conversational, maybe_extract_prompt

    ex = maybe_extract_prompt({k: record[k] for k in PAIR_KEYS if k in record})
    prompt, chosen, rejected = ex.get("prompt", ""), ex["chosen"], ex["rejected"]
    if is_conversational(ex):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: chat messages need a tokenizer with a chat_template")
        if not prompt:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no leading messages: no prompt to answer "
                            "(give 'prompt' explicitly, or start both with the same user turn)")
        prompt_ids = _ids(tokenizer, prompt, add_generation_prompt=True)
        sides = [_ids(tokenizer, prompt + chosen), _ids(tokenizer, prompt + rejected)]
    else:
        eos = tokenizer.eos_token or ""
        chosen, rejected = (s if s.endswith(eos) else s + eos for s in (chosen, rejected))
        prompt_ids = _ids(tokenizer, prompt)
        sides = [_ids(tokenizer, prompt + chosen), _ids(tokenizer, prompt + rejected)]
    start = min(common_prefix_length(prompt_ids, s) for s in sides)
    out = []
    for name, ids in zip(("chosen", "rejected"), sides):
        labels = [IGNORE] * start + ids[start:]
        ids, labels = ids[:max_length], labels[:max_length]
        example = Example(ids, labels)
        if example.num_tokens == 0:
            raise DataError(f"{where}: no {name} token left after truncation to max_length={max_length} (the prompt "
                            f"takes {start} tokens); raise max_length or shorten the prompt")
        out.append(example)
    return PairExample(*out)


def load_pairs(source: str | Path, tokenizer, *, max_length: int) -> list[PairExample]:
    """Read, validate and tokenize a whole preference source. Raises DataError before training."""
    pairs = [tokenize_preference(where, check_preference_record(where, rec), tokenizer, max_length=max_length)
             for where, rec in iter_records(source)]
    if not pairs:
        raise DataError(f"{source}: no preference pairs")
    return pairs


def collate_pairs(pairs: list[PairExample], pad_id: int) -> dict[str, Any]:
    """One batch of 2B rows, chosen sides first, then rejected (TRL's concatenated layout)."""
    from node.data import collate

    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)


# ---------------------------------------------------------------- loss


def sequence_logps(model, batch: dict):
    """(sum of log-probs over each row's completion tokens, completion tokens per row)."""
    import torch

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = out.logits[:, :-1, :].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE
    picked = torch.gather(logits.log_softmax(-1), 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1), mask.sum(-1)


def dpo_loss(logps, ref_logps, counts, *, beta: float, loss: str):
    """Per-pair loss for rows laid out as collate_pairs makes them (chosen rows, then rejected)."""
    import torch.nn.functional as F

    ratios = logps - ref_logps
    chosen, rejected = ratios.chunk(2)
    if loss == "sigmoid":
        return -F.logsigmoid(beta * (chosen - rejected))
    if loss == "hinge":
        return (1 - beta * (chosen - rejected)).clamp(min=0)
    if loss == "ipo":
        n_chosen, n_rejected = counts.clamp(min=1).chunk(2)
        return (chosen / n_chosen - rejected / n_rejected - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss!r}")


def preference_accuracy(model, pairs: list[PairExample], pad_id: int, *, microbatch_size: int = 32) -> dict:
    """Held-out figures of a policy: `accuracy`, the share of pairs whose chosen answer it gives a higher
    log-probability than the rejected one (log pi(chosen|x) > log pi(rejected|x), i.e. chosen reward > rejected
    reward for any reference that does not prefer the rejected one by itself), and `margin`, the mean of
    log pi(chosen|x) - log pi(rejected|x) in nats."""
    import torch

    was_training = model.training
    model.eval()
    wins, margin = 0, 0.0
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in range(0, len(pairs), microbatch_size):
            chunk = pairs[i:i + microbatch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id).items()}
            chosen, rejected = sequence_logps(model, batch)[0].chunk(2)
            wins += int((chosen > rejected).sum())
            margin += float((chosen - rejected).sum())
    model.train(was_training)
    return {"accuracy": wins / len(pairs), "margin": margin / len(pairs), "pairs": len(pairs)}
