"""Export the adapter in standard PEFT format (adapter_config.json + adapter_model.safetensors).

    swarmtune export --manifest swarm.toml --out my-adapter
    # then, anywhere:  AutoPeftModelForCausalLM.from_pretrained("my-adapter")

`adapter_config.json` names a base that stock tools can load: the hub id (and the commit
it was trained on, as PEFT's `revision`) when the base came from the Hugging Face cache,
else the absolute folder the base was loaded from (`builtin:tiny` and manifest-relative
paths mean nothing outside swarmtune).

Export never deletes or overwrites what it did not write. A missing or empty `--out` gets
the files written to a temporary folder beside it and renamed into place, so it holds either
a complete adapter or nothing. A non-empty `--out` is refused, unless `force`: then only
the adapter's own files are replaced, each by an atomic rename (weights first, config
last), and every other file there stays; a README.md already there is kept as it is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from node.durable import fsync_dir

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")  # in replacement order
MODEL_CARD = "README.md"  # PEFT writes one; a README already in --out is the user's (or an earlier export's)


class ExportError(RuntimeError):
    """The adapter cannot be written where asked; the message names the folder and the fix."""


def check_target(out_dir: str | os.PathLike, *, force: bool = False) -> Path:
    """Raise ExportError when `out_dir` must not be written (a file, or a non-empty folder without force)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file, not a folder; pass another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ExportError(f"{out} exists and is not empty; pass another --out, or --force to replace only the "
                          f"adapter's files there ({', '.join(ADAPTER_FILES)}) and keep everything else")
    return out


def adapter_base(peft_model, base_name: str = "") -> tuple[str, str | None]:
    """(base_model_name_or_path, revision) for adapter_config.json, from where the base was loaded.

    A Hugging Face cache snapshot gives its hub id and commit; any other folder its absolute path.
    `base_name` (the manifest's [base] model) is kept when it is the hub id of that snapshot.
    """
    from node.model import hub_snapshot_of

    loaded = Path(getattr(peft_model.get_base_model(), "name_or_path", "") or base_name)
    hub = hub_snapshot_of(loaded)
    if hub is not None:
        repo, commit = hub
        return (base_name if base_name.lower() == repo.lower() else repo), commit
    if not loaded.is_dir():
        raise ExportError(f"cannot tell where the base model was loaded from ({loaded}); load it from a folder")
    return str(loaded.resolve()), None


def export_peft(peft_model, out_dir: str | os.PathLike, *, base_name: str = "", force: bool = False) -> Path:
    """Write the PEFT adapter of `peft_model` to `out_dir` (see the module docstring for what is replaced)."""
    out = check_target(out_dir, force=force)
    name, revision = adapter_base(peft_model, base_name)
    fresh = not out.is_dir() or not any(out.iterdir())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # a fresh target is written beside it and renamed into place whole; an existing one (force) gets
        # files renamed in from a folder inside it (same filesystem, so each rename is atomic)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent if fresh else out))
    except OSError as e:
        raise ExportError(f"could not write the adapter to {out}: {e}") from None
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"], cfg["revision"] = name, revision
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if fresh:
            os.replace(tmp, out)  # onto a folder filled meanwhile this fails (ENOTEMPTY) instead of replacing it
            fsync_dir(out.parent)
            return out
        for fname in ADAPTER_FILES:
            os.replace(tmp / fname, out / fname)
        if not (out / MODEL_CARD).exists() and (tmp / MODEL_CARD).exists():
            os.replace(tmp / MODEL_CARD, out / MODEL_CARD)
        fsync_dir(out)
    except OSError as e:
        raise ExportError(f"could not write the adapter to {out}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def export_from_checkpoint(manifest_path, out_dir, *, home=None, base_model=None, data=None, force: bool = False) -> Path:
    """Rebuild base + LoRA, load the node's newest good checkpoint, export it.
    The target is checked first: a refused --out costs no model load."""
    from node import checkpoint
    from node.config import NodeConfig
    from node.manifest import ManifestError, load_manifest
    from node.model import ModelError, resolve_base
    from node.stack import StackError, load_stack

    check_target(out_dir, force=force)
    try:
        m = load_manifest(manifest_path)
        # the base at the manifest's revision, resolved here, so the stack loads exactly that snapshot
        base_dir = base_model or str(resolve_base(m.resolve_path(m.base.model), revision=m.base.revision))
    except (ManifestError, ModelError) as e:
        raise ExportError(str(e)) from None
    cfg = NodeConfig(manifest=str(manifest_path), home=home or "", base_model=base_dir, data=data or "", create_key=False)
    try:
        stack = load_stack(cfg, load_data=False)
    except StackError as e:
        raise ExportError(str(e)) from None
    ckpt = checkpoint.load_latest(stack.workdir / "checkpoints", stack.manifest.swarm_id)
    if ckpt is None:
        raise ExportError(f"no checkpoint of swarm {stack.manifest.swarm_id[:16]}… under {stack.workdir}; run the node first (or pass --home)")
    checkpoint.restore_adapter(ckpt, stack.adapter)
    return export_peft(stack.model, out_dir, base_name=m.base.model, force=force)
