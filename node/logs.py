"""Logging setup for the `swarmtune` process: readable lines by default, JSON lines on request.

    setup_logging("info")              # 2026-01-02 10:11:12.345 INFO  node.daemon: round 3 done  loss=1.25
    setup_logging("info", json=True)   # {"ts": "...", "level": "INFO", "logger": "node.daemon", "msg": "round 3 done", "loss": 1.25}

Fields passed with `log.info("...", extra={"loss": 1.25})` appear as `key=value`
in text and as top-level keys in JSON. hivemind (and other chatty libraries)
log at WARNING and above unless the level is debug. Call it once at process
start; calling again replaces the previous setup. If hivemind is already
imported, its own colored handler is switched off so its records go through
ours (and become JSON too); otherwise HIVEMIND_LOGLEVEL is set for when it loads.
"""

from __future__ import annotations

import json as _json
import logging
import os
import sys
from datetime import datetime, timezone
from typing import TextIO

# Libraries that log at INFO per round or per connection; quiet unless debugging.
NOISY_LOGGERS = ("hivemind", "urllib3", "filelock", "asyncio", "httpx", "datasets")

# Attributes every LogRecord has; anything else came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# hivemind's formatter attributes, set on records it formats; never useful as fields.
_IGNORED = {"caller", "caller_block", "levelcolor", "bold", "reset", "origin_created"}


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and k not in _IGNORED}


# hivemind renames WARNING to "WARN" globally when imported; keep JSON level names stable.
_LEVEL_NAMES = {logging.DEBUG: "DEBUG", logging.INFO: "INFO", logging.WARNING: "WARNING",
                logging.ERROR: "ERROR", logging.CRITICAL: "CRITICAL"}


def _level(record: logging.LogRecord) -> str:
    return _LEVEL_NAMES.get(record.levelno, record.levelname)


def _timestamp(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC ISO 8601), level, logger, msg, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": _timestamp(record), "level": _level(record), "logger": record.name, "msg": record.getMessage()}
        for key, value in _extras(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = record.stack_info
        return _json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`2026-01-02 10:11:12.345 INFO  logger: message  key=value ...` in local time."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        line = f"{ts} {_level(record):<5} {record.name}: {record.getMessage()}"
        extras = _extras(record)
        if extras:
            line += "  " + " ".join(f"{k}={v}" for k, v in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


# Messages nobody running a node can act on: they are dropped, not printed.
# - bitsandbytes' optional CPU 4-bit kernel from the `kernels` package (a speed-up it falls back from);
# - asyncio's report of a p2pd stream that closed while the daemon shut down (hivemind's stream handler
#   reads a header from a connection p2pd already dropped: IncompleteReadError, nothing was lost);
# - hivemind's traceback for an averaging step that found no group or lost a part: node.swarm logs the
#   same failure as one warning with the shard, and the round loop says what it does about it.
QUIET_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR}


class _ShutdownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "hivemind.averaging.averager":
            return not (record.exc_info and record.funcName == "_step")
        if record.name != "asyncio" or not record.exc_info:
            return True
        import asyncio

        closed = isinstance(record.exc_info[1], (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError))
        return not (closed and "client_connected_cb" in record.getMessage())


def quiet_unactionable() -> None:
    """Drop the messages above (idempotent; forked hivemind processes inherit it)."""
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for name in ("asyncio", "hivemind.averaging.averager"):
        noise = logging.getLogger(name)
        if not any(isinstance(f, _ShutdownNoise) for f in noise.filters):
            noise.addFilter(_ShutdownNoise())


def setup_logging(level: str | int = "info", json: bool = False, stream: TextIO | None = None) -> logging.Handler:
    """Configure the root logger; returns the handler it installed (on stderr by default)."""
    numeric = logging.getLevelName(level.upper()) if isinstance(level, str) else level
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_swarmtune", False)]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler._swarmtune = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)

    library_level = numeric if numeric <= logging.DEBUG else max(numeric, logging.WARNING)
    os.environ["HIVEMIND_LOGLEVEL"] = logging.getLevelName(library_level)
    if "hivemind.utils.logging" in sys.modules:
        sys.modules["hivemind.utils.logging"].use_hivemind_log_handler("nowhere")
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(library_level)
    quiet_unactionable()
    logging.captureWarnings(True)  # library warnings (FutureWarning, ...) become log records: JSON too
    if json:
        _libraries_through_logging()
    return handler


def _libraries_through_logging() -> None:
    """For JSON output: progress bars off (a bar is not a line a log collector can read, and nobody watches
    a daemon's), and transformers' own stderr handler replaced by propagation to ours."""
    for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ[var] = "1"  # read when huggingface_hub / datasets load, and by transformers' tqdm
    import transformers.utils.logging as hf_logging  # the node loads transformers anyway; this part is light

    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def json_active() -> bool:
    """Whether `setup_logging(json=True)` is in force (then even the CLI's last words must be JSON)."""
    return any(getattr(h, "_swarmtune", False) and isinstance(h.formatter, JsonFormatter) for h in logging.getLogger().handlers)
