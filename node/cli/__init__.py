"""The `swarmtune` command line.

Each submodule owns a group of subcommands and exposes `register(subparsers)`;
heavy imports (torch, hivemind) happen inside the handlers so `--help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import sys

from node import __version__
from node.cli.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    from node.cli import control, doctor, keys, ledger, serve, service, train

    parser = argparse.ArgumentParser(
        prog="swarmtune",
        description="Fine-tune LoRA adapters together with peers over a hivemind DHT.",
    )
    parser.add_argument("--version", action="version", version=f"swarmtune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in (train, keys, ledger, control, doctor, serve, service):
        module.register(sub)
    return parser


_FIXES = {errno.EROFS: "the file system is read-only: remount it read-write or use a folder on another disk",
          errno.EACCES: "check the file's owner and permissions", errno.EPERM: "check the file's owner and permissions"}


def _environment(e: OSError) -> bool:
    """A full or read-only disk, or permissions: the user's environment, not a bug."""
    return e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EACCES, errno.EPERM)


def main(argv: list[str] | None = None) -> int:
    from node.logs import quiet_unactionable

    quiet_unactionable()  # before anything imports bitsandbytes
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        _say(f"swarmtune: error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if isinstance(e, OSError) and _environment(e):  # the user's disk or permissions, not a bug
            verb = "access" if e.errno in (errno.EACCES, errno.EPERM) else "write"
            _say(f"swarmtune: error: cannot {verb} {e.filename or 'a file'}: {e.strerror}; "
                 f"{_FIXES.get(e.errno, 'free space there or set --home to a folder on another disk')}")
            return 2
        # a bug, not the user's input: one line, and the traceback kept for the report
        where = _crash_report(args)
        _say(f"swarmtune: internal error in `swarmtune {args.command}`: {type(e).__name__}: {e}. This is a bug, not your "
             f"input; the full traceback is in {where} (please attach it to a bug report)")
        return 1


def _say(line: str) -> None:
    """The CLI's last word on stderr: a JSON log line under --log-format json, else plain text."""
    from node.logs import json_active

    if json_active():
        import logging

        logging.getLogger("swarmtune").error(line)
    else:
        print(line, file=sys.stderr)


def _crash_report(args) -> str:
    """Write the current exception's traceback to <home>/crash-<time>-<pid>.log (the temp folder when the
    home cannot be written); returns the path."""
    import os
    import tempfile
    import time
    import traceback
    from pathlib import Path

    from node.config import default_home

    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    text = f"swarmtune {__version__}: {' '.join(sys.argv)}\n\n{traceback.format_exc()}"
    home = Path(args.home).expanduser() if getattr(args, "home", None) else default_home()
    for folder in (home, Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text)
            return str(folder / name)
        except OSError:
            continue
    return "(nowhere: neither the home nor the temp folder is writable)"


if __name__ == "__main__":
    sys.exit(main())
