"""The node's identity: one Ed25519 key that signs contribution records and is its libp2p id.

The key file is an unencrypted PKCS#8 PEM ("-----BEGIN PRIVATE KEY-----"), mode 0600, by
default at `~/.swarmtune/identity.key` ($SWARMTUNE_HOME/identity.key when that is set).
`write_libp2p_identity` writes the same key in libp2p's marshalled form for the p2p daemon
(hivemind `DHT(identity_path=...)`), so the peer id other nodes see in the DHT *is* the key
that verifies this node's records.

Backup and restore:
    The key file is the node's whole identity: every record it signed names its peer id,
    and credit follows the peer id. Back it up once, right after `swarmtune keygen`, to
    somewhere offline (a password manager, an encrypted USB stick):
        cp ~/.swarmtune/identity.key /safe/place/swarmtune-identity.key
    Restore it on a new machine before the first `swarmtune run`:
        mkdir -p ~/.swarmtune && cp /safe/place/swarmtune-identity.key ~/.swarmtune/identity.key
        chmod 600 ~/.swarmtune/identity.key && swarmtune keygen --show
    and check the printed peer id is the old one. Never run two nodes with one key at once
    (the swarm sees one peer flapping and the two ledgers equivocate). If the key may have
    leaked, rotate it (`rotate_identity`, `swarmtune keygen --rotate`): the statement signed by both
    keys makes every record the old key signs after the cut invalid, and a node started with the
    new key continues the swarm with a new ledger (node/rotation.py). A lost key cannot be recovered; start a
    new identity (credit earned under the old peer id stays attributed to it).

Usage:
    identity = generate_identity(path)      # refuses to overwrite
    identity = load_identity(path)          # IdentityError naming the path and the fix
    identity.peer_id, identity.private_key    # records are signed by protocol.record, nowhere else
    identity = new_identity()               # in memory only; save_identity(identity, path) writes it
    lock = lock_identity(identity, home)    # IdentityError when another node on this machine runs this key
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import stat
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from node.config import default_home
from node.durable import fsync_dir
from protocol.peerid import marshal_private_key, peer_id_from_public_key
from protocol.record import RECORD_VERSION, ZERO_HASH, KeyRotation, sign_rotation

IDENTITY_FILENAME = "identity.key"


class IdentityError(Exception):
    """The identity key cannot be created or used; the message names the file and the fix."""


def default_identity_path() -> Path:
    return default_home() / IDENTITY_FILENAME


@dataclasses.dataclass(frozen=True)
class Identity:
    private_key: Ed25519PrivateKey
    path: Path | None = None

    @property
    def public_bytes(self) -> bytes:
        return self.private_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_bytes)



def _write_private(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600, atomically, refusing to replace an existing file.

    A temporary file is written and fsynced, then hard-linked into place: link() fails if the
    target exists, so a crash leaves either no key or the whole key, never half of one.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # in case the umask was odd
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise IdentityError(
                f"{path} already exists; refusing to overwrite a key (that would change this node's identity). "
                f"Use a different --key path, or move the old key away first if you really mean it."
            ) from None
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def new_identity() -> Identity:
    """A fresh Ed25519 key in memory (nothing written: `save_identity` does that once it is wanted)."""
    return Identity(Ed25519PrivateKey.generate())


def generate_identity(path: str | os.PathLike) -> Identity:
    """Create a new Ed25519 key at `path` (mode 0600). Never overwrites an existing file."""
    return save_identity(new_identity(), path)


def save_identity(identity: Identity, path: str | os.PathLike) -> Identity:
    """Write a key made in memory (`new_identity()`) to `path`, mode 0600, never overwriting."""
    path = Path(path).expanduser()
    if path.exists():
        raise IdentityError(
            f"{path} already exists; refusing to overwrite it (that would change this node's identity). "
            f"`swarmtune keygen --show --key {path}` prints its peer id; pass --key for a new key elsewhere."
        )
    pem = identity.private_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    _write_private(path, pem)
    return Identity(identity.private_key, path)


def load_identity(path: str | os.PathLike) -> Identity:
    """Load the key at `path`; any problem is an IdentityError, never a silently new key."""
    path = Path(path).expanduser()
    try:
        st = path.stat()
    except FileNotFoundError:
        raise IdentityError(
            f"no identity key at {path}. Create one with `swarmtune keygen --key {path}`, "
            f"or restore your backup to that path (chmod 600)."
        ) from None
    except OSError as e:
        raise IdentityError(f"cannot read identity key {path}: {e.strerror}. Check the path and its permissions.") from None
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"identity key {path} is not a regular file")
    if st.st_mode & 0o077:
        raise IdentityError(
            f"identity key {path} has permissions {stat.S_IMODE(st.st_mode):04o}: other users could read it. "
            f"Fix with `chmod 600 {path}`."
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise IdentityError(f"cannot read identity key {path}: {e.strerror}. Check its owner and permissions.") from None
    try:
        key = load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise IdentityError(
            f"identity key {path} is corrupt or not an unencrypted PKCS#8 PEM key ({e}). "
            f"Restore it from your backup; do not generate a new one unless you accept a new peer id."
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(f"identity key {path} is a {type(key).__name__}, not an Ed25519 key")
    return Identity(key, path)


def libp2p_private_key_bytes(identity: Identity) -> bytes:
    seed = identity.private_key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return marshal_private_key(seed, identity.public_bytes)


def write_libp2p_identity(identity: Identity, path: str | os.PathLike) -> Path:
    """Write the key as the libp2p daemon's identity file (protobuf PrivateKey, mode 0600).

    Pass the path to `hivemind.DHT(identity_path=..., check_if_identity_free=False)`:
    hivemind's "is this identity taken" probe only parses RSA identities. An existing file
    with the same content is kept; one with other content is an error (it would be another id).
    """
    path = Path(path)
    data = libp2p_private_key_bytes(identity)
    if path.exists():
        if path.read_bytes() == data:
            return path
        raise IdentityError(f"{path} holds a different libp2p identity; remove it to rewrite it from {identity.path}")
    _write_private(path, data)
    return path


def rotate_identity(
    old: Identity, new_path: str | os.PathLike, *, swarm_id: str, old_next_seq: int, old_head_hash: str, time_ms: int
) -> tuple[Identity, bytes]:
    """Create a new key at `new_path` and a rotation statement signed by both keys.

    `old_next_seq`/`old_head_hash` are the old key's ledger head in that swarm (next seq to be
    written, hash of the last record): verifiers reject any record of the old key at or beyond
    that seq. The new key starts its own chain at seq 0.
    """
    if old_next_seq == 0:
        old_head_hash = ZERO_HASH
    new = generate_identity(new_path)
    rotation = KeyRotation(
        version=RECORD_VERSION,
        swarm_id=swarm_id,
        old_peer_id=old.peer_id,
        new_peer_id=new.peer_id,
        old_next_seq=old_next_seq,
        old_head_hash=old_head_hash,
        time_ms=time_ms,
    )
    return new, sign_rotation(rotation, old.private_key, new.private_key)


# ---------------------------------------------------------------- one key, one running node

_SECOND_NODE = ("Two nodes with one key sign conflicting records under one peer id (the swarm sees one peer "
                "flapping between addresses, and the ledgers equivocate). To run a second node, give it its own "
                "home and key: `swarmtune run --home ~/.swarmtune-2 --create-key ...` (or `swarmtune keygen --key "
                "FILE` and --key FILE)")


class KeyLock:
    """An exclusive flock held while a node runs with a key; released by `release()` or the process's exit."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            self.path.unlink(missing_ok=True)  # while still held: a waiter that opened it sees it unlinked and retries
            os.close(self.fd)
            self.fd = -1


def key_lock_path(peer_id: str) -> Path:
    """Machine-wide, keyed by the peer id rather than the key file's path: a copy of the key in a second
    home is the same identity and is refused too."""
    return Path(tempfile.gettempdir()) / f"swarmtune-key-{peer_id}.lock"


def lock_identity(identity: Identity, home: str | os.PathLike) -> KeyLock:
    """Take this machine's lock on the identity; IdentityError when another running node holds it."""
    path = key_lock_path(identity.peer_id)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise IdentityError(f"cannot create the key lock {path}: {e.strerror}; check that {path.parent} is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:
                holder = {}
            os.close(fd)
            who = f" (pid {holder.get('pid', '?')}, home {holder.get('home', '?')})" if holder else ""
            key = f"the identity key {identity.path}" if identity.path else "this identity key"
            raise IdentityError(f"{key} (peer id {identity.peer_id}) is already in use by another swarmtune node on this "
                                f"machine{who}. {_SECOND_NODE}") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder released (and unlinked) it between our open and flock: take the new file
    info = json.dumps({"pid": os.getpid(), "home": str(home), "key": str(identity.path or "")}).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, info, 0)
    return KeyLock(fd, path)


def second_node_message(peer_id: str, maddrs) -> str:
    """What a node is told when the swarm shows its peer id live at other addresses (another machine)."""
    return (f"peer id {peer_id} is already running in this swarm from {', '.join(maddrs) or 'another address'} "
            f"(its heartbeat is fresh): another machine runs a node with this identity key. {_SECOND_NODE}")
