"""The built-in tiny base: deterministic, cached, atomic, loadable offline."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from node.data import load_records
from node.tiny import (BUILTIN_EVAL, MARKER, build_tiny_base, default_tiny_dir, evaluate,
                       folder_digest, tiny_config)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_base(tmp_path_factory.mktemp("tiny") / "base")


def test_two_builds_are_byte_identical(tiny, tmp_path):
    other = build_tiny_base(tmp_path / "again")
    assert folder_digest(other) == folder_digest(tiny)
    assert sorted(p.name for p in other.iterdir()) == sorted(p.name for p in tiny.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temp folder left behind"


def test_concurrent_builders_end_with_one_complete_folder(tiny, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    target = tmp_path / "shared"
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: build_tiny_base(target), range(3)))
    assert paths == [target] * 3
    assert folder_digest(target) == folder_digest(tiny)
    assert [p.name for p in tmp_path.iterdir()] == ["shared"]  # no temp folders left


def test_build_leaves_callers_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_base(tmp_path / "b")
    assert torch.equal(torch.rand(3), expected)


def test_other_seed_gives_other_weights(tiny, tmp_path):
    other = build_tiny_base(tmp_path / "seed1", seed=1)
    assert (other / "model.safetensors").read_bytes() != (tiny / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (tiny / "tokenizer.json").read_bytes()


def test_cached_build_is_not_rewritten(tiny):
    before = {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()}
    assert build_tiny_base(tiny) == tiny
    assert {p.name: p.stat().st_mtime_ns for p in tiny.iterdir()} == before


def test_incomplete_folder_is_rebuilt(tiny, tmp_path):
    path = build_tiny_base(tmp_path / "b")
    (path / "model.safetensors").unlink()  # as if a tool deleted it
    assert folder_digest(build_tiny_base(path)) == folder_digest(tiny)


def test_refuses_to_overwrite_foreign_or_mismatched_folders(tiny, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a swarmtune tiny-base"):
        build_tiny_base(foreign)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="seed"):
        build_tiny_base(tiny, seed=7)


def test_loads_with_auto_classes_and_generates(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers >= 4
    assert model.dtype == torch.float32
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 0)
    assert len(tok) == cfg.vocab_size
    msgs = [{"role": "user", "content": "Is 12 even or odd?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<s><|user|>\nIs 12 even or odd?</s><|assistant|>\n"
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    # byte-level: any text round-trips
    assert tok.decode(tok("héllo ☃ 12", add_special_tokens=False)["input_ids"]) == "héllo ☃ 12"


def test_tiny_config_overrides():
    cfg = tiny_config(num_hidden_layers=2, hidden_size=64)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (2, 64, 262)


def test_default_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SWARMTUNE_CACHE", str(tmp_path))
    assert default_tiny_dir() == tmp_path / "tiny-llama-v1"


def test_marker_names_version(tiny):
    marker = json.loads((tiny / MARKER).read_text())
    assert marker["version"] == 1 and marker["seed"] == 0


def test_evaluate_reports_loss_accuracy_and_samples(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    records = load_records(BUILTIN_EVAL)[:6]
    records.append({"prompt": "Say hi:", "completion": " hi"})  # the other record shape
    model.train()
    out = evaluate(model, tok, records, max_new_tokens=4, batch_size=4)
    assert model.training  # evaluate() switches to eval mode and back
    assert len(out["samples"]) == len(records)
    prompt, expected, generated = out["samples"][0]
    assert prompt.endswith("<|assistant|>\n") and expected in ("even", "odd")
    assert out["samples"][-1][:2] == ("<s>Say hi:", " hi")
    assert out["accuracy"] == 0.0  # random weights answer nothing sensible
    assert 4.0 < out["loss"] < 8.0  # about ln(262) = 5.6 for a random model
