"""swarmtune node: a peer-to-peer LoRA fine-tuning daemon.

Module map, lowest layer first (tests/test_layering.py keeps imports pointing downward):
    config, durable, logs   the node's config (the one place SWARMTUNE_HOME is read), fsync, logging
    manifest, identity      what the swarm trains (+ manifest diff); the node's Ed25519 key
    data, preference        datasets and the one batch split; preference pairs and the DPO loss
    tiny, model             the built-in tiny Llama; base + LoRA (and start adapters)
    shards, checkpoint      which shards to train; atomic checkpoints
    ledger, credit          the node's signed-record file; offline verification of any ledgers and credit
    receipt_sets            which receipts and spot checks count (canonical receipt set per round and shard)
    metrics                 Prometheus metrics
    rotation                a rotated key continues a swarm's ledger (keeps the old one, finds the chain)
    trainer                 local forward/backward and the AdamW step
    swarm/                  the only package that imports hivemind:
        exact                 the shared integer grid, exact sums and their wire codec (pure torch)
        averager              the hivemind averager subclass and every private hivemind hook
        dht, probe, traffic   DHT start / failures / cleanup; bandwidth probe; bytes on p2pd's sockets
        membership            heartbeats, the peer view, re-dialling, the member check
        quorum                consensus rules over one peer view (pure functions)
        outcome               what one shard's all-reduce gives: members' round claims, the exact sum or a failure
        swarm                 the facade: exact all-reduce, state sharing, the state metadata format
        follow                follow a swarm without training in it (read heartbeats, download shard state)
        statements, validator per-round receipt and spot-check keys; the DHT's signed-value guard and readers
        stores                this node's DHT stores on their way (not waited for by the round)
    spotcheck, receipts     recompute a drawn member's part; sign, keep, publish and collect receipts and checks
    stack                   everything a node loads before it joins (checked inputs -> model, trainer)
    rounds                  one round: train, exchange, apply, record
    republish               store the node's records and statements again before the DHT forgets them
    statesync, splitguard   publish/download state and donor trust; train, wait or resync
    status, control         the snapshot the control service reads; the gRPC service
    daemon                  the composition root: wiring and sequencing only
    export, doctor, demo    standalone tools (never import the daemon)
    serve, serve_api        one base, many LoRA adapters (folders or a followed swarm); OpenAI's HTTP API on it
    cli/                    the `swarmtune` command (the only importer of run_node)
"""

__version__ = "0.1.0"
