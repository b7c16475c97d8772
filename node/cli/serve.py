"""Subcommands that use adapters: `serve` (an OpenAI-compatible server) and `generate` (a quick look)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import sys
import threading

from node.cli.errors import UserError


def _pairs(values, flag: str) -> list[tuple[str, str]]:
    """NAME=VALUE arguments of a repeatable flag, names checked and unique."""
    from node.serve import ServeError, check_name

    out, seen = [], set()
    for value in values or ():
        name, sep, rest = value.partition("=")
        if not sep or not rest:
            raise UserError(f"{flag} {value!r}: expected NAME=PATH, e.g. {flag} math=./math-adapter")
        try:
            check_name(name)
        except ServeError as e:
            raise UserError(f"{flag} {value!r}: {e}") from None
        if name in seen:
            raise UserError(f"{flag} {value!r}: the name {name!r} is given twice; each served model needs its own name")
        seen.add(name)
        out.append((name, rest))
    return out


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a taken port costs nothing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a TIME_WAIT port is free; a listening one is not
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is in use (another server?); pick another with --port, or --port 0 "
                            "for any free port") from None
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror}); check --host and --port") from None
    sock.listen(128)
    return sock


def _base_of(args, folders, swarms) -> tuple[str, str, str, str]:
    """(base, revision, dtype, quantization): --base, else the first swarm manifest's, else the first adapter's."""
    from node.manifest import ManifestError, load_manifest
    from node.serve import ServeError, adapter_base

    dtype, quant = args.dtype, args.quantization
    if swarms:
        try:
            m = load_manifest(swarms[0][1])
        except ManifestError as e:
            raise UserError(str(e)) from None
        dtype, quant = dtype or m.base.dtype, quant or m.base.quantization
        if not args.base:
            return m.resolve_path(m.base.model), args.revision or m.base.revision, dtype, quant
    if args.base:
        return args.base, args.revision or "", dtype or "float32", quant or "none"
    if folders:
        try:
            base, revision = adapter_base(folders[0][1])
        except ServeError as e:
            raise UserError(str(e)) from None
        return base, args.revision or revision, dtype or "float32", quant or "none"
    raise UserError("no base model: pass --base PATH|HUB_ID (or an --adapter / --swarm that names one)")


def cmd_serve(args) -> int:
    from node.logs import setup_logging
    from node.serve import Engine, ServeError, read_adapter_config

    folders, swarms = _pairs(args.adapter, "--adapter"), _pairs(args.swarm, "--swarm")
    if {n for n, _ in folders} & {n for n, _ in swarms}:
        raise UserError(f"the names {sorted({n for n, _ in folders} & {n for n, _ in swarms})} are used by both --adapter and --swarm")
    if swarms and not args.initial_peers:
        raise UserError("--swarm follows a running swarm: pass --initial-peers with any node's address (its log prints it)")
    for name, path in folders:  # every cheap check before the base loads
        try:
            read_adapter_config(path)
        except ServeError as e:
            raise UserError(f"--adapter {name}={path}: {e}") from None
    base, revision, dtype, quant = _base_of(args, folders, swarms)
    api_key = args.api_key or os.environ.get("SWARMTUNE_API_KEY") or None
    sock = _bind(args.host, args.port)
    setup_logging(args.log_level)
    # SIGTERM / Ctrl-C: while loading, stop at once (the finally below still stops any swarm follower);
    # while serving, uvicorn shuts down gracefully and then re-raises the signal, which lands here and
    # must not kill the process before the followers' DHT processes are stopped
    serving = threading.Event()

    def on_signal(_sig, _frame):
        if not serving.is_set():
            raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    engine = None
    try:
        try:
            engine = Engine.load(base, revision=revision, dtype=dtype, quantization=quant, device=args.device)
            for name, path in folders:
                engine.add_folder(name, path)
            for name, manifest in swarms:
                engine.add_swarm(name, manifest, initial_peers=args.initial_peers, poll_s=args.poll_interval)
        except ServeError as e:
            raise UserError(str(e)) from None
        return _run_server(engine, sock, args, api_key, serving)
    finally:
        sock.close()
        if engine is not None:
            engine.close()


def _run_server(engine, sock, args, api_key, serving) -> int:
    import uvicorn

    from node.serve_api import make_app

    host, port = sock.getsockname()[:2]
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"swarmtune serve: warning: listening on {args.host} without --api-key: anyone who reaches this port can "
              "use the models and load adapters from this machine's folders", file=sys.stderr)
    app = make_app(engine, api_key=api_key, initial_peers=tuple(args.initial_peers or ()), poll_s=args.poll_interval)
    names = [n for n in engine.models]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/v1"
    print(f"swarmtune serve: {', '.join(names)} on {url} (base {engine.base_source}, "
          f"{engine.parameter_bytes() / 2**20:.1f} MiB of weights, loaded once)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level.lower(), access_log=args.log_level.lower() == "debug"))
    serving.set()
    server.run(sockets=[sock])
    return 0


def cmd_generate(args) -> int:
    from node.logs import setup_logging
    from node.serve import BASE_ID, Engine, Sampling, ServeError

    setup_logging("warning")
    if args.max_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UserError("--max-tokens must be >= 1, --temperature >= 0, and --top-p in (0, 1]")
    folders = [("adapter", args.adapter)] if args.adapter else []
    if args.adapter:
        from node.serve import read_adapter_config

        try:
            read_adapter_config(args.adapter)
        except ServeError as e:
            raise UserError(f"--adapter {args.adapter}: {e}") from None
    base, revision, dtype, quant = _base_of(args, folders, [])
    try:
        engine = Engine.load(base, revision=revision, dtype=dtype, quantization=quant, device=args.device)
        if folders:
            engine.add_folder(*folders[0])
        chat = not args.raw and bool(getattr(engine.tokenizer, "chat_template", None))
        ids = engine.encode_chat([{"role": "user", "content": args.prompt}]) if chat else engine.encode_text(args.prompt)
        sampling = Sampling(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        gen = engine.generate(folders[0][0] if folders else BASE_ID, ids, sampling,
                              on_text=lambda piece: print(piece, end="", flush=True))
    except ServeError as e:
        raise UserError(str(e)) from None
    print(flush=True)
    print(f"[{'chat template' if chat else 'plain prompt'}; {gen.prompt_tokens} prompt + {gen.completion_tokens} generated "
          f"tokens; finish: {gen.finish_reason}]", file=sys.stderr)
    return 0


def _model_flags(p) -> None:
    p.add_argument("--base", default=None, metavar="PATH|HUB_ID",
                   help="base model: a local folder, a hub id, or builtin:tiny (default: the base the first --swarm "
                        "manifest or --adapter's adapter_config.json names)")
    p.add_argument("--revision", default="", help="hub revision of --base (default: main, or the one the adapter names)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype of the base (default: the manifest's with --swarm, else float32)")
    p.add_argument("--quantization", default=None, choices=["none", "nf4", "int8"],
                   help="bitsandbytes quantization of the base (default: the manifest's with --swarm, else none)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default: auto, a GPU when torch sees one)")


def register(sub) -> None:
    s = sub.add_parser(
        "serve", help="serve a base with many LoRA adapters over an OpenAI-compatible HTTP API",
        description="Load one base model once and serve any number of LoRA adapters on it over OpenAI's HTTP API "
                    "(/v1/models, /v1/completions, /v1/chat/completions, streaming). A request names its adapter in "
                    "`model`; `base` is the base itself. An adapter is a PEFT folder (--adapter) or a running swarm "
                    "(--swarm: its latest adapter, bit-identical to the swarm's, swapped in as rounds complete). "
                    "Adapters are added and removed at run time with POST/DELETE /v1/adapters (see README).")
    _model_flags(s)
    s.add_argument("--adapter", action="append", metavar="NAME=PATH", help="serve a PEFT LoRA adapter folder as NAME (repeatable)")
    s.add_argument("--swarm", action="append", metavar="NAME=MANIFEST",
                   help="serve a running swarm's latest adapter as NAME; needs --initial-peers (repeatable)")
    s.add_argument("--initial-peers", nargs="*", default=None, metavar="ADDR", help="multiaddrs of any swarm nodes, for --swarm")
    s.add_argument("--poll-interval", type=float, default=2.0, metavar="S",
                   help="seconds between looks at a followed swarm's progress (default: 2)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000; 0 = any free port, printed at start)")
    s.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` on every request (default: $SWARMTUNE_API_KEY, else none)")
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="(default: info)")
    s.set_defaults(func=cmd_serve)

    g = sub.add_parser(
        "generate", help="generate from a prompt with a base (+ an adapter) in the terminal",
        description="A quick look at an adapter: load the base (from --base, or the one the adapter's "
                    "adapter_config.json names) and the adapter, apply the tokenizer's chat template to the prompt "
                    "(unless --raw or the tokenizer has none), and print the generated text as it comes.")
    _model_flags(g)
    g.add_argument("--adapter", default=None, metavar="PATH", help="a PEFT LoRA adapter folder (default: the base alone)")
    g.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most (default: 64)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--seed", type=int, default=None, help="seed for sampling (default: none)")
    g.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    g.add_argument("prompt", help="the user's message (or, with --raw, the whole prompt)")
    g.set_defaults(func=cmd_generate)
