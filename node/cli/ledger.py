"""`swarmtune ledger show|verify|export` and `swarmtune credit`: read, check and count ledgers.

    swarmtune ledger show   [--ledger PATH...] [--peer P] [--round R] [--json]
    swarmtune ledger verify --ledger PATH... [--dht-peer MADDR...] (--manifest M | --swarm-id HEX --max-samples N)
                            [--rotations FILE] [--json] [--allow-torn-tail]   # exit 1 if anything fails or is torn
    swarmtune ledger export --ledger PATH... --format jsonl|csv [--out FILE]
    swarmtune credit        --ledger PATH... (--manifest M | --swarm-id HEX --max-samples N) [--json] [--explain PEER]

Everything here is offline: it reads ledger, receipts and rotations files (one signed statement
per line: records, round receipts, spot checks, key rotations, in any mix) and, with --dht-peer,
the statements published in the swarm's DHT; it never needs the node's key. Exit codes of
`ledger verify`: 0 when everything verifies (records that earn nothing for lack of a receipt or
after a failed spot check are "uncredited", not failures), 1 on any failure, 2 on bad input.
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

    credit = sub.add_parser("credit", help="per-peer credit from verified, receipted records (capped per round)",
                            description="Count each peer's credit from verified contribution records that other members "
                                        "of its group receipted and no spot check failed: rounds claimed, receipted, "
                                        "spot-checked (passed/failed) and credited, and samples and tokens, capped per "
                                        "round at the manifest's [credit] max_samples_per_round (or --max-samples). "
                                        "Offline: reads ledger, receipts and rotations files and, with --dht-peer, the "
                                        "statements published in the swarm's DHT.")
    _add_sources(credit, required=False)
    _add_swarm(credit)
    credit.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    credit.add_argument("--explain", metavar="PEER",
                        help="for each record of this peer (a prefix is enough), why it counts or not, and the spot "
                             "checks of it")
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
        help="ledger, receipts or rotations file(s), any mix of signed statements one per line"
        + ("" if required else " (default: $SWARMTUNE_HOME/swarms/*/{ledger,receipts,rotations}.jsonl)"),
    )


def _add_swarm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--manifest", metavar="M", help="swarm manifest: gives the swarm id and the per-round cap")
    p.add_argument("--swarm-id", metavar="HEX", help="swarm id (overrides the manifest's)")
    p.add_argument("--max-samples", type=int, metavar="N", help="samples credited per peer per round (overrides the manifest's)")
    p.add_argument("--dht-peer", nargs="+", default=[], metavar="MADDR", help="also collect the swarm's records from the DHT via these peers")
    p.add_argument("--rotations", metavar="FILE", help="key rotation statements, one per line")
    p.add_argument("--no-receipts", action="store_true",
                   help="credit records that no receipt names (self-reported work, as in swarms that ran before "
                        "receipts; anyone can inflate such credit)")


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
    # the node's receipts (its own, and groupmates' that name it) and its key rotations, next to the ledger,
    # and the ledgers of keys it rotated away from (node/rotation.py)
    return (found + sorted(home.glob("swarms/*/ledger-*.jsonl")) + sorted(home.glob("swarms/*/receipts.jsonl"))
            + sorted(home.glob("swarms/*/rotations.jsonl")))


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
    manifest's max_length, or None without a manifest)."""
    from node.cli.errors import UserError

    swarm_id, cap, token_cap = args.swarm_id, args.max_samples, None
    args.objective = ""  # known from a manifest only
    args.exclude_after = None
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
        args.exclude_after = manifest.credit.exclude_after
    if not swarm_id or cap is None:
        raise UserError("need the swarm: pass --manifest M, or both --swarm-id HEX and --max-samples N")
    if len(swarm_id) != 64 or not all(c in "0123456789abcdef" for c in swarm_id):
        raise UserError(f"--swarm-id must be 64 lowercase hex characters, got {swarm_id!r}")
    if cap < 1:
        raise UserError(f"--max-samples must be >= 1, got {cap}")
    return swarm_id, cap, token_cap


def _collect_dht(peers: list[str], swarm_id: str) -> list[bytes]:
    """Records (in (peer, seq) order), receipts, spot checks and rotations from the swarm's DHT."""
    from node.cli.errors import UserError
    from node.swarm.dht import SwarmError, read_swarm_statements

    try:
        found = read_swarm_statements(peers, swarm_id)
    except SwarmError as e:
        raise UserError(f"cannot read records from the DHT through --dht-peer: {e}") from None
    return [blob for kind in ("records", "receipts", "checks", "rotations") for blob in found[kind]]


def _report(args: argparse.Namespace, torn: list[str] | None = None):
    from node.cli.errors import UserError
    from node.credit import verify_logs

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
    return verify_logs(sources, swarm_id, cap, rotations=rotations, max_tokens_per_sample=token_cap,
                       require_receipts=not args.no_receipts,
                       **({"exclude_after": args.exclude_after} if args.exclude_after else {}))


def _record_dict(record, **extra) -> dict:
    d = dataclasses.asdict(record)
    d["shards"] = list(record.shards)
    d.update(extra)
    return d


def _valid_records(paths: list[Path]):
    """(source, blob, record) for every record line whose signature and schema hold; others noted on
    stderr (receipts, spot checks and rotations are not records: skipped silently)."""
    from protocol.receipt import classify
    from protocol.record import RecordError, verify_signed

    for source, blobs in _read_sources(paths).items():
        for i, blob in enumerate(blobs):
            try:
                if classify(blob) != "record":
                    continue
            except RecordError:
                pass  # verify_signed says what is wrong with it
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
        for s in report.statements:
            print(json.dumps({"source": s.source, "index": s.index, "kind": s.kind, "status": s.status,
                              "reason": s.reason, "signer": s.peer_id, "round": s.round, "shard": s.shard,
                              "target": s.target, "statement_hash": s.statement_hash}))
        for p in report.peers.values():
            print(json.dumps({"peer_id": p.peer_id, "ok": p.ok, "reasons": p.reasons, "head_seq": p.head_seq}))
    else:
        console = Console()
        objective = f" (objective {args.objective})" if args.objective else ""
        table = Table(title=f"swarm {report.swarm_id[:16]}…{objective}: {len(report.records)} record(s)")
        for col in ("source", "#", "peer", "seq", "round", "verdict", "reason"):
            table.add_column(col)
        for v in report.records:
            style = _STYLES[v.status]
            table.add_row(
                Path(v.source).name, str(v.index + 1), (v.peer_id or "?")[:14], str(v.seq if v.seq is not None else "?"),
                str(v.round if v.round is not None else "?"), f"[{style}]{v.status}[/]", v.reason,
            )
        console.print(table)
        if report.statements:  # a line per receipt would swamp the table (members x shards per round): problems only
            from collections import Counter

            counts = Counter((s.kind, s.status) for s in report.statements)
            console.print("receipts and spot checks: " + ", ".join(
                f"{n} {kind}(s) {status}" for (kind, status), n in sorted(counts.items())))
            shown = [s for s in report.statements if s.status not in ("ok", "duplicate")]
            table = Table(title=f"{len(shown)} receipt(s) and spot check(s) that do not count")
            for col in ("source", "#", "kind", "signer", "round", "shard", "verdict", "reason"):
                table.add_column(col)
            for s in shown:
                table.add_row(
                    Path(s.source).name, str(s.index + 1), s.kind, (s.peer_id or "?")[:14],
                    "?" if s.round is None else str(s.round), "?" if s.shard is None else str(s.shard),
                    f"[{_STYLES[s.status]}]{s.status}[/]", s.reason,
                )
            if shown:
                console.print(table)
        for group in report.groups.values():
            if group.canonical is None:
                console.print(f"[yellow]round {group.round} shard {group.shard}: {group.note}[/]")
        for p in report.peers.values():
            verdict = "[green]ok[/]" if p.ok else "[bold red]FAIL[/] " + "; ".join(p.reasons)
            console.print(f"peer {p.peer_id}: chain to seq {p.head_seq}: {verdict}")
        for reason in report.rotation_errors:
            console.print(f"[bold red]{reason}[/]")
    failed = (sum(not v.ok for v in report.records) + sum(not s.ok for s in report.statements)
              + sum(not p.ok for p in report.peers.values()) + len(report.rotation_errors))
    if failed:
        print(f"verification FAILED: {failed} problem(s)", file=sys.stderr)
    if torn and not args.allow_torn_tail:  # bytes it could not credit: not a clean verification
        print(f"verification FAILED: {len(torn)} ledger(s) end in a torn line that was neither verified nor credited "
              f"({'; '.join(torn)}); pass --allow-torn-tail to accept that (a crash mid-write leaves one)", file=sys.stderr)
        return 1
    return 1 if failed else 0


_STYLES = {"ok": "green", "duplicate": "cyan", "uncredited": "yellow", "ignored": "yellow", "fail": "bold red"}


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


def _credit_dict(c) -> dict:
    d = dataclasses.asdict(c)
    d["rotated_from"] = list(c.rotated_from)
    d.update(rounds=c.rounds, samples=c.samples, tokens=c.tokens)  # the names from before receipts
    return d


def _credit(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from node.credit import compute_credit

    report = _report(args)
    credit = compute_credit(report)
    rejected = sum(v.status == "fail" for v in report.records)
    if rejected:
        print(f"note: {rejected} record(s) failed verification and are not credited (see `swarmtune ledger verify`)", file=sys.stderr)
    if args.explain:
        return _explain(report, credit, args.explain, as_json=args.json)
    if args.json:
        for c in credit.values():
            print(json.dumps(_credit_dict(c)))
        return 0
    objective = f"objective {args.objective}, " if args.objective else ""
    tokens = f", {report.max_tokens_per_sample} tokens/sample" if report.max_tokens_per_sample else ""
    receipts = "receipts not required" if args.no_receipts else "receipts required"
    table = Table(title=f"credit in swarm {report.swarm_id[:16]}… ({objective}cap {report.max_samples_per_round} "
                        f"samples/round{tokens}, {receipts})")
    for col in ("peer", "claimed", "receipted", "checks passed/failed", "credited rounds", "samples", "tokens", "share"):
        table.add_column(col, justify="left" if col == "peer" else "right")
    for c in sorted(credit.values(), key=lambda c: (-c.credited_samples, c.peer_id)):
        peer = c.peer_id + (f" (+{len(c.rotated_from)} rotated key(s))" if c.rotated_from else "")
        table.add_row(peer, str(c.claimed_rounds), str(c.receipted_rounds),
                      f"{c.spot_checks_passed}/{c.spot_checks_failed}", str(c.credited_rounds), str(c.credited_samples),
                      str(c.credited_tokens), f"{100 * c.share:.1f}%")
    Console().print(table)
    return 0


def _explain(report, credit: dict, prefix: str, *, as_json: bool) -> int:
    """One line per record of the peer matching `prefix`: why it counts or not, and the checks of it."""
    from node.cli.errors import UserError

    known = {v.peer_id for v in report.records if v.peer_id} | set(credit)
    matches = sorted(p for p in known if p.startswith(prefix))
    if not matches:
        raise UserError(f"no records of a peer {prefix!r} in these sources; `swarmtune credit` lists the peers")
    if len(matches) > 1:
        raise UserError(f"--explain {prefix!r} matches {len(matches)} peers ({', '.join(matches)}); give a longer prefix")
    peer = matches[0]
    owner = next((c for c in credit.values() if peer == c.peer_id or peer in c.rotated_from), None)
    words = {"ok": "credited", "uncredited": "not credited", "duplicate": "copy", "fail": "FAILED verification"}
    if not as_json:
        summary = ""
        if owner is not None:
            summary = (f": claimed {owner.claimed_rounds}, receipted {owner.receipted_rounds}, checks passed "
                       f"{owner.spot_checks_passed} failed {owner.spot_checks_failed}, credited {owner.credited_rounds} "
                       f"round(s), {owner.credited_samples} samples")
            if owner.peer_id != peer:
                summary += f" (counted in the row of {owner.peer_id}, which replaced this key)"
            elif owner.rotated_from:
                summary += f" (includes rotated-out key(s) {', '.join(owner.rotated_from)})"
        print(f"peer {peer}{summary}")
    for v in report.records:
        if v.peer_id != peer:
            continue
        checks = [f"spot check by {c.peer_id} in shard {c.shard} "
                  + (f"FAILED (error {c.error_ppm / 1e6:.2f} > tolerance {c.tolerance_ppm / 1e6:.2f})" if c.failed else
                     f"passed (error {c.error_ppm / 1e6:.2f} <= tolerance {c.tolerance_ppm / 1e6:.2f})")
                  for c in v.checks if not c.failed or v.status != "uncredited"]  # else the reason says it
        why = v.reason or (v.receipt_note if v.status == "ok" and report.require_receipts else "")
        if as_json:
            print(json.dumps({"peer_id": peer, "source": v.source, "index": v.index, "seq": v.seq, "round": v.round,
                              "shards": list(v.record.shards) if v.record else None, "status": v.status,
                              "reason": why, "receipted": v.receipted, "checks": checks}))
            continue
        shards = ",".join(map(str, v.record.shards)) if v.record else "?"
        print(f"  seq {v.seq if v.seq is not None else '?'} round {v.round if v.round is not None else '?'} "
              f"shards {shards}: {words[v.status]}" + (f": {why}" if why else "") +
              ("".join(f"; {c}" for c in checks)) + f"  [{v.source}#{v.index + 1}]")
    return 0
