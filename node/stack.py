"""What a node loads before it joins: manifest, base (fingerprint checked), data (digest checked),
tokenizer, LoRA adapter cut into shards, and the trainer for the shards it trains.

    stack = load_stack(cfg, load_data=True)     # StackError (cause + fix) before anything is written

The daemon and `swarmtune export` both build their model here, so both see the same adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from node.config import NodeConfig
from node.data import DataError, dataset_digest, load_examples, resolve_data
from node.manifest import Manifest, load_manifest
from node.model import ModelError, build_lora_model, check_fingerprint, pick_device, resolve_base
from node.shards import ShardChoiceError, choose_shards_auto, parse_shards
from node.trainer import Trainer

logger = logging.getLogger(__name__)


class StackError(RuntimeError):
    """Input that stops the node before it joins; the message says what to fix."""


def load_training_data(m: Manifest, data_spec: str, tokenizer) -> list:
    """The manifest objective's examples: tokenized sequences (sft) or preference pairs (dpo). DataError names
    file:line."""
    if m.objective == "dpo":
        from node.preference import load_pairs

        return load_pairs(data_spec, tokenizer, max_length=m.data.max_length)
    return load_examples(data_spec, tokenizer, max_length=m.data.max_length, packing=m.data.packing)


@dataclass
class Stack:
    manifest: Manifest
    model_dir: Path
    data_digest: str
    tokenizer: object
    examples: list
    device: str
    model: object  # the PEFT model
    adapter: object  # node.model.Adapter
    trained: tuple[int, ...]
    trainer: Trainer
    workdir: Path  # this node's folder for this swarm


def load_stack(cfg: NodeConfig, *, load_data: bool) -> Stack:
    """Check every input and build the model; raises StackError before anything is written.
    Without `load_data` the dataset is neither read nor checked (export needs only the model)."""
    from transformers import AutoTokenizer

    if not cfg.manifest:
        raise StackError("no manifest given; pass --manifest swarm.toml (create one with `swarmtune swarm init`)")
    m = load_manifest(cfg.manifest)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        # a --base-model override is a folder; the manifest's revision pins its own hub id only
        model_dir = resolve_base(cfg.base_model or m.resolve_path(m.base.model), revision="" if cfg.base_model else m.base.revision)
        check_fingerprint(model_dir, m.base.fingerprint, manifest_path=f"manifest {cfg.manifest}")
    except ModelError as e:
        raise StackError(str(e)) from None

    data_spec = resolve_data(cfg.data or m.resolve_path(m.data.source))
    try:
        digest = dataset_digest(data_spec) if load_data else m.data.digest
    except DataError as e:
        raise StackError(str(e)) from None
    if digest != m.data.digest:
        raise StackError(
            f"dataset {data_spec} has digest {digest[:16]}…, but the manifest expects {m.data.digest[:16]}…: "
            "every peer must train on the same data; get the manifest's dataset (--data PATH)"
        )

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    try:
        examples = load_training_data(m, data_spec, tokenizer) if load_data else []
    except DataError as e:
        raise StackError(str(e)) from None

    try:
        device = pick_device(cfg.device)
        model, adapter = build_lora_model(m, model_dir, device=device, gradient_checkpointing=cfg.gradient_checkpointing)
        if cfg.shards == "auto":
            trained = choose_shards_auto(model, adapter, m, cfg, device)
            logger.info("--shards auto: training shards %s of %d", list(trained), adapter.num_shards)
        else:
            trained = parse_shards(cfg.shards, adapter.num_shards)
    except (ModelError, ShardChoiceError) as e:
        raise StackError(str(e)) from None
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dpo = m.dpo if m.objective == "dpo" else None
    # DPO's reference: the start adapter's bits (held now, before any checkpoint replaces them), else the base
    reference = [p.detach().clone() for p in adapter.params] if dpo and m.start.hash else None
    trainer = Trainer(model, adapter, trained, m.optim, microbatch_size=m.rounds.microbatch_size, device=device, pad_id=pad,
                      sync=m.sync, dpo=dpo, reference=reference)
    return Stack(manifest=m, model_dir=model_dir, data_digest=digest, tokenizer=tokenizer, examples=examples, device=device,
                 model=model, adapter=adapter, trained=trained, trainer=trainer, workdir=cfg.swarm_dir(m.swarm_id))
