"""Export the adapter in standard PEFT format (adapter_config.json + adapter_model.safetensors).

    swarmtune export --manifest swarm.toml --out my-adapter
    # then, anywhere:  PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), "my-adapter")

The files are written to a temporary folder and renamed into place, so `--out` holds
either a complete adapter or nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


class ExportError(RuntimeError):
    pass


def export_peft(peft_model, out_dir: str | os.PathLike, *, base_name: str) -> Path:
    """Write the PEFT adapter of `peft_model` to `out_dir` atomically."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        peft_model.save_pretrained(str(tmp), safe_serialization=True)
        cfg_path = tmp / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["base_model_name_or_path"] = base_name
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"could not write the adapter to {out}: {e}") from None
    return out


def export_from_checkpoint(manifest_path, out_dir, *, home=None, base_model=None, data=None) -> Path:
    """Rebuild base + LoRA, load the node's newest good checkpoint, export it."""
    from node import checkpoint
    from node.config import NodeConfig
    from node.stack import StackError, load_stack

    cfg = NodeConfig(manifest=str(manifest_path), home=home or "", base_model=base_model or "", data=data or "", create_key=False)
    try:
        stack = load_stack(cfg, load_data=False)
    except StackError as e:
        raise ExportError(str(e)) from None
    ckpt = checkpoint.load_latest(stack.workdir / "checkpoints", stack.manifest.swarm_id)
    if ckpt is None:
        raise ExportError(f"no checkpoint of swarm {stack.manifest.swarm_id[:16]}… under {stack.workdir}; run the node first (or pass --home)")
    checkpoint.restore_adapter(ckpt, stack.adapter)
    return export_peft(stack.model, out_dir, base_name=stack.manifest.base.model)
