"""Consensus rules over one peer view: pure functions, no network, no model.

Every decision a node takes from what other peers claim lives here, so that each can be
unit-tested with hand-made views (tests/test_quorum.py), including the adversarial ones:
a liar claiming a huge round, two groups after a split, a donor whose state disagrees with
the majority. A *view* is `{peer_id: PeerInfo}` as `node.swarm.membership` reads it from
the DHT; the rules that take `peers` expect `others(view, me)` (this node and syncing peers
left out), the ones that take `me` as well leave this node out themselves.

Claims are never trusted one by one: the swarm's round is a lower median, a state is
"the swarm's" when most peers at that round advertise its hash, and ties go to the later
round, then the larger hash, so every honest peer picks the same winner.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Iterable, Mapping, Protocol, Sequence


class Claim(Protocol):
    """What a peer's heartbeat says (node.swarm.membership.PeerInfo satisfies it)."""

    round: int
    shards: tuple[int, ...]
    syncing: bool
    shard_hashes: dict
    reach: str  # public | relayed | outbound-only


def others(view: Mapping[str, Claim], me: str) -> dict[str, Claim]:
    """The peers that train with us: everyone but this node, leaving out peers that are downloading
    state (a syncing peer is not a trainer this round and its hashes are not yet its own)."""
    return {p: i for p, i in view.items() if p != me and not i.syncing}


def swarm_round(peers: Mapping[str, Claim]) -> int:
    """The round most peers have reached: the lower median of their claims (-1 with none).

    A single peer claiming a round far ahead cannot move it while two honest peers are
    visible (hivemind's progress tracker takes the max, and one liar stalls everyone)."""
    rounds = sorted(i.round for i in peers.values())
    return rounds[(len(rounds) - 1) // 2] if rounds else -1


def round_members(peers: Mapping[str, Claim], me: str, round_: int) -> list[str]:
    """Who trains `round_` with this node, sorted (the order the batch split uses): peers at this
    round or just finishing the previous one (a heartbeat lags by up to a round), and this node."""
    active = [p for p, i in peers.items() if p != me and round_ - 1 <= i.round <= round_]
    return sorted({*active, me})


def expected_group_sizes(peers: Mapping[str, Claim], members: Sequence[str], me: str, trained: Iterable[int]) -> dict[int, int]:
    """How many trainers each of our shards should average with this round (this node included)."""
    return {k: 1 + sum(1 for p in members if p != me and p in peers and k in peers[p].shards) for k in trained}


def group_claim(gathered: Mapping[str, Mapping], shard: int) -> tuple[int, str]:
    """The (round, shard hash) most members of an all-reduce group started from, from the round
    metadata each member sent ({"r": round, "h": {shard: hash}}); ties go to the later round,
    then the larger hash. A member whose own claim differs holds another state and must resync."""
    votes = Counter((int(g["r"]), str(g["h"].get(str(shard)))) for g in gathered.values())
    return max(votes, key=lambda c: (votes[c], c[0], c[1]))


def donor_order(peers: Mapping[str, Claim], me: str, shard: int, *, skip: Iterable[str] = (),
                rng: random.Random | None = None) -> list[str]:
    """Who to ask for `shard`'s state, best first.

    Peers holding the state most peers agree on (the largest group of equal (round, hash)
    claims, later rounds first among equals) come first, then the rest; shuffled within each
    group so that newcomers arriving together spread over donors. `skip`: peers whose state
    failed a check recently; outbound-only peers serve no state and are never asked. A donor that
    declares itself best gains nothing: only the claims of the others rank it."""
    skip = set(skip)
    holders = {p: i for p, i in peers.items() if p != me and not i.syncing and shard in i.shards and p not in skip
               and i.reach != "outbound-only"}  # nobody can dial it: it serves no state
    votes = Counter((i.round, i.shard_hashes.get(shard)) for i in holders.values())
    rank = {claim: n for n, claim in enumerate(sorted(votes, key=lambda c: (votes[c], c[0]), reverse=True))}
    order = list(holders)
    (rng or random).shuffle(order)
    order.sort(key=lambda p: rank[(holders[p].round, holders[p].shard_hashes.get(shard))])
    return order


def applied_elsewhere(peers: Mapping[str, Claim], round_: int, hashes: Mapping[int, str]) -> bool:
    """After a round that applied only some shards: whether a peer at `round_` (the next one) or later holds
    another state of one of the others (`hashes`: this node's, kept at the round's start), i.e. its group
    applied that shard. When every trainer lost that sum, none does, and there is nothing to download."""
    return any(i.round >= round_ and i.shard_hashes.get(k) not in (None, h) for k, h in hashes.items() for i in peers.values())


def unvouched_shard(peers: Mapping[str, Claim], round_: int, my_round: int, hashes: Mapping[int, str]) -> int | None:
    """Whether a downloaded state at `round_` with these shard hashes is the swarm's.

    Returns None when it is: `round_` is not beyond the swarm's round (lower median) nor our
    own, and for every shard most peers advertising that round hold the same hash. Otherwise
    the first shard that fails (-1 when the round itself is implausible). Nobody left at that
    round (they moved on) vouches by default: the donor's hash check still held."""
    if round_ > max(swarm_round(peers), my_round):
        return -1
    at_round = [i for i in peers.values() if i.round == round_ and i.shard_hashes]
    for k, h in hashes.items():
        claims = [i.shard_hashes[k] for i in at_round if k in i.shard_hashes]
        if claims and sum(1 for c in claims if c == h) * 2 <= len(claims):
            return k
    return None


def split_verdict(peers: Mapping[str, Claim], my_round: int, my_hashes: Mapping[int, str],
                  prev_hashes: Mapping[int, str]) -> tuple[int, tuple[int, str], int, int] | None:
    """Whether peers at or below our round hold another adapter than ours (two groups formed where
    one should have, or a partition healed), shard by shard over the shards we train.

    The largest group of peers holding one (round, hash) wins, then the later round, then the
    larger hash. Peers lagging one round behind on the state we held before this round
    (`prev_hashes`) are not a split, nor are peers ahead of us (that is being behind).
    Returns (shard, winning (round, hash), its votes, our votes) when we are not the winner."""
    for k, h in my_hashes.items():
        mine = (my_round, h)
        lagging = (my_round - 1, prev_hashes.get(k))
        votes = Counter((i.round, i.shard_hashes[k]) for i in peers.values()
                        if k in i.shard_hashes and i.round <= my_round and (i.round, i.shard_hashes[k]) != lagging)
        if not votes or set(votes) == {mine}:
            continue
        votes[mine] += 1
        canonical = max(votes, key=lambda c: (votes[c], c[0], c[1]))
        if canonical != mine:
            return k, canonical, votes[canonical], votes[mine]
    return None


def is_minority(visible: int, known: int) -> bool:
    """Whether this node, seeing `visible` of the `known` other peers, is on the smaller side of a
    split: it and the peers it sees are less than half of everyone it knows (itself included)."""
    return (visible + 1) * 2 < known + 1


def coverage(peers: Mapping[str, Claim], me: str, trained: Iterable[int], num_shards: int) -> dict[int, int]:
    """Trainers per shard (this node included), as the view shows them."""
    trained = set(trained)
    counts = {k: int(k in trained) for k in range(num_shards)}
    for p, info in peers.items():
        if p != me and not info.syncing:
            for k in info.shards:
                if k in counts:
                    counts[k] += 1
    return counts


def followed_state(peers: Mapping[str, Claim], num_shards: int) -> tuple[int, dict[int, str], dict[int, list[str]]] | None:
    """What a follower (`serve --swarm`, which trains nothing) should hold: (round, {shard: hash},
    {shard: donors holding that hash}), or None while the trainers are between rounds.

    The round is the swarm's (the lower median of the trainers' claims: one peer claiming a round
    far ahead cannot move it); for each shard, the hash most of its trainers at that round
    advertise (ties to the larger hash, as everywhere). A shard nobody trains is left out: it keeps
    the manifest's initial bits, as at every node. None when a trained shard has no trainer at the
    round yet (it is between rounds: ask again) or nobody trains anything."""
    trainers = {p: i for p, i in peers.items() if not i.syncing and i.shards}
    round_ = swarm_round(trainers)
    hashes, donors = {}, {}
    for k in range(num_shards):
        of_k = [(p, i) for p, i in trainers.items() if k in i.shards]
        if not of_k:
            continue
        at = [(p, i.shard_hashes[k]) for p, i in of_k if i.round == round_ and k in i.shard_hashes]
        if not at:
            return None
        votes = Counter(h for _, h in at)
        hashes[k] = max(votes, key=lambda h: (votes[h], h))
        donors[k] = sorted(p for p, h in at if h == hashes[k])
    return (round_, hashes, donors) if hashes else None


def dialable_peers(peers: Mapping[str, Claim], me: str) -> list[str]:
    """Peers other than `me` that others can dial (public or relayed): the ones that can hold all-reduce parts."""
    return sorted(p for p, i in peers.items() if p != me and i.reach != "outbound-only")
