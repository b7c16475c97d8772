"""`swarmtune doctor`: everything that can stop a node from joining, checked before it joins.

Each check is a small function returning a `Check(name, status, detail, fix)`; `status` is
one of pass / warn / fail / skip, and every fail (and warn) carries a concrete fix.

    p2p daemon starts          start_dht(host_maddrs) and shut it down; on failure the
                               daemon's own error text (SwarmError: cause + fix)
    address reachable          a throwaway second DHT bootstraps from our announced
                               multiaddrs; round-trip time of a DHT ping
    reachability               (with --initial-peers) our p2pd on --host-maddrs joins through them and asks
                               one to dial our announced addresses back: public / relayed /
                               outbound-only (node/swarm/reach.py), with the fix (forward port N,
                               or nothing to do)
    initial peers reachable    (with --initial-peers) a DHT with those initial peers starts;
                               round-trip time to each, the ones that did not answer, and
                               bandwidth from the first one when it serves the probe
                               (`serve_bandwidth_probe(dht)`)
    bandwidth                  a bounded stream (<= 32 MiB or ~3 s) from our p2pd to the
                               throwaway peer over hivemind's p2p stream handlers; MB/s,
                               warn below a threshold
    hardware                   GPU (name, total/free VRAM) or CPU only, RAM, disk free in home
    identity key               load_identity: peer id, or the reason and `swarmtune keygen`
    base model                 (with --manifest) present and matching the manifest fingerprint
    data                       (with --manifest) present and matching the manifest digest

Every DHT started here is shut down before the function that started it returns.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from node.swarm.dht import SwarmError, peer_id_of, ping_rtts
from node.swarm.probe import measure_bandwidth, serve_bandwidth_probe

logger = logging.getLogger(__name__)

PASS, WARN, FAIL, SKIP = "pass", "warn", "fail", "skip"

BW_CHUNK = 256 * 1024
BW_MAX_BYTES = 32 * 1024 * 1024
BW_TIME_LIMIT = 3.0
BW_WARN_MBPS = 1.0  # MB/s; ~8 Mbit/s, a slow home uplink
MIN_DISK_BYTES = 2 * 1024**3
DHT_STARTUP_TIMEOUT = 20.0


@dataclass
class Check:
    name: str
    status: str  # pass | warn | fail | skip
    detail: str
    fix: str = ""

    @property
    def failed(self) -> bool:
        return self.status == FAIL

    def to_dict(self) -> dict:
        return asdict(self)


def _start_dht(**kwargs):
    from node.swarm.dht import start_dht

    return start_dht(startup_timeout=DHT_STARTUP_TIMEOUT, **kwargs)


def _gib(n: float) -> str:
    return f"{n / 1024**3:.1f} GiB"


# --------------------------------------------------------------------------- network


def check_p2p_daemon(host_maddrs: Sequence[str], announce_maddrs: Sequence[str] = ()):
    """Start our p2p daemon + DHT. Returns (Check, dht or None); the caller shuts the dht down."""

    name = "p2p daemon starts"
    t0 = time.perf_counter()
    try:
        dht = _start_dht(host_maddrs=host_maddrs, announce_maddrs=announce_maddrs)
    except SwarmError as e:
        text = str(e)
        cause, _, fix = text.partition(". Fix: ")
        return Check(name, FAIL, cause, fix or "see the error above"), None
    except Exception as e:  # anything hivemind did not wrap: still a readable line, never a traceback
        return Check(name, FAIL, f"{type(e).__name__}: {e}", "run with a plain --host-maddrs /ip4/0.0.0.0/tcp/0 to compare"), None
    try:
        maddrs = [str(a) for a in dht.get_visible_maddrs()]
    except Exception as e:
        dht.shutdown()
        return Check(name, FAIL, f"started, but reports no addresses ({type(e).__name__}: {e})",
                     "check --host-maddrs / --announce-maddrs"), None
    detail = f"started in {time.perf_counter() - t0:.1f} s; listening on " + ", ".join(maddrs)
    return Check(name, PASS, detail), dht


def check_reachable(dht, announce_maddrs: Sequence[str] = ()):
    """A throwaway second DHT bootstraps from `dht`'s announced addresses. Returns (Check, peer dht or None)."""

    name = "address reachable from a peer"
    maddrs = [str(a) for a in dht.get_visible_maddrs()]
    if announce_maddrs:  # dial exactly what we tell the swarm to dial
        announced = [m for m in maddrs if any(m.startswith(a.rstrip("/")) for a in announce_maddrs)]
        maddrs = announced or maddrs
    try:
        peer = _start_dht(initial_peers=maddrs, host_maddrs=("/ip4/127.0.0.1/tcp/0",))
    except SwarmError as e:
        cause, _, fix = str(e).partition(". Fix: ")
        return Check(name, FAIL, f"a second peer could not bootstrap from {maddrs}: {cause}",
                     "announce an address peers can dial (--announce-maddrs /ip4/<public ip>/tcp/<port>, "
                     "with that port forwarded to this machine) and allow it in the firewall"), None
    try:
        rtt = ping_rtts(peer, [str(dht.peer_id)]).get(str(dht.peer_id))
    except Exception as e:
        rtt = None
        err = f"{type(e).__name__}: {e}"
    else:
        err = "no answer to the DHT ping"
    if rtt is None:
        return Check(name, FAIL, f"a second peer bootstrapped from {maddrs} but then could not ping us ({err})",
                     "check the firewall for the port in --host-maddrs"), peer
    detail = f"a second peer connected via {', '.join(maddrs)}; round trip {rtt * 1000:.1f} ms"
    if all(_is_local(m) for m in maddrs):
        detail += " (only local addresses: peers on other machines need --announce-maddrs or a LAN/public --host-maddrs)"
    return Check(name, PASS, detail), peer


def _is_local(maddr: str) -> bool:
    return maddr.startswith(("/ip4/127.", "/ip6/::1/"))


REACHABILITY = "reachability"


def check_reachability(host_maddrs: Sequence[str], announce_maddrs: Sequence[str], initial_peers: Sequence[str]):
    """Join through the initial peers on the node's own addresses and ask them to dial us back, as `swarmtune run`
    does at start. Returns (Check, Reachability or None)."""
    from node.swarm.reach import OUTBOUND_ONLY, detect_reachability

    try:
        dht = _start_dht(initial_peers=initial_peers, host_maddrs=host_maddrs, announce_maddrs=announce_maddrs)
    except SwarmError as e:
        cause, _, fix = str(e).partition(". Fix: ")
        return Check(REACHABILITY, SKIP, f"not checked: could not join through the initial peers ({cause})"), None
    try:
        reach = detect_reachability(dht, [peer_id_of(p) for p in initial_peers if peer_id_of(p)], peer_maddrs=initial_peers)
    finally:
        dht.shutdown()
    detail = f"{reach.kind}: {reach.detail}"
    if reach.kind == OUTBOUND_ONLY:
        return Check(REACHABILITY, WARN, detail + " (it still trains: it sends its parts over connections it opens, "
                                                  "but holds no part of the all-reduce and serves no state)", reach.fix()), reach
    if not reach.checked:
        return Check(REACHABILITY, WARN, detail, "ask the swarm's organiser for a peer address that runs swarmtune"), reach
    return Check(REACHABILITY, PASS, f"{detail}; {reach.fix()}"), reach


def reachability_of(checks: Sequence[Check]) -> str | None:
    """public / relayed / outbound-only, as the reachability check found it (None: not checked)."""
    for c in checks:
        if c.name == REACHABILITY and c.status != SKIP:
            return c.detail.split(":", 1)[0]
    return None


def check_initial_peers(initial_peers: Sequence[str]) -> Check:
    """A DHT with `initial_peers` starts (at least one answered); round trip to each."""

    name = "initial peers reachable"
    bad = [p for p in initial_peers if not peer_id_of(p)]
    if bad:
        return Check(name, FAIL, f"{bad} do not end in /p2p/<peer id>",
                     "copy the full address from the first node's log, e.g. /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW...")
    try:
        dht = _start_dht(initial_peers=initial_peers, host_maddrs=("/ip4/0.0.0.0/tcp/0",))
    except SwarmError as e:
        cause, _, fix = str(e).partition(". Fix: ")
        return Check(name, FAIL, cause, fix)
    bandwidth = ""
    try:
        ids = [peer_id_of(p) for p in initial_peers]
        rtts = ping_rtts(dht, ids)
        answering = [pid for pid in ids if rtts.get(pid) is not None]
        if answering:
            got, seconds, error = measure_bandwidth(dht, answering[0], total=BW_MAX_BYTES, chunk=BW_CHUNK,
                                                    time_limit=BW_TIME_LIMIT)
            if error is None and got:
                bandwidth = f"; bandwidth from {answering[0][:16]}…: {got / 1e6 / max(seconds, 1e-9):.1f} MB/s"
            elif error and "not supported" in error:
                bandwidth = "; bandwidth to it not measured (it serves no doctor bandwidth probe)"
            else:
                bandwidth = f"; bandwidth to it not measured ({error or 'no data came back'})"
    except Exception as e:
        return Check(name, WARN, f"joined through the initial peers, but pinging them failed: {type(e).__name__}: {e}",
                     "run `swarmtune doctor` again; if it persists, check the peers' logs")
    finally:
        dht.shutdown()
    parts = [f"{p}: {'no answer' if rtts.get(pid) is None else f'{rtts[pid] * 1000:.1f} ms'}"
             for p, pid in zip(initial_peers, ids)]
    silent = [p for p, pid in zip(initial_peers, ids) if rtts.get(pid) is None]
    if silent:
        return Check(name, WARN, "; ".join(parts) + bandwidth,
                     f"{len(silent)} of {len(initial_peers)} initial peers did not answer; drop or update them: {silent}")
    return Check(name, PASS, "round trip " + "; ".join(parts) + bandwidth)


def check_bandwidth(server, client, *, total: int = BW_MAX_BYTES, time_limit: float = BW_TIME_LIMIT,
                    warn_below_mbps: float = BW_WARN_MBPS) -> Check:
    """Stream up to `total` bytes (or `time_limit` s) from `server`'s p2pd to `client`'s; MB/s."""
    name = "bandwidth to a peer"
    try:
        serve_bandwidth_probe(server)
        got, seconds, error = measure_bandwidth(client, str(server.peer_id), total=total, chunk=BW_CHUNK, time_limit=time_limit)
        if error:
            raise RuntimeError(error)
    except Exception as e:
        return Check(name, FAIL, f"a bounded transfer to the peer failed: {type(e).__name__}: {e}",
                     "check that nothing (VPN, firewall, proxy) drops long-lived TCP streams on the p2p port")
    mbps = got / 1e6 / max(seconds, 1e-9)
    detail = f"{mbps:.1f} MB/s ({got / 1e6:.1f} MB in {seconds:.2f} s)"
    local = all(_is_local(str(a)) for a in server.get_visible_maddrs())
    if local:
        detail += "; measured over this machine's own network stack, an upper bound for real peers"
    if mbps < warn_below_mbps:
        return Check(name, WARN, detail + f", below {warn_below_mbps:g} MB/s",
                     "rounds will spend most of their time averaging; use a wired connection, "
                     "or train fewer shards (--shards) so less is exchanged")
    return Check(name, PASS, detail)


def network_checks(host_maddrs: Sequence[str], announce_maddrs: Sequence[str] = (),
                   initial_peers: Sequence[str] = (), *, bandwidth: bool = True) -> list[Check]:
    """p2p daemon, reachability, initial peers, bandwidth; every DHT is shut down before returning."""
    checks: list[Check] = []
    first, dht = check_p2p_daemon(host_maddrs, announce_maddrs)
    checks.append(first)
    peer = None
    try:
        if dht is None:
            why = "skipped: the p2p daemon did not start"
            checks.append(Check("address reachable from a peer", SKIP, why))
            if bandwidth:
                checks.append(Check("bandwidth to a peer", SKIP, why))
        else:
            reach, peer = check_reachable(dht, announce_maddrs)
            checks.append(reach)
            if bandwidth:
                if peer is None or reach.failed:
                    checks.append(Check("bandwidth to a peer", SKIP, "skipped: no peer connected"))
                else:
                    checks.append(check_bandwidth(dht, peer))
    finally:
        for d in (peer, dht):
            if d is not None:
                d.shutdown()
    if initial_peers:
        checks.append(check_reachability(host_maddrs, announce_maddrs, initial_peers)[0])
        checks.append(check_initial_peers(initial_peers))
    else:
        checks.append(Check(REACHABILITY, SKIP, "not checked: pass --initial-peers (a node of the swarm) so that a peer "
                                                "can try to dial this machine back"))
    return checks


# --------------------------------------------------------------------------- hardware


def check_gpu() -> Check:
    name = "GPU"
    try:
        import torch

        if not torch.cuda.is_available():
            return Check(name, WARN, "CPU only: no CUDA GPU visible to torch",
                         "training works on CPU but slowly; on a GPU machine install a CUDA build of torch "
                         "(pip install torch==2.13.0 from PyPI) and check `nvidia-smi`")
        parts = []
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            parts.append(f"cuda:{i} {torch.cuda.get_device_name(i)}, {_gib(total)} VRAM ({_gib(free)} free)")
        return Check(name, PASS, "; ".join(parts))
    except Exception as e:
        return Check(name, WARN, f"could not query the GPU: {type(e).__name__}: {e}",
                     "check the NVIDIA driver (`nvidia-smi`) and that torch's CUDA version matches it")


def check_ram() -> Check:
    import psutil

    vm = psutil.virtual_memory()
    detail = f"{_gib(vm.total)} total, {_gib(vm.available)} available"
    if vm.available < 1024**3:
        return Check("RAM", WARN, detail, "close other programs; the base model is loaded into RAM before the GPU")
    return Check("RAM", PASS, detail)


def check_disk(home: Path, min_free: int = MIN_DISK_BYTES) -> Check:
    """Writable and roomy enough; `swarmtune run` repeats this with the manifest's own checkpoint size."""
    from node.durable import free_bytes, storage_problem

    name = "disk space"
    try:
        problem = storage_problem(home, min_free, "checkpoints and ledgers")
        free = free_bytes(home)
    except OSError as e:
        return Check(name, FAIL, f"cannot stat {home}: {e.strerror}", f"create {home} or set --home to a writable folder")
    if problem:
        detail, _, fix = problem.partition("; ")
        return Check(name, FAIL, detail, fix)
    return Check(name, PASS, f"{_gib(free)} free in {home}")


# --------------------------------------------------------------------------- identity, model, data


def check_identity(key_path: Path) -> Check:
    from node.identity import IdentityError, load_identity

    name = "identity key"
    try:
        identity = load_identity(key_path)
    except IdentityError as e:
        text = str(e)
        if "no identity key" in text:
            fix = f"swarmtune keygen --key {key_path}   (or restore your backup there and chmod 600)"
        elif "permissions" in text:
            fix = f"chmod 600 {key_path}"
        else:
            fix = f"restore the key from your backup, or `swarmtune keygen --key {key_path}` for a new identity"
        return Check(name, FAIL, text, fix)
    return Check(name, PASS, f"{key_path}: peer id {identity.peer_id}")


def _locate_base(spec: str, revision: str = "") -> Path:
    """resolve_base, except that a hub id is only looked up in the local cache (doctor downloads nothing)."""
    from node.manifest import looks_like_hub_id
    from node.model import BUILTIN_BASE, HUB_FILES, ModelError, resolve_base

    hub_like = spec != BUILTIN_BASE and not Path(spec).expanduser().exists() and looks_like_hub_id(spec)
    if not hub_like:
        return resolve_base(spec)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec, revision=revision or None, local_files_only=True, allow_patterns=list(HUB_FILES)))
    except Exception as e:  # huggingface_hub raises its own errors (offline, missing) and OSError
        logger.info("hub lookup of %s in the local cache failed: %r", spec, e)
        at = f" at revision {revision!r}" if revision else ""
        raise ModelError(f"base model '{spec}'{at} is not in the local Hugging Face cache") from None


def load_manifest_check(manifest_path: str):
    """(Check or None, manifest or None): a manifest that does not load is itself a failure."""
    from node.manifest import ManifestError, load_manifest

    try:
        return None, load_manifest(manifest_path)
    except ManifestError as e:
        return Check("manifest", FAIL, str(e), "pass the swarm's manifest with --manifest swarm.toml "
                     "(ask the swarm's organiser, or create one with `swarmtune swarm init`)"), None


def check_base_model(manifest, base_model: str = "") -> Check:
    from node.model import FingerprintMismatch, ModelError, check_fingerprint

    name = "base model"
    spec = base_model or manifest.resolve_path(manifest.base.model)
    revision = "" if base_model else manifest.base.revision
    try:
        model_dir = _locate_base(spec, revision)
    except ModelError as e:
        text = str(e)
        if "not in the local Hugging Face cache" in text:
            rev = f" --revision {revision}" if revision else ""
            fix = f"download it once: hf download {spec}{rev}   (or pass a local folder with --base-model PATH)"
        else:
            fix = "point --base-model at the folder holding the manifest's base model (config.json + *.safetensors)"
        detail = text if "not found" in text or "cache" in text else f"not usable: {text}"
        return Check(name, FAIL, detail, fix)
    try:
        fp = check_fingerprint(model_dir, manifest.base.fingerprint)
    except FingerprintMismatch as e:
        return Check(name, FAIL,
                     f"{model_dir} has fingerprint {e.actual}, the manifest expects {e.expected}: a different model or revision",
                     "use the exact base model the manifest names (--base-model PATH to the right folder), "
                     "or join a swarm whose manifest matches your model")
    except (ModelError, OSError, ValueError) as e:  # missing or unreadable weight files, a corrupt header
        return Check(name, FAIL, f"{model_dir}: cannot read its weights ({type(e).__name__}: {e})",
                     "re-download the model; the files are incomplete or corrupt")
    return Check(name, PASS, f"{model_dir}: fingerprint {fp[:16]}… matches the manifest")


def check_data(manifest, data: str = "") -> Check:
    from node.data import DataError, dataset_digest, resolve_data

    name = "data"
    spec = resolve_data(data or manifest.resolve_path(manifest.data.source))
    try:
        digest = dataset_digest(spec)
    except DataError as e:
        return Check(name, FAIL, str(e), "get the manifest's dataset and pass it with --data PATH")
    except Exception as e:  # hf: sources offline, permissions, ...
        return Check(name, FAIL, f"{spec}: cannot be read ({type(e).__name__}: {e})",
                     "get the manifest's dataset and pass it with --data PATH")
    want = manifest.data.digest
    if digest != want:
        return Check(name, FAIL, f"{spec} has digest {digest}, the manifest expects {want}",
                     "every peer must train on the same data; get the manifest's dataset (--data PATH)")
    return Check(name, PASS, f"{spec}: digest {digest[:16]}… matches the manifest")


# --------------------------------------------------------------------------- all together


def run_checks(cfg, *, network: bool = True) -> list[Check]:
    """Every check for a `NodeConfig`, in the order they are shown."""
    checks: list[Check] = []
    if network:
        checks += network_checks(cfg.host_maddrs, cfg.announce_maddrs, cfg.initial_peers)
    checks += [check_gpu(), check_ram(), check_disk(cfg.home_dir), check_identity(cfg.key_path)]
    if cfg.manifest:
        bad, manifest = load_manifest_check(cfg.manifest)
        if bad:
            checks.append(bad)
        else:
            checks += [check_base_model(manifest, cfg.base_model), check_data(manifest, cfg.data)]
    else:
        checks.append(Check("base model", SKIP, "no --manifest given: base model and data not checked",
                            "pass --manifest swarm.toml to check them"))
    return checks


def any_failed(checks: Sequence[Check]) -> bool:
    return any(c.failed for c in checks)
