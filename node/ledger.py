"""The local contribution ledger: this node's hash-chained signed records in one swarm, on disk.

Storage: JSON lines, one signed record envelope per line (protocol/record.py:
`{"signer":..,"sig":..,"body":{..}}`), appended and fsynced. Why JSON lines and not SQLite:
each line *is* the exact byte string that was signed and published in the DHT, so a ledger
can be verified with nothing but protocol/, shipped as-is to a verifier, diffed, grepped and
read with jq; appending one line and fsyncing is the whole crash-safety story (only the last
line can be torn, and a torn line is dropped on open and never credited); SQLite would add a
second encoding of each record, journal files and a binary format for no gain in an
append-only log that is read front to back. One ledger holds one key's chain in one swarm
(after a key rotation the new key starts a new ledger at seq 0).

    ledger = Ledger.open(path)               # recovers a torn last line (ledger.torn), locks the file
    blob = ledger.append_new(identity.private_key, swarm_id=..., round=..., ...)
    ledger.head(); ledger.records(); ledger.close()

Any ledger file (this node's, a retired key's, a peer's) is read unchanged with `read_log(path).blobs`;
verifying such logs offline and computing credit from them is node/credit.py.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.durable import STORAGE_ERRNOS, StorageError, fsync_dir, write_all

from protocol.peerid import peer_id_from_public_key
from protocol.record import (
    RECORD_VERSION,
    ZERO_HASH,
    ContributionRecord,
    RecordError,
    public_bytes,
    record_hash,
    sign_record,
    verify_signed,
)

logger = logging.getLogger(__name__)



class LedgerError(Exception):
    """The ledger cannot be opened or appended to; the message names the file and the fix."""


@dataclasses.dataclass(frozen=True)
class TornEntry:
    """A last line that was cut short by a crash: dropped from the ledger, never credited."""

    offset: int  # byte offset where it started (the file is truncated to this length)
    data: bytes
    reason: str


@dataclasses.dataclass(frozen=True)
class LogContents:
    blobs: list[bytes]
    torn: TornEntry | None


def read_log(path: str | os.PathLike) -> LogContents:
    """Read a ledger file without changing it. A final line without a newline is reported as torn."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LedgerError(f"cannot read ledger {path}: {e.strerror}") from None
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    torn = None
    if tail:
        torn = TornEntry(len(data) - len(tail), tail, "last line has no newline (write cut short by a crash)")
    return LogContents(lines, torn)


class Ledger:
    """An append-only, hash-chained ledger of this node's signed records in one swarm."""

    def __init__(self, path: Path, fd: int, entries: list[tuple[bytes, ContributionRecord]], torn: TornEntry | None):
        self.path = path
        self._fd = fd
        self._entries = entries
        self.torn = torn  # what recovery dropped when opening, if anything

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Ledger":
        """Open (creating if needed) and lock the ledger; verify every line; recover a torn tail."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        created = not path.exists()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as e:
            raise LedgerError(f"cannot open ledger {path}: {e.strerror}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LedgerError(f"ledger {path} is in use by another process (is a swarmtune node running?)") from None
            if created:
                fsync_dir(path.parent)
            contents = read_log(path)
            entries: list[tuple[bytes, ContributionRecord]] = []
            torn = contents.torn
            offset = 0
            for i, blob in enumerate(contents.blobs):
                try:
                    record = _check_next(entries, blob)
                except (RecordError, LedgerError) as e:
                    if isinstance(e, RecordError) and i == len(contents.blobs) - 1 and torn is None:
                        # A complete-looking last line that is not a valid record: a crash left junk.
                        # (A valid record that does not extend the chain is not junk: that is an error.)
                        torn = TornEntry(offset, blob, f"last line is invalid ({e})")
                        break
                    raise LedgerError(
                        f"{path}, line {i + 1}: {e}. The ledger is corrupt; restore it from a backup "
                        f"or move it away (its records stay verifiable from the DHT)."
                    ) from None
                entries.append((blob, record))
                offset += len(blob) + 1
            if torn is not None:
                # keep the dropped bytes next to the ledger: recovery never destroys data silently
                path.with_name(f"{path.name}.torn-{torn.offset}").write_bytes(torn.data)
                os.ftruncate(fd, torn.offset)
                os.fsync(fd)
                logger.warning(
                    f"ledger {path}: dropped a torn last entry of {len(torn.data)} bytes at offset {torn.offset} "
                    f"({torn.reason}); it is not credited (bytes kept in {path.name}.torn-{torn.offset})"
                )
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, entries, torn)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the flock
            self._fd = -1

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def head(self) -> ContributionRecord | None:
        return self._entries[-1][1] if self._entries else None

    def head_hash(self) -> str:
        return record_hash(self._entries[-1][0]) if self._entries else ZERO_HASH

    @property
    def next_seq(self) -> int:
        return len(self._entries)

    def records(self) -> list[ContributionRecord]:
        return [r for _, r in self._entries]

    def blobs(self) -> list[bytes]:
        return [b for b, _ in self._entries]

    def append(self, blob: bytes) -> ContributionRecord:
        """Verify that `blob` extends the chain, then write it durably (write + fsync)."""
        if self._fd < 0:
            raise LedgerError(f"ledger {self.path} is closed")
        record = _check_next(self._entries, blob)
        line = bytes(blob) + b"\n"
        size = os.fstat(self._fd).st_size
        try:
            written = os.write(self._fd, line)
            if written != len(line):  # a short write: the disk filled up (the retry says why)
                write_all(self._fd, line[written:])
            os.fsync(self._fd)
        except OSError as e:  # cut off what was written: the ledger ends at its last whole record
            os.ftruncate(self._fd, size)
            if e.errno in STORAGE_ERRNOS:
                raise StorageError(self.path, e) from None
            raise LedgerError(f"cannot append to {self.path}: {e.strerror or e}") from None
        self._entries.append((bytes(blob), record))
        return record

    def append_new(self, private_key: Ed25519PrivateKey, **fields) -> bytes:
        """Sign a record for the next seq (version, peer_id, seq, prev_hash filled in) and append it."""
        record = ContributionRecord(
            version=RECORD_VERSION,
            peer_id=peer_id_from_public_key(public_bytes(private_key)),
            seq=self.next_seq,
            prev_hash=self.head_hash(),
            **fields,
        )
        blob = sign_record(record, private_key)
        self.append(blob)
        return blob


def _check_next(entries: list[tuple[bytes, ContributionRecord]], blob: bytes) -> ContributionRecord:
    record = verify_signed(blob)
    if not entries:
        if record.seq != 0:
            raise LedgerError(f"first record must have seq 0, got {record.seq}")
        return record
    head_blob, head = entries[-1]
    if record.peer_id != head.peer_id:
        raise LedgerError(f"record is signed by {record.peer_id}, this ledger belongs to {head.peer_id}")
    if record.swarm_id != head.swarm_id:
        raise LedgerError(f"record is for swarm {record.swarm_id}, this ledger is for {head.swarm_id}")
    if record.seq != head.seq + 1:
        raise LedgerError(f"seq {record.seq} does not follow the head seq {head.seq}")
    if record.prev_hash != record_hash(head_blob):
        raise LedgerError(f"prev_hash of seq {record.seq} is not the hash of the head record")
    if record.round <= head.round:
        raise LedgerError(f"round {record.round} is not after the head's round {head.round}")
    return record
