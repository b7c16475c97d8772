"""The Hugging Face path, offline: hub-id bases from a local HF cache, revisions, chat templates in
`chat_template.jinja`, the files a download takes, and exports that stock PEFT loads and never destroy.

The cache is laid out as huggingface_hub writes it (`models--org--name/{blobs,snapshots/<commit>,refs/main}`,
snapshot files symlinked to blobs) in tmp, with the tiny model's files. huggingface_hub reads
HF_HUB_CACHE / HF_HUB_OFFLINE when it is imported, so everything that must see that cache runs as a
real `swarmtune` (or python) process with those variables set.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from node.export import ExportError, export_peft
from node.model import HUB_FILES, attach_lora, base_fingerprint, load_base, resolve_base
from tests.conftest import REPO

COMMIT_A = "a" * 39 + "1"
COMMIT_B = "b" * 39 + "2"
SKIP_FILES = {"swarmtune_tiny.json", ".swarmtune-fingerprint.json"}  # ours, not a Hub repo's


def cache_repo(hub: Path, repo_id: str, src: Path, commit: str, *, ref: str | None = "main", drop=()) -> Path:
    """Put the files of model folder `src` into the HF cache `hub` as `repo_id` at `commit`; return the snapshot."""
    repo = hub / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name in SKIP_FILES or f.name in drop or not f.is_file():
            continue
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    if ref:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


@pytest.fixture
def hf_env(tmp_path, st_cache) -> dict:
    """Environment of a machine with an offline HF cache in tmp (the cache starts empty)."""
    home = tmp_path / "hf"
    (home / "hub").mkdir(parents=True)
    return {"HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"), "HF_HUB_OFFLINE": "1",
            "SWARMTUNE_CACHE": str(st_cache)}


def swarmtune(env: dict, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, text=True, cwd=cwd,
                          env=dict(os.environ, **env), timeout=300)


def python(env: dict, code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, **env), timeout=300)


def chat_jsonl(path: Path, n: int = 6) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"{i}: even or odd?"},
                          {"role": "assistant", "content": "even" if i % 2 == 0 else "odd"}]} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- what a download takes


def test_hub_downloads_take_every_tokenizer_and_template_file_and_no_code():
    from huggingface_hub.utils import filter_repo_objects

    wanted = ["config.json", "generation_config.json", "model.safetensors", "model-00001-of-00002.safetensors",
              "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "chat_template.jinja", "chat_template.json", "additional_chat_templates/tool_use.jinja",
              "merges.txt", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model", "qwen.tiktoken",
              "added_tokens.json", "preprocessor_config.json"]
    unwanted = ["modeling_custom.py", "tokenization_custom.py", "pytorch_model.bin", "consolidated.00.pth",
                "model.gguf", "flax_model.msgpack", "tf_model.h5", ".gitattributes", "onnx/model.onnx"]
    got = set(filter_repo_objects(items=wanted + unwanted, allow_patterns=list(HUB_FILES)))
    assert got == set(wanted), (set(wanted) - got, got - set(wanted))


# ---------------------------------------------------------------- revisions, chat templates, clear errors


@pytest.mark.timeout(300)
def test_hub_id_base_from_the_cache_pinned_to_a_revision(tmp_path, tiny_base, hf_env):
    """Two commits of one repo, main -> B: `--revision A` records A and fingerprints A's files; doctor
    finds A in the cache; an unknown revision or repo is refused with the fix, nothing written."""
    from node.tiny import build_tiny_base

    other = build_tiny_base(tmp_path / "tiny-seed1", seed=1)  # same shapes, other weights: another commit
    hub = Path(hf_env["HF_HUB_CACHE"])
    snap_a = cache_repo(hub, "myorg/pinned", tiny_base, COMMIT_A, ref=None)
    cache_repo(hub, "myorg/pinned", other, COMMIT_B)
    # the chat template lives only in chat_template.jinja: the chat data below needs transformers to read it
    assert "chat_template" not in json.loads((snap_a / "tokenizer_config.json").read_text())
    assert (snap_a / "chat_template.jinja").is_file()
    data = chat_jsonl(tmp_path / "chat.jsonl")
    fp_a, fp_b = base_fingerprint(tiny_base), base_fingerprint(other)
    assert fp_a != fp_b

    pinned = tmp_path / "pinned.toml"
    out = swarmtune(hf_env, "swarm", "init", "--base", "myorg/pinned", "--revision", COMMIT_A, "--data", str(data),
                    "--out", str(pinned), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    from node.manifest import load_manifest

    m = load_manifest(pinned)
    assert (m.base.model, m.base.revision, m.base.fingerprint) == ("myorg/pinned", COMMIT_A, fp_a)
    assert m.resolve_path(m.base.model) == "myorg/pinned"  # a hub id, never a folder beside the manifest
    assert not list(snap_a.glob(".swarmtune*")), "the fingerprint cache was written into the HF snapshot"

    main = tmp_path / "main.toml"
    out = swarmtune(hf_env, "swarm", "init", "--base", "myorg/pinned", "--data", str(data), "--out", str(main))
    assert out.returncode == 0, out.stderr
    assert load_manifest(main).base.fingerprint == fp_b and load_manifest(main).base.revision == ""
    assert f"pin it with --revision {COMMIT_B}" in out.stdout

    report = swarmtune(hf_env, "doctor", "--no-network", "--json", "--manifest", str(pinned), "--home", str(tmp_path / "h"))
    checks = {c["name"]: c for c in json.loads(report.stdout)["checks"]}
    assert checks["base model"]["status"] == "pass" and COMMIT_A in checks["base model"]["detail"], checks["base model"]
    assert checks["data"]["status"] == "pass", checks["data"]

    for args, words in ((["--base", "myorg/pinned", "--revision", "c" * 40], ["myorg/pinned", "c" * 40, "hf download"]),
                        (["--base", "myorg/absent"], ["myorg/absent", "Hugging Face cache", "hf download"])):
        bad = tmp_path / "bad.toml"
        out = swarmtune(hf_env, "swarm", "init", *args, "--data", str(data), "--out", str(bad))
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert all(w in out.stderr for w in words), out.stderr
        assert not bad.exists()


@pytest.mark.timeout(300)
def test_without_the_jinja_file_chat_data_fails_so_the_template_test_means_something(tmp_path, tiny_base, hf_env):
    cache_repo(Path(hf_env["HF_HUB_CACHE"]), "myorg/notemplate", tiny_base, COMMIT_A, drop={"chat_template.jinja"})
    out = swarmtune(hf_env, "swarm", "init", "--base", "myorg/notemplate", "--data", str(chat_jsonl(tmp_path / "c.jsonl")),
                    "--out", str(tmp_path / "s.toml"))
    assert out.returncode == 2 and "chat_template" in out.stderr, out.stderr
    assert not (tmp_path / "s.toml").exists()


# ---------------------------------------------------------------- export: stock-loadable, never destructive


@pytest.fixture(scope="module")
def tiny_peft(st_cache):
    return attach_lora(load_base(resolve_base("builtin:tiny")), rank=4, alpha=8, dropout=0.0,
                       target_modules=("all-linear",), init_seed=0)


def test_builtin_base_export_loads_with_auto_peft_and_generates(tmp_path, tiny_base, tiny_peft):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    out = export_peft(tiny_peft, tmp_path / "adapter", base_name="builtin:tiny")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_base.resolve()) and cfg["revision"] is None
    model = AutoPeftModelForCausalLM.from_pretrained(str(out))  # nothing but the adapter folder
    tok = AutoTokenizer.from_pretrained(cfg["base_model_name_or_path"])
    ids = model.generate(**tok("12: even or odd?", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert ids.shape[1] > 0
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    mine = {n: p for n, p in tiny_peft.named_parameters() if "lora_" in n}
    assert lora.keys() == mine.keys() and all((lora[n] == mine[n]).all() for n in lora)


def test_export_refuses_a_non_empty_folder_and_force_keeps_other_files(tmp_path, tiny_peft):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    (out / "README.md").write_text("my readme")
    with pytest.raises(ExportError, match="not empty.*--force"):
        export_peft(tiny_peft, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "notes.txt"]  # untouched, no temp left

    export_peft(tiny_peft, out, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert (out / "notes.txt").read_text() == "my notes" and (out / "README.md").read_text() == "my readme"
    first = (out / "adapter_model.safetensors").read_bytes()
    with __import__("torch").no_grad():
        next(p for n, p in tiny_peft.named_parameters() if "lora_B" in n).add_(1.0)
    export_peft(tiny_peft, out, force=True)  # a second forced export replaces the adapter's own files
    assert (out / "adapter_model.safetensors").read_bytes() != first
    assert (out / "notes.txt").read_text() == "my notes"
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_peft(tiny_peft, tmp_path / "file", force=True)


def test_export_cli_refuses_a_non_empty_folder_before_loading_anything(tmp_path, tiny_base, capsys):
    from node.cli import main
    from tests.conftest import write_test_manifest

    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.bin").write_bytes(b"\0" * 10)
    assert main(["export", "--manifest", str(manifest), "--out", str(out), "--home", str(tmp_path / "home")]) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--force" in err, err
    assert [p.name for p in out.iterdir()] == ["keep.bin"] and not (tmp_path / "home").exists()


# ---------------------------------------------------------------- a 2-node swarm from a hub id


@pytest.mark.swarm
@pytest.mark.timeout(420)
def test_two_node_swarm_from_a_hub_id_manifest_exports_an_adapter_stock_peft_loads(tmp_path, tiny_base, hf_env, spawn_node):
    hub = Path(hf_env["HF_HUB_CACHE"])
    cache_repo(hub, "myorg/tiny", tiny_base, COMMIT_A)
    elsewhere = tmp_path / "organiser"  # the manifest lives in a folder that has no myorg/ in it
    elsewhere.mkdir()
    manifest = elsewhere / "swarm.toml"
    out = swarmtune(hf_env, "swarm", "init", "--base", "myorg/tiny", "--revision", COMMIT_A, "--out", str(manifest),
                    "--max-rounds", "3", "--target-batch-size", "16", "--max-length", "48", "--matchmaking-time", "2",
                    "--averaging-timeout", "20", "--peer-ttl", "10", "--lr", "3e-3")
    assert out.returncode == 0, out.stderr
    text = manifest.read_text()
    assert 'model = "myorg/tiny"' in text and f'revision = "{COMMIT_A}"' in text, text

    a = spawn_node(manifest, "a", "--min-peers", "2", env=hf_env)
    b = spawn_node(manifest, "b", "--min-peers", "2", "--initial-peers", *a.wait_info()["maddrs"], env=hf_env)
    for node in (a, b):
        assert node.wait_exit(timeout=300) == 0, node.log.read_text()[-3000:]
    final = {n.home.name: n.rounds()[-1]["hash"] for n in (a, b)}
    assert len(set(final.values())) == 1, final

    adapter = tmp_path / "adapter"
    out = swarmtune(hf_env, "export", "--manifest", str(manifest), "--home", str(a.home), "--out", str(adapter))
    assert out.returncode == 0, out.stderr
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == ("myorg/tiny", COMMIT_A)
    again = swarmtune(hf_env, "export", "--manifest", str(manifest), "--home", str(a.home), "--out", str(adapter))
    assert again.returncode == 2 and "--force" in again.stderr, again.stderr

    code = f"""
import json, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r})
tok = AutoTokenizer.from_pretrained("myorg/tiny", revision={COMMIT_A!r})
prompt = tok.apply_chat_template([{{"role": "user", "content": "12: even or odd?"}}], tokenize=False, add_generation_prompt=True)
ids = model.generate(**tok(prompt, return_tensors="pt", add_special_tokens=False), max_new_tokens=4, do_sample=False)
print(json.dumps({{"base": model.get_base_model().name_or_path, "new_tokens": ids.shape[1]}}))
"""
    loaded = python(hf_env, code)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    result = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert result["base"] == "myorg/tiny" and result["new_tokens"] > 0, result


@pytest.mark.timeout(120)
def test_run_with_a_hub_id_missing_from_the_cache_names_the_id_and_the_fix(tmp_path, tiny_base, hf_env):
    import dataclasses

    from node.manifest import load_manifest, write_manifest
    from tests.conftest import write_test_manifest

    folder = tmp_path / "organiser"
    folder.mkdir()
    path = write_test_manifest(folder / "swarm.toml", tiny_base)
    m = load_manifest(path)
    write_manifest(dataclasses.replace(m, base=dataclasses.replace(m.base, model="myorg/animal-llama")), path)
    home = tmp_path / "home"
    out = swarmtune(hf_env, "run", "--manifest", str(path), "--home", str(home), "--create-key")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "'myorg/animal-llama'" in out.stderr and "hf download myorg/animal-llama" in out.stderr, out.stderr
    assert str(folder / "myorg") not in out.stderr  # never a folder beside the manifest
    assert not home.exists() or not any(home.rglob("*"))


@pytest.mark.timeout(300)
def test_run_loads_the_pinned_commit_not_main(tmp_path, tiny_base, hf_env):
    """`[base] revision` pins the commit `run` loads even when the cache's main points elsewhere."""
    from node.tiny import build_tiny_base

    other = build_tiny_base(tmp_path / "seed1", seed=1)
    hub = Path(hf_env["HF_HUB_CACHE"])
    cache_repo(hub, "myorg/pinned", tiny_base, COMMIT_A, ref=None)
    cache_repo(hub, "myorg/pinned", other, COMMIT_B)
    m = tmp_path / "swarm.toml"
    out = swarmtune(hf_env, "swarm", "init", "--base", "myorg/pinned", "--revision", COMMIT_A, "--out", str(m),
                    "--max-rounds", "1", "--target-batch-size", "8")
    assert out.returncode == 0, out.stderr
    run = swarmtune(hf_env, "run", "--manifest", str(m), "--home", str(tmp_path / "h"), "--create-key",
                    "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1")
    assert run.returncode == 0, run.stderr[-3000:]
    ex = swarmtune(hf_env, "export", "--manifest", str(m), "--home", str(tmp_path / "h"), "--out", str(tmp_path / "ad"))
    assert ex.returncode == 0, ex.stderr
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert (cfg["base_model_name_or_path"], cfg["revision"]) == ("myorg/pinned", COMMIT_A)
