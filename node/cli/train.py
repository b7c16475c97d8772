"""Subcommands that train: `run` (the daemon), `swarm init`, `export`, `demo`."""

from __future__ import annotations

import argparse
import os

from node.cli.errors import UserError


def _add_node_flags(p: argparse.ArgumentParser) -> None:
    from node.cli.flags import field_help
    from node.config import FIELDS, NodeConfig

    p.add_argument("--config", help="node TOML file (lowest precedence after defaults; env SWARMTUNE_* and flags override it)")
    for name, f in FIELDS.items():
        flag = "--" + name.replace("_", "-")
        doc = field_help(NodeConfig, name)
        if isinstance(f.default, bool):
            p.add_argument(flag, dest=name, action="store_const", const=True, default=None, help=doc)
        elif isinstance(f.default, tuple):
            p.add_argument(flag, dest=name, nargs="*", default=None, metavar="ADDR", help=doc)
        else:
            p.add_argument(flag, dest=name, default=None, help=doc)


def cmd_run(args) -> int:
    import signal
    import threading

    # catch a stop request from the first moment (imports and model loading take a while); the node
    # installs its full drain handler on the same event later
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    from node.config import FIELDS, ConfigError, load_node_config
    from node.logs import setup_logging

    overrides = {name: getattr(args, name) for name in FIELDS if getattr(args, name, None) is not None}
    try:
        cfg = load_node_config(args.config, overrides=overrides)
    except ConfigError as e:
        raise UserError(str(e)) from None
    if args.export:  # refuse a folder the export would have to clobber before training, not after
        from node.export import ExportError, check_target

        try:
            check_target(args.export)
        except ExportError as e:
            raise UserError(str(e)) from None
    setup_logging(cfg.log_level, json=cfg.log_format == "json")  # before torch & co. load: their warnings are logged too
    from node.daemon import NodeError, run_node
    from node.manifest import ManifestError
    from node.swarm.dht import SwarmError

    try:
        return run_node(cfg, export_dir=args.export, stop=stop)
    except (NodeError, ManifestError, SwarmError) as e:
        raise UserError(str(e)) from None


# `swarm init` flag of each manifest field whose flag is not "--" + its name
_INIT_FLAGS = {"averaging.timeout": "--averaging-timeout", "shards.plan": "--shard-plan", "base.model": "--base",
               "data.source": "--data", "sync.mode": "--sync", "dpo.loss": "--dpo-loss", "start.adapter": "--adapter",
               "start.hash": "--adapter"}
_LORA_FLAGS = ("rank", "alpha", "dropout", "target_modules")


def _init_flag(field: str) -> str:
    return _INIT_FLAGS.get(field, "--" + field.rpartition(".")[2].replace("_", "-"))


def cmd_swarm_init(args) -> int:
    import dataclasses
    import json

    from node.data import BUILTIN_DATA, BUILTIN_PREFS, DataError, dataset_digest, resolve_data
    from node.manifest import (
        AveragingSection, BaseSection, CreditSection, DataSection, DpoSection, LoraSection, Manifest, ManifestError,
        DILOCO_INNER_STEPS, OptimSection, RoundSection, ShardSection, StartSection, SyncSection, validate, write_manifest,
    )
    from node.model import (
        ModelError, adapter_lora_fields, base_fingerprint, check_shard_plan, check_target_modules, hub_snapshot_of,
        load_tokenizer, read_peft_adapter, resolve_base, start_adapter_hash,
    )
    from node.stack import load_training_data

    if os.path.exists(args.out) and not args.force:
        raise UserError(f"{args.out} exists; pass --force to overwrite it")
    plan = ()
    if args.shard_plan:
        try:
            plan = tuple(tuple(int(x) for x in part.split("-")) for part in args.shard_plan.split(","))
        except ValueError:
            raise UserError(f"--shard-plan {args.shard_plan!r}: expected ranges like 0-2,2-4") from None
        if any(len(r) != 2 for r in plan):
            raise UserError(f"--shard-plan {args.shard_plan!r}: expected ranges like 0-2,2-4")
    # LoRA: the flags, or the start adapter's own config (a flag that contradicts it is refused)
    lora = {name: getattr(LoraSection, name) for name in _LORA_FLAGS}
    given = {name: getattr(args, name) for name in _LORA_FLAGS if getattr(args, name) is not None}
    given = {k: tuple(v) if k == "target_modules" else v for k, v in given.items()}
    if args.adapter:
        try:
            lora = adapter_lora_fields(read_peft_adapter(args.adapter)[0], args.adapter)
        except ModelError as e:
            raise UserError(str(e)) from None
        for name, value in given.items():
            if value != lora[name] and not (name == "target_modules" and tuple(sorted(value)) == lora[name]):
                raise UserError(f"--{name.replace('_', '-')} {value if not isinstance(value, tuple) else ' '.join(value)} "
                                f"contradicts the adapter {args.adapter}, whose adapter_config.json has {name} = "
                                f"{list(lora[name]) if isinstance(lora[name], tuple) else lora[name]}; drop the flag "
                                "(the swarm takes the adapter's LoRA config) or start from another adapter")
    lora.update(given if not args.adapter else {})
    data = args.data or (BUILTIN_PREFS if args.objective == "dpo" else BUILTIN_DATA)
    m = Manifest(
        name=args.name,
        objective=args.objective,
        dpo=DpoSection(beta=args.beta, loss=args.dpo_loss),
        start=StartSection(adapter=str(args.adapter or ""), hash="0" * 64 if args.adapter else ""),
        base=BaseSection(model=args.base, fingerprint="0" * 64, revision=args.revision, dtype=args.dtype,
                         quantization=args.quantization),
        data=DataSection(source=data, digest="", max_length=args.max_length, packing=args.packing),
        lora=LoraSection(rank=lora["rank"], alpha=lora["alpha"], dropout=lora["dropout"],
                         target_modules=tuple(lora["target_modules"])),
        shards=ShardSection(plan=plan),
        optim=OptimSection(lr=args.lr, schedule=args.schedule or ("cosine" if args.max_rounds else "constant"), warmup_rounds=args.warmup_rounds),
        rounds=RoundSection(target_batch_size=args.target_batch_size, microbatch_size=args.microbatch_size, max_rounds=args.max_rounds),
        averaging=AveragingSection(matchmaking_time=args.matchmaking_time, timeout=args.averaging_timeout,
                                   peer_ttl=args.peer_ttl, on_split=args.on_split),
        sync=SyncSection(mode=args.sync, wire=args.wire, outer_lr=args.outer_lr, outer_momentum=args.outer_momentum,
                         overlap=args.overlap if args.overlap is not None else args.sync == "diloco",
                         inner_steps=args.inner_steps or (DILOCO_INNER_STEPS if args.sync == "diloco" else 1)),
        credit=CreditSection(max_samples_per_round=args.max_samples_per_round),
    )

    def check(manifest: Manifest) -> None:
        try:
            validate(manifest, f"swarm init (--out {args.out})")
        except ManifestError as e:
            raise UserError(f"{e}; fix {_init_flag(e.field)}" if e.field else str(e)) from None

    check(m)  # every value first: a typo costs no model load
    try:
        model_dir = resolve_base(args.base, revision=args.revision)
        if args.revision and hub_snapshot_of(model_dir) is None:
            raise UserError(f"--revision {args.revision} applies only to a hub id base, but {args.base} is a local folder")
        check_target_modules(model_dir, m.lora.target_modules)
        n_layers = json.loads((model_dir / "config.json").read_text()).get("num_hidden_layers", 0)
        plan = check_shard_plan(plan, n_layers)
        start_hash = start_adapter_hash(model_dir, lora, plan, args.adapter) if args.adapter else ""
        fingerprint = base_fingerprint(model_dir)
        digest = dataset_digest(resolve_data(data))
        # read every example once now, so a malformed line is reported before anyone joins the swarm
        load_training_data(m, resolve_data(data), load_tokenizer(model_dir))
    except (ModelError, DataError) as e:
        raise UserError(str(e)) from None
    m = dataclasses.replace(m, base=dataclasses.replace(m.base, fingerprint=fingerprint),
                            data=dataclasses.replace(m.data, digest=digest), shards=ShardSection(plan=plan),
                            start=dataclasses.replace(m.start, hash=start_hash))
    check(m)
    write_manifest(m, args.out)
    hub = hub_snapshot_of(model_dir)
    where = f"{hub[0]} commit {hub[1]}" if hub else str(model_dir)
    print(f"wrote {args.out}\nswarm_id {m.swarm_id}\nbase {where} (fingerprint {fingerprint[:16]}…), "
          f"{len(plan)} shards {list(map(list, plan))}")
    if start_hash:
        print(f"start adapter {args.adapter} (state hash {start_hash[:16]}…; every node needs this folder, at the same "
              "path relative to the manifest or absolute)")
    if hub and not args.revision:
        print(f"the base is not pinned to a revision: peers load whatever their cache or the Hub has for {hub[0]} "
              f"(the fingerprint check refuses another commit); pin it with --revision {hub[1]}")
    return 0


def cmd_export(args) -> int:
    from node.export import ExportError, export_from_checkpoint

    try:
        out = export_from_checkpoint(args.manifest, args.out, home=args.home, base_model=args.base_model, data=None,
                                     force=args.force)
    except ExportError as e:
        raise UserError(str(e)) from None
    print(f"wrote PEFT adapter to {out} (load with AutoPeftModelForCausalLM.from_pretrained('{out}'), "
          "or PeftModel.from_pretrained(base, ...))")
    return 0


def cmd_demo(args) -> int:
    from node.demo import DemoError, run_demo

    try:
        return run_demo(
            nodes=args.nodes, rounds=args.rounds, workdir=args.workdir, port_base=args.port, quiet=args.quiet, threads=args.threads,
        )
    except DemoError as e:
        raise UserError(str(e)) from None


def register(sub) -> None:
    from node.cli.flags import add_field_flag, field_help
    from node.data import BUILTIN_DATA, BUILTIN_PREFS
    from node.manifest import (
        DILOCO_INNER_STEPS, DPO_LOSSES, AveragingSection, BaseSection, CreditSection, DataSection, DpoSection,
        LoraSection, OptimSection, RoundSection, SyncSection,
    )
    from node.model import BUILTIN_BASE

    p = sub.add_parser("run", help="run a node: join (or start) a swarm and train", description="Run the swarmtune node daemon.")
    _add_node_flags(p)
    p.add_argument("--export", metavar="DIR", help="after the last round, write the adapter here in PEFT format")
    p.set_defaults(func=cmd_run)

    swarm = sub.add_parser("swarm", help="create swarm manifests, show a running swarm",
                           description="Create swarm manifests; show a running swarm from its DHT.")
    sw = swarm.add_subparsers(dest="swarm_command", metavar="COMMAND")
    swarm.set_defaults(func=lambda args: (swarm.print_help(), 2)[1])
    i = sw.add_parser("init", help="write a swarm manifest (computes the base fingerprint and data digest)",
                      description="Write a swarm manifest: the file every node of one swarm holds. Defaults are the "
                                  "manifest's own (node/manifest.py); every value is checked before anything is written.")
    i.add_argument("--out", default="swarm.toml", help="where to write the manifest (default: swarm.toml)")
    i.add_argument("--force", action="store_true", help="overwrite --out (default: refuse when it exists)")
    i.add_argument("--name", default="my-swarm", help="a human-readable name shown to peers (default: my-swarm)")
    i.add_argument("--base", default=BUILTIN_BASE,
                   help=f"base model: local folder, hub id (org/name), or {BUILTIN_BASE} (default: {BUILTIN_BASE})")
    add_field_flag(i, BaseSection, "revision", metavar="REV")
    i.add_argument("--data", default=None,
                   help=f"JSONL file, hf:<dataset>[:split], {BUILTIN_DATA} or {BUILTIN_PREFS} (default: {BUILTIN_DATA}, or "
                        f"{BUILTIN_PREFS} with --objective dpo)")
    i.add_argument("--objective", default="sft", choices=["sft", "dpo"],
                   help="sft: prompt/completion or messages data; dpo: TRL preference pairs (prompt/chosen/rejected) "
                        "(default: sft)")
    add_field_flag(i, DpoSection, "beta")
    add_field_flag(i, DpoSection, "loss", flag="--dpo-loss", dest="dpo_loss", choices=list(DPO_LOSSES))
    i.add_argument("--adapter", default=None, metavar="PATH",
                   help="start every node from this PEFT LoRA adapter folder (checked against the base; its LoRA "
                        "config becomes the manifest's, its hash goes into [start]); DPO then uses it as the reference "
                        "(default: a fresh LoRA)")
    add_field_flag(i, BaseSection, "dtype", choices=["float32", "bfloat16"])
    add_field_flag(i, BaseSection, "quantization", choices=["none", "nf4", "int8"])
    for name in _LORA_FLAGS:
        add_field_flag(i, LoraSection, name, default=None,
                       help=f"{field_help(LoraSection, name, show_default=False)} (default: "
                            f"{' '.join(getattr(LoraSection, name)) if name == 'target_modules' else getattr(LoraSection, name)}, "
                            "or the --adapter's)")
    i.add_argument("--shard-plan", default="", help="layer ranges like 0-2,2-4 (default: halves for <= 8 layers, else ~4 layers each)")
    add_field_flag(i, DataSection, "max_length")
    add_field_flag(i, DataSection, "packing", help=field_help(DataSection, "packing") + " (default: --no-packing)")
    add_field_flag(i, OptimSection, "lr")
    add_field_flag(i, OptimSection, "schedule", choices=["constant", "cosine"], default=None,
                   help=field_help(OptimSection, "schedule", show_default=False) + " (default: cosine with --max-rounds, "
                   "so the run ends on a decayed rate, not on a random point of a noisy curve; else constant)")
    add_field_flag(i, OptimSection, "warmup_rounds")
    for name in ("target_batch_size", "microbatch_size", "max_rounds"):
        add_field_flag(i, RoundSection, name)
    add_field_flag(i, AveragingSection, "matchmaking_time")
    add_field_flag(i, AveragingSection, "timeout", flag="--averaging-timeout", dest="averaging_timeout")
    add_field_flag(i, AveragingSection, "peer_ttl")
    add_field_flag(i, AveragingSection, "on_split", choices=["train", "wait"])
    add_field_flag(i, SyncSection, "mode", flag="--sync", dest="sync", choices=["per-step", "diloco"])
    add_field_flag(i, SyncSection, "wire", choices=["int8", "int32"])
    add_field_flag(i, SyncSection, "inner_steps", default=None,
                   help=f"{field_help(SyncSection, 'inner_steps', show_default=False)} (default: 1, or "
                        f"{DILOCO_INNER_STEPS} with --sync diloco)")
    for name in ("outer_lr", "outer_momentum"):
        add_field_flag(i, SyncSection, name)
    add_field_flag(i, SyncSection, "overlap", default=None, help=field_help(SyncSection, "overlap") + " (default: on with "
                   "--sync diloco, the mode for home uplinks; see README 'Which mode')")
    add_field_flag(i, CreditSection, "max_samples_per_round")
    i.set_defaults(func=cmd_swarm_init)
    from node.cli.swarm_status import add_parser as add_swarm_status

    add_swarm_status(sw)

    e = sub.add_parser("export", help="write the node's latest adapter in standard PEFT format",
                       description="Rebuild the manifest's base + LoRA, load this node's newest checkpoint and write it as "
                                   "a standard PEFT adapter (adapter_config.json + adapter_model.safetensors) that "
                                   "AutoPeftModelForCausalLM / PeftModel load. Never deletes anything: a non-empty --out "
                                   "is refused unless --force, which replaces only the adapter's own files.")
    e.add_argument("--manifest", required=True, metavar="FILE", help="the swarm manifest the node trained (required)")
    e.add_argument("--out", required=True, metavar="DIR", help="folder to write the adapter to; missing or empty (required)")
    e.add_argument("--force", action="store_true",
                   help="write into a non-empty --out: replace adapter_config.json and adapter_model.safetensors "
                        "there, keep every other file (default: refuse)")
    e.add_argument("--home", default=None, help="the node's state folder (default: $SWARMTUNE_HOME or ~/.swarmtune)")
    e.add_argument("--base-model", default=None, metavar="PATH",
                   help="local base folder overriding the manifest's (fingerprint still checked; default: the manifest's "
                        "[base] model at its revision)")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="train a 3-node swarm on 127.0.0.1 with the built-in tiny model and task",
                       description="A whole swarm on this machine, nothing to download: builds the tiny base model, starts "
                                   "the nodes on 127.0.0.1, shows their progress, then checks the adapters are "
                                   "bit-identical, verifies the ledgers, and compares the exported adapter with the base "
                                   "model on held-out examples. Writes <workdir>/demo_report.json.")
    d.add_argument("--nodes", type=int, default=3, help="node processes to start (default: 3)")
    d.add_argument("--rounds", type=int, default=150,
                   help="rounds of 48 samples (default: 150, about 3 minutes on 2 CPU cores)")
    d.add_argument("--workdir", default=None, help="where the demo keeps its files (default: a fresh temp folder)")
    d.add_argument("--port", type=int, default=0, help="first TCP port on 127.0.0.1 (default: 0, any free port)")
    d.add_argument("--threads", type=int, default=1, help="torch threads per node (default: 1)")
    d.add_argument("--quiet", action="store_true", help="no live display, just the final report (default: live display)")
    d.set_defaults(func=cmd_demo)
