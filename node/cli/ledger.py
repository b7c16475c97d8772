"""`swarmtune ledger show|verify|export` and `swarmtune credit`: read, check and count ledgers.

    swarmtune ledger show   [--ledger PATH...] [--peer P] [--round R] [--json]
    swarmtune ledger verify --ledger PATH... [--dht-peer MADDR...] (--manifest M | --swarm-id HEX --max-samples N)
                            [--rotations FILE] [--json] [--allow-torn-tail]   # exit 1 if anything fails or is torn
    swarmtune ledger export --ledger PATH... --format jsonl|csv [--out FILE]
    swarmtune credit        --ledger PATH... (--manifest M | --swarm-id HEX --max-samples N) [--json]

Everything here is offline: it reads ledger files (one signed record per line) and, with
--dht-peer, the records published in the swarm's DHT; it never needs the node's key.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("ledger", help="show, verify and export contribution ledgers",
                       description="Show, verify and export contribution ledgers (the node's own, others', the DHT's).")
    lsub = p.add_subparsers(dest="ledger_command", metavar="ACTION")
    p.set_defaults(func=lambda args: _group_help(p))

    show = lsub.add_parser("show", help="table of the records in ledger files")
    _add_sources(show, required=False)
    show.add_argument("--peer", help="only records of this peer id (a prefix is enough)")
    show.add_argument("--round", type=int, help="only records of this round")
    show.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    show.set_defaults(func=_show)

    verify = lsub.add_parser("verify", help="verify ledgers offline: a verdict per record, exit 1 on any failure")
    _add_sources(verify, required=False)
    _add_swarm(verify)
    verify.add_argument("--json", action="store_true", help="verdicts as JSON lines")
    verify.add_argument("--allow-torn-tail", action="store_true",
                        help="accept a ledger whose last line was cut short by a crash (that line is never credited; "
                             "default: such a ledger fails verification, exit 1)")
    verify.set_defaults(func=_verify)

    export = lsub.add_parser("export", help="export records as JSON lines or CSV")
    _add_sources(export, required=True)
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl")
    export.add_argument("--out", metavar="FILE", help="output file (default: stdout)")
    export.set_defaults(func=_export)

    credit = sub.add_parser("credit", help="per-peer credit from verified records (capped per round)",
                            description="Count each peer's credit from verified contribution records only: samples and "
                                        "tokens per peer, capped per round at the manifest's [credit] "
                                        "max_samples_per_round (or --max-samples). Offline: reads ledger files and, with "
                                        "--dht-peer, the records published in the swarm's DHT.")
    _add_sources(credit, required=False)
    _add_swarm(credit)
    credit.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    credit.set_defaults(func=_credit)


def _group_help(parser: argparse.ArgumentParser) -> int:
    """`swarmtune ledger` alone: its own help, exit 2 (an action is needed)."""
    parser.print_help()
    return 2


def _add_sources(p: argparse.ArgumentParser, *, required: bool) -> None:
    p.add_argument(
        "--ledger",
        nargs="+",
        default=[],
        metavar="PATH",
        required=required,
        help="ledger file(s)" + ("" if required else " (default: $SWARMTUNE_HOME/swarms/*/ledger.jsonl)"),
    )


def _add_swarm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", metavar="M", help="swarm manifest: gives the swarm id and the per-round cap")
    p.add_argument("--swarm-id", metavar="HEX", help="swarm id (overrides the manifest's)")
    p.add_argument("--max-samples", type=int, metavar="N", help="samples credited per peer per round (overrides the manifest's)")
    p.add_argument("--dht-peer", nargs="+", default=[], metavar="MADDR", help="also collect the swarm's records from the DHT via these peers")
    p.add_argument("--rotations", metavar="FILE", help="key rotation statements, one per line")


# ---------------------------------------------------------------- inputs


def _ledger_paths(args: argparse.Namespace, *, allow_empty: bool = False) -> list[Path]:
    from node.cli.errors import UserError
    from node.config import default_home

    if args.ledger:
        return [Path(p) for p in args.ledger]
    home = default_home()
    found = sorted(home.glob("swarms/*/ledger.jsonl"))  # where the daemon keeps each swarm's ledger
    if not found and not allow_empty:
        raise UserError(f"no ledger files under {home}/swarms/*/ledger.jsonl; pass --ledger PATH")
    return found


def _read_sources(paths: list[Path], torn: list[str] | None = None) -> dict[str, list[bytes]]:
    """Every ledger's complete lines; a torn last line is noted on stderr (and its description added to `torn`)."""
    from node.cli.errors import UserError
    from node.ledger import LedgerError, read_log

    sources: dict[str, list[bytes]] = {}
    for path in paths:
        try:
            contents = read_log(path)
        except LedgerError as e:
            raise UserError(f"{e}; check the --ledger path") from None
        if contents.torn is not None:
            if torn is not None:
                torn.append(f"{path}: torn last line at byte {contents.torn.offset} ({contents.torn.reason})")
            print(
                f"note: {path}: torn last line at byte {contents.torn.offset} ignored, not credited ({contents.torn.reason})",
                file=sys.stderr,
            )
        sources[str(path)] = contents.blobs
    return sources


def _swarm_params(args: argparse.Namespace) -> tuple[str, int, int | None]:
    """(swarm id, samples credited per record at most, tokens per credited sample at most: the
    manifest's max_length, or None without a manifest)"""
    from node.cli.errors import UserError

    swarm_id, cap, token_cap = args.swarm_id, args.max_samples, None
    args.objective = ""  # known from a manifest only
    if args.manifest:
        from node.manifest import load_manifest  # lazy: the manifest pulls in more than we need here

        try:
            manifest = load_manifest(args.manifest)
        except (OSError, ValueError) as e:
            raise UserError(str(e)) from None
        swarm_id = swarm_id or manifest.swarm_id
        cap = cap if cap is not None else manifest.credit_cap
        token_cap = manifest.token_cap
        args.objective = manifest.objective
    if not swarm_id or cap is None:
        raise UserError("need the swarm: pass --manifest M, or both --swarm-id HEX and --max-samples N")
    if len(swarm_id) != 64 or not all(c in "0123456789abcdef" for c in swarm_id):
        raise UserError(f"--swarm-id must be 64 lowercase hex characters, got {swarm_id!r}")
    if cap < 1:
        raise UserError(f"--max-samples must be >= 1, got {cap}")
    return swarm_id, cap, token_cap


def _collect_dht(peers: list[str], swarm_id: str) -> list[bytes]:
    from node.cli.errors import UserError
    from node.swarm.dht import SwarmError, read_swarm_records

    try:
        return read_swarm_records(peers, swarm_id)
    except SwarmError as e:
        raise UserError(f"cannot read records from the DHT through --dht-peer: {e}") from None


def _report(args: argparse.Namespace, torn: list[str] | None = None):
    from node.cli.errors import UserError
    from node.ledger import verify_logs

    swarm_id, cap, token_cap = _swarm_params(args)
    sources = _read_sources(_ledger_paths(args, allow_empty=bool(args.dht_peer)), torn)
    if args.dht_peer:
        sources["dht"] = _collect_dht(args.dht_peer, swarm_id)
    rotations: list[bytes] = []
    if args.rotations:
        try:
            rotations = [line for line in Path(args.rotations).read_bytes().split(b"\n") if line]
        except OSError as e:
            raise UserError(f"cannot read --rotations {args.rotations}: {e.strerror}") from None
    return verify_logs(sources, swarm_id, cap, rotations=rotations, max_tokens_per_sample=token_cap)


def _record_dict(record, **extra) -> dict:
    d = dataclasses.asdict(record)
    d["shards"] = list(record.shards)
    d.update(extra)
    return d


def _valid_records(paths: list[Path]):
    """(source, blob, record) for every line whose signature and schema hold; others noted on stderr."""
    from protocol.record import RecordError, verify_signed

    for source, blobs in _read_sources(paths).items():
        for i, blob in enumerate(blobs):
            try:
                yield source, blob, verify_signed(blob)
            except RecordError as e:
                print(f"note: {source} line {i + 1}: skipped, {e}", file=sys.stderr)


# ---------------------------------------------------------------- commands


def _show(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from protocol.record import from_fixed, record_hash

    rows = [
        (source, blob, r)
        for source, blob, r in _valid_records(_ledger_paths(args))
        if (args.peer is None or r.peer_id.startswith(args.peer)) and (args.round is None or r.round == args.round)
    ]
    if args.json:
        for source, blob, r in rows:
            print(json.dumps(_record_dict(r, source=source, record_hash=record_hash(blob))))
        return 0
    table = Table(title=f"{len(rows)} record(s)")
    for col in ("source", "peer", "seq", "round", "shards", "samples", "tokens", "loss", "secs", "hash"):
        table.add_column(col, justify="right" if col in ("seq", "round", "samples", "tokens", "secs") else "left")
    for source, blob, r in rows:
        table.add_row(
            Path(source).name,
            r.peer_id[:8] + "…" + r.peer_id[-6:],
            str(r.seq),
            str(r.round),
            ",".join(map(str, r.shards)),
            str(r.samples),
            str(r.tokens),
            f"{from_fixed(r.loss_before):.4f} → {from_fixed(r.loss_after):.4f}",
            f"{(r.end_ms - r.start_ms) / 1000:.1f}",
            record_hash(blob)[:12],
        )
    Console().print(table)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    torn: list[str] = []
    report = _report(args, torn)
    if args.json:
        for v in report.records:
            print(json.dumps({"source": v.source, "index": v.index, "status": v.status, "reason": v.reason,
                              "peer_id": v.peer_id, "seq": v.seq, "round": v.round, "record_hash": v.record_hash}))
        for p in report.peers.values():
            print(json.dumps({"peer_id": p.peer_id, "ok": p.ok, "reasons": p.reasons, "head_seq": p.head_seq}))
    else:
        console = Console()
        objective = f" (objective {args.objective})" if args.objective else ""
        table = Table(title=f"swarm {report.swarm_id[:16]}…{objective}: {len(report.records)} record(s)")
        for col in ("source", "#", "peer", "seq", "round", "verdict", "reason"):
            table.add_column(col)
        for v in report.records:
            style = {"ok": "green", "duplicate": "cyan", "fail": "bold red"}[v.status]
            table.add_row(
                Path(v.source).name, str(v.index + 1), (v.peer_id or "?")[:14], str(v.seq if v.seq is not None else "?"),
                str(v.round if v.round is not None else "?"), f"[{style}]{v.status}[/]", v.reason,
            )
        console.print(table)
        for p in report.peers.values():
            verdict = "[green]ok[/]" if p.ok else "[bold red]FAIL[/] " + "; ".join(p.reasons)
            console.print(f"peer {p.peer_id}: chain to seq {p.head_seq}: {verdict}")
        for reason in report.rotation_errors:
            console.print(f"[bold red]{reason}[/]")
    failed = sum(not v.ok for v in report.records) + sum(not p.ok for p in report.peers.values()) + len(report.rotation_errors)
    if failed:
        print(f"verification FAILED: {failed} problem(s)", file=sys.stderr)
    if torn and not args.allow_torn_tail:  # bytes it could not credit: not a clean verification
        print(f"verification FAILED: {len(torn)} ledger(s) end in a torn line that was neither verified nor credited "
              f"({'; '.join(torn)}); pass --allow-torn-tail to accept that (a crash mid-write leaves one)", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _export(args: argparse.Namespace) -> int:
    from protocol.record import record_hash

    out = open(args.out, "w", newline="") if args.out else sys.stdout
    try:
        rows = list(_valid_records(_ledger_paths(args)))
        if args.format == "jsonl":
            for source, blob, r in rows:
                out.write(json.dumps(_record_dict(r, record_hash=record_hash(blob), envelope=blob.decode("ascii"))) + "\n")
        else:
            from protocol.record import ContributionRecord

            names = [f.name for f in dataclasses.fields(ContributionRecord)] + ["record_hash"]
            writer = csv.writer(out)
            writer.writerow(names)
            for source, blob, r in rows:
                d = _record_dict(r, record_hash=record_hash(blob))
                d["shards"] = ";".join(map(str, r.shards))
                writer.writerow([d[n] for n in names])
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _credit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from node.ledger import compute_credit

    report = _report(args)
    credit = compute_credit(report)
    rejected = sum(v.status == "fail" for v in report.records)
    if rejected:
        print(f"note: {rejected} record(s) failed verification and are not credited (see `swarmtune ledger verify`)", file=sys.stderr)
    if args.json:
        for c in credit.values():
            print(json.dumps(dataclasses.asdict(c)))
        return 0
    objective = f"objective {args.objective}, " if args.objective else ""
    tokens = f", {report.max_tokens_per_sample} tokens/sample" if report.max_tokens_per_sample else ""
    table = Table(title=f"credit in swarm {report.swarm_id[:16]}… ({objective}cap {report.max_samples_per_round} "
                        f"samples/round{tokens})")
    for col in ("peer", "rounds", "samples", "tokens", "share"):
        table.add_column(col, justify="left" if col == "peer" else "right")
    for c in sorted(credit.values(), key=lambda c: -c.samples):
        table.add_row(c.peer_id, str(c.rounds), str(c.samples), str(c.tokens), f"{100 * c.share:.1f}%")
    Console().print(table)
    return 0
