"""The frozen base model, its fingerprint, and the PEFT LoRA adapter cut into layer shards.

- `resolve_base(spec, revision=...)`: the folder of a base: `builtin:tiny`, a local folder,
  or a hub id fetched into (or found in) the Hugging Face cache at a revision; a download
  takes `HUB_FILES` only (weights, config, every tokenizer and chat template form).
- `base_fingerprint(dir)`: sha256 over the model config and every weight tensor, read
  straight from the safetensors files (no model load), cached beside the model (in
  $SWARMTUNE_CACHE for Hugging Face cache snapshots, which stay as the Hub wrote them).
- `load_base(...)`: a Hugging Face causal LM from that folder, fp32/bf16,
  or 4-bit NF4 / 8-bit through bitsandbytes; every base weight frozen.
- `attach_lora(...)`: PEFT LoRA with the manifest's config and a seeded init, so every
  node starts from the same adapter bits; `check_target_modules` runs the same check on
  a weightless (meta-device) copy of the model, so `swarm init` refuses bad modules cheaply.
- Start adapters (`swarm init --adapter PATH`): `read_peft_adapter` reads a stock PEFT LoRA
  folder, `fit_adapter` checks it against the base (every adapted weight, every shape), and
  `start_adapter_hash` gives, from a meta-device copy, the state hash every node must hold
  once `build_lora_model` has loaded it.
- `Adapter`: the LoRA parameters grouped by shard (contiguous layer ranges), with
  hashes, flatten/unflatten for averaging and state sync, and the trainable switch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

FINGERPRINT_VERSION = "swarmtune/base-fingerprint/v1"
_CACHE_NAME = ".swarmtune-fingerprint.json"
# config keys that describe how a file was written, not what the model computes
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "_commit_hash", "architectures_source"}


class ModelError(RuntimeError):
    """The base model or the adapter cannot be used; the message says why and what to do."""


# --------------------------------------------------------------------------- locating

BUILTIN_BASE = "builtin:tiny"  # the demo's tiny Llama, built locally (node.tiny)


# What a hub download takes: weights, configs, and everything a tokenizer may need, chat templates in
# every form transformers reads (`chat_template.jinja`, `additional_chat_templates/*.jinja`,
# `chat_template.json`, or inside tokenizer_config.json). No `*.py`: remote code is never run, and no
# `*.bin` / `*.pth` / `*.gguf` duplicates of the weights. ("*" also matches "/" in these patterns.)
HUB_FILES = (
    "*.json",  # config, generation_config, tokenizer_config, special_tokens_map, chat_template, vocab, indexes
    "*.safetensors",
    "*.jinja",
    "tokenizer*",
    "*.model",  # sentencepiece (tokenizer.model, spiece.model)
    "*.tiktoken",
    "*.txt",  # merges.txt, vocab.txt
)

_SNAPSHOT_RE = re.compile(r"models--(?P<repo>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


def hub_snapshot_of(model_dir: Path) -> tuple[str, str] | None:
    """(hub id, commit) when `model_dir` is a snapshot folder of the Hugging Face cache, else None."""
    m = _SNAPSHOT_RE.search(Path(model_dir).as_posix())
    return (m.group("repo").replace("--", "/", 1), m.group("commit")) if m else None


def resolve_base(spec: str, revision: str = "") -> Path:
    """The folder of a manifest's base: the built-in tiny model, a local folder or a hub id (at `revision`)."""
    if spec == BUILTIN_BASE:
        from node.tiny import build_tiny_base, default_tiny_dir

        return build_tiny_base(default_tiny_dir()).resolve()
    return resolve_model_dir(spec, revision)


def pick_device(spec: str) -> str:
    """`auto` -> cuda when torch sees a GPU, else cpu; a cuda device without a GPU is an error."""
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {spec}: no CUDA GPU is visible to torch; use --device cpu")
    return spec


def resolve_model_dir(model: str, revision: str = "") -> Path:
    """A local folder as is, or a hub id resolved through the local Hugging Face cache / the Hub.
    `revision` (commit, tag or branch; "" = main) applies to hub ids only."""
    from node.manifest import looks_like_hub_id

    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"base model folder {p} has no config.json; point --base-model at a Hugging Face model folder")
        return p.resolve()
    if model.startswith((".", "/", "~")) or not looks_like_hub_id(model):
        raise ModelError(f"base model folder {p} not found; check the path, or set [base] model to a Hugging Face hub id (org/name)")
    at = f" at revision {revision!r}" if revision else ""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, revision=revision or None, allow_patterns=list(HUB_FILES)))
    except Exception as e:  # network, auth, missing repo or revision, offline cache miss: all end the same way
        raise ModelError(
            f"base model '{model}'{at} is neither a local folder nor in the Hugging Face cache, and could not be "
            f"downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); download it once with "
            f"`hf download {model}{' --revision ' + revision if revision else ''}` (offline: HF_HUB_OFFLINE=1 then uses "
            "the cache), or pass a local folder with --base-model PATH"
        ) from None


def load_tokenizer(model_dir: Path):
    """The base's tokenizer (chat template included, in whichever file the folder keeps it)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError, TypeError) as e:
        raise ModelError(f"could not load the tokenizer of {model_dir}: {e}") from None


# --------------------------------------------------------------------------- fingerprint


def _safetensors_index(path: Path) -> list[tuple[str, str, list[int], int, int]]:
    """(name, dtype, shape, start, end) of every tensor, from the file header alone."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ModelError(f"{path} is truncated (no safetensors header); re-download the model")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ModelError(f"{path} has a corrupt safetensors header; re-download the model")
        header = json.loads(f.read(n))
    base = 8 + n
    out = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        out.append((name, info["dtype"], info["shape"], base + start, base + end))
    return out


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        if list(model_dir.glob("*.bin")):
            raise ModelError(
                f"{model_dir} holds only PyTorch .bin weights; swarmtune fingerprints safetensors. "
                "Convert once: `python -c \"from transformers import AutoModelForCausalLM as M; "
                f"M.from_pretrained('{model_dir}').save_pretrained('{model_dir}-st')\"`"
            )
        raise ModelError(f"{model_dir} has no *.safetensors weight files")
    return files


def _compute_fingerprint(model_dir: Path) -> str:
    h = hashlib.sha256(FINGERPRINT_VERSION.encode() + b"\0")
    cfg = json.loads((model_dir / "config.json").read_text())
    for k in _VOLATILE_CONFIG_KEYS:
        cfg.pop(k, None)
    h.update(json.dumps(cfg, sort_keys=True, separators=(",", ":")).encode() + b"\0")
    entries = []
    for f in _weight_files(model_dir):
        entries += [(name, dtype, shape, start, end, f) for name, dtype, shape, start, end in _safetensors_index(f)]
    seen = set()
    for name, dtype, shape, start, end, f in sorted(entries, key=lambda e: e[0]):
        if name in seen:
            raise ModelError(f"{model_dir}: tensor {name} appears in two weight files")
        seen.add(name)
        th = hashlib.sha256()
        with open(f, "rb") as fh:
            fh.seek(start)
            left = end - start
            while left:
                chunk = fh.read(min(left, 1 << 22))
                if not chunk:
                    raise ModelError(f"{f} is truncated inside tensor {name}; re-download the model")
                th.update(chunk)
                left -= len(chunk)
        h.update(f"{name}\0{dtype}\0{shape}\0".encode() + th.digest())
    return h.hexdigest()


def _file_stamp(model_dir: Path) -> dict[str, list[int]]:
    files = [model_dir / "config.json", *_weight_files(model_dir)]
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def base_fingerprint(model_dir: Path) -> str:
    """sha256 over config and all weight tensors; cached beside the model (or in $SWARMTUNE_CACHE when the
    folder is read-only or a Hugging Face cache snapshot, which holds only the Hub's files)."""
    model_dir = Path(model_dir)
    stamp = _file_stamp(model_dir)
    cache_paths = [_user_cache_dir() / "fingerprints" / (hashlib.sha256(str(model_dir).encode()).hexdigest() + ".json")]
    if hub_snapshot_of(model_dir) is None:
        cache_paths.insert(0, model_dir / _CACHE_NAME)
    for cp in cache_paths:
        try:
            cached = json.loads(cp.read_text())
            if cached.get("version") == FINGERPRINT_VERSION and cached.get("files") == stamp:
                return cached["fingerprint"]
        except (OSError, ValueError, KeyError, AttributeError):
            pass
    fp = _compute_fingerprint(model_dir)
    payload = json.dumps({"version": FINGERPRINT_VERSION, "files": stamp, "fingerprint": fp})
    for cp in cache_paths:
        try:
            cp.parent.mkdir(parents=True, exist_ok=True)
            tmp = cp.with_name(cp.name + f".{os.getpid()}.tmp")
            tmp.write_text(payload)
            os.replace(tmp, cp)
            break
        except OSError:
            continue
    return fp


def _user_cache_dir() -> Path:
    return Path(os.environ.get("SWARMTUNE_CACHE", Path.home() / ".cache" / "swarmtune"))


class FingerprintMismatch(ModelError):
    def __init__(self, message: str, actual: str, expected: str):
        super().__init__(message)
        self.actual, self.expected = actual, expected


def check_fingerprint(model_dir: Path, expected: str, *, manifest_path: str = "the swarm manifest") -> str:
    """The one check that a base is the swarm's: its fingerprint, or FingerprintMismatch naming the fix."""
    actual = base_fingerprint(model_dir)
    if actual != expected:
        raise FingerprintMismatch(
            f"base model {model_dir} has fingerprint {actual[:16]}…, but {manifest_path} expects {expected[:16]}…: "
            "it is a different model or revision. Use the exact base the manifest names (--base-model PATH), "
            "or join a swarm whose manifest matches your model", actual, expected,
        )
    return actual


# --------------------------------------------------------------------------- loading


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_base(model_dir: Path, *, dtype: str = "float32", quantization: str = "none", device: str = "cpu"):
    """Load a frozen causal LM. Quantized bases use bitsandbytes (nf4 also on CPU; int8 needs CUDA)."""
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": _DTYPES[dtype]}
    if quantization != "none":
        try:
            from transformers import BitsAndBytesConfig
        except ImportError as e:  # pragma: no cover - transformers always ships it
            raise ModelError(f"bitsandbytes quantization unavailable: {e}") from None
        if quantization == "int8" and device == "cpu":
            raise ModelError("int8 (LLM.int8) needs a CUDA GPU; use quantization = 'nf4' or 'none' on CPU")
        if quantization == "nf4":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=_DTYPES[dtype]
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"could not load base model from {model_dir}: {e}") from None
    if quantization == "none":
        model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model


def num_layers(model) -> int:
    n = getattr(model.config, "num_hidden_layers", None)
    if not n:
        raise ModelError("base model config has no num_hidden_layers; only decoder-only transformer stacks are supported")
    return int(n)


def lora_config(*, rank: int, alpha: int, dropout: float, target_modules):
    """The PEFT LoraConfig of a manifest's [lora] section (the one place it is built)."""
    from peft import LoraConfig

    targets = target_modules
    if isinstance(targets, (list, tuple)) and list(targets) == ["all-linear"]:
        targets = "all-linear"
    return LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none", task_type="CAUSAL_LM",
    )


def attach_lora(model, *, rank: int, alpha: int, dropout: float, target_modules, init_seed: int, gradient_checkpointing: bool = False):
    """Wrap the frozen base with a PEFT LoRA adapter whose initial bits depend only on the manifest."""
    from peft import get_peft_model

    config = lora_config(rank=rank, alpha=alpha, dropout=dropout, target_modules=target_modules)
    torch.manual_seed(init_seed)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(f"[lora] target_modules {list(target_modules)} do not fit this model ({e}). Linear modules it has: {linear}, or use 'all-linear'") from None
    if gradient_checkpointing:
        # non-reentrant checkpointing needs no input grads, so backward still stops at the lowest trained layer
        peft_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_model


def check_target_modules(model_dir: Path, target_modules) -> None:
    """attach_lora's module check on the model built from its config on the meta device (no weights read,
    no memory used), so a module the model lacks is refused before a manifest is written."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"could not read the model config in {model_dir}: {e}") from None
    attach_lora(skeleton, rank=1, alpha=1, dropout=0.0, target_modules=target_modules, init_seed=0)


# --------------------------------------------------------------------------- shards


def build_lora_model(manifest, model_dir: Path, *, device: str, gradient_checkpointing: bool = False):
    """The manifest's base with its LoRA attached and cut into its shard plan: (peft model, Adapter).
    Every node calls this, so every node starts from the same adapter bits: the seeded init, or the
    manifest's start adapter ([start], checked against the hash `swarm init` recorded)."""
    m = manifest
    base = load_base(model_dir, dtype=m.base.dtype, quantization=m.base.quantization, device=device)
    plan = check_shard_plan(m.shards.plan, num_layers(base))
    model = attach_lora(
        base, rank=m.lora.rank, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=m.lora.target_modules,
        init_seed=m.lora.init_seed, gradient_checkpointing=gradient_checkpointing,
    )
    adapter = Adapter.from_model(model, plan)
    if m.start.hash:
        folder = m.resolve_path(m.start.adapter)
        _, tensors = read_peft_adapter(folder)
        adapter.load_all(fit_adapter(adapter, tensors, folder))
        if adapter.state_hash() != m.start.hash:
            raise ModelError(f"the start adapter {folder} holds other bits than the manifest's [start] hash "
                             f"({adapter.state_hash()[:16]}… vs {m.start.hash[:16]}…): every node must start from the "
                             "adapter the swarm was created with; get that exact folder")
    return model, adapter


# --------------------------------------------------------------------------- start adapters (PEFT folders)

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_config.json fields a start adapter must leave at PEFT's defaults: the manifest's [lora] cannot say them
_PLAIN_LORA = {"bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None, "rank_pattern": {},
               "alpha_pattern": {}, "layers_to_transform": None, "fan_in_fan_out": False, "lora_bias": False,
               "exclude_modules": None, "layer_replication": None, "trainable_token_indices": None,
               "target_parameters": None}


def read_peft_config(folder, use: str = "can start a swarm") -> tuple[Path, dict]:
    """(folder, adapter_config.json) of a stock PEFT LoRA adapter folder with weights; ModelError when it is
    not one (`use` ends the message for a non-LoRA adapter: only LoRA adapters `use`)."""
    folder = Path(folder).expanduser()
    how = ("a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors, as `swarmtune export` and "
           "PeftModel.save_pretrained write them")
    if not folder.is_dir():
        raise ModelError(f"adapter folder {folder} not found; {how}")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{folder} is not a PEFT adapter folder: it has no adapter_config.json; {how}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_path} is not valid JSON ({e}); re-export the adapter") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type") != "LORA":
        kind = cfg.get("peft_type") if isinstance(cfg, dict) else None
        raise ModelError(f"{cfg_path}: peft_type is {kind!r}; only LoRA adapters (peft_type \"LORA\") {use}")
    if not any((folder / w).is_file() for w in ADAPTER_WEIGHTS):
        raise ModelError(f"{folder} has adapter_config.json but no weights ({' or '.join(ADAPTER_WEIGHTS)}); {how}")
    return folder, cfg


def read_peft_adapter(folder) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a stock PEFT LoRA adapter folder; ModelError when it is not one."""
    folder, cfg = read_peft_config(folder)
    from peft.utils import load_peft_weights

    try:
        tensors = load_peft_weights(str(folder), device="cpu")
    except Exception as e:  # safetensors / torch.load raise many types for a damaged file; name the file
        raise ModelError(f"{folder}: cannot read the adapter weights ({type(e).__name__}: {e}); re-export it") from None
    return cfg, tensors


def adapter_lora_fields(cfg: dict, folder) -> dict:
    """The manifest [lora] values of an adapter_config.json (rank, alpha, dropout, target_modules); ModelError for
    a LoRA variant the manifest cannot describe (DoRA, rsLoRA, per-module ranks, bias, modules_to_save)."""
    where = Path(folder) / "adapter_config.json"
    for key, plain in _PLAIN_LORA.items():
        value = cfg.get(key, plain)
        if (value or None) != (plain or None):  # None, False, {} and [] all mean "not used"
            raise ModelError(f"{where}: {key} = {value!r}; a swarm trains plain LoRA ({key} = {plain!r}), so this "
                             "adapter cannot start one")
    targets = cfg.get("target_modules")
    if isinstance(targets, str):
        targets = ["all-linear"] if targets == "all-linear" else None
    if not targets or not all(isinstance(t, str) for t in targets):
        raise ModelError(f"{where}: target_modules = {cfg.get('target_modules')!r}; a start adapter must name its "
                         "modules (a list, as PEFT writes it)")
    rank, alpha = cfg.get("r"), cfg.get("lora_alpha")
    if type(rank) is not int or rank < 1 or not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ModelError(f"{where}: r = {rank!r}, lora_alpha = {alpha!r}; expected positive numbers")
    alpha = int(alpha) if float(alpha).is_integer() else alpha
    if not isinstance(alpha, int):
        raise ModelError(f"{where}: lora_alpha = {alpha!r} is not an integer; the manifest's [lora] alpha is one")
    return {"rank": rank, "alpha": alpha, "dropout": float(cfg.get("lora_dropout") or 0.0),
            "target_modules": tuple(sorted(targets))}


def _file_key(name: str) -> str:
    """The key PEFT's save_pretrained gives a parameter of the "default" adapter (get_peft_model_state_dict)."""
    return name.replace(".default", "")


def fit_adapter(adapter: "Adapter", tensors: dict[str, torch.Tensor], folder) -> list[torch.Tensor]:
    """An adapter file's tensors in `adapter.params` order (as their dtype), or ModelError naming the first that
    does not fit: a weight of this base the file lacks, a tensor with no place in it, another shape (base or rank)."""
    keys = [_file_key(n) for n in adapter.names]
    missing = [k for k in keys if k not in tensors]
    extra = sorted(set(tensors) - set(keys))
    fix = "start the swarm from an adapter trained on this base with this LoRA config"
    if missing:
        raise ModelError(f"the adapter {folder} does not fit this base: {len(missing)} of the base's adapted weights have "
                         f"no tensor in it (e.g. {missing[0]}); {fix}")
    if extra:
        raise ModelError(f"the adapter {folder} does not fit this base: {len(extra)} of its tensors have no place in it "
                         f"(e.g. {extra[0]}); {fix}")
    out = []
    for k, p in zip(keys, adapter.params):
        t = tensors[k]
        if tuple(t.shape) != tuple(p.shape):
            raise ModelError(f"the adapter {folder} does not fit this base: {k} has shape {list(t.shape)}, the base with "
                             f"this LoRA needs {list(p.shape)} (another base, or another rank); {fix}")
        out.append(t.to(p.dtype))
    return out


def start_adapter_hash(model_dir: Path, lora: dict, plan, folder) -> str:
    """The adapter state hash (Adapter.state_hash) a node will hold after loading `folder` onto this base with
    this LoRA and shard plan, from a weightless (meta-device) copy of the model: what `swarm init --adapter`
    writes into the manifest. ModelError when the adapter does not fit."""
    from transformers import AutoConfig, AutoModelForCausalLM

    _, tensors = read_peft_adapter(folder)
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"could not read the model config in {model_dir}: {e}") from None
    skeleton = attach_lora(skeleton, rank=lora["rank"], alpha=lora["alpha"], dropout=lora["dropout"],
                           target_modules=lora["target_modules"], init_seed=0)
    adapter = Adapter.from_model(skeleton, plan)
    fitted = fit_adapter(adapter, tensors, folder)
    h = hashlib.sha256()
    for k in range(adapter.num_shards):
        idx = [i for i, s in enumerate(adapter.shard_of) if s == k]
        h.update(bytes.fromhex(tensors_hash([adapter.names[i] for i in idx], [fitted[i] for i in idx])))
    return h.hexdigest()


def default_shard_plan(n_layers: int) -> tuple[tuple[int, int], ...]:
    """Two halves for small models (<= 8 layers), else shards of about 4 layers."""
    if n_layers <= 1:
        return ((0, n_layers),)
    k = 2 if n_layers <= 8 else -(-n_layers // 4)
    bounds = [round(i * n_layers / k) for i in range(k + 1)]
    return tuple((bounds[i], bounds[i + 1]) for i in range(k))


def check_shard_plan(plan, n_layers: int) -> tuple[tuple[int, int], ...]:
    plan = tuple(tuple(r) for r in plan) or default_shard_plan(n_layers)
    if plan[-1][1] != n_layers:
        raise ModelError(
            f"[shards] plan covers layers 0..{plan[-1][1]} but the base model has {n_layers} layers; "
            f"fix the plan (e.g. {list(map(list, default_shard_plan(n_layers)))}) or remove it for the default"
        )
    return plan


_LAYER_RE = re.compile(r"\.layers\.(\d+)\.")


def tensors_hash(names, tensors) -> str:
    """sha256 over (name, bytes) of each tensor in order: a shard's hash, for a model's parameters or
    for tensors downloaded before they are loaded (`serve --swarm` checks state before it uses it)."""
    h = hashlib.sha256()
    for n, t in zip(names, tensors):
        h.update(n.encode() + b"\0")
        h.update(t.detach().to("cpu").contiguous().numpy())  # the buffer itself, not a copy of it
    return h.hexdigest()


@dataclass
class Adapter:
    """LoRA parameters of a PEFT model, grouped by shard, in a fixed order every node agrees on."""

    names: list[str]
    params: list[torch.nn.Parameter]
    shard_of: list[int]
    plan: tuple[tuple[int, int], ...]

    @classmethod
    def from_model(cls, peft_model, plan, adapter: str = "default") -> "Adapter":
        """`adapter`: which adapter of a multi-adapter model (`serve`); its parameters are named as PEFT
        names the only adapter of a node's model ("default"), so both hash alike for the same bits."""
        names, params, shard_of = [], [], []
        for name, p in peft_model.named_parameters():
            parts = name.split(".")
            at = [i for i in range(len(parts) - 1) if parts[i].startswith("lora_") and parts[i + 1] == adapter]
            if not at:
                continue
            parts[at[0] + 1] = "default"
            name = ".".join(parts)
            m = _LAYER_RE.search(name)
            layer = int(m.group(1)) if m else plan[-1][1] - 1  # modules above the stack belong to the top shard
            shard = next(i for i, (a, b) in enumerate(plan) if a <= layer < b)
            names.append(name)
            params.append(p)
            shard_of.append(shard)
        if not params:
            raise ModelError("the adapter has no LoRA parameters; check [lora] target_modules")
        return cls(names, params, shard_of, tuple(plan))

    @property
    def num_shards(self) -> int:
        return len(self.plan)

    def shard_params(self, k: int) -> list[torch.nn.Parameter]:
        return [p for p, s in zip(self.params, self.shard_of) if s == k]

    def shard_names(self, k: int) -> list[str]:
        return [n for n, s in zip(self.names, self.shard_of) if s == k]

    def shard_numel(self, k: int) -> int:
        return sum(p.numel() for p in self.shard_params(k))

    def set_trainable(self, shards) -> None:
        shards = set(shards)
        for p, s in zip(self.params, self.shard_of):
            p.requires_grad_(s in shards)

    def shard_hash(self, k: int) -> str:
        return tensors_hash(self.shard_names(k), self.shard_params(k))

    def state_hash(self, shard_hashes: dict[int, str] | None = None) -> str:
        """Hash of the whole adapter: peers holding the same bits report the same value. `shard_hashes`: every
        shard's hash, as `shard_hash` just gave it (the adapter is not read again)."""
        h = hashlib.sha256()
        for k in range(self.num_shards):
            h.update(bytes.fromhex(shard_hashes[k] if shard_hashes is not None else self.shard_hash(k)))
        return h.hexdigest()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu").clone() for n, p in zip(self.names, self.params)}

    @torch.no_grad()
    def load_all(self, tensors) -> None:
        """Every parameter from `tensors`, in `params` order (shapes already checked: fit_adapter)."""
        for p, t in zip(self.params, tensors):
            p.copy_(t.to(p.device, p.dtype))

    @torch.no_grad()
    def load_shard(self, k: int, tensors) -> None:
        params = self.shard_params(k)
        if len(tensors) != len(params) or any(t.shape != p.shape for t, p in zip(tensors, params)):
            raise ModelError(f"shard {k} state does not match this adapter's shapes (another LoRA config?)")
        for p, t in zip(params, tensors):
            p.copy_(t.to(p.device, p.dtype))
