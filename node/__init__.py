"""swarmtune node: a peer-to-peer LoRA fine-tuning daemon.

Module map (data flows top to bottom):
    config, manifest   what the node and the swarm are configured to do
    identity           the node's Ed25519 key (also its libp2p identity)
    model, shards      frozen base + PEFT LoRA adapter, cut into layer shards
    data               JSONL / HF datasets -> tokenized examples, assigned per node
    trainer            local forward/backward and gradient accumulation
    swarm/             everything that talks to hivemind (DHT, averaging, state sync)
    ledger             signed contribution records, verification, credit
    daemon             the composition root: wires the above, checkpoints, signals
    control, metrics   read-only views for the CLI (gRPC) and Prometheus
    cli/               the `swarmtune` command
"""

__version__ = "0.1.0"
