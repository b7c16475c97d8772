"""`swarmtune demo`: a whole swarm on one laptop, in a few minutes, with nothing to download.

It builds (once, cached) the tiny deterministic Llama and uses the built-in parity task,
writes a manifest, starts N real node processes on 127.0.0.1 (each with its own key,
ledger, checkpoints and p2p daemon), shows their progress live, then:
- checks every node ended with bit-identical adapter weights,
- verifies every node's signed ledger and prints the credit table,
- loads the exported adapter with stock PEFT and compares held-out loss and accuracy
  against the base model, with a few sample generations.
A JSON report is written to <workdir>/demo_report.json. The adapter goes to <workdir>/adapter;
its adapter_config.json names the tiny base's absolute folder, so stock tools load it alone
(`AutoPeftModelForCausalLM.from_pretrained("<workdir>/adapter")`). A workdir that already holds
an adapter is refused before anything starts (the demo never overwrites one).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

EVAL_EXAMPLES = 200


class DemoError(RuntimeError):
    """The demo swarm did not come up or a node failed; the message names the log to read."""


def _last_line(path: Path) -> dict | None:
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError, IndexError):
        return None


def _node_json(home: Path) -> dict | None:
    for p in (home / "swarms").glob("*/node.json"):
        try:
            return json.loads(p.read_text())
        except (OSError, ValueError):
            return None
    return None


def _rounds_file(home: Path) -> Path | None:
    found = list((home / "swarms").glob("*/rounds.jsonl"))
    return found[0] if found else None


def _progress_table(homes, procs, started, total_rounds) -> Table:
    t = Table(title=f"swarmtune demo — {len(homes)} nodes on 127.0.0.1, {time.time() - started:.0f}s")
    for col in ("node", "peer id", "round", "loss", "peers", "samples/s", "state"):
        t.add_column(col)
    for i, (home, proc) in enumerate(zip(homes, procs)):
        info = _node_json(home) or {}
        rf = _rounds_file(home)
        last = _last_line(rf) if rf else None
        state = "running" if proc.poll() is None else f"exited {proc.returncode}"
        if last is None:
            t.add_row(str(i), (info.get("peer_id") or "starting…")[-10:], "-", "-", "-", "-", state)
            continue
        t.add_row(
            str(i), info.get("peer_id", "")[-10:], f"{last['next_round']}/{total_rounds}",
            f"{last['loss']:.4f}" if last.get("loss") is not None else "-", str(last.get("peers", "-")),
            f"{last['samples'] / max(last['seconds'], 1e-9):.1f}", state,
        )
    return t


def _evaluate_adapter(base_dir: Path, adapter_dir: Path, n: int) -> tuple[dict, dict]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from node.data import builtin_data_path
    from node.data import load_records
    from node.tiny import evaluate

    records = load_records(builtin_data_path("eval"))[:n]
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    before = evaluate(base, tok, records)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir))  # stock PEFT, as any user would load it
    after = evaluate(tuned, tok, records)
    return before, after


def run_demo(*, nodes: int = 3, rounds: int = 60, workdir: str | None = None, port_base: int = 0, quiet: bool = False, threads: int = 1) -> int:
    from node.credit import compute_credit, verify_logs
    from node.manifest import load_manifest

    from node.export import ExportError, check_target

    console = Console()
    work = Path(workdir or tempfile.mkdtemp(prefix="swarmtune-demo-"))
    try:
        check_target(work / "adapter")  # found now, not after minutes of training
    except ExportError:
        raise DemoError(f"{work / 'adapter'} already holds files (an earlier demo's adapter?) and the demo never "
                        f"overwrites one: pass a fresh --workdir, or move {work / 'adapter'} away") from None
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "swarm.toml"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    console.print(f"[bold]swarmtune demo[/] in {work}: building the tiny base model (cached) and the manifest…")
    subprocess.run(
        [sys.executable, "-m", "node", "swarm", "init", "--out", str(manifest), "--force", "--name", "demo",
         "--max-rounds", str(rounds), "--lr", "3e-3", "--target-batch-size", "48"],
        check=True, env=env, stdout=subprocess.DEVNULL if quiet else None,
    )
    m = load_manifest(manifest)
    homes = [work / f"node-{i}" for i in range(nodes)]
    procs: list[subprocess.Popen] = []
    logs = []

    def start(i: int, initial: list[str]) -> subprocess.Popen:
        port = port_base + i if port_base else 0
        cmd = [
            sys.executable, "-m", "node", "run", "--manifest", str(manifest), "--home", str(homes[i]), "--create-key",
            "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}", "--min-peers", str(nodes), "--threads", str(threads),
        ]
        if initial:
            cmd += ["--initial-peers", *initial]
        if i == 0:
            cmd += ["--export", str(work / "adapter")]
        log = open(work / f"node-{i}.log", "w")
        logs.append(log)
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    started = time.time()
    try:
        procs.append(start(0, []))
        deadline = time.time() + 180
        info = None
        while info is None:
            if procs[0].poll() is not None:
                raise DemoError(f"node 0 exited with {procs[0].returncode}; see {work / 'node-0.log'}")
            if time.time() > deadline:
                raise DemoError(f"node 0 did not come up in 180 s; see {work / 'node-0.log'}")
            time.sleep(0.5)
            info = _node_json(homes[0])
        for i in range(1, nodes):
            procs.append(start(i, info["maddrs"]))
        if quiet:
            while any(p.poll() is None for p in procs):
                time.sleep(1)
        else:
            with Live(_progress_table(homes, procs, started, rounds), console=console, refresh_per_second=2) as live:
                while any(p.poll() is None for p in procs):
                    time.sleep(0.5)
                    live.update(_progress_table(homes, procs, started, rounds))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # the node drains and stops its own children
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in logs:
            log.close()
    wall = time.time() - started
    failed = [i for i, p in enumerate(procs) if p.returncode != 0]
    if failed:
        raise DemoError(f"node(s) {failed} failed; see their logs in {work}")

    # 1. identical adapters
    finals = {i: _last_line(_rounds_file(h)) for i, h in enumerate(homes)}
    hashes = {i: f["hash"] for i, f in finals.items() if f}
    identical = len(set(hashes.values())) == 1 and len(hashes) == nodes
    # 2. ledgers verify, credit
    blobs = {}
    for i, h in enumerate(homes):
        led = next((h / "swarms").glob("*/ledger.jsonl"))
        blobs[f"node-{i}"] = [line for line in led.read_bytes().splitlines() if line]
        evidence = led.with_name("receipts.jsonl")  # receipts and spot-checks: what makes a record count
        if evidence.exists():
            blobs[f"node-{i}-receipts"] = [line for line in evidence.read_bytes().splitlines() if line]
    report = verify_logs(blobs, m.swarm_id, m.credit_cap, max_tokens_per_sample=m.token_cap,
                         exclude_after=m.credit.exclude_after)
    credit = compute_credit(report)
    # 3. before/after on held-out examples, with stock PEFT
    from node.model import resolve_base

    base_dir = resolve_base(m.base.model)
    before, after = _evaluate_adapter(base_dir, work / "adapter", EVAL_EXAMPLES)

    console.print(f"\n[bold]{nodes} nodes, {rounds} rounds, {wall:.0f} s[/]. Adapters bit-identical on every node: "
                  + ("[green]yes[/] " + next(iter(hashes.values()))[:16] + "…" if identical else f"[red]NO[/] {hashes}"))
    console.print(f"Ledgers: {sum(v.ok for v in report.records)}/{len(report.records)} records verify"
                  + ("" if report.ok else " [red](failures!)[/]"))
    ct = Table(title="Credit (receipted, spot-checked work only)")
    for col in ("peer", "claimed", "credited rounds", "checks passed/failed", "samples", "tokens", "share"):
        ct.add_column(col)
    for c in credit.values():
        ct.add_row(c.peer_id[-12:], str(c.claimed_rounds), str(c.credited_rounds),
                   f"{c.spot_checks_passed}/{c.spot_checks_failed}", str(c.credited_samples), str(c.credited_tokens),
                   f"{c.share:.1%}")
    console.print(ct)
    et = Table(title=f"Held-out parity task ({len(before['samples'])} examples never trained on)")
    for col in ("", "loss", "accuracy"):
        et.add_column(col)
    et.add_row("base model", f"{before['loss']:.3f}", f"{before['accuracy']:.1%}")
    et.add_row("base + swarm adapter", f"{after['loss']:.3f}", f"{after['accuracy']:.1%}")
    console.print(et)
    st = Table(title="Sample generations")
    for col in ("prompt", "expected", "base", "fine-tuned"):
        st.add_column(col)
    for (prompt, expected, got_b), (_, _, got_a) in list(zip(before["samples"], after["samples"]))[:5]:
        q = prompt.split("user")[-1].strip().splitlines()[0] if "user" in prompt else prompt[-30:]
        st.add_row(q[:40], expected, repr(got_b[:16]), repr(got_a[:16]))
    console.print(st)
    result = {
        "nodes": nodes, "rounds": rounds, "wall_s": round(wall, 1), "identical_adapters": identical,
        "final_hash": next(iter(hashes.values()), None), "ledger_ok": report.ok,
        "records": len(report.records), "credit": {p: dataclasses.asdict(c) for p, c in credit.items()},
        "before": {"loss": before["loss"], "accuracy": before["accuracy"]},
        "after": {"loss": after["loss"], "accuracy": after["accuracy"]},
        "first_loss": _first_loss(homes[0]), "last_loss": finals[0].get("loss") if finals.get(0) else None,
    }
    (work / "demo_report.json").write_text(json.dumps(result, indent=2))
    console.print(f"Report: {work / 'demo_report.json'}; adapter (PEFT format): {work / 'adapter'}")
    return 0 if identical and report.ok and after["loss"] < before["loss"] else 1


def _first_loss(home: Path):
    rf = _rounds_file(home)
    try:
        return json.loads(rf.read_text().splitlines()[0]).get("loss")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
