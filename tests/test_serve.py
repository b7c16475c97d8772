"""`swarmtune serve` and `swarmtune generate`: real server processes, the official openai client, real PEFT.

- the openai client lists the models, completes and streams (plain and chat) with two adapters on one
  base; each answer equals what stock PEFT generates with that adapter, and the two differ;
  concurrent requests with different adapters never mix;
- adapters are added and removed at run time; the base is loaded once (the server's RSS grows by
  far less than the base's weights when three adapters are added);
- an unknown model is a 404 in OpenAI's error shape; a missing API key a 401;
- `--swarm`: served next to a 2-node swarm, the adapter's state hash equals the nodes' at the
  round it reports, and follows them as rounds advance;
- `generate` prints the adapter's answer to the chat-templated prompt;
- bad input (not a PEFT folder, an adapter for another base, a missing base, a taken port) exits 2
  with the cause and no traceback.

Server processes run in their own process group and are killed (SIGKILL) at teardown.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
import torch

from tests.conftest import REPO, write_test_manifest

KEY = "test-key"
PROMPT = "The swarm says"
QUESTION = "What is 12 + 7?"
N_TOKENS = 12


# --------------------------------------------------------------------------- helpers


class Server:
    """One `swarmtune serve` process; `url` is its /v1 address, read from the line it prints when ready."""

    def __init__(self, args: list[str], workdir: Path, name: str = "serve"):
        self.out, self.err = workdir / f"{name}.out", workdir / f"{name}.err"
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.popen = subprocess.Popen([sys.executable, "-m", "node", "serve", *args], stdout=out, stderr=err,
                                          cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        self.url = None

    def wait_ready(self, timeout: float = 180) -> "Server":
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(r"on (http://\S+/v1)", self.out.read_text(errors="replace"))
            if m:
                self.url = m.group(1)
                return self
            if self.popen.poll() is not None:
                raise AssertionError(f"serve exited {self.popen.returncode}:\n{self.err.read_text()[-3000:]}")
            time.sleep(0.2)
        raise AssertionError(f"serve not ready in {timeout}s:\n{self.err.read_text()[-3000:]}")

    def http(self, method: str, path: str, body=None, key: str | None = KEY) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(self.url.removesuffix("/v1") + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=KEY, max_retries=0, timeout=120)

    def kill(self) -> None:
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(timeout=30)


def make_adapter(base_dir: Path, out: Path, seed: int, targets=("q_proj", "v_proj"), rank: int = 8) -> Path:
    """A PEFT LoRA adapter with random (non-zero) A and B, so it changes what the base generates."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets), init_lora_weights=False))
    peft.save_pretrained(str(out))
    return out


def stock_generate(base_dir: Path, adapter: Path | None, ids: list[int], n: int) -> tuple[str, int]:
    """(text, generated token count) of greedy decoding with stock transformers + PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
    if tok.eos_token_id in out:
        out = out[:out.index(tok.eos_token_id) + 1]
    return tok.decode(out, skip_special_tokens=True), len(out)


def prompt_ids(base_dir: Path, *, chat: bool, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if chat:
        rendered = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
        return tok(rendered, add_special_tokens=False)["input_ids"]
    return tok(text)["input_ids"]


def run_cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    """A `swarmtune` command; its output decoded as UTF-8 byte for byte (a generated "\r" stays one)."""
    out = subprocess.run([sys.executable, "-m", "node", *args], capture_output=True, cwd=REPO, timeout=timeout,
                         env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8"))
    out.stdout, out.stderr = out.stdout.decode("utf-8"), out.stderr.decode("utf-8", "replace")
    return out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def serve_base(st_cache, tmp_path_factory) -> Path:
    """A 4-layer Llama with 512-wide layers (13M parameters, 50 MB fp32): big enough that loading it twice
    would show in the server's memory, small enough for a 2-core machine."""
    from node.tiny import build_tiny_base

    return build_tiny_base(tmp_path_factory.mktemp("serve-base") / "base",
                           config_overrides={"hidden_size": 512, "intermediate_size": 1536})


@pytest.fixture(scope="module")
def adapters(serve_base, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: make_adapter(serve_base, root / name, seed)
            for name, seed in (("one", 1), ("two", 2), ("three", 3), ("four", 4))}


@pytest.fixture(scope="module")
def expected(serve_base, adapters) -> dict:
    """What stock PEFT generates (greedy) for each adapter and the base: {(model, "text"|"chat"): (text, tokens)}."""
    out = {}
    for kind, chat, text in (("text", False, PROMPT), ("chat", True, QUESTION)):
        ids = prompt_ids(serve_base, chat=chat, text=text)
        out[("base", kind)] = stock_generate(serve_base, None, ids, N_TOKENS) + (len(ids),)
        for name in ("one", "two", "three"):
            out[(name, kind)] = stock_generate(serve_base, adapters[name], ids, N_TOKENS) + (len(ids),)
    return out


@pytest.fixture(scope="module")
def server(serve_base, adapters, tmp_path_factory):
    """One server for the module, started with adapter "one" only (the others are added at run time)."""
    srv = Server(["--base", str(serve_base), "--adapter", f"one={adapters['one']}", "--port", "0", "--api-key", KEY,
                  "--device", "cpu"], tmp_path_factory.mktemp("server"))
    try:
        yield srv.wait_ready()
    finally:
        srv.kill()


def _ensure(server, name: str, path: Path) -> None:
    status, body = server.http("POST", "/v1/adapters", {"name": name, "path": str(path)})
    assert status == 201 or "already served" in body["error"]["message"], body


# --------------------------------------------------------------------------- the server


def _rss(server) -> int:
    return psutil.Process(server.popen.pid).memory_info().rss


def test_base_loaded_once_adapters_added_at_run_time(server, adapters, expected):
    client = server.client()
    assert [m.id for m in client.models.list()] == ["base", "one"]
    for model in ("base", "one"):  # warm up: first generation allocates the KV cache and kernels' buffers
        client.completions.create(model=model, prompt=PROMPT, max_tokens=N_TOKENS, temperature=0)
    rss_one = _rss(server)
    for name in ("two", "three", "four"):
        status, body = server.http("POST", "/v1/adapters", {"name": name, "path": str(adapters[name])})
        assert status == 201, body
        assert body["kind"] == "folder" and body["source"] == str(adapters[name].resolve())
        client.completions.create(model=name, prompt=PROMPT, max_tokens=N_TOKENS, temperature=0)
    rss_four = _rss(server)
    status, info = server.http("GET", "/v1/adapters")
    assert status == 200 and info["base"]["loads"] == 1
    assert [a["id"] for a in info["data"]] == ["one", "two", "three", "four"]
    base_bytes = info["base"]["parameter_bytes"]
    assert base_bytes > 40 * 2**20
    grew = rss_four - rss_one
    print(f"\nserve memory: base weights {base_bytes / 2**20:.1f} MiB; RSS with 1 adapter {rss_one / 2**20:.1f} MiB, "
          f"with 4 adapters {rss_four / 2**20:.1f} MiB (+{grew / 2**20:.1f} MiB)")
    # three adapters of ~1 MB each; a second copy of the base would add its 50 MB
    assert grew < base_bytes / 2, (rss_one, rss_four, base_bytes)
    # an adapter added at run time answers as stock PEFT does with it
    got = client.completions.create(model="three", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0)
    assert got.choices[0].text == expected[("three", "text")][0]


def test_two_adapters_complete_and_stream_as_peft_does(server, adapters, expected):
    _ensure(server, "two", adapters["two"])
    client = server.client()
    assert {"base", "one", "two"} <= {m.id for m in client.models.list()}
    for model in ("one", "two", "base"):
        want, n_gen, n_prompt = expected[(model, "text")]
        r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N_TOKENS, temperature=0)
        assert r.object == "text_completion" and r.model == model
        assert r.choices[0].text == want
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (n_prompt, n_gen, n_prompt + n_gen)
        assert r.choices[0].finish_reason == ("length" if n_gen == N_TOKENS else "stop")
        chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=N_TOKENS, temperature=0, stream=True,
                                                stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == n_gen and chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason

        want, n_gen, n_prompt = expected[(model, "chat")]
        messages = [{"role": "user", "content": QUESTION}]
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=N_TOKENS, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == want
        assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, n_gen)
        stream = client.chat.completions.create(model=model, messages=messages, max_tokens=N_TOKENS, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want
    # the adapters differ, and each differs from the base
    for kind in ("text", "chat"):
        assert len({expected[(m, kind)][0] for m in ("one", "two", "base")}) == 3


def test_stop_strings_and_seeded_sampling(server, expected):
    client = server.client()
    full = expected[("one", "text")][0]
    stop = full[4:6]
    assert stop and full.find(stop) == 4
    r = client.completions.create(model="one", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:4] and r.choices[0].finish_reason == "stop"
    stream = client.completions.create(model="one", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in stream) == full[:4]
    sampled = [client.completions.create(model="one", prompt=PROMPT, max_tokens=N_TOKENS, temperature=1.0, top_p=0.9,
                                         seed=seed).choices[0].text for seed in (5, 5, 6)]
    assert sampled[0] == sampled[1] != sampled[2]


def test_concurrent_requests_never_mix_adapters(server, adapters, expected):
    _ensure(server, "two", adapters["two"])
    client = server.client()
    results, errors = {}, []

    def ask(i: int) -> None:
        model = ("one", "two")[i % 2]
        try:
            if i % 3 == 0:
                stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=N_TOKENS, temperature=0, stream=True)
                results[i] = (model, "".join(c.choices[0].text for c in stream))
            else:
                r = client.completions.create(model=model, prompt=PROMPT, max_tokens=N_TOKENS, temperature=0)
                results[i] = (model, r.choices[0].text)
        except Exception as e:  # reported below with the request it belongs to
            errors.append((i, repr(e)))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 8, errors
    for i, (model, text) in results.items():
        assert text == expected[(model, "text")][0], (i, model)


def test_unknown_model_is_a_404_in_openai_shape_and_the_key_is_required(server):
    import openai

    client = server.client()
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as e:
            client.completions.create(model="nope", prompt=PROMPT, max_tokens=4, stream=stream)
        assert e.value.status_code == 404
        assert e.value.body["code"] == "model_not_found" and "'nope'" in e.value.body["message"]
        assert e.value.body["type"] == "invalid_request_error" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="one", prompt=PROMPT, n=2)
    assert e.value.body["param"] == "n"
    status, body = server.http("GET", "/v1/models", key=None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    status, body = server.http("GET", "/v1/models", key="wrong")
    assert status == 401


def test_adapters_removed_at_run_time(server, adapters, tmp_path, st_cache):
    from node.tiny import build_tiny_base

    import openai

    _ensure(server, "four", adapters["four"])
    client = server.client()
    status, body = server.http("DELETE", "/v1/adapters/four")
    assert status == 200 and body == {"id": "four", "object": "adapter", "deleted": True}
    assert "four" not in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="four", prompt=PROMPT, max_tokens=4)
    status, body = server.http("DELETE", "/v1/adapters/four")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert server.http("DELETE", "/v1/adapters/base")[0] == 400
    # a refused adapter over HTTP leaves the served set as it was
    other = build_tiny_base(tmp_path / "other-base", config_overrides={"hidden_size": 64, "intermediate_size": 128})
    before = [m.id for m in client.models.list()]
    status, body = server.http("POST", "/v1/adapters", {"name": "wrong", "path": str(make_adapter(other, tmp_path / "wrong", 0))})
    assert status == 400 and "does not fit the base" in body["error"]["message"], body
    status, body = server.http("POST", "/v1/adapters", {"name": "notpeft", "path": str(tmp_path)})
    assert status == 400 and "not a PEFT adapter folder" in body["error"]["message"], body
    assert [m.id for m in client.models.list()] == before
    # and a name comes back after removal, with the adapter's own answer
    status, _ = server.http("POST", "/v1/adapters", {"name": "four", "path": str(adapters["one"])})
    assert status == 201
    a = client.completions.create(model="four", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0).choices[0].text
    b = client.completions.create(model="one", prompt=PROMPT, max_tokens=N_TOKENS, temperature=0).choices[0].text
    assert a == b


# --------------------------------------------------------------------------- generate


def test_generate_applies_the_chat_template(serve_base, adapters, expected):
    # no --base: the adapter's adapter_config.json names it
    out = run_cli("generate", "--adapter", str(adapters["one"]), "--max-tokens", str(N_TOKENS), "--device", "cpu", QUESTION)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == expected[("one", "chat")][0] + "\n"
    assert "chat template" in out.stderr
    raw = run_cli("generate", "--base", str(serve_base), "--adapter", str(adapters["two"]), "--raw",
                  "--max-tokens", str(N_TOKENS), "--device", "cpu", PROMPT)
    assert raw.returncode == 0, raw.stderr[-3000:]
    assert raw.stdout == expected[("two", "text")][0] + "\n"


# --------------------------------------------------------------------------- bad input


def _refused(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stdout[-2000:], out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    for needle in needles:
        assert needle in out.stderr, out.stderr[-3000:]


def test_bad_input_is_refused_with_exit_2(serve_base, adapters, tmp_path, st_cache):
    from node.tiny import build_tiny_base

    notpeft = tmp_path / "notpeft"
    notpeft.mkdir()
    (notpeft / "model.safetensors").write_bytes(b"")
    _refused(run_cli("serve", "--base", str(serve_base), "--adapter", f"x={notpeft}", "--port", "0"),
             "not a PEFT adapter folder", "adapter_config.json")
    _refused(run_cli("generate", "--adapter", str(notpeft), "hi"), "not a PEFT adapter folder")
    _refused(run_cli("serve", "--base", str(serve_base), "--adapter", "noequals", "--port", "0"), "expected NAME=PATH")
    _refused(run_cli("serve", "--base", str(tmp_path / "missing-base"), "--adapter", f"x={adapters['one']}", "--port", "0"),
             "missing-base", "not found")
    _refused(run_cli("serve", "--swarm", f"x={tmp_path / 'swarm.toml'}", "--port", "0"), "--initial-peers")
    # an adapter made for another base: other shapes, and more layers than this base has
    narrow = make_adapter(build_tiny_base(tmp_path / "narrow", config_overrides={"hidden_size": 64, "intermediate_size": 128}),
                          tmp_path / "narrow-adapter", 0)
    _refused(run_cli("serve", "--base", str(serve_base), "--adapter", f"x={narrow}", "--port", "0", "--device", "cpu"),
             "does not fit the base", "size mismatch")
    deep = make_adapter(build_tiny_base(tmp_path / "deep", config_overrides={"hidden_size": 512, "intermediate_size": 1536,
                                                                            "num_hidden_layers": 6}),
                        tmp_path / "deep-adapter", 0)
    _refused(run_cli("generate", "--base", str(serve_base), "--adapter", str(deep), "--device", "cpu", "hi"),
             "does not fit the base", "have no place in this base")
    # a swarm whose manifest names another base (by fingerprint) is refused before joining its DHT
    manifest = write_test_manifest(tmp_path / "tiny-swarm.toml", build_tiny_base(tmp_path / "tiny"))
    _refused(run_cli("serve", "--base", str(serve_base), "--swarm", f"live={manifest}", "--port", "0", "--device", "cpu",
                     "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"),
             "has fingerprint", "expects")
    # a taken port is refused before the model loads
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        _refused(run_cli("serve", "--base", str(serve_base), "--adapter", f"x={adapters['one']}", "--port", str(port)),
                 f"port {port} on 127.0.0.1 is in use")


# --------------------------------------------------------------------------- pure parts


def test_followed_state_rules():
    from node.swarm.membership import PeerInfo
    from node.swarm.quorum import followed_state

    def peer(pid, round_, shards, hashes, syncing=False):
        return pid, PeerInfo(pid, round_, tuple(shards), (), 0.0, 0.0, syncing, dict(hashes))

    view = dict([peer("a", 5, [0, 1], {0: "x0", 1: "x1"}), peer("b", 5, [0, 1], {0: "x0", 1: "x1"}),
                 peer("c", 5, [1], {1: "bad"})])
    assert followed_state(view, 2) == (5, {0: "x0", 1: "x1"}, {0: ["a", "b"], 1: ["a", "b"]})
    # one peer claiming a far round cannot move the followed round (lower median)
    liar = dict(view, z=peer("z", 999, [0, 1], {0: "evil", 1: "evil"})[1])
    assert followed_state(liar, 2)[0] == 5
    # a shard whose trainers are all still at the previous round: wait
    assert followed_state(dict([peer("a", 6, [0], {0: "n0"}), peer("b", 5, [1], {1: "o1"})]), 2) is None
    # a shard nobody trains keeps its initial bits (left out); syncing peers and non-trainers do not count
    assert followed_state(dict([peer("a", 3, [0], {0: "h"}), peer("s", 9, [0, 1], {}, syncing=True),
                                peer("f", 0, [], {})]), 2) == (3, {0: "h"}, {0: ["a"]})
    assert followed_state({}, 2) is None


def test_decoder_holds_back_what_may_still_change():
    from node.serve import _Decoder
    from node.tiny import build_tokenizer

    tok = build_tokenizer()
    ids = tok("héllo world, bye", add_special_tokens=False)["input_ids"]
    pieces, dec = [], _Decoder(tok, ("ld,",))
    for i in ids:
        pieces.append(dec.push(i))
        if dec.stopped:
            break
    assert dec.stopped and dec.text == "héllo wor" and "".join(pieces) == "héllo wor"
    assert "\ufffd" not in "".join(pieces)  # the two bytes of "é" came out as one character
    dec = _Decoder(tok, ("xyz",))
    pieces = [dec.push(i) for i in ids] + [dec.finish()]
    assert "".join(pieces) == dec.text == "héllo world, bye"


def test_swarm_adapter_starts_from_the_nodes_initial_bits(tiny_base, tmp_path, adapters_for_tiny):
    """Shards nobody trains keep the manifest's initial bits at every node; the served copy must too,
    whether it is the first adapter on the base or joins others."""
    from node.manifest import load_manifest
    from node.model import build_lora_model
    from node.serve import Engine

    manifest = load_manifest(write_test_manifest(tmp_path / "swarm.toml", tiny_base))
    _, node_adapter = build_lora_model(manifest, tiny_base, device="cpu")
    engine = Engine.load(str(tiny_base), device="cpu")
    m, plan = engine.swarm_manifest(tmp_path / "swarm.toml")
    _, first = engine.attach_manifest_lora("live", m, plan, source="test")
    engine.add_folder("other", adapters_for_tiny)
    _, second = engine.attach_manifest_lora("live2", m, plan, source="test")
    assert first.names == node_adapter.names
    assert first.state_hash() == second.state_hash() == node_adapter.state_hash()


@pytest.fixture
def adapters_for_tiny(tiny_base, tmp_path) -> Path:
    return make_adapter(tiny_base, tmp_path / "tiny-adapter", 7)


# --------------------------------------------------------------------------- following a swarm


def _wait_served_round(srv: Server, name: str, at_least: int, timeout: float = 90) -> dict:
    deadline = time.time() + timeout
    entry = None
    while time.time() < deadline:
        status, body = srv.http("GET", "/v1/adapters")
        entry = next((a for a in body.get("data", []) if a["id"] == name), None)
        if entry and entry["round"] is not None and entry["round"] >= at_least:
            return entry
        time.sleep(0.5)
    raise AssertionError(f"{name} never reached round {at_least}: {entry}\n{srv.err.read_text()[-3000:]}")


def _pause_all(nodes) -> None:
    from node.control_client import ControlClient

    for node in nodes:
        with ControlClient(node.home / "node.sock") as client:
            client.pause()
    deadline = time.time() + 90
    for node in nodes:
        while True:
            with ControlClient(node.home / "node.sock") as client:
                if client.status()["state"] == "paused":
                    break
            assert time.time() < deadline, f"{node.home.name} never paused"
            time.sleep(0.2)


def _resume_all(nodes) -> None:
    from node.control_client import ControlClient

    for node in nodes:
        with ControlClient(node.home / "node.sock") as client:
            client.resume()


def _node_hash_at(nodes, round_: int) -> set[str]:
    """The nodes' adapter state hash at the start of `round_` (every row that ended at that round)."""
    return {row["hash"] for node in nodes for row in node.rounds() if row["next_round"] == round_}


@pytest.mark.swarm
@pytest.mark.timeout(420)
def test_serve_follows_a_running_swarm(tmp_path, tiny_base, spawn_node):
    manifest = write_test_manifest(tmp_path / "swarm.toml", tiny_base, rounds={"max_rounds": 0})
    a = spawn_node(manifest, "a", "--min-peers", "2")
    peers = a.wait_info()["maddrs"]
    b = spawn_node(manifest, "b", "--min-peers", "2", "--initial-peers", *peers)
    srv = Server(["--swarm", f"live={manifest}", "--initial-peers", *peers, "--port", "0", "--api-key", KEY,
                  "--poll-interval", "1", "--device", "cpu"], tmp_path)
    try:
        srv.wait_ready()
        a.wait_round(2, timeout=240)
        _pause_all((a, b))
        first = _wait_served_round(srv, "live", 2)
        assert first["state_hash"] in _node_hash_at((a, b), first["round"]), (first, a.rounds()[-3:], b.rounds()[-3:])
        assert len(_node_hash_at((a, b), first["round"])) == 1
        # the served adapter answers (and the base is the manifest's, found without --base)
        client = srv.client()
        assert client.completions.create(model="live", prompt="12: even or odd?", max_tokens=4, temperature=0).choices
        _resume_all((a, b))
        a.wait_round(first["round"] + 2, timeout=240)
        _pause_all((a, b))
        later = _wait_served_round(srv, "live", first["round"] + 2)
        assert later["state_hash"] in _node_hash_at((a, b), later["round"]), (later, a.rounds()[-3:])
        assert later["state_hash"] != first["state_hash"]
        models = {m.id: m for m in client.models.list()}
        assert models["live"].model_extra["round"] == later["round"]
    finally:
        srv.kill()
