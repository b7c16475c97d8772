"""Data: masking, truncation, packing, errors with file:line, assignment, digests."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from node.data import (IGNORE, DataError, Example, assign_examples, split_range, collate, data_commitment,
                       dataset_digest, load_examples, load_records, pack, round_batch_indices)
from node.tiny import BUILTIN_EVAL, BUILTIN_TRAIN, build_tokenizer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def write_jsonl(path: Path, records) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def trained_text(tok, ex: Example) -> str:
    return tok.decode([t for t in ex.labels if t != IGNORE])


# ---------------------------------------------------------------- masking


def test_prompt_completion_trains_only_completion(tok, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    (ex,) = load_examples(str(src), tok, max_length=64)
    assert tok.decode(ex.input_ids) == "<s>Q: 2+2?\nA: 4</s>"
    assert trained_text(tok, ex) == " 4</s>"
    n_prompt = 1 + len("Q: 2+2?\nA:")
    assert ex.labels[:n_prompt] == [IGNORE] * n_prompt
    assert ex.labels[n_prompt:] == ex.input_ids[n_prompt:]
    assert ex.num_tokens == 3  # " ", "4", eos


def test_chat_trains_only_assistant_turns(tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Ciao"}]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    (ex,) = load_examples(str(src), tok, max_length=128)
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(msgs, tokenize=False)
    spans, cur = [], []
    for t, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            spans.append(tok.decode(cur))
            cur = []
    if cur:
        spans.append(tok.decode(cur))
    assert spans == ["Hello</s>", "Ciao</s>"]
    assert ex.num_tokens == len("Hello") + len("Ciao") + 2


def test_chat_starting_with_assistant_trains_its_content_not_the_header(tok, tmp_path):
    msgs = [{"role": "assistant", "content": "Hi, ask me."}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"}]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    (ex,) = load_examples(str(src), tok, max_length=128)
    assert trained_text(tok, ex) == "Hi, ask me.</s>A</s>"


def test_chat_masking_with_multibyte_text(tok, tmp_path):
    msgs = [{"role": "user", "content": "Grüße ☃?"}, {"role": "assistant", "content": "Schön ☃"}]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    (ex,) = load_examples(str(src), tok, max_length=128)
    assert trained_text(tok, ex) == "Schön ☃</s>"
    assert ex.num_tokens == len("Schön ☃".encode()) + 1  # one token per byte


def test_records_with_extra_keys_are_fine(tok, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b", "id": 7}])
    assert len(load_examples(str(src), tok, max_length=16)) == 1


# ---------------------------------------------------------------- truncation


def test_truncation_drops_prompt_from_left_keeping_bos_and_completion(tok, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abcdefghij", "completion": "XYZ"}])
    (ex,) = load_examples(str(src), tok, max_length=8)
    assert len(ex.input_ids) == 8
    assert tok.decode(ex.input_ids) == "<s>hijXYZ</s>"
    assert trained_text(tok, ex) == "XYZ</s>"


def test_truncation_cuts_completion_end_when_it_alone_is_too_long(tok, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "abc", "completion": "0123456789"}])
    (ex,) = load_examples(str(src), tok, max_length=5)
    assert tok.decode(ex.input_ids) == "<s>0123"
    assert ex.num_tokens == 4


def test_chat_truncation_keeps_the_answer(tok, tmp_path):
    msgs = [{"role": "user", "content": "x" * 100}, {"role": "assistant", "content": "yes"}]
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}])
    (ex,) = load_examples(str(src), tok, max_length=20)
    assert len(ex.input_ids) == 20 and ex.input_ids[0] == tok.bos_token_id
    assert trained_text(tok, ex) == "yes</s>"


# ---------------------------------------------------------------- packing


def test_packing_keeps_examples_whole_and_labels_aligned(tok, tmp_path):
    recs = [{"prompt": f"p{i}" * (i % 3 + 1), "completion": f"c{i}"} for i in range(10)]
    src = write_jsonl(tmp_path / "d.jsonl", recs)
    plain = load_examples(str(src), tok, max_length=24)
    packed = load_examples(str(src), tok, max_length=24, packing=True)
    assert len(packed) < len(plain)
    assert all(len(w.input_ids) <= 24 for w in packed)
    assert [t for w in packed for t in w.input_ids] == [t for e in plain for t in e.input_ids]
    assert [t for w in packed for t in w.labels] == [t for e in plain for t in e.labels]
    assert sum(w.num_tokens for w in packed) == sum(e.num_tokens for e in plain)
    # every window starts at an example boundary (a bos token)
    assert all(w.input_ids[0] == tok.bos_token_id for w in packed)


def test_packing_masks_the_first_label_of_each_packed_example():
    a = Example([5, 6], [5, 6])  # no bos: its first token is a label
    b = Example([7, 8], [7, 8])
    (w,) = pack([a, b], max_length=8)
    assert w.input_ids == [5, 6, 7, 8]
    assert w.labels == [IGNORE, 6, IGNORE, 8]  # 7 is never predicted from 6


# ---------------------------------------------------------------- collate


def test_collate_right_pads(tok):
    a, b = Example([1, 10, 11], [IGNORE, 10, 11]), Example([1, 12], [IGNORE, 12])
    batch = collate([a, b], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 10, 11], [1, 12, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[IGNORE, 10, 11], [IGNORE, 12, IGNORE]]
    assert all(t.dtype == torch.long for t in batch.values())


# ---------------------------------------------------------------- errors

GOOD = json.dumps({"prompt": "a", "completion": "b"})
BAD_LINES = [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object, got list"),
    (json.dumps({"text": "hi"}), "expected keys 'prompt' and 'completion', or 'messages'"),
    (json.dumps({"prompt": "a"}), "missing key 'completion'"),
    (json.dumps({"prompt": 3, "completion": "b"}), "'prompt' must be a string, got int"),
    (json.dumps({"prompt": "a", "completion": ["b"]}), "'completion' must be a string, got list"),
    (json.dumps({"prompt": "a", "completion": ""}), "empty completion"),
    (json.dumps({"messages": "hi"}), "'messages' must be a non-empty list"),
    (json.dumps({"messages": []}), "'messages' must be a non-empty list"),
    (json.dumps({"messages": [{"role": "user"}]}), "messages[0] must be an object with 'role' and 'content'"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}), "messages[0] has unknown role 'robot'"),
    (json.dumps({"messages": [{"role": "user", "content": 5}]}), "messages[0].content must be a string, got int"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}), "no assistant message"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]}),
     "messages[1] is an empty assistant turn"),
]


@pytest.mark.parametrize("line,reason", BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_names_file_line_and_reason(tok, tmp_path, line, reason):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD, "", GOOD, line, GOOD])
    with pytest.raises(DataError) as err:
        load_examples(str(src), tok, max_length=32)
    msg = str(err.value)
    assert msg.startswith(f"{src}:4: "), msg
    assert reason in msg
    with pytest.raises(DataError, match=f"^{src}:4: "):
        load_records(str(src))  # validation alone finds it too, without a tokenizer


def test_non_utf8_line(tok, tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "\xff", "completion": "b"}\n')
    with pytest.raises(DataError, match=rf"^{src}:2: not UTF-8"):
        load_examples(str(src), tok, max_length=32)


def test_no_trainable_tokens_after_truncation(tok, tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD])
    with pytest.raises(DataError, match=rf"^{src}:1: no trainable tokens after truncation to max_length=1"):
        load_examples(str(src), tok, max_length=1)


def test_missing_file_names_path(tok, tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"{missing}: no such data file"):
        load_examples(str(missing), tok, max_length=32)
    with pytest.raises(DataError, match="no such data file"):
        dataset_digest(str(missing))


def test_empty_file(tok, tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        load_examples(str(src), tok, max_length=32)


# ---------------------------------------------------------------- HF datasets (local, offline)


def test_hf_dataset_saved_to_disk(tok, tmp_path):
    import datasets

    rows = {"prompt": ["a", "b"], "completion": ["1", "2"]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    src = f"hf:{tmp_path / 'ds'}"
    exs = load_examples(src, tok, max_length=16)
    assert [trained_text(tok, e) for e in exs] == ["1</s>", "2</s>"]
    assert dataset_digest(src) == dataset_digest(src) and len(dataset_digest(src)) > 0
    assert len(load_examples(str(tmp_path / "ds"), tok, max_length=16)) == 2  # bare folder too

    bad = {"prompt": ["a", "b"], "completion": ["1", ""]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(bad)}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"row 1: empty completion"):
        load_examples(f"hf:{tmp_path / 'bad'}:train", tok, max_length=16)
    with pytest.raises(DataError, match="no split 'test'"):
        load_examples(f"hf:{tmp_path / 'bad'}:test", tok, max_length=16)


# ---------------------------------------------------------------- digests


def test_dataset_digest_is_sha256_of_bytes(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD])
    assert dataset_digest(str(src)) == hashlib.sha256(src.read_bytes()).hexdigest()
    assert dataset_digest(src) == dataset_digest(str(src))
    src.write_text(src.read_text() + GOOD + "\n")
    assert dataset_digest(str(src)) == hashlib.sha256(src.read_bytes()).hexdigest()


def test_data_commitment_is_pinned_and_order_sensitive():
    d = "ab" * 32
    c = data_commitment([3, 1, 2], d)
    assert c == data_commitment((3, 1, 2), d)
    assert c != data_commitment([1, 2, 3], d) and c != data_commitment([3, 1, 2], "cd" * 32)
    assert c != data_commitment([3, 1], d)
    # the encoding is signed into records: a change here must be deliberate
    import struct
    raw = b"swarmtune/data/v1\0" + d.encode() + b"\0" + struct.pack(">4Q", 3, 3, 1, 2)
    assert c == hashlib.sha256(raw).hexdigest()


# ---------------------------------------------------------------- assignment


def test_assignment_is_disjoint_deterministic_and_unions_to_the_round_batch():
    peers = ["peer-c", "peer-a", "peer-b"]
    for rnd in range(5):
        for total in (24, 25, 26):  # even and uneven splits: the first total % n members take one more
            shares = {p: assign_examples(100, swarm_id="s1", round=rnd, total=total, members=peers, me=p)
                      for p in peers}
            sizes = [len(shares[p]) for p in sorted(peers)]
            assert sizes == [total // 3 + (1 if k < total % 3 else 0) for k in range(3)]
            flat = [i for s in shares.values() for i in s]
            assert len(set(flat)) == len(flat) == total  # disjoint
            batch = round_batch_indices(100, "s1", rnd, total)
            assert [i for p in sorted(peers) for i in shares[p]] == batch  # fixed slices, in member order
            # same members in another order, or asked again: same answer
            again = assign_examples(100, swarm_id="s1", round=rnd, total=total, members=list(reversed(peers)), me="peer-a")
            assert again == shares["peer-a"]


def test_split_range_covers_total_in_order():
    for total in range(0, 30):
        for n in range(1, 7):
            ranges = [split_range(total, n, k) for k in range(n)]
            assert ranges[0][0] == 0 and ranges[-1][1] == total
            assert all(ranges[k][1] == ranges[k + 1][0] for k in range(n - 1))
            assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_rounds_walk_epochs_without_repeats_and_wrap():
    n, total = 50, 10
    epoch0 = [i for r in range(5) for i in round_batch_indices(n, "s", r, total)]
    assert sorted(epoch0) == list(range(n))  # one epoch = every example once
    epoch1 = [i for r in range(5, 10) for i in round_batch_indices(n, "s", r, total)]
    assert sorted(epoch1) == list(range(n)) and epoch1 != epoch0  # reshuffled
    # 12 does not divide 50: 4 rounds per epoch, 2 examples skipped, never a straddle
    rounds = [round_batch_indices(n, "s", r, 12) for r in range(8)]
    assert all(len(set(b)) == 12 for b in rounds)
    assert len(set(i for b in rounds[:4] for i in b)) == 48
    assert rounds[4] == epoch1[:10] + rounds[4][10:] and rounds[4][:10] == epoch1[:10]
    # a batch larger than the dataset walks whole permutations (repeats unavoidable)
    big = round_batch_indices(5, "s", 0, 12)
    assert len(big) == 12 and sorted(big[:5]) == list(range(5))


def test_assignment_depends_on_swarm_and_round_and_is_pinned():
    a = round_batch_indices(1000, "swarm-a", 0, 16)
    assert a != round_batch_indices(1000, "swarm-b", 0, 16)
    assert a != round_batch_indices(1000, "swarm-a", 1, 16)
    # a hand-written Fisher-Yates over sha256: verifiers on any machine recompute it
    assert round_batch_indices(10, "pinned", 0, 10) == [0, 7, 6, 8, 5, 3, 2, 1, 4, 9]
    assert round_batch_indices(37, "spec", 2, 37) == spec_permutation(37, "spec", 2)


def spec_permutation(n: int, swarm_id: str, epoch: int) -> list[int]:
    """The permutation as the docstring of node.data._epoch_permutation specifies it."""
    import struct

    perm = list(range(n))
    prefix = b"swarmtune/perm/v1\0" + swarm_id.encode() + b"\0" + struct.pack(">Q", epoch)
    for k, i in enumerate(range(n - 1, 0, -1)):
        digest = hashlib.sha256(prefix + struct.pack(">Q", k)).digest()
        j = int.from_bytes(digest[:8], "big") % (i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def test_assignment_rejects_unknown_peer():
    with pytest.raises(ValueError, match="not in the peer list"):
        assign_examples(10, swarm_id="s", round=0, total=2, members=["a"], me="b")


# ---------------------------------------------------------------- built-in task files


def test_builtin_task_files_parse_and_are_disjoint(tok):
    train = load_examples(str(BUILTIN_TRAIN), tok, max_length=64)
    evals = load_examples(str(BUILTIN_EVAL), tok, max_length=64)
    assert len(train) >= 2000 and len(evals) >= 200
    questions = lambda p: {r["messages"][0]["content"] for r in load_records(str(p))}  # noqa: E731
    assert not questions(BUILTIN_TRAIN) & questions(BUILTIN_EVAL)
    answers = [r["messages"][-1]["content"] for r in load_records(str(BUILTIN_EVAL))]
    assert set(answers) == {"even", "odd"} and answers.count("even") == len(answers) // 2


def test_builtin_files_match_their_generator():
    spec = importlib.util.spec_from_file_location("make_builtin_data", REPO / "scripts" / "make_builtin_data.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    train, evals = gen.generate()
    assert BUILTIN_TRAIN.read_text() == "\n".join(train) + "\n"
    assert BUILTIN_EVAL.read_text() == "\n".join(evals) + "\n"


# ---------------------------------------------------------------- bounds, JSON positions, hf: content digests


def test_a_line_over_the_limit_is_refused_quickly_in_bounded_memory(tmp_path):
    import time
    import tracemalloc

    from node.data import MAX_RECORD_BYTES

    huge = json.dumps({"prompt": "x" * (2 * MAX_RECORD_BYTES), "completion": "y"})  # a 2 MiB line
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, huge, GOOD])
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_records(str(src))
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    msg = str(err.value)
    assert msg.startswith(f"{src}:3: ") and str(MAX_RECORD_BYTES) in msg and "1 MiB" in msg, msg
    assert seconds < 1.0, seconds
    assert peak < 2.5 * MAX_RECORD_BYTES, peak  # one bounded read, never the whole 2 MiB line decoded and parsed


def test_a_line_at_the_limit_is_accepted(tmp_path):
    from node.data import MAX_RECORD_BYTES

    head = json.dumps({"prompt": "", "completion": "y"})[:-1] + ', "pad": "'
    line = head + "p" * (MAX_RECORD_BYTES - len(head) - 2) + '"}'
    assert len(line) == MAX_RECORD_BYTES
    src = tmp_path / "d.jsonl"
    src.write_bytes(line.encode() + b"\r\n" + line.encode())  # CRLF, and a last line without a newline
    assert len(load_records(str(src))) == 2
    src.write_bytes(line.encode() + b"z\n")
    with pytest.raises(DataError, match=rf"^{src}:1: line longer than"):
        load_records(str(src))


def test_invalid_json_names_the_column_on_the_line(tmp_path):
    truncated = '{"prompt": "2+2=", "completion": '
    unterminated = '{"prompt": "abc'
    src = write_jsonl(tmp_path / "d.jsonl", [GOOD, truncated])
    with pytest.raises(DataError) as err:
        load_records(str(src))
    # the parser sees the line without its newline: the error is at the line's end, not "column 1" of the next
    assert str(err.value) == f"{src}:2: invalid JSON (Expecting value at column {len(truncated) + 1})"
    src = write_jsonl(tmp_path / "e.jsonl", [unterminated])
    with pytest.raises(DataError) as err:
        load_records(str(src))
    assert str(err.value) == f"{src}:1: invalid JSON (Unterminated string starting at column 12)"
    assert "at at" not in str(err.value)


def _save(tmp_path, name, rows):
    import datasets

    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / name))
    return f"hf:{tmp_path / name}"


def test_hf_digest_hashes_the_rows_not_the_datasets_fingerprint(tmp_path):
    rows = {"prompt": ["a", "b", "c"], "completion": ["1", "2", "3"], "score": [0.5, 1.0, 2.0]}
    src = _save(tmp_path, "ds", rows)
    # the documented encoding: tag, then canonical JSON of every row in order, each followed by a newline
    expected = hashlib.sha256(b"swarmtune/hf-rows/v1\0")
    for i in range(3):
        row = {k: v[i] for k, v in rows.items()}
        expected.update(json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n")
    assert dataset_digest(src) == expected.hexdigest()
    assert dataset_digest(_save(tmp_path, "copy", rows)) == dataset_digest(src)  # same rows, other files
    changed = dict(rows, completion=["1", "2", "4"])
    assert dataset_digest(_save(tmp_path, "changed", changed)) != dataset_digest(src)  # one value
    reordered = {k: list(reversed(v)) for k, v in rows.items()}
    assert dataset_digest(_save(tmp_path, "reordered", reordered)) != dataset_digest(src)  # order counts


def test_hf_digest_sees_a_changed_byte_in_the_arrow_file(tmp_path):
    """The user's case: one byte of the saved arrow data changed, `datasets`' fingerprint did not."""
    import datasets

    src = _save(tmp_path, "ds", {"prompt": ["abc", "def"], "completion": ["xyz", "uvw"]})
    before, fingerprint = dataset_digest(src), datasets.load_from_disk(str(tmp_path / "ds"))._fingerprint
    (arrow,) = (tmp_path / "ds").glob("*.arrow")
    arrow.write_bytes(arrow.read_bytes().replace(b"uvw", b"uvX"))
    after = datasets.load_from_disk(str(tmp_path / "ds"))
    assert after[1]["completion"] == "uvX" and after._fingerprint == fingerprint  # what the old digest used
    assert dataset_digest(src) != before


def test_hf_row_over_the_limit_is_refused(tmp_path):
    from node.data import MAX_RECORD_BYTES

    src = _save(tmp_path, "big", {"prompt": ["a", "b" * (MAX_RECORD_BYTES + 1)], "completion": ["1", "2"]})
    with pytest.raises(DataError, match=rf"row 1: the row is \d+ bytes as JSON, over the limit of {MAX_RECORD_BYTES}"):
        load_records(src)
