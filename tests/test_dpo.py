"""DPO (objective = "dpo") and swarms that start from an existing PEFT adapter (`swarm init --adapter`).

Unit checks of TRL's preference formats and their line-precise errors, the manifest's [dpo] and [start]
sections and `swarm init --adapter` refusals; then real swarms on 127.0.0.1: three DPO nodes started
from an adapter raise held-out preference accuracy on the built-in task with bit-identical adapters,
and a 2-node DPO swarm follows one process on the same pairs within 1 % every round.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, verify_ledgers

PAIR_TEXT = {"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}
PAIR_CHAT = {"prompt": [{"role": "user", "content": "2+2?"}], "chosen": [{"role": "assistant", "content": "4"}],
             "rejected": [{"role": "assistant", "content": "5"}]}


def _jsonl(path: Path, lines) -> Path:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def tok(tiny_base):
    from node.model import load_tokenizer

    return load_tokenizer(tiny_base)


def test_preference_formats_tokenize_like_trl(tmp_path, tok):
    from node.data import IGNORE
    from node.preference import load_pairs

    implicit = {"chosen": PAIR_CHAT["prompt"] + PAIR_CHAT["chosen"], "rejected": PAIR_CHAT["prompt"] + PAIR_CHAT["rejected"]}
    text, chat, chat_implicit = load_pairs(_jsonl(tmp_path / "p.jsonl", [PAIR_TEXT, PAIR_CHAT, implicit]), tok, max_length=64)
    # plain text: prompt+completion tokenized whole, eos appended (TRL's add_eos); only the completion is scored
    c = text.chosen
    assert c.input_ids == tok(text="2+2= 4" + tok.eos_token)["input_ids"]
    assert [t for t, lab in zip(c.input_ids, c.labels) if lab != IGNORE] == tok(text=" 4" + tok.eos_token)["input_ids"]
    # chat: the template's generation prompt ends the prompt, the assistant turn is the completion
    prompt_ids = tok.apply_chat_template(PAIR_CHAT["prompt"], add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]
    assert chat.chosen.labels[:len(prompt_ids)] == [IGNORE] * len(prompt_ids)
    assert chat.chosen.input_ids[:len(prompt_ids)] == prompt_ids and chat.chosen.num_tokens > 0
    # implicit prompt: TRL's extract_prompt splits it off, the same pair results
    assert (chat_implicit.chosen.input_ids, chat_implicit.rejected.labels) == (chat.chosen.input_ids, chat.rejected.labels)
    assert text.num_tokens == text.chosen.num_tokens + text.rejected.num_tokens


def test_bad_preference_lines_name_file_and_line(tmp_path, tok):
    from node.data import DataError
    from node.preference import load_pairs

    cases = [
        ('{"prompt": "a", "chosen": "b", "rejected": ', "2: invalid JSON"),
        ({"prompt": "a", "chosen": "same", "rejected": "same"}, "2: 'chosen' and 'rejected' are the same"),
        ({"prompt": "a", "chosen": "b"}, "2: missing key 'rejected'"),
        ({"prompt": "a", "completion": "b"}, "2: expected TRL's preference keys 'chosen' and 'rejected'"),
        ({"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"}, "2: 'prompt' must be"),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "user", "content": "x"}],
          "rejected": [{"role": "assistant", "content": "y"}]}, "2: 'chosen' must end with a non-empty assistant message"),
        ({"prompt": "x" * 80, "chosen": "b", "rejected": "c"}, "2: no chosen token left after truncation to max_length=32"),
    ]
    for i, (bad, expected) in enumerate(cases):
        path = _jsonl(tmp_path / f"bad{i}.jsonl", [PAIR_TEXT, bad, PAIR_TEXT])
        with pytest.raises(DataError) as e:
            load_pairs(path, tok, max_length=32)
        assert str(e.value).startswith(f"{path}:{expected}"), str(e.value)


def test_manifest_dpo_and_start_sections(tmp_path, tiny_base):
    from node.manifest import DpoSection, ManifestError, StartSection, load_manifest, validate, write_manifest
    from tests.conftest import write_test_manifest

    sft = load_manifest(write_test_manifest(tmp_path / "sft.toml", tiny_base))
    assert "dpo" not in sft.to_dict() and "start" not in sft.to_dict()  # SFT manifests hash as before
    dpo = dataclasses.replace(sft, objective="dpo", dpo=DpoSection(beta=0.2, loss="hinge"))
    back = load_manifest(write_manifest(dpo, tmp_path / "dpo.toml"))
    assert back.dpo == DpoSection(beta=0.2, loss="hinge") and back.swarm_id == dpo.swarm_id != sft.swarm_id
    assert dpo.token_cap == 2 * sft.token_cap == 2 * sft.data.max_length  # credit: chosen + rejected per pair
    # where the start adapter lives is not part of the swarm id; its hash is
    a = dataclasses.replace(dpo, start=StartSection(adapter="/x/a", hash="ab" * 32))
    assert a.swarm_id == dataclasses.replace(a, start=StartSection(adapter="b", hash="ab" * 32)).swarm_id != dpo.swarm_id
    for bad, msg in [
        (dataclasses.replace(dpo, data=dataclasses.replace(dpo.data, packing=True)), "packing"),
        (dataclasses.replace(dpo, dpo=DpoSection(beta=0.0)), "beta"),
        (dataclasses.replace(dpo, dpo=DpoSection(loss="kto")), "loss"),
        (dataclasses.replace(dpo, start=StartSection(adapter="a")), "[start] needs both"),
    ]:
        with pytest.raises(ManifestError, match=msg.replace("[", r"\[")):
            validate(bad)
    text = (tmp_path / "sft.toml").read_text() + '\n[dpo]\nbeta = 0.1\n'
    (tmp_path / "mixed.toml").write_text(text)
    with pytest.raises(ManifestError, match="objective = \"dpo\""):
        load_manifest(tmp_path / "mixed.toml")


def _make_adapter(out: Path, base_dir: Path, *, rank: int = 4, seed: int = 1) -> Path:
    """A stock PEFT adapter folder (PeftModel.save_pretrained) with non-zero B, i.e. not a fresh LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(out)
    return out


def _init(tmp_path: Path, base: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", "swarm", "init", "--base", str(base), *args],
                          capture_output=True, text=True, cwd=REPO)


def test_swarm_init_refuses_adapters_that_do_not_fit(tmp_path, tiny_base, st_cache):
    from node.tiny import build_tiny_base

    other_base = build_tiny_base(st_cache / "tiny-wide", config_overrides={"hidden_size": 64, "intermediate_size": 128})
    wide = _make_adapter(tmp_path / "other-base", other_base)
    rank4 = _make_adapter(tmp_path / "rank4", tiny_base)
    not_peft = tmp_path / "not-peft"
    not_peft.mkdir()
    (not_peft / "model.safetensors").write_bytes(b"")
    out = tmp_path / "swarm.toml"
    for args, expected in [
        (["--adapter", str(wide)], "does not fit this base"),
        (["--adapter", str(rank4), "--rank", "8"], "--rank 8 contradicts the adapter"),
        (["--adapter", str(not_peft)], "is not a PEFT adapter folder: it has no adapter_config.json"),
    ]:
        res = _init(tmp_path, tiny_base, "--objective", "dpo", "--out", str(out), *args)
        assert res.returncode == 2, res.stdout + res.stderr
        assert expected in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert not out.exists()
    assert "another base, or another rank" in _init(tmp_path, other_base, "--adapter", str(rank4), "--out", str(out)).stderr


def _dpo_manifest(tmp_path: Path, base: Path, *args: str) -> Path:
    out = tmp_path / "swarm.toml"
    res = _init(tmp_path, base, "--objective", "dpo", "--out", str(out), "--max-length", "64", "--lr", "0.003",
                "--microbatch-size", "8", "--matchmaking-time", "2", "--averaging-timeout", "20", "--peer-ttl", "10", *args)
    assert res.returncode == 0, res.stdout + res.stderr
    return out


def _accuracy(base: Path, adapter: Path) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from node.data import builtin_data_path
    from node.model import load_tokenizer
    from node.preference import load_pairs, preference_accuracy

    tok = load_tokenizer(base)
    pairs = load_pairs(builtin_data_path("eval", "prefs"), tok, max_length=64)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(adapter))
    return preference_accuracy(model, pairs, tok.pad_token_id)


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_three_node_dpo_swarm_from_an_adapter_raises_preference_accuracy(tmp_path, tiny_base, spawn_node):
    from node.manifest import load_manifest

    rounds = 15
    start = _make_adapter(tmp_path / "start", tiny_base)
    manifest = _dpo_manifest(tmp_path, tiny_base, "--adapter", str(start), "--target-batch-size", "24",
                             "--max-rounds", str(rounds))
    m = load_manifest(manifest)
    assert (m.lora.rank, m.lora.target_modules) == (4, ("q_proj", "v_proj"))  # the adapter's config
    a = spawn_node(manifest, "a", "--min-peers", "3", "--export", str(tmp_path / "out"))
    peers = a.wait_info()["maddrs"]
    b = spawn_node(manifest, "b", "--min-peers", "3", "--initial-peers", *peers)
    c = spawn_node(manifest, "c", "--min-peers", "3", "--initial-peers", *peers)
    for node in (a, b, c):
        assert node.wait_exit(timeout=280) == 0, node.log.read_text()[-3000:]
    # every node that took part in round 0 started it from the adapter's bits (whether or not it completed);
    # one that came late (a busy box: the others summed round 0 without it) took the swarm's state instead
    later = {row["hash"] for n in (a, b, c) for row in n.rounds() if row["applied"]}
    firsts = [n.rounds()[0] for n in (a, b, c)]
    assert sum(first["round"] == 0 for first in firsts) >= 2, firsts
    for first in firsts:
        assert first["start_hash"] == m.start.hash if first["round"] == 0 else first["start_hash"] in later, first
    runs = [n.applied() for n in (a, b, c)]
    # the reference is the start adapter: before the first step policy and reference agree, the loss is log 2
    assert all(abs(run[0]["loss"] - math.log(2)) < 1e-5 for run in runs if 0 in run)
    common = set(runs[0]) & set(runs[1]) & set(runs[2])
    assert len(common) >= rounds * 2 // 3
    for r in common:
        assert runs[0][r]["hash"] == runs[1][r]["hash"] == runs[2][r]["hash"], f"round {r}"
    before, after = _accuracy(tiny_base, start), _accuracy(tiny_base, tmp_path / "out")
    print(f"held-out preference accuracy: start adapter {before}, after {rounds} DPO rounds {after}")
    assert after["accuracy"] >= before["accuracy"] + 0.1 and after["margin"] > before["margin"]
    assert "(objective dpo)" in verify_ledgers(manifest, a, b, c)


@pytest.mark.swarm
@pytest.mark.timeout(300)
def test_two_node_dpo_swarm_matches_single_process(tmp_path, tiny_base, spawn_node):
    rounds = 5
    manifest = _dpo_manifest(tmp_path, tiny_base, "--target-batch-size", "32", "--max-rounds", str(rounds),
                             "--wire", "int32")
    solo = spawn_node(manifest, "solo")
    a = spawn_node(manifest, "a", "--min-peers", "2")
    b = spawn_node(manifest, "b", "--min-peers", "2", "--initial-peers", *a.wait_info()["maddrs"])
    for node in (solo, a, b):
        assert node.wait_exit(timeout=240) == 0, node.log.read_text()[-3000:]
    rs, ra, rb = ({r["round"]: r for r in n.rounds()} for n in (solo, a, b))
    for r in range(rounds):
        assert ra[r]["groups"] == {"0": 2, "1": 2}, "the pair must average every round"
        assert ra[r]["samples"] + rb[r]["samples"] == rs[r]["samples"] == 32
        rel = abs(ra[r]["loss"] - rs[r]["loss"]) / rs[r]["loss"]
        assert rel < 0.01, f"round {r}: swarm loss {ra[r]['loss']} vs single {rs[r]['loss']}"
        assert ra[r]["hash"] == rb[r]["hash"]
    # a fresh LoRA is the base (B = 0), so the policy equals the reference and the first sigmoid loss is log 2
    assert abs(rs[0]["loss"] - math.log(2)) < 1e-5 and abs(ra[0]["loss"] - math.log(2)) < 1e-5
    assert len({rs[r]["loss"] for r in range(rounds)}) == rounds  # and it trains


def test_dpo_trainer_reference_and_partial_shards(tmp_path, tiny_base, tok):
    """In one process: the reference is the policy's start (loss log 2 before any step), a node that trains one
    shard keeps the other frozen through PEFT's disable_adapter, and the losses are TRL's at delta = 0."""
    import torch

    from node.data import builtin_data_path
    from node.manifest import DpoSection, OptimSection
    from node.model import Adapter, attach_lora, check_shard_plan, load_base
    from node.preference import dpo_loss, load_pairs
    from node.trainer import Trainer

    zero, counts = torch.zeros(4), torch.tensor([2, 4, 2, 4])
    assert dpo_loss(zero, zero, counts, beta=0.1, loss="sigmoid").tolist() == pytest.approx([math.log(2)] * 2)
    assert dpo_loss(zero, zero, counts, beta=0.1, loss="hinge").tolist() == [1.0, 1.0]
    assert dpo_loss(zero, zero, counts, beta=0.1, loss="ipo").tolist() == pytest.approx([25.0, 25.0])
    pairs = load_pairs(builtin_data_path("train", "prefs"), tok, max_length=64)[:8]
    model = attach_lora(load_base(tiny_base), rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"), init_seed=0)
    adapter = Adapter.from_model(model, check_shard_plan((), 4))
    with torch.no_grad():
        for p in adapter.params:
            p.normal_(0, 0.05)  # a start adapter that is not the base
    for reference in (None, [p.detach().clone() for p in adapter.params]):
        for p in pairs:
            p.ref = None
        trainer = Trainer(model, adapter, (1,), OptimSection(lr=1e-2), microbatch_size=4, device="cpu",
                          pad_id=tok.pad_token_id, dpo=DpoSection(), reference=reference)
        local = trainer.local_gradients(pairs)
        assert all(p.requires_grad == (s == 1) for p, s in zip(adapter.params, adapter.shard_of))
        assert local.grad_sums[1].abs().sum() > 0 and local.samples == 8
        if reference is not None:  # the policy is its own reference: every pair's loss is log 2
            assert local.loss_sum / local.samples == pytest.approx(math.log(2), abs=1e-6)
        else:
            assert abs(local.loss_sum / local.samples - math.log(2)) > 1e-4


def test_nodes_and_served_swarm_adapters_load_the_start_adapter_bits(tmp_path, tiny_base):
    """build_lora_model (every node, export) and `serve --swarm` hold exactly the [start] adapter's bits; a node
    whose start folder changed since `swarm init` refuses to start."""
    from node.manifest import StartSection, load_manifest, write_manifest
    from node.model import ModelError, build_lora_model, check_shard_plan, start_adapter_hash
    from node.serve import Engine
    from tests.conftest import write_test_manifest

    start = _make_adapter(tmp_path / "start", tiny_base)
    lora = dict(rank=4, alpha=8, dropout=0.0, target_modules=("q_proj", "v_proj"))
    m = load_manifest(write_test_manifest(tmp_path / "s.toml", tiny_base))
    m = dataclasses.replace(m, lora=dataclasses.replace(m.lora, **lora), start=StartSection(
        adapter="start", hash=start_adapter_hash(tiny_base, lora, check_shard_plan((), 4), start)))
    m = load_manifest(write_manifest(m, tmp_path / "s.toml"))  # "start" resolves beside the manifest
    assert build_lora_model(m, tiny_base, device="cpu")[1].state_hash() == m.start.hash
    engine = Engine.load(str(tiny_base), device="cpu")
    _, served = engine.attach_manifest_lora("live", *engine.swarm_manifest(tmp_path / "s.toml"), source="test")
    assert served.state_hash() == m.start.hash
    _make_adapter(tmp_path / "start", tiny_base, seed=2)  # same shapes, other bits
    with pytest.raises(ModelError, match="holds other bits than the manifest's"):
        build_lora_model(m, tiny_base, device="cpu")
