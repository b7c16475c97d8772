"""`swarmtune service install`: write a systemd unit that runs this node unattended.

    swarmtune service install --config node.toml            # /etc/systemd/system/swarmtune.service (root)
    swarmtune service install --config node.toml --user     # ~/.config/systemd/user/swarmtune.service
    swarmtune service install --config node.toml --out FILE # anywhere (to review, or for packaging)

The unit (node/builtin/swarmtune.service) runs `swarmtune run --config FILE` with the node's home,
restarts it after a crash (not after a clean stop, not after bad input), and stops it with SIGTERM,
which drains. The config is checked first (it must load and name a manifest); nothing is written
when it does not. Prints the systemctl commands that enable and start it; runs none of them.
"""

from __future__ import annotations

import getpass
import os
import shutil
import sys
from pathlib import Path

from node.cli.errors import UserError

UNIT = Path(__file__).resolve().parents[1] / "builtin" / "swarmtune.service"


def register(sub) -> None:
    svc = sub.add_parser("service", help="run the node unattended under systemd",
                         description="Run the node unattended under systemd.")
    ss = svc.add_subparsers(dest="service_command", metavar="COMMAND")
    svc.set_defaults(func=lambda args: (svc.print_help(), 2)[1])
    i = ss.add_parser("install", help="write a systemd unit for this node and print how to enable it",
                      description="Write a systemd unit that runs `swarmtune run --config FILE` and restarts it after a "
                                  "crash; print the systemctl commands that enable and start it (none is run).")
    i.add_argument("--config", required=True, metavar="FILE", help="the node TOML the service runs (required; it must name a manifest)")
    i.add_argument("--user", action="store_true",
                   help="a user unit (~/.config/systemd/user/swarmtune.service, systemctl --user) instead of a system one")
    i.add_argument("--out", default=None, metavar="FILE",
                   help="where to write the unit (default: /etc/systemd/system/swarmtune.service, or the user path with --user)")
    i.add_argument("--name", default="swarmtune", help="the unit's name (default: swarmtune)")
    i.add_argument("--force", action="store_true", help="overwrite an existing unit file (default: refuse)")
    i.set_defaults(func=cmd_install)


def render_unit(*, config: Path, home: Path, user: str | None, wanted_by: str, executable: str) -> str:
    text = UNIT.read_text()
    fields = {"@EXEC@": executable, "@CONFIG@": str(config), "@HOME@": str(home), "@WORKDIR@": str(config.parent),
              "@USER@": f"User={user}" if user else "", "@WANTEDBY@": wanted_by}
    for key, value in fields.items():
        text = text.replace(key, value)
    return text


def _executable() -> str:
    """The swarmtune this process runs as: the console script beside the interpreter, else `python -m node`."""
    beside = Path(sys.executable).parent / "swarmtune"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("swarmtune")
    return found if found else f"{sys.executable} -m node"


def cmd_install(args) -> int:
    from node.config import ConfigError, load_node_config

    config = Path(args.config).expanduser().resolve()
    try:
        cfg = load_node_config(config, env={})
    except ConfigError as e:
        raise UserError(f"{e}; the service runs `swarmtune run --config {config}`, so fix that file first") from None
    if not cfg.manifest:
        raise UserError(f"{config} names no manifest: add `manifest = \"/path/to/swarm.toml\"` under [node]")
    manifest = Path(cfg.manifest).expanduser()
    manifest = manifest if manifest.is_absolute() else config.parent / manifest
    if not manifest.is_file():
        raise UserError(f"{config}: manifest {manifest} not found; fix `manifest` in that file")
    if args.user:
        out = Path(args.out) if args.out else Path("~/.config/systemd/user").expanduser() / f"{args.name}.service"
        user, wanted_by, ctl = None, "default.target", "systemctl --user"
    else:
        out = Path(args.out) if args.out else Path("/etc/systemd/system") / f"{args.name}.service"
        user, wanted_by, ctl = getpass.getuser(), "multi-user.target", "systemctl"
    if out.exists() and not args.force:
        raise UserError(f"{out} exists; pass --force to overwrite it")
    text = render_unit(config=config, home=cfg.home_dir.resolve(), user=user, wanted_by=wanted_by, executable=_executable())
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror or e}; run as root for a system unit, or use --user or --out") from None
    print(f"wrote {out}")
    print(f"enable and start it: {ctl} daemon-reload && {ctl} enable --now {out.stem}")
    print(f"watch it: {'journalctl --user' if args.user else 'journalctl'} -u {out.stem} -f; swarmtune status")
    if args.user:
        print(f"keep it running after you log out: loginctl enable-linger {getpass.getuser()}")
    return 0
