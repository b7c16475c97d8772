"""The local contribution ledger, offline verification of anyone's ledgers, and credit.

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

Verification and credit, offline, from any number of sources (ledger files, DHT dumps):

    report = verify_logs({"a.log": blobs_a, "dht": blobs_dht}, swarm_id, max_samples_per_round=512)
    report.ok; report.records (a Verdict per record); report.peers (a PeerVerdict per peer)
    credit = compute_credit(report)          # per peer: verified rounds, samples, tokens, share

Rules: a record counts only if its signature, schema and swarm id hold, its chain from seq 0
is intact (every prev_hash matches, no seq missing, no two records with one seq), its round
is later than the previous record's, its samples are within the per-round cap, and it was not
signed by a key after that key's rotation. The same record seen twice is credited once.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from node.durable import STORAGE_ERRNOS, StorageError, fsync_dir, write_all

from protocol.peerid import peer_id_from_public_key
from protocol.record import (
    RECORD_VERSION,
    ZERO_HASH,
    ContributionRecord,
    KeyRotation,
    RecordError,
    public_bytes,
    record_hash,
    sign_record,
    verify_rotation,
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


# ---------------------------------------------------------------- verification


@dataclasses.dataclass
class Verdict:
    source: str  # ledger file name, "dht", ...
    index: int  # position in that source
    status: str  # "ok" (credited), "duplicate" (a copy of a record seen before: valid, credited once), "fail"
    reason: str = ""
    peer_id: str | None = None
    seq: int | None = None
    round: int | None = None
    record_hash: str | None = None
    record: ContributionRecord | None = None

    @property
    def ok(self) -> bool:
        return self.status != "fail"


@dataclasses.dataclass
class PeerVerdict:
    peer_id: str
    ok: bool = True
    reasons: list[str] = dataclasses.field(default_factory=list)
    head_seq: int = -1  # last seq of the intact chain from seq 0 (-1: none)
    rotated_to: str | None = None

    def fail(self, reason: str) -> None:
        self.ok = False
        if reason not in self.reasons:
            self.reasons.append(reason)


@dataclasses.dataclass
class Report:
    swarm_id: str
    max_samples_per_round: int
    records: list[Verdict]
    peers: dict[str, PeerVerdict]
    rotation_errors: list[str]
    max_tokens_per_sample: int | None = None  # tokens credited per credited sample at most (None: uncapped)

    @property
    def ok(self) -> bool:
        return (
            all(v.ok for v in self.records) and all(p.ok for p in self.peers.values()) and not self.rotation_errors
        )

    def credited(self) -> list[ContributionRecord]:
        return [v.record for v in self.records if v.status == "ok" and v.record is not None]


def verify_logs(
    blobs_by_source: Mapping[str, Sequence[bytes]],
    swarm_id: str,
    max_samples_per_round: int,
    published_heads: Mapping[str, int] | None = None,
    rotations: Iterable[bytes] = (),
    max_tokens_per_sample: int | None = None,
) -> Report:
    """Verify records from several sources; a Verdict per record and a PeerVerdict per peer.

    Within one source a peer's records must appear in increasing seq order (a ledger file is
    in chain order; `collect_records` sorts DHT values). `published_heads` maps peer id to the
    highest seq the peer is known to have published: a chain ending below it is a truncated log.
    `rotations` are signed KeyRotation statements. `max_tokens_per_sample` (the manifest's
    `[data] max_length`: no sample is trained on more tokens) caps the tokens credited per record.
    """
    verdicts: list[Verdict] = []
    peers: dict[str, PeerVerdict] = {}
    rotation_errors: list[str] = []
    rotated: dict[str, KeyRotation] = {}
    for blob in rotations:
        try:
            rotation = verify_rotation(blob)
        except RecordError as e:
            rotation_errors.append(f"rotation statement rejected: {e}")
            continue
        if rotation.swarm_id == swarm_id:
            rotated[rotation.old_peer_id] = rotation

    first_seen: dict[str, Verdict] = {}
    chains: dict[str, dict[int, list[Verdict]]] = defaultdict(lambda: defaultdict(list))
    for source, blobs in blobs_by_source.items():
        last_in_source: dict[str, Verdict] = {}
        for index, blob in enumerate(blobs):
            v = Verdict(source, index, "fail")
            verdicts.append(v)
            try:
                record = verify_signed(blob)
            except RecordError as e:
                v.reason = str(e)
                continue
            v.peer_id, v.seq, v.round, v.record = record.peer_id, record.seq, record.round, record
            v.record_hash = record_hash(blob)
            peer = peers.setdefault(record.peer_id, PeerVerdict(record.peer_id))
            if record.swarm_id != swarm_id:
                v.reason = f"wrong swarm id: record is for {record.swarm_id}, expected {swarm_id}"
                peer.fail("records for another swarm")
                continue
            rotation = rotated.get(record.peer_id)
            if rotation is not None:
                peer.rotated_to = rotation.new_peer_id
                if record.seq >= rotation.old_next_seq:
                    v.reason = (
                        f"signed by a rotated-out key: {record.peer_id} was replaced by {rotation.new_peer_id} "
                        f"from seq {rotation.old_next_seq}"
                    )
                    peer.fail("records signed after key rotation")
                    continue
            previous = last_in_source.get(record.peer_id)
            if previous is not None and record.seq <= previous.seq:
                earlier = first_seen.get(v.record_hash)
                if previous.record_hash == v.record_hash or (earlier is not None and earlier.source == source):
                    v.reason = f"replay: the same record (seq {record.seq}) appears twice in {source}"
                else:
                    v.reason = f"log out of order: seq {record.seq} after seq {previous.seq} in {source} (reordered)"
                peer.fail(f"{source} is not in chain order")
                continue
            last_in_source[record.peer_id] = v
            if v.record_hash in first_seen:
                first = first_seen[v.record_hash]
                v.status, v.reason = "duplicate", f"copy of {first.source}#{first.index}, credited once"
                continue
            first_seen[v.record_hash] = v
            chains[record.peer_id][record.seq].append(v)

    for peer_id, by_seq in chains.items():
        _check_chain(peers[peer_id], by_seq, max_samples_per_round, rotated.get(peer_id))

    for peer_id, head in (published_heads or {}).items():
        peer = peers.setdefault(peer_id, PeerVerdict(peer_id))
        if peer.head_seq < head:
            peer.fail(f"log ends at seq {peer.head_seq} below the published head seq {head} (truncated tail)")
    return Report(swarm_id, max_samples_per_round, verdicts, peers, rotation_errors, max_tokens_per_sample)


def _check_chain(
    peer: PeerVerdict, by_seq: dict[int, list[Verdict]], cap: int, rotation: KeyRotation | None
) -> None:
    broken = ""
    expected_prev = ZERO_HASH
    last_round = -1
    for seq in range(max(by_seq) + 1):
        candidates = by_seq.get(seq, [])
        if broken:
            for v in candidates:
                v.reason = broken
            continue
        if not candidates:
            broken = f"chain broken: seq {seq} is missing (deleted entry)"
            peer.fail(broken)
            continue
        if len(candidates) > 1:
            for v in candidates:
                v.reason = f"equivocation: {len(candidates)} different records signed with seq {seq}"
            broken = f"chain broken at seq {seq} by equivocation"
            peer.fail(f"equivocation at seq {seq}")
            continue
        v = candidates[0]
        record = v.record
        assert record is not None
        if record.prev_hash != expected_prev:
            broken = f"chain broken: prev_hash of seq {seq} does not match the hash of seq {seq - 1}"
            v.reason = broken
            peer.fail(broken)
            continue
        if rotation is not None and seq == rotation.old_next_seq - 1 and v.record_hash != rotation.old_head_hash:
            broken = f"seq {seq} is not the head named by the key rotation"
            v.reason = broken
            peer.fail(broken)
            continue
        expected_prev = v.record_hash or ""
        peer.head_seq = seq
        if record.round <= last_round:
            v.reason = f"round {record.round} is not after round {last_round} of an earlier record (claimed twice)"
            peer.fail(v.reason)
        elif record.samples > cap:
            v.reason = f"samples {record.samples} exceed the cap of {cap} per round"
            peer.fail(v.reason)
        else:
            v.status = "ok"
        last_round = max(last_round, record.round)


# ---------------------------------------------------------------- credit


@dataclasses.dataclass(frozen=True)
class Credit:
    peer_id: str
    rounds: int  # verified rounds
    samples: int  # verified samples, each round capped at max_samples_per_round
    tokens: int  # verified tokens, each record capped at its credited samples x max_tokens_per_sample
    share: float  # samples / all verified samples of the swarm


def compute_credit(report: Report) -> dict[str, Credit]:
    """Per peer credit from verified records only (status "ok"; copies counted once)."""
    rounds: dict[str, int] = defaultdict(int)
    samples: dict[str, int] = defaultdict(int)
    tokens: dict[str, int] = defaultdict(int)
    for record in report.credited():
        rounds[record.peer_id] += 1
        credited = min(record.samples, report.max_samples_per_round)
        samples[record.peer_id] += credited
        cap = credited * report.max_tokens_per_sample if report.max_tokens_per_sample else record.tokens
        tokens[record.peer_id] += min(record.tokens, cap)
    total = sum(samples.values())
    return {
        peer: Credit(peer, rounds[peer], samples[peer], tokens[peer], samples[peer] / total if total else 0.0)
        for peer in sorted(rounds)
    }
