"""One base model, many LoRA adapters: the engine behind `swarmtune serve` and `swarmtune generate`.

    engine = Engine.load("./base")                       # the base, loaded once
    engine.add_folder("math", "./math-adapter")          # a PEFT adapter folder (checked against the base)
    engine.add_swarm("live", "swarm.toml", initial_peers=[...])   # follows a running swarm's adapter
    out = engine.generate("math", engine.encode_chat([{"role": "user", "content": "2+2?"}]), Sampling())

Every adapter is a PEFT LoRA adapter on the one base (`PeftModel.load_adapter`), under an
internal PEFT name; requests name it by its served name, and the base itself is served as
`base` (with the adapters switched off). The engine's lock makes "switch to the request's
adapter, generate" one step, so two requests never mix adapters, and adapters are added,
removed and hot-swapped under the same lock, never in the middle of a generation.

A swarm adapter is the manifest's LoRA config on the base, with the manifest's initial bits;
a feed thread polls the swarm (node.swarm.follow) and, when its trainers announce a newer
round, downloads every changed shard, checks each against the hash the trainers advertise
(the nodes' own shard hash, over the same names and bytes), and installs them all at once:
the served adapter is bit-identical to the swarm's at the round it reports.

The HTTP layer (OpenAI's API) is node/serve_api.py; the commands are node/cli/serve.py.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

logger = logging.getLogger(__name__)

BASE_ID = "base"  # the served name of the base model without an adapter
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")


class ServeError(RuntimeError):
    """Input the engine cannot use (an adapter folder, a base, a manifest); the message says the fix."""


class UnknownModel(ServeError):
    """A request named a model the engine does not serve."""


class NotReady(ServeError):
    """A swarm adapter that has not downloaded a round yet."""


@dataclass(frozen=True)
class Sampling:
    """What a request asks of one generation (OpenAI's names and defaults, except max_tokens)."""

    max_tokens: int = 16  # tokens to generate at most
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass
    stop: tuple[str, ...] = ()  # strings that end the output (not included in it)
    seed: int | None = None  # seeds torch's RNG for this request (sampling only)


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) | "length"


@dataclass
class Served:
    """One model the engine serves."""

    name: str
    kind: str  # base | folder | swarm
    source: str  # the folder, the manifest, or the base's folder
    internal: str | None  # the PEFT adapter name (None for the base)
    created: int = field(default_factory=lambda: int(time.time()))
    round: int | None = None  # swarm adapters: the swarm round whose start state is loaded
    state_hash: str | None = None  # swarm adapters: the nodes' adapter state hash of that state
    feed: "SwarmFeed | None" = None

    def describe(self) -> dict:
        out = {"id": self.name, "kind": self.kind, "source": self.source, "created": self.created}
        if self.kind == "swarm":
            out.update(round=self.round, state_hash=self.state_hash, trainers=self.feed.follower.trainers() if self.feed else 0)
        return out


# --------------------------------------------------------------------------- adapter folders


def read_adapter_config(path: str | Path) -> dict:
    """adapter_config.json of a PEFT LoRA adapter folder; ServeError when the folder is not one."""
    from node.model import ModelError, read_peft_config

    try:
        return read_peft_config(path, "can be served")[1]
    except ModelError as e:
        raise ServeError(str(e)) from None


def adapter_base(path: str | Path) -> tuple[str, str]:
    """(base model, revision) an adapter folder names in adapter_config.json, for `generate` without --base."""
    cfg = read_adapter_config(path)
    base = cfg.get("base_model_name_or_path")
    if not isinstance(base, str) or not base:
        raise ServeError(f"{Path(path) / 'adapter_config.json'} names no base model (base_model_name_or_path); pass --base")
    return base, str(cfg.get("revision") or "")


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise ServeError(f"adapter name {name!r}: use 1-128 letters, digits and . _ : / @ + - (starting with a letter or digit)")
    if name == BASE_ID:
        raise ServeError(f"adapter name {BASE_ID!r} is taken by the base model itself; pick another name")
    return name


# --------------------------------------------------------------------------- decoding


class _Decoder:
    """Generated tokens -> text, piece by piece, ending at the first stop string (which is cut off).

    A piece is emitted only once it cannot change: an incomplete multi-byte character at the end
    (decoded as U+FFFD) and any tail that could begin a stop string are held back until the next
    token, so the pieces of a stream always add up to the text of the same request unstreamed."""

    def __init__(self, tokenizer, stop: tuple[str, ...]):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[:min(hits)], True
            return self.finish()
        self.text = text
        safe = len(text)
        while safe > self.emitted and text[safe - 1] == "\ufffd":
            safe -= 1
        hold = max((j for s in self.stop for j in range(1, len(s)) if text[:safe].endswith(s[:j])), default=0)
        return self._emit(max(self.emitted, safe - hold))

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted:upto]
        self.emitted = upto
        return piece


class _Watch:
    """A stopping criterion that sees every generated token: feeds the decoder, streams its pieces, and
    stops at a stop string or when the client went away."""

    def __init__(self, decoder: _Decoder, eos: set[int], on_text: Callable[[str], None] | None, cancel: threading.Event | None):
        self.decoder, self.eos, self.on_text, self.cancel = decoder, eos, on_text, cancel
        self.count = 0
        self.ended = False  # an end-of-sequence token came

    def __call__(self, input_ids, scores, **kwargs):
        token = int(input_ids[0, -1])
        self.count += 1
        if token in self.eos:
            self.ended = True
        else:
            piece = self.decoder.push(token)
            if piece and self.on_text:
                self.on_text(piece)
        done = self.decoder.stopped or self.ended or (self.cancel is not None and self.cancel.is_set())
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------- the engine


class Engine:
    """The base, its adapters, and one lock around every switch, generation and weight change."""

    def __init__(self, model, tokenizer, *, base_source: str, base_dir: Path, device: str):
        self.base = model  # the transformers model; after the first adapter it lives inside self.peft
        self.peft = None  # the PeftModel, created with the first adapter
        self.tokenizer = tokenizer
        self.base_source = base_source
        self.base_dir = Path(base_dir)
        self.device = device
        self.lock = threading.Lock()
        self.base_loads = 1  # stays 1: adapters come and go, the base is never loaded again
        self.models: dict[str, Served] = {BASE_ID: Served(BASE_ID, "base", str(base_dir), None)}
        self._next = 0
        gen = getattr(model, "generation_config", None)
        eos = getattr(gen, "eos_token_id", None)
        eos = eos if eos is not None else tokenizer.eos_token_id
        self.eos = {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None}
        pad = tokenizer.pad_token_id
        self.pad = pad if pad is not None else next(iter(self.eos), 0)
        self.context = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    @classmethod
    def load(cls, base: str, *, revision: str = "", dtype: str = "float32", quantization: str = "none",
             device: str = "auto") -> "Engine":
        """Load the base once (a folder, a hub id, or builtin:tiny) and its tokenizer."""
        from node.model import ModelError, load_base, load_tokenizer, pick_device, resolve_base

        try:
            device = pick_device(device)
            base_dir = resolve_base(base, revision=revision)
            model = load_base(base_dir, dtype=dtype, quantization=quantization, device=device)
            tokenizer = load_tokenizer(base_dir)
        except ModelError as e:
            raise ServeError(str(e)) from None
        model.eval()
        return cls(model, tokenizer, base_source=base, base_dir=base_dir, device=device)

    def parameter_bytes(self) -> int:
        """Bytes of the base's own weights (adapters excluded)."""
        return sum(p.numel() * p.element_size() for n, p in self.base.named_parameters() if "lora_" not in n)

    # ------------------------------------------------------------------ adapters

    def _internal_name(self) -> str:
        self._next += 1
        return f"swarmtune_adapter_{self._next}"

    def _attach(self, internal: str, config) -> None:
        """A new adapter on the base (lock held): the first one wraps the base in a PeftModel."""
        with warnings.catch_warnings():
            # PEFT warns that the config names another base path; add_folder checks the fit itself
            warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            if self.peft is None:
                from peft import get_peft_model

                self.peft = get_peft_model(self.base, config, adapter_name=internal)
            else:
                self.peft.add_adapter(internal, config)

    def _detach(self, internal: str) -> None:
        if self.peft is not None and internal in self.peft.peft_config:
            with warnings.catch_warnings():  # PEFT warns when the active adapter goes; every request sets its own
                warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
                self.peft.delete_adapter(internal)

    def _claim(self, name: str) -> str:
        check_name(name)
        if name in self.models:
            raise ServeError(f"a model named {name!r} is already served; remove it first (DELETE /v1/adapters/{name}) "
                             "or pick another name")
        return name

    def add_folder(self, name: str, path: str | Path) -> Served:
        """Load a PEFT LoRA adapter folder onto the base. The folder is checked first (PEFT format, LoRA),
        then against the base: every module it targets must exist with the shapes it has, and every
        tensor in it must land somewhere (else it was made for another base); a refused adapter leaves
        nothing behind."""
        from peft import LoraConfig
        from peft.utils import load_peft_weights, set_peft_model_state_dict

        cfg = read_adapter_config(path)
        folder = str(Path(path).expanduser().resolve())
        made_for = cfg.get("base_model_name_or_path") or "a base it does not name"
        other_base = (f"the adapter {folder} does not fit the base {self.base_source} (its adapter_config.json says it "
                      f"was made for {made_for}); serve it on the base it was trained on (--base)")
        try:
            config = LoraConfig.from_pretrained(folder)
            weights = load_peft_weights(folder, device="cpu")
        except (OSError, ValueError, TypeError) as e:
            raise ServeError(f"{folder}: cannot read the adapter ({type(e).__name__}: {e}); re-export it") from None
        config.inference_mode = True
        with self.lock:
            self._claim(name)
            internal = self._internal_name()
            try:
                self._attach(internal, config)
            except ValueError as e:  # PEFT: a target module the base lacks
                raise ServeError(f"{other_base} ({e})") from None
            try:
                result = set_peft_model_state_dict(self.peft, weights, adapter_name=internal)
            except RuntimeError as e:  # size mismatch: same module names, other shapes
                self._detach(internal)
                first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e)[:300])
                first = first.replace(f".{internal}.", ".")  # the tensor's name as the adapter file has it
                raise ServeError(f"{other_base} ({first})") from None
            missing = [k for k in result.missing_keys if "lora_" in k and f".{internal}." in k + "."]
            unexpected = [k for k in result.unexpected_keys if "lora_" in k]
            if missing or unexpected:
                self._detach(internal)
                what = (f"{len(unexpected)} of its tensors have no place in this base (e.g. {unexpected[0]})" if unexpected
                        else f"{len(missing)} of the base's adapted weights have no tensor in it (e.g. {missing[0]})")
                raise ServeError(f"{other_base}: {what}")
            self.peft.eval()
            served = self.models[name] = Served(name, "folder", folder, internal)
        logger.info("adapter %r loaded from %s", name, folder)
        return served

    def add_swarm(self, name: str, manifest_path: str | Path, *, initial_peers, poll_s: float = 2.0) -> Served:
        """Serve a running swarm's adapter: the manifest's LoRA on this base (which must be the manifest's, by
        fingerprint), kept equal to the swarm's latest round by a feed thread. Needs peers to ask."""
        from node.swarm.dht import SwarmError
        from node.swarm.follow import SwarmFollower

        if not initial_peers:
            raise ServeError(f"adapter {name!r} follows a swarm: pass --initial-peers (any node's address, as its log prints it)")
        with self.lock:
            self._claim(name)
        m, plan = self.swarm_manifest(manifest_path)
        try:
            follower = SwarmFollower(m, initial_peers=list(initial_peers), num_shards=len(plan))
        except SwarmError as e:
            raise ServeError(str(e)) from None
        try:
            served, adapter = self.attach_manifest_lora(name, m, plan, source=str(Path(manifest_path).resolve()))
        except BaseException:
            follower.shutdown()
            raise
        served.feed = SwarmFeed(self, served, m.swarm_id, follower, adapter, poll_s=poll_s)
        served.feed.start()
        logger.info("adapter %r follows swarm %s… (%s)", name, m.swarm_id[:16], manifest_path)
        return served

    def swarm_manifest(self, manifest_path: str | Path):
        """(manifest, shard plan) of a swarm whose adapter this base can serve (its base, by fingerprint)."""
        from node.manifest import ManifestError, load_manifest
        from node.model import ModelError, check_fingerprint, check_shard_plan, num_layers

        try:
            m = load_manifest(manifest_path)
            check_fingerprint(self.base_dir, m.base.fingerprint, manifest_path=str(manifest_path))
            return m, check_shard_plan(m.shards.plan, num_layers(self.base))
        except (ManifestError, ModelError) as e:
            raise ServeError(str(e)) from None

    def attach_manifest_lora(self, name: str, m, plan, *, source: str):
        """A served adapter with the manifest's LoRA config and the nodes' initial bits (shards nobody trains
        keep them, as at every node; the manifest's [start] adapter when it has one): (Served, the
        node.model.Adapter view of its parameters)."""
        from node.model import Adapter, ModelError, fit_adapter, lora_config, read_peft_adapter

        start = None
        if m.start.hash:
            folder = m.resolve_path(m.start.adapter)
            try:
                start = (folder, read_peft_adapter(folder)[1])
            except ModelError as e:
                raise ServeError(str(e)) from None

        with self.lock:
            self._claim(name)
            internal = self._internal_name()
            torch.manual_seed(m.lora.init_seed)  # as node.model.attach_lora seeds it
            self._attach(internal, lora_config(rank=m.lora.rank, alpha=m.lora.alpha, dropout=m.lora.dropout,
                                               target_modules=m.lora.target_modules))
            self.peft.eval()
            adapter = Adapter.from_model(self.peft, plan, adapter=internal)
            if start is not None:
                try:
                    adapter.load_all(fit_adapter(adapter, start[1], start[0]))
                    if adapter.state_hash() != m.start.hash:
                        raise ModelError(f"the start adapter {start[0]} is not the one the manifest names ([start] hash)")
                except ModelError as e:
                    self._detach(internal)
                    raise ServeError(str(e)) from None
            served = self.models[name] = Served(name, "swarm", source, internal)
        return served, adapter

    def remove(self, name: str) -> None:
        served = self.get(name)
        if served.kind == "base":
            raise ServeError(f"{BASE_ID!r} is the base model itself and cannot be removed")
        if served.feed is not None:
            served.feed.stop()
        with self.lock:
            self.models.pop(name, None)
            self._detach(served.internal)
        logger.info("adapter %r removed", name)

    def get(self, name: str) -> Served:
        served = self.models.get(name)
        if served is None:
            raise UnknownModel(f"the model {name!r} does not exist; served here: {', '.join(sorted(self.models))}")
        return served

    def close(self) -> None:
        for served in list(self.models.values()):
            if served.feed is not None:
                served.feed.stop()

    # ------------------------------------------------------------------ prompts and generation

    def encode_text(self, prompt: str) -> list[int]:
        return self.tokenizer(prompt)["input_ids"]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The tokenizer's chat template with the assistant's turn opened (ServeError without a template)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise ServeError("the base's tokenizer has no chat template; use /v1/completions with a plain prompt")
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def generate(self, name: str, prompt_ids: list[int], sampling: Sampling, *, on_text: Callable[[str], None] | None = None,
                 cancel: threading.Event | None = None) -> Generation:
        """Generate with the named model; `on_text` gets each piece of text as it is final."""
        from transformers import StoppingCriteriaList

        if self.context and len(prompt_ids) + sampling.max_tokens > self.context:
            raise ServeError(f"this model's maximum context length is {self.context} tokens; the prompt has "
                             f"{len(prompt_ids)} and max_tokens asks for {sampling.max_tokens}: shorten one of them")
        decoder = _Decoder(self.tokenizer, sampling.stop)
        watch = _Watch(decoder, self.eos, on_text, cancel)
        greedy = sampling.temperature == 0
        # OpenAI's semantics, not the base's generation_config: no top-k, no repetition penalty
        kwargs = dict(max_new_tokens=sampling.max_tokens, do_sample=not greedy, repetition_penalty=1.0,
                      eos_token_id=sorted(self.eos), pad_token_id=self.pad, use_cache=True,
                      stopping_criteria=StoppingCriteriaList([watch]))
        if not greedy:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        with self.lock:
            served = self.get(name)
            if served.kind == "swarm" and served.round is None:
                raise NotReady(f"adapter {name!r} follows a swarm and has not downloaded its state yet; retry in a few seconds")
            ids = torch.tensor([prompt_ids], device=self.device)
            inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            if served.internal is None:
                if self.peft is not None and self.peft.peft_config:
                    # PEFT's disable_adapter() reads the active adapter's config: make it one that exists
                    self.peft.set_adapter(next(iter(self.peft.peft_config)))
                    with self.peft.disable_adapter():
                        self.peft.generate(**inputs, **kwargs)
                else:  # no adapter left: the LoRA layers hold none, the plain model is the base
                    self.base.generate(**inputs, **kwargs)
            else:
                self.peft.set_adapter(served.internal)
                self.peft.generate(**inputs, **kwargs)
        tail = decoder.finish()
        if tail and on_text:
            on_text(tail)
        stopped = decoder.stopped or watch.ended
        return Generation(decoder.text, len(prompt_ids), watch.count, "stop" if stopped or watch.count < sampling.max_tokens else "length")


# --------------------------------------------------------------------------- following a swarm


class SwarmFeed:
    """Keeps one served adapter equal to a swarm's latest state: polls, downloads what changed, checks, swaps."""

    def __init__(self, engine: Engine, served: Served, swarm_id: str, follower, adapter, *, poll_s: float):
        self.engine, self.served, self.swarm_id = engine, served, swarm_id
        self.follower, self.adapter, self.poll_s = follower, adapter, poll_s
        self.hashes = {k: adapter.shard_hash(k) for k in range(adapter.num_shards)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"swarm-feed-{served.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.follower.shutdown()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # a background thread that dies silently would freeze the adapter unnoticed
                logger.exception("adapter %r: following the swarm failed this time; trying again", self.served.name)
            self._stop.wait(self.poll_s)

    def poll(self) -> bool:
        """One look at the swarm; True when a newer state was installed."""
        from node.model import tensors_hash

        target = self.follower.newest()
        if target is None:
            return False
        round_, hashes, donors = target
        if self.served.round == round_ and all(self.hashes[k] == h for k, h in hashes.items()):
            return False
        got = {}
        for k, want in sorted(hashes.items()):
            if self.hashes[k] == want:
                continue
            reply = self.follower.fetch(k, donors[k])
            if reply is None or self._stop.is_set():
                return False
            donor, meta, tensors = reply
            if (meta.round, meta.hash, meta.swarm) != (round_, want, self.swarm_id):
                return False  # the donor moved on since it announced: the next poll sees the newer round
            params, names = self.adapter.shard_params(k), self.adapter.shard_names(k)
            tensors = tensors[:len(params)]  # adapter tensors first, then the optimizer's moments (not served)
            if len(tensors) != len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
                logger.warning("adapter %r: shard %d from %s… does not fit the manifest's LoRA; ignored", self.served.name, k, donor[:16])
                return False
            if tensors_hash(names, tensors) != want:
                logger.warning("adapter %r: shard %d from %s… does not match the hash its trainers advertise for round %d; "
                               "ignored", self.served.name, k, donor[:16], round_)
                return False
            got[k] = tensors
        with self.engine.lock:  # never in the middle of a generation; every shard of one round at once
            for k, tensors in got.items():
                self.adapter.load_shard(k, tensors)
                self.hashes[k] = hashes[k]
            self.served.round, self.served.state_hash = round_, self.adapter.state_hash()
        logger.info("adapter %r: swarm round %d loaded (state %s…, %d shard(s) downloaded)", self.served.name, round_,
                    self.served.state_hash[:12], len(got))
        return True
