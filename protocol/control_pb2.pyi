from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_TRAINING: _ClassVar[NodeState]
    NODE_STATE_PAUSED: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
    NODE_STATE_SYNCING: _ClassVar[NodeState]
    NODE_STATE_STOPPED: _ClassVar[NodeState]
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_TRAINING: NodeState
NODE_STATE_PAUSED: NodeState
NODE_STATE_DRAINING: NodeState
NODE_STATE_SYNCING: NodeState
NODE_STATE_STOPPED: NodeState

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("round", "loss", "samples_per_s", "tokens_per_s", "peers", "state", "swarm_id", "peer_id", "shards", "adapter_hash", "rss_bytes", "peak_rss_bytes", "gpu_memory_bytes", "uptime_s", "last_round_s", "last_round_at", "listen_maddrs", "samples_total", "tokens_total", "version", "stalled", "stall_reason", "reachability", "reachability_fix")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_S_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    PEERS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_HASH_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    GPU_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_S_FIELD_NUMBER: _ClassVar[int]
    LAST_ROUND_AT_FIELD_NUMBER: _ClassVar[int]
    LISTEN_MADDRS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALLED_FIELD_NUMBER: _ClassVar[int]
    STALL_REASON_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIX_FIELD_NUMBER: _ClassVar[int]
    round: int
    loss: float
    samples_per_s: float
    tokens_per_s: float
    peers: int
    state: NodeState
    swarm_id: str
    peer_id: str
    shards: _containers.RepeatedScalarFieldContainer[int]
    adapter_hash: str
    rss_bytes: int
    peak_rss_bytes: int
    gpu_memory_bytes: int
    uptime_s: float
    last_round_s: float
    last_round_at: float
    listen_maddrs: _containers.RepeatedScalarFieldContainer[str]
    samples_total: int
    tokens_total: int
    version: str
    stalled: bool
    stall_reason: str
    reachability: str
    reachability_fix: str
    def __init__(self, round: _Optional[int] = ..., loss: _Optional[float] = ..., samples_per_s: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., peers: _Optional[int] = ..., state: _Optional[_Union[NodeState, str]] = ..., swarm_id: _Optional[str] = ..., peer_id: _Optional[str] = ..., shards: _Optional[_Iterable[int]] = ..., adapter_hash: _Optional[str] = ..., rss_bytes: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ..., gpu_memory_bytes: _Optional[int] = ..., uptime_s: _Optional[float] = ..., last_round_s: _Optional[float] = ..., last_round_at: _Optional[float] = ..., listen_maddrs: _Optional[_Iterable[str]] = ..., samples_total: _Optional[int] = ..., tokens_total: _Optional[int] = ..., version: _Optional[str] = ..., stalled: _Optional[bool] = ..., stall_reason: _Optional[str] = ..., reachability: _Optional[str] = ..., reachability_fix: _Optional[str] = ...) -> None: ...

class PeersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Peer(_message.Message):
    __slots__ = ("peer_id", "multiaddrs", "round", "shards", "last_seen_s", "reachability")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    MULTIADDRS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_S_FIELD_NUMBER: _ClassVar[int]
    REACHABILITY_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    multiaddrs: _containers.RepeatedScalarFieldContainer[str]
    round: int
    shards: _containers.RepeatedScalarFieldContainer[int]
    last_seen_s: float
    reachability: str
    def __init__(self, peer_id: _Optional[str] = ..., multiaddrs: _Optional[_Iterable[str]] = ..., round: _Optional[int] = ..., shards: _Optional[_Iterable[int]] = ..., last_seen_s: _Optional[float] = ..., reachability: _Optional[str] = ...) -> None: ...

class PeersReply(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[Peer]
    def __init__(self, peers: _Optional[_Iterable[_Union[Peer, _Mapping]]] = ...) -> None: ...

class ShardsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Shard(_message.Message):
    __slots__ = ("index", "layer_start", "layer_end", "trainers", "local")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LAYER_START_FIELD_NUMBER: _ClassVar[int]
    LAYER_END_FIELD_NUMBER: _ClassVar[int]
    TRAINERS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    index: int
    layer_start: int
    layer_end: int
    trainers: int
    local: bool
    def __init__(self, index: _Optional[int] = ..., layer_start: _Optional[int] = ..., layer_end: _Optional[int] = ..., trainers: _Optional[int] = ..., local: _Optional[bool] = ...) -> None: ...

class ShardsReply(_message.Message):
    __slots__ = ("shards",)
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedCompositeFieldContainer[Shard]
    def __init__(self, shards: _Optional[_Iterable[_Union[Shard, _Mapping]]] = ...) -> None: ...

class RecordsRequest(_message.Message):
    __slots__ = ("from_seq", "follow")
    FROM_SEQ_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    from_seq: int
    follow: bool
    def __init__(self, from_seq: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class Record(_message.Message):
    __slots__ = ("seq", "blob", "record_hash", "peer_id", "swarm_id", "round", "shards", "samples", "tokens", "loss_before", "loss_after", "prev_hash", "adapter_hash", "start_ms", "end_ms")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    BLOB_FIELD_NUMBER: _ClassVar[int]
    RECORD_HASH_FIELD_NUMBER: _ClassVar[int]
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    SWARM_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_BEFORE_FIELD_NUMBER: _ClassVar[int]
    LOSS_AFTER_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_HASH_FIELD_NUMBER: _ClassVar[int]
    START_MS_FIELD_NUMBER: _ClassVar[int]
    END_MS_FIELD_NUMBER: _ClassVar[int]
    seq: int
    blob: bytes
    record_hash: str
    peer_id: str
    swarm_id: str
    round: int
    shards: _containers.RepeatedScalarFieldContainer[int]
    samples: int
    tokens: int
    loss_before: int
    loss_after: int
    prev_hash: str
    adapter_hash: str
    start_ms: int
    end_ms: int
    def __init__(self, seq: _Optional[int] = ..., blob: _Optional[bytes] = ..., record_hash: _Optional[str] = ..., peer_id: _Optional[str] = ..., swarm_id: _Optional[str] = ..., round: _Optional[int] = ..., shards: _Optional[_Iterable[int]] = ..., samples: _Optional[int] = ..., tokens: _Optional[int] = ..., loss_before: _Optional[int] = ..., loss_after: _Optional[int] = ..., prev_hash: _Optional[str] = ..., adapter_hash: _Optional[str] = ..., start_ms: _Optional[int] = ..., end_ms: _Optional[int] = ...) -> None: ...

class CreditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PeerCredit(_message.Message):
    __slots__ = ("peer_id", "verified_rounds", "samples", "tokens", "share", "claimed_rounds", "receipted_rounds", "spot_checks_passed", "spot_checks_failed")
    PEER_ID_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    CLAIMED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    RECEIPTED_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    SPOT_CHECKS_PASSED_FIELD_NUMBER: _ClassVar[int]
    SPOT_CHECKS_FAILED_FIELD_NUMBER: _ClassVar[int]
    peer_id: str
    verified_rounds: int
    samples: int
    tokens: int
    share: float
    claimed_rounds: int
    receipted_rounds: int
    spot_checks_passed: int
    spot_checks_failed: int
    def __init__(self, peer_id: _Optional[str] = ..., verified_rounds: _Optional[int] = ..., samples: _Optional[int] = ..., tokens: _Optional[int] = ..., share: _Optional[float] = ..., claimed_rounds: _Optional[int] = ..., receipted_rounds: _Optional[int] = ..., spot_checks_passed: _Optional[int] = ..., spot_checks_failed: _Optional[int] = ...) -> None: ...

class CreditReply(_message.Message):
    __slots__ = ("peers",)
    PEERS_FIELD_NUMBER: _ClassVar[int]
    peers: _containers.RepeatedCompositeFieldContainer[PeerCredit]
    def __init__(self, peers: _Optional[_Iterable[_Union[PeerCredit, _Mapping]]] = ...) -> None: ...

class PauseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ResumeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CommandReply(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: NodeState
    def __init__(self, state: _Optional[_Union[NodeState, str]] = ...) -> None: ...
