"""Screenshot of the node dashboard, as README shows it: a 2-node swarm on 127.0.0.1 (built-in tiny model
and task), node 0 started with --dashboard-port, and headless Chromium (over its DevTools pipe, the same
driver as tests/test_dashboard.py) captures the page once it shows the node's round.

    python scripts/dashboard_screenshot.py --out docs/dashboard.png [--rounds 20] [--workdir DIR]

Needs Debian's chromium. Every process it starts runs in its own process group and is stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float, procs) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        if any(p.poll() is not None for p in procs):
            raise SystemExit(f"a node exited before {what}; see its log in the workdir")
        time.sleep(0.5)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(REPO / "docs" / "dashboard.png"), help="PNG to write (default: docs/dashboard.png)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds node 0 trains before the screenshot (default: 20)")
    ap.add_argument("--workdir", default=None, help="where the nodes keep their files (default: a fresh temp folder)")
    args = ap.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if not browser:
        raise SystemExit("chromium is not installed (apt-get install chromium)")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="swarmtune-dash-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    manifest = work / "swarm.toml"
    subprocess.run([sys.executable, "-m", "node", "swarm", "init", "--out", str(manifest), "--force", "--name", "dashboard-demo",
                    "--lr", "3e-3", "--target-batch-size", "48"], check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL)
    port = _free_port()
    procs: list[subprocess.Popen] = []

    def start(i: int, *extra: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "node", "run", "--manifest", str(manifest), "--home", str(work / f"node-{i}"),
               "--create-key", "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", "--min-peers", "2", *extra]
        with open(work / f"node-{i}.log", "w") as log:
            p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        procs.append(p)
        return p

    try:
        start(0, "--dashboard-port", str(port))
        info_files = lambda: list((work / "node-0" / "swarms").glob("*/node.json"))  # noqa: E731
        _wait("node 0 to start", lambda: bool(info_files()), 180, procs)
        start(1, "--initial-peers", *json.loads(info_files()[0].read_text())["maddrs"])

        def rounds_done() -> int:
            files = list((work / "node-0" / "swarms").glob("*/rounds.jsonl"))
            return len(files[0].read_text().splitlines()) if files else 0

        _wait(f"{args.rounds} rounds", lambda: rounds_done() >= args.rounds, 60 + 10 * args.rounds, procs)
        out = Path(args.out).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        from tests.browser import Browser

        with Browser(work / "chromium") as b:
            b.open(f"http://127.0.0.1:{port}/")
            _wait("the page to show the round", lambda: (b.eval("document.getElementById('round')?.textContent") or "-")
                  .isdigit() and b.eval("document.querySelectorAll('#credit-rows tr').length") >= 2, 60, procs)
            time.sleep(1.5)  # one more server-sent update, so every panel is drawn
            b.screenshot(out)
        print(f"wrote {out} ({out.stat().st_size} bytes) after {rounds_done()} rounds")
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
