"""Training data: records -> tokenized examples, and which examples a node trains.

Sources (`load_examples(source, tokenizer, max_length=...)`):
  * a local JSONL file, one record per line, either
      {"prompt": "...", "completion": "..."}            (loss on the completion)
      {"messages": [{"role": "user", "content": "..."},  (chat template; loss on
                    {"role": "assistant", ...}, ...]}     assistant turns only)
  * `hf:<dataset id>[:split]` — a Hugging Face dataset through `datasets`
    (split defaults to "train"), or a local folder written by
    `Dataset.save_to_disk` / holding data files. Rows use the same two shapes.

Every record is validated before any training starts; a bad one raises
`DataError("file:line: reason")`. A JSONL line (and an `hf:` row, as canonical JSON)
may hold at most MAX_RECORD_BYTES (1 MiB); a longer one is refused in bounded memory,
without reading the rest of it.

Token layout. prompt/completion: [bos] + prompt + completion + [eos], where
prompt and completion are tokenized separately (no merge across the seam).
Chat: the template's text, tokenized once; the characters of each assistant
turn — from the end of its generation prompt to the end of the turn,
end-of-turn token included — are found by rendering the conversation prefix by
prefix, and the tokens whose characters fall there are trained.
`labels[i] == input_ids[i]` on trained tokens and -100 elsewhere (the model
shifts them), so `num_tokens` counts trained tokens at positions >= 1.

Truncation to max_length: tokens before the first trained token (the prompt)
are dropped from the left first, keeping a leading bos; if the example is
still too long, its end is cut. So completions survive whenever they fit.

Packing (`packing=True`): examples, in order, are concatenated into windows of
at most max_length tokens without splitting any example. Attention is plain
causal over the whole window, so a token CAN attend to earlier examples of the
same window (no block-diagonal mask, positions keep counting); the first
label of every packed example is masked, so no loss term predicts across a
boundary.

Assignment (`assign_examples`, `round_batch_indices`, `split_range`): see those functions.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")
DATA_COMMIT_TAG = b"swarmtune/data/v1\0"
HF_DIGEST_TAG = b"swarmtune/hf-rows/v1\0"
# Most bytes one record may take: a JSONL line without its newline, or an hf: row as canonical JSON.
# Far above any sane example (max_length truncates to a few thousand tokens anyway); it bounds the
# memory and time one line can cost before anything is tokenized.
MAX_RECORD_BYTES = 1 << 20


BUILTIN_DATA = "builtin:task"  # the demo's parity task, shipped in node/builtin
BUILTIN_PREFS = "builtin:prefs"  # the same task as preference pairs (DPO), shipped in node/builtin


def builtin_data_path(split: str = "train", task: str = "task") -> Path:
    """A split (train, eval) of a built-in task: "task" (SFT) or "prefs" (preference pairs)."""
    return Path(__file__).resolve().parent / "builtin" / f"{task}_{split}.jsonl"


def resolve_data(spec: str) -> str:
    """A manifest's data source as a path or `hf:` id (the built-in tasks resolved to their files)."""
    if spec in (BUILTIN_DATA, BUILTIN_PREFS):
        return str(builtin_data_path("train", spec.partition(":")[2]))
    return spec


class DataError(ValueError):
    """A source that cannot be trained on; the message starts with 'file:line:'."""


@dataclass
class Example:
    """One training sequence (or one packed window of several)."""

    input_ids: list[int]
    labels: list[int]  # input_ids where trained, -100 elsewhere; same length
    num_tokens: int = field(init=False)  # trained tokens (labels at positions >= 1)

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.input_ids):
            raise ValueError("labels and input_ids differ in length")
        self.num_tokens = sum(1 for lab in self.labels[1:] if lab != IGNORE)


# ---------------------------------------------------------------- records


def _is_hf(source: str) -> bool:
    return source.startswith("hf:") or Path(source).is_dir()


def _hf_parts(source: str) -> tuple[str, str]:
    """'hf:<id>[:split]' or a local folder -> (id or folder, split); split defaults to train."""
    if not source.startswith("hf:"):
        return source, "train"
    name, sep, split = source[3:].rpartition(":")
    return (name, split or "train") if sep else (split, "train")


def _load_hf(source: str):
    import datasets

    name, split = _hf_parts(source)
    local = Path(name)
    if local.is_dir() and ((local / "state.json").exists() or (local / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(local))
    else:
        try:
            ds = datasets.load_dataset(name, split=split)
        except Exception as e:  # datasets raises many types; the user needs the source named
            raise DataError(f"{source}: cannot load dataset {name!r} split {split!r} "
                            f"({type(e).__name__}: {e})") from e
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{source}: no split {split!r} (has {sorted(ds)})")
        ds = ds[split]
    return ds


def _canonical_row(where: str, row: dict[str, Any]) -> bytes:
    """A row as canonical JSON (sorted keys, no whitespace, ASCII): the bytes the `hf:` digest hashes."""
    try:
        return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=True,
                          default=_json_value).encode("ascii")
    except TypeError as e:
        raise DataError(f"{where}: {e}") from None


def _json_value(value: Any) -> Any:
    """JSON for the non-JSON values a `datasets` row can hold (bytes, dates, decimals)."""
    if isinstance(value, (bytes, bytearray)):
        return {"$bytes": bytes(value).hex()}
    if hasattr(value, "isoformat"):
        return {"$time": value.isoformat()}
    if type(value).__name__ == "Decimal":
        return {"$decimal": str(value)}
    raise TypeError(f"a value of type {type(value).__name__} has no canonical encoding; convert the column to "
                    "strings or numbers")


def _iter_hf_rows(source: str) -> Iterator[tuple[str, dict[str, Any], bytes]]:
    """(location, row, canonical bytes) for every row of an `hf:` source, in order."""
    ds = _load_hf(source)
    i = 0
    for batch in ds.iter(batch_size=1000):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            where = f"{source} row {i}"
            row = dict(zip(columns, values))
            raw = _canonical_row(where, row)
            if len(raw) > MAX_RECORD_BYTES:
                raise DataError(f"{where}: the row is {len(raw)} bytes as JSON, over the limit of "
                                f"{MAX_RECORD_BYTES} bytes (node.data.MAX_RECORD_BYTES); split or shorten it")
            yield where, row, raw
            i += 1


def _read_line(fh, where: str) -> bytes | None:
    """One line of a JSONL file without its line ending, reading at most MAX_RECORD_BYTES + 1 bytes
    of it (a longer line is refused before the rest of it is read); None at the end of the file."""
    raw = fh.readline(MAX_RECORD_BYTES + 2)  # the content, then "\r\n" at most
    if not raw:
        return None
    body = raw[:-1] if raw.endswith(b"\n") else raw
    body = body[:-1] if body.endswith(b"\r") else body
    if len(body) > MAX_RECORD_BYTES:  # also when readline stopped at its limit: the line goes on
        raise DataError(f"{where}: line longer than {MAX_RECORD_BYTES} bytes (node.data.MAX_RECORD_BYTES, 1 MiB); "
                        "one record per line, split or shorten it")
    return body


def iter_records(source: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield (location, record) for every record of a source; location is 'file:line'."""
    source = str(source)
    if _is_hf(source):
        for where, row, _ in _iter_hf_rows(source):
            yield where, row
        return
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such data file (pass a .jsonl path or hf:<dataset id>)")
    with open(path, "rb") as fh:
        lineno = 0
        while (raw := _read_line(fh, f"{path}:{lineno + 1}")) is not None:
            lineno += 1
            where = f"{path}:{lineno}"
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
            if not text.strip():
                continue  # blank lines (e.g. a trailing newline) carry nothing
            try:
                record = json.loads(text)
            except json.JSONDecodeError as e:
                # json's messages for a position that starts a token end in "at" ("...string starting at")
                at = " " if e.msg.endswith(" at") else " at "
                raise DataError(f"{where}: invalid JSON ({e.msg}{at}column {e.colno})") from None
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            yield where, record


def check_record(where: str, record: dict[str, Any]) -> dict[str, Any]:
    """Validate one record's shape; return it. Raises DataError naming `where`."""
    if "messages" in record:
        msgs = record["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        n_assistant = 0
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or "role" not in m or "content" not in m:
                raise DataError(f"{where}: messages[{i}] must be an object with 'role' and 'content'")
            if m["role"] not in ROLES:
                raise DataError(f"{where}: messages[{i}] has unknown role {m['role']!r} "
                                f"(expected one of {', '.join(ROLES)})")
            if not isinstance(m["content"], str):
                raise DataError(f"{where}: messages[{i}].content must be a string, "
                                f"got {type(m['content']).__name__}")
            if m["role"] == "assistant":
                if not m["content"]:
                    raise DataError(f"{where}: messages[{i}] is an empty assistant turn")
                n_assistant += 1
        if n_assistant == 0:
            raise DataError(f"{where}: no assistant message, nothing to train on")
        return record
    if "prompt" in record or "completion" in record:
        for key in ("prompt", "completion"):
            if key not in record:
                raise DataError(f"{where}: missing key {key!r}")
            if not isinstance(record[key], str):
                raise DataError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        if not record["completion"]:
            raise DataError(f"{where}: empty completion, nothing to train on")
        return record
    raise DataError(f"{where}: expected keys 'prompt' and 'completion', or 'messages' "
                    f"(got {sorted(record)})")


def load_records(source: str | Path) -> list[dict[str, Any]]:
    """All records of a source, validated (no tokenizer needed)."""
    return [check_record(where, rec) for where, rec in iter_records(source)]


# ---------------------------------------------------------------- tokenizing


def _encode(tokenizer, text: str, offsets: bool = False):
    """Token ids (and character offsets) of `text`, no special tokens added.

    Goes to the Rust tokenizer directly when there is one: the transformers
    wrapper costs more than the tokenizing on short texts.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        enc = backend.encode(text, add_special_tokens=False)
        return (list(enc.ids), list(enc.offsets)) if offsets else list(enc.ids)
    if offsets:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), list(enc["offset_mapping"])
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def prompt_text(tokenizer, record: dict[str, Any]) -> tuple[str, str]:
    """(text to generate from, expected answer) for a record, for evaluation.

    Chat: every message before the last assistant turn, rendered with the
    generation prompt; prompt/completion: the prompt (after bos, if any).
    """
    if "messages" in record:
        msgs = record["messages"]
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return _render(tokenizer, msgs[:last], True), msgs[last]["content"]
    bos = tokenizer.bos_token or ""
    return bos + record["prompt"], record["completion"]


_PROBE = "\x00swarmtune-probe\x00"


def _tokenize_chat(where: str, tokenizer, messages) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat 'messages' need a tokenizer with a chat_template")
    full = _render(tokenizer, messages, False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i:
            head = _render(tokenizer, messages[:i], True)
        else:  # templates refuse an empty conversation: find where content starts instead
            probe = _render(tokenizer, [{"role": "assistant", "content": _PROBE}], False)
            head = probe[:probe.find(_PROBE)] if _PROBE in probe else ""
        upto = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1], False)
        if not full.startswith(upto) or not upto.startswith(head) or len(head) == len(upto):
            raise DataError(f"{where}: the chat template does not render conversations "
                            "prefix by prefix, cannot locate assistant turns")
        spans.append((len(head), len(upto)))
    ids, offsets = _encode(tokenizer, full, offsets=True)
    labels = [IGNORE] * len(ids)
    for t, (a, b) in enumerate(offsets):
        if b > a and any(lo <= a and b <= hi for lo, hi in spans):
            labels[t] = ids[t]
        elif b > a and any(lo < b and a < hi for lo, hi in spans):
            labels[t] = ids[t]  # a token straddling a turn's edge: train it
    return ids, labels


def _tokenize_pair(tokenizer, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    head = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + _encode(tokenizer, prompt)
    tail = _encode(tokenizer, completion)
    if tokenizer.eos_token_id is not None:
        tail.append(tokenizer.eos_token_id)
    return head + tail, [IGNORE] * len(head) + list(tail)


def _truncate(ids: list[int], labels: list[int], max_length: int, bos_id) -> tuple[list[int], list[int]]:
    if len(ids) <= max_length:
        return ids, labels
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(labels))
    keep_bos = 1 if ids and bos_id is not None and ids[0] == bos_id and first > 0 else 0
    excess = len(ids) - max_length
    drop = min(excess, first - keep_bos)  # prompt tokens, oldest first
    ids = ids[:keep_bos] + ids[keep_bos + drop:]
    labels = labels[:keep_bos] + labels[keep_bos + drop:]
    return ids[:max_length], labels[:max_length]


def tokenize_record(where: str, record: dict[str, Any], tokenizer, *, max_length: int) -> Example:
    """One validated record -> Example (truncated to max_length)."""
    if "messages" in record:
        ids, labels = _tokenize_chat(where, tokenizer, record["messages"])
    else:
        ids, labels = _tokenize_pair(tokenizer, record["prompt"], record["completion"])
    ids, labels = _truncate(ids, labels, max_length, tokenizer.bos_token_id)
    ex = Example(ids, labels)
    if ex.num_tokens == 0:
        raise DataError(f"{where}: no trainable tokens after truncation to max_length={max_length} "
                        f"(the example has {len(ids)} tokens kept; raise max_length)")
    return ex


def pack(examples: Iterable[Example], max_length: int) -> list[Example]:
    """Greedily concatenate whole examples, in order, into windows of <= max_length."""
    windows: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > max_length:
            windows.append(Example(ids, labels))
            ids, labels = [], []
        ids = ids + ex.input_ids
        labels = labels + [IGNORE] + ex.labels[1:]  # never predict across a boundary
    if ids:
        windows.append(Example(ids, labels))
    return windows


def load_examples(source: str | Path, tokenizer, *, max_length: int,
                  packing: bool = False) -> list[Example]:
    """Read, validate and tokenize a whole source. Raises DataError before training."""
    examples = [tokenize_record(where, check_record(where, rec), tokenizer, max_length=max_length)
                for where, rec in iter_records(source)]
    if not examples:
        raise DataError(f"{source}: no examples")
    return pack(examples, max_length) if packing else examples


def collate(examples: list[Example], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch: input_ids/attention_mask/labels as int64 tensors."""
    import torch

    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------- identity of data


def dataset_digest(source: str | Path) -> str:
    """sha256 hex of what a source holds.

    A local file: sha256 of its bytes. An `hf:` source (hub id or local folder): sha256 over
    b"swarmtune/hf-rows/v1\\0" then, for every row in order, its canonical JSON (sorted keys,
    separators "," ":", ASCII escapes, bytes as {"$bytes": hex}) and b"\\n". So it changes when
    any value of any row does, and not when the same rows are stored in other files or by
    another `datasets` version (its own `_fingerprint` is neither: it hashes how the data was made).
    """
    source = str(source)
    if _is_hf(source):
        h = hashlib.sha256(HF_DIGEST_TAG)
        for _, _, raw in _iter_hf_rows(source):
            h.update(raw + b"\n")
        return h.hexdigest()
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_commitment(indices: Iterable[int], digest: str) -> str:
    """sha256 hex committing to which examples (in order) of which dataset were used.

    Bytes: b"swarmtune/data/v1\\0" + digest (ASCII) + b"\\0" + u64 count + u64 per
    index, big-endian. The one encoding of this commitment in the project.
    """
    idx = [int(i) for i in indices]
    if any(i < 0 for i in idx):
        raise ValueError("example indices must be non-negative")
    h = hashlib.sha256(DATA_COMMIT_TAG + digest.encode("ascii") + b"\0")
    h.update(struct.pack(">Q", len(idx)))
    h.update(b"".join(struct.pack(">Q", i) for i in idx))
    return h.hexdigest()


# ---------------------------------------------------------------- assignment


@lru_cache(maxsize=8)
def _epoch_permutation(num_examples: int, swarm_id: str, epoch: int) -> tuple[int, ...]:
    """Fisher-Yates shuffle driven by sha256 in counter mode.

    Fully specified here (no library RNG whose stream could change between
    versions), so any verifier can recompute which examples a round used.
    Draw k: first 8 bytes of sha256(b"swarmtune/perm/v1\\0" + swarm_id + b"\\0" +
    u64 epoch + u64 k), big-endian, modulo (i + 1).
    """
    prefix = b"swarmtune/perm/v1\0" + swarm_id.encode() + b"\0" + struct.pack(">Q", epoch)
    perm = list(range(num_examples))
    for k, i in enumerate(range(num_examples - 1, 0, -1)):
        r = int.from_bytes(hashlib.sha256(prefix + struct.pack(">Q", k)).digest()[:8], "big")
        j = r % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return tuple(perm)


def round_batch_indices(num_examples: int, swarm_id: str, round: int, total: int) -> list[int]:
    """The whole swarm's global batch for `round`, in order (`total` examples).

    Epoch e is a permutation of all examples seeded by (swarm_id, e); a node passes its manifest's
    `order_key` (the swarm id, or `[data] shuffle_seed`). When
    total <= num_examples, an epoch holds num_examples // total rounds, round r
    takes the next `total` entries of its epoch's permutation, and the last
    num_examples % total entries of each epoch are skipped (each epoch
    reshuffles, so nothing is skipped for good). A round never straddles two
    epochs, so its examples are distinct. When total > num_examples the round
    walks whole consecutive permutations and repeats are unavoidable. `total`
    must be the same every round (the manifest's target batch).
    """
    if num_examples <= 0:
        raise ValueError("num_examples must be positive")
    if round < 0 or total < 0:
        raise ValueError("round and total must be non-negative")
    if total <= num_examples:
        per_epoch = num_examples // total if total else 1
        epoch, slot = divmod(round, per_epoch)
        perm = _epoch_permutation(num_examples, swarm_id, epoch)
        return list(perm[slot * total:(slot + 1) * total])
    out = []
    for pos in range(round * total, (round + 1) * total):
        epoch, off = divmod(pos, num_examples)
        out.append(_epoch_permutation(num_examples, swarm_id, epoch)[off])
    return out


def split_range(total: int, n: int, rank: int) -> tuple[int, int]:
    """[start, end) of member `rank`'s share when `total` samples are split among `n` members:
    the first `total % n` members take one more."""
    base, extra = divmod(total, n)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def assign_examples(num_examples: int, *, swarm_id: str, round: int, total: int, members: Iterable[str],
                    me: str) -> list[int]:
    """Example indices `me` trains in `round`: the node and any verifier both call this.

    The round's global batch is `round_batch_indices(..., total)`; the member at position k
    of sorted(set(members)) takes `split_range(total, len(members), k)` of it. Two nodes with
    the same members never share an example in a round (unless the round's batch is larger
    than the whole dataset).
    """
    view = sorted(set(members))
    if me not in view:
        raise ValueError(f"peer {me!r} is not in the peer list")
    a, b = split_range(total, len(view), view.index(me))
    return round_batch_indices(num_examples, swarm_id, round, total)[a:b]
