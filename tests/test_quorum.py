"""Unit tests for node.swarm.quorum: the consensus rules over a hand-made peer view.

Views are `{peer_id: P}` with a tiny local stand-in for PeerInfo (the rules only read
round, shards, syncing and shard_hashes), so no DHT, network or model is involved.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from node.swarm.quorum import (
    applied_elsewhere,
    coverage,
    dialable_peers,
    donor_order,
    expected_group_sizes,
    group_claim,
    is_minority,
    others,
    round_members,
    split_verdict,
    swarm_round,
    unvouched_shard,
)

LIAR_ROUND = 10**9


@dataclass
class P:
    round: int
    shards: tuple = (0,)
    syncing: bool = False
    shard_hashes: dict = field(default_factory=dict)
    reach: str = "public"


def at(round_: int, h: str | None = None, *, shards: tuple = (0,), syncing: bool = False, hashes: dict | None = None) -> P:
    """A peer at `round_` training `shards`; `h` is its hash for shard 0 (or pass `hashes`)."""
    if hashes is None:
        hashes = {} if h is None else {0: h}
    return P(round=round_, shards=tuple(shards), syncing=syncing, shard_hashes=dict(hashes))


def meta(r, **h) -> dict:
    """Round metadata as an all-reduce member sends it: {"r": round, "h": {"<shard>": hash}}."""
    return {"r": r, "h": {k.lstrip("s"): v for k, v in h.items()}}


# ---------------------------------------------------------------------------------------- others


def test_others_leaves_out_me_and_syncing_peers():
    a, b, c, m = at(3), at(3, syncing=True), at(4), at(3)
    view = {"A": a, "B": b, "C": c, "M": m}
    got = others(view, "M")
    assert got == {"A": a, "C": c}
    assert got["A"] is a and got["C"] is c
    assert list(got) == ["A", "C"]


def test_others_me_absent_from_view_and_does_not_mutate():
    view = {"A": at(1), "B": at(2, syncing=True)}
    before = dict(view)
    assert list(others(view, "M")) == ["A"]
    assert view == before


def test_others_me_syncing_and_only_me():
    assert others({"M": at(1, syncing=True)}, "M") == {}
    assert others({"M": at(1)}, "M") == {}
    assert others({}, "M") == {}


def test_others_all_syncing():
    assert others({"A": at(1, syncing=True), "B": at(2, syncing=True)}, "M") == {}


# ---------------------------------------------------------------------------------- swarm_round


def test_swarm_round_empty():
    assert swarm_round({}) == -1


@pytest.mark.parametrize(
    "rounds, expected",
    [
        ([7], 7),
        ([3, 9], 3),  # even count: lower median
        ([9, 3], 3),
        ([1, 2, 3], 2),  # odd count: the median
        ([3, 1, 2], 2),
        ([4, 1, 3, 2], 2),  # even: lower of the two middle values
        ([5, 5, 6, 6], 5),
        ([1, 2, 3, 4, 5], 3),
        ([10, 20, 30, 40, 50, 60], 30),
        ([0, 0, 0], 0),
        ([-1, 5], -1),
    ],
)
def test_swarm_round_lower_median(rounds, expected):
    view = {chr(ord("A") + n): at(r) for n, r in enumerate(rounds)}
    assert swarm_round(view) == expected


@pytest.mark.parametrize("honest", [[5, 5], [4, 5], [5, 6, 7], [3, 3, 3, 3]])
def test_swarm_round_liar_among_two_or_more_honest_does_not_move_it(honest):
    view = {chr(ord("A") + n): at(r) for n, r in enumerate(honest)}
    before = swarm_round(view)
    view["Z"] = at(LIAR_ROUND)
    after = swarm_round(view)
    assert after <= max(honest)
    # the lower median with one extra (high) claim is the honest sorted element at index n // 2
    assert after == sorted(honest)[len(honest) // 2]
    assert after != LIAR_ROUND
    assert before <= after <= max(honest)


def test_swarm_round_one_honest_plus_one_liar_is_the_honest_round():
    assert swarm_round({"A": at(5), "Z": at(LIAR_ROUND)}) == 5
    assert swarm_round({"Z": at(LIAR_ROUND), "A": at(5)}) == 5


def test_swarm_round_two_honest_two_liars():
    assert swarm_round({"A": at(5), "B": at(6), "Y": at(LIAR_ROUND), "Z": at(LIAR_ROUND)}) == 6


def test_swarm_round_ignores_syncing_flag_itself():
    # swarm_round counts every claim it is given; leaving syncing peers out is others()'s job
    view = {"A": at(1), "B": at(9, syncing=True), "C": at(9, syncing=True)}
    assert swarm_round(view) == 9
    assert swarm_round(others(view, "M")) == 1


@settings(max_examples=200, deadline=None)
@given(honest=st.lists(st.integers(min_value=0, max_value=10**6), min_size=2, max_size=12),
       liar=st.integers(min_value=-(10**12), max_value=10**12))
def test_swarm_round_one_liar_stays_within_honest_range(honest, liar):
    view = {f"H{n}": at(r) for n, r in enumerate(honest)}
    view["LIAR"] = at(liar)
    got = swarm_round(view)
    assert min(honest) <= got <= max(honest)


@settings(max_examples=100, deadline=None)
@given(honest=st.integers(min_value=0, max_value=10**6), liar=st.integers(min_value=10**6 + 1, max_value=10**15))
def test_swarm_round_single_honest_vs_high_liar(honest, liar):
    assert swarm_round({"A": at(honest), "Z": at(liar)}) == honest


# -------------------------------------------------------------------------------- round_members


def test_round_members_window_and_me():
    view = {"A": at(4), "B": at(5), "C": at(3), "D": at(6), "E": at(5)}
    assert round_members(view, "M", 5) == ["A", "B", "E", "M"]


def test_round_members_sorted_with_me_in_the_middle():
    view = {"D": at(5), "A": at(4), "C": at(5)}
    assert round_members(view, "B", 5) == ["A", "B", "C", "D"]


def test_round_members_me_in_view_listed_once_whatever_its_round():
    view = {"A": at(5), "M": at(5)}
    assert round_members(view, "M", 5) == ["A", "M"]
    view = {"A": at(5), "M": at(100)}
    assert round_members(view, "M", 5) == ["A", "M"]


def test_round_members_only_me():
    assert round_members({}, "M", 0) == ["M"]
    assert round_members({"A": at(7)}, "M", 0) == ["M"]


@pytest.mark.parametrize("peer_round, included", [(3, False), (4, True), (5, True), (6, False), (LIAR_ROUND, False)])
def test_round_members_boundaries(peer_round, included):
    got = round_members({"A": at(peer_round)}, "M", 5)
    assert got == (["A", "M"] if included else ["M"])


def test_round_members_no_duplicates():
    view = {"A": at(5), "B": at(4), "M": at(5)}
    got = round_members(view, "M", 5)
    assert got == ["A", "B", "M"]
    assert len(got) == len(set(got))


# ------------------------------------------------------------------------- expected_group_sizes


def test_expected_group_sizes_counts_members_training_the_shard_plus_me():
    view = {"A": at(5, shards=(0, 1)), "B": at(5, shards=(1,)), "C": at(5, shards=(0, 1, 2))}
    members = ["A", "B", "M"]  # C is not a member this round
    assert expected_group_sizes(view, members, "M", [0, 1, 2]) == {0: 2, 1: 3, 2: 1}


def test_expected_group_sizes_members_absent_from_view_and_me_in_view():
    view = {"A": at(5, shards=(0,)), "M": at(5, shards=(0, 1))}
    members = ["A", "GONE", "M"]
    assert expected_group_sizes(view, members, "M", [0, 1]) == {0: 2, 1: 1}


def test_expected_group_sizes_only_trained_keys():
    view = {"A": at(5, shards=(0, 1, 2, 3))}
    assert expected_group_sizes(view, ["A", "M"], "M", [3]) == {3: 2}
    assert expected_group_sizes(view, ["A", "M"], "M", []) == {}
    assert expected_group_sizes(view, ["A", "M"], "M", iter([1, 2])) == {1: 2, 2: 2}


def test_expected_group_sizes_no_members():
    view = {"A": at(5, shards=(0,))}
    assert expected_group_sizes(view, [], "M", [0]) == {0: 1}


# ---------------------------------------------------------------------------------- group_claim


def test_group_claim_majority_wins():
    gathered = {"A": meta(5, s0="aa"), "B": meta(5, s0="aa"), "C": meta(5, s0="zz")}
    assert group_claim(gathered, 0) == (5, "aa")


def test_group_claim_majority_wins_over_later_round_and_larger_hash():
    gathered = {"A": meta(5, s0="aa"), "B": meta(5, s0="aa"), "C": meta(6, s0="zz")}
    assert group_claim(gathered, 0) == (5, "aa")


@pytest.mark.parametrize(
    "claims, expected",
    [
        ([(5, "zz"), (6, "aa")], (6, "aa")),  # tie on votes: later round, even with a smaller hash
        ([(6, "aa"), (5, "zz")], (6, "aa")),
        ([(5, "aa"), (5, "bb")], (5, "bb")),  # tie on round: larger hash
        ([(5, "bb"), (5, "aa")], (5, "bb")),
        ([(5, "9"), (5, "10")], (5, "9")),  # string compare, not numeric
        ([(4, "x"), (4, "x"), (5, "y"), (5, "y")], (5, "y")),
    ],
)
def test_group_claim_ties(claims, expected):
    gathered = {f"P{n}": meta(r, s0=h) for n, (r, h) in enumerate(claims)}
    assert group_claim(gathered, 0) == expected


def test_group_claim_lone_liar_round_does_not_win():
    gathered = {"A": meta(5, s0="aa"), "B": meta(5, s0="aa"), "Z": meta(LIAR_ROUND, s0="ff")}
    assert group_claim(gathered, 0) == (5, "aa")


def test_group_claim_reads_the_requested_shard():
    gathered = {"A": meta(5, s0="a0", s1="b1"), "B": meta(5, s0="a0", s1="c1"), "C": meta(5, s0="d0", s1="c1")}
    assert group_claim(gathered, 0) == (5, "a0")
    assert group_claim(gathered, 1) == (5, "c1")


def test_group_claim_coerces_round_to_int_and_hash_to_str():
    gathered = {"A": {"r": "7", "h": {"0": 123}}, "B": {"r": 7.0, "h": {"0": "123"}}}
    assert group_claim(gathered, 0) == (7, "123")


def test_group_claim_missing_shard_votes_as_the_string_none():
    # documents current behaviour: members without the shard (or sending int keys) vote for "None"
    gathered = {"A": meta(5), "B": meta(5), "C": meta(5, s0="aa")}
    assert group_claim(gathered, 0) == (5, "None")
    int_keys = {"A": {"r": 5, "h": {0: "aa"}}}
    assert group_claim(int_keys, 0) == (5, "None")


def test_group_claim_single_member():
    assert group_claim({"A": meta(3, s2="hh")}, 2) == (3, "hh")


def test_group_claim_empty_raises():
    with pytest.raises(ValueError):
        group_claim({}, 0)


@settings(max_examples=150, deadline=None)
@given(claims=st.lists(st.tuples(st.integers(0, 4), st.sampled_from(["a", "b", "c"])), min_size=1, max_size=9),
       seed=st.integers(0, 2**32))
def test_group_claim_independent_of_member_order(claims, seed):
    items = [(f"P{n}", meta(r, s0=h)) for n, (r, h) in enumerate(claims)]
    shuffled = items[:]
    random.Random(seed).shuffle(shuffled)
    got = group_claim(dict(items), 0)
    assert got == group_claim(dict(shuffled), 0)
    assert got in set(claims)
    # the winner has the most votes
    assert claims.count(got) == max(claims.count(c) for c in claims)


# ---------------------------------------------------------------------------------- donor_order


def test_donor_order_majority_holders_first():
    view = {"A": at(5, "hh"), "B": at(5, "hh"), "C": at(5, "zz"), "D": at(5, "hh")}
    for seed in range(20):
        got = donor_order(view, "M", 0, rng=random.Random(seed))
        assert sorted(got[:3]) == ["A", "B", "D"]
        assert got[3] == "C"
        assert len(got) == 4


def test_donor_order_excludes_me_syncing_and_non_holders():
    view = {
        "M": at(5, "hh"),
        "A": at(5, "hh"),
        "S": at(5, "hh", syncing=True),
        "N": at(5, shards=(1,), hashes={1: "hh"}),
        "B": at(5, "hh"),
    }
    got = donor_order(view, "M", 0, rng=random.Random(0))
    assert sorted(got) == ["A", "B"]


def test_donor_order_never_asks_an_outbound_only_peer():
    # a peer behind a NAT serves no state (nobody can dial it), however many vote for its hash
    view = {"A": at(5, "hh"), "N": P(round=5, shards=(0,), shard_hashes={0: "hh"}, reach="outbound-only"),
            "R": P(round=5, shards=(0,), shard_hashes={0: "hh"}, reach="relayed")}
    assert sorted(donor_order(view, "M", 0, rng=random.Random(0))) == ["A", "R"]
    assert dialable_peers(view, "A") == ["R"] and dialable_peers({"N": view["N"]}, "M") == []


def test_donor_order_skip_list_honoured():
    view = {"A": at(5, "hh"), "B": at(5, "hh"), "C": at(5, "hh"), "D": at(5, "zz")}
    got = donor_order(view, "M", 0, skip=["A", "C"], rng=random.Random(1))
    assert got == ["B", "D"]
    assert donor_order(view, "M", 0, skip=iter(["D"]), rng=random.Random(1)).count("D") == 0
    assert donor_order(view, "M", 0, skip={"A", "B", "C", "D"}, rng=random.Random(1)) == []


def test_donor_order_skipped_peers_do_not_vote():
    # with the two "hh" holders skipped, the remaining "zz" pair is the largest group
    view = {"A": at(5, "hh"), "B": at(5, "hh"), "C": at(5, "hh"), "X": at(5, "zz"), "Y": at(5, "zz"), "L": at(6, "ll")}
    got = donor_order(view, "M", 0, skip=["A", "B"], rng=random.Random(3))
    assert sorted(got[:2]) == ["X", "Y"]
    assert got[2:] == ["L", "C"]  # singletons: later round first


def test_donor_order_liar_with_later_round_after_majority():
    view = {"A": at(5, "hh"), "B": at(5, "hh"), "Z": at(LIAR_ROUND, "ff")}
    for seed in range(30):
        got = donor_order(view, "M", 0, rng=random.Random(seed))
        assert got[-1] == "Z"
        assert sorted(got[:2]) == ["A", "B"]


def test_donor_order_later_round_first_among_equal_groups():
    view = {"A": at(4, "aa"), "B": at(6, "bb"), "C": at(5, "cc")}
    assert donor_order(view, "M", 0, rng=random.Random(0)) == ["B", "C", "A"]


def test_donor_order_groups_ranked_by_size():
    view = {
        "A1": at(3, "a"), "A2": at(3, "a"), "A3": at(3, "a"),
        "B1": at(4, "b"), "B2": at(4, "b"),
        "C1": at(9, "c"),
    }
    for seed in range(10):
        got = donor_order(view, "M", 0, rng=random.Random(seed))
        assert sorted(got[:3]) == ["A1", "A2", "A3"]
        assert sorted(got[3:5]) == ["B1", "B2"]
        assert got[5] == "C1"


def test_donor_order_holders_without_hash_group_together():
    view = {"A": at(5), "B": at(5), "C": at(5, "hh")}
    got = donor_order(view, "M", 0, rng=random.Random(0))
    assert sorted(got[:2]) == ["A", "B"]
    assert got[2] == "C"


def test_donor_order_deterministic_with_seeded_rng():
    view = {p: at(5, "hh") for p in "ABCDEFG"} | {"X": at(5, "zz"), "Y": at(5, "zz")}
    first = donor_order(view, "M", 0, rng=random.Random(42))
    assert donor_order(view, "M", 0, rng=random.Random(42)) == first
    assert sorted(first[:7]) == list("ABCDEFG")
    assert sorted(first[7:]) == ["X", "Y"]


def test_donor_order_seeds_spread_first_choice_over_majority_holders():
    view = {"A": at(5, "hh"), "B": at(5, "hh"), "Z": at(5, "zz")}
    firsts = {donor_order(view, "M", 0, rng=random.Random(seed))[0] for seed in range(50)}
    assert firsts == {"A", "B"}


def test_donor_order_without_rng_uses_global_random():
    view = {"A": at(5, "hh"), "B": at(5, "hh"), "Z": at(5, "zz")}
    random.seed(7)
    first = donor_order(view, "M", 0)
    random.seed(7)
    assert donor_order(view, "M", 0) == first
    assert first[-1] == "Z"


def test_donor_order_empty():
    assert donor_order({}, "M", 0, rng=random.Random(0)) == []
    assert donor_order({"M": at(5, "hh")}, "M", 0, rng=random.Random(0)) == []


# ------------------------------------------------------------------------------ unvouched_shard


def test_unvouched_shard_vouched_by_majority():
    view = {"A": at(5, "hh"), "B": at(5, "hh"), "C": at(5, "zz")}
    assert unvouched_shard(view, 5, 5, {0: "hh"}) is None


def test_unvouched_shard_all_agree():
    view = {"A": at(5, "hh"), "B": at(5, "hh")}
    assert unvouched_shard(view, 5, 4, {0: "hh"}) is None


def test_unvouched_shard_donor_disagrees_with_majority():
    # we downloaded "zz" from a donor; most peers at round 5 hold "hh"
    view = {"A": at(5, "hh"), "B": at(5, "hh"), "D": at(5, "zz")}
    assert unvouched_shard(view, 5, 5, {0: "zz"}) == 0


def test_unvouched_shard_exactly_half_is_not_vouched():
    view = {"A": at(5, "hh"), "B": at(5, "zz")}
    assert unvouched_shard(view, 5, 5, {0: "hh"}) == 0
    view = {"A": at(5, "hh"), "B": at(5, "hh"), "C": at(5, "zz"), "D": at(5, "yy")}
    assert unvouched_shard(view, 5, 5, {0: "hh"}) == 0


def test_unvouched_shard_returns_first_failing_shard():
    view = {
        "A": at(5, shards=(0, 1, 2), hashes={0: "a", 1: "b", 2: "c"}),
        "B": at(5, shards=(0, 1, 2), hashes={0: "a", 1: "b", 2: "c"}),
    }
    assert unvouched_shard(view, 5, 5, {0: "a", 1: "b", 2: "c"}) is None
    assert unvouched_shard(view, 5, 5, {0: "a", 1: "X", 2: "Y"}) == 1
    assert unvouched_shard(view, 5, 5, {2: "Y", 1: "X"}) == 2


def test_unvouched_shard_implausible_round():
    view = {"A": at(5, "hh"), "B": at(5, "hh")}
    assert unvouched_shard(view, 6, 5, {0: "hh"}) == -1
    assert unvouched_shard(view, LIAR_ROUND, 5, {0: "hh"}) == -1


def test_unvouched_shard_liar_cannot_make_us_accept_its_round():
    view = {"A": at(5, "hh"), "B": at(5, "hh"), "Z": at(LIAR_ROUND, "ff")}
    assert swarm_round(view) == 5
    assert unvouched_shard(view, LIAR_ROUND, 5, {0: "ff"}) == -1
    # even with one honest peer only, the lower median is the honest round
    assert unvouched_shard({"A": at(5, "hh"), "Z": at(LIAR_ROUND, "ff")}, LIAR_ROUND, 3, {0: "ff"}) == -1


def test_unvouched_shard_round_at_my_round_beyond_swarm_is_plausible():
    view = {"A": at(5, "hh"), "B": at(5, "hh")}
    # round 6 is beyond the swarm (5) but not beyond our own round (6); nobody is at 6
    assert unvouched_shard(view, 6, 6, {0: "xx"}) is None
    assert unvouched_shard(view, 7, 6, {0: "xx"}) == -1


def test_unvouched_shard_nobody_at_that_round():
    view = {"A": at(6, "hh"), "B": at(6, "hh")}
    assert unvouched_shard(view, 5, 5, {0: "anything"}) is None
    assert unvouched_shard({}, -1, -1, {0: "anything"}) is None


def test_unvouched_shard_peers_without_hashes_are_not_witnesses():
    view = {"A": at(5), "B": at(5), "C": at(5, "hh")}
    assert unvouched_shard(view, 5, 5, {0: "hh"}) is None
    assert unvouched_shard(view, 5, 5, {0: "zz"}) == 0


def test_unvouched_shard_shard_no_peer_at_round_advertises():
    view = {"A": at(5, shards=(1,), hashes={1: "b"}), "B": at(5, shards=(1,), hashes={1: "b"})}
    assert unvouched_shard(view, 5, 5, {0: "anything"}) is None
    assert unvouched_shard(view, 5, 5, {0: "anything", 1: "b"}) is None
    assert unvouched_shard(view, 5, 5, {0: "anything", 1: "c"}) == 1


def test_unvouched_shard_only_peers_at_exactly_that_round_count():
    # peers at round 4 and 6 disagreeing do not matter for a state at round 5
    view = {"A": at(5, "hh"), "B": at(4, "zz"), "C": at(6, "zz"), "D": at(6, "zz")}
    assert unvouched_shard(view, 5, 6, {0: "hh"}) is None


def test_unvouched_shard_no_hashes_to_check():
    view = {"A": at(5, "hh")}
    assert unvouched_shard(view, 5, 5, {}) is None


# -------------------------------------------------------------------------------- split_verdict


def test_split_verdict_no_peers():
    assert split_verdict({}, 5, {0: "aa"}, {0: "pp"}) is None


def test_split_verdict_everyone_agrees():
    view = {"A": at(5, "aa"), "B": at(5, "aa"), "C": at(5, "aa")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) is None


def test_split_verdict_two_peers_on_another_hash_win():
    view = {"A": at(5, "zz"), "B": at(5, "zz")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) == (0, (5, "zz"), 2, 1)


def test_split_verdict_another_group_wins_even_with_smaller_hash():
    view = {"A": at(5, "00"), "B": at(5, "00")}
    assert split_verdict(view, 5, {0: "ff"}, {0: "pp"}) == (0, (5, "00"), 2, 1)


def test_split_verdict_we_are_the_larger_group():
    view = {"A": at(5, "aa"), "B": at(5, "zz")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) is None
    view = {"A": at(5, "aa"), "B": at(5, "aa"), "X": at(5, "zz"), "Y": at(5, "zz")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) is None


def test_split_verdict_our_votes_include_agreeing_peers():
    view = {"A": at(5, "aa"), "X": at(5, "zz"), "Y": at(5, "zz"), "W": at(5, "zz")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) == (0, (5, "zz"), 3, 2)


def test_split_verdict_tie_larger_hash_wins_theirs():
    view = {"A": at(5, "zz")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) == (0, (5, "zz"), 1, 1)
    view = {"A": at(5, "zz"), "B": at(5, "zz"), "C": at(5, "aa")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) == (0, (5, "zz"), 2, 2)


def test_split_verdict_tie_larger_hash_wins_ours():
    view = {"A": at(5, "aa")}
    assert split_verdict(view, 5, {0: "zz"}, {0: "pp"}) is None
    view = {"A": at(5, "aa"), "B": at(5, "aa"), "C": at(5, "zz")}
    assert split_verdict(view, 5, {0: "zz"}, {0: "pp"}) is None


def test_split_verdict_tie_later_round_wins():
    # a peer at round 4 on a hash other than our previous one is a group; on a tie our later round wins
    view = {"A": at(4, "zz")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) is None


def test_split_verdict_lagging_one_round_on_previous_hash_is_not_a_split():
    view = {"A": at(4, "pp"), "B": at(4, "pp"), "C": at(4, "pp")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) is None
    # nor when mixed with peers agreeing with us
    view["D"] = at(5, "aa")
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) is None


def test_split_verdict_lagging_peers_on_previous_hash_do_not_vote_for_a_rival():
    # 3 laggers on our previous hash are not counted; the single rival ties with us and loses on hash
    view = {"L1": at(4, "pp"), "L2": at(4, "pp"), "L3": at(4, "pp"), "R": at(5, "bb")}
    assert split_verdict(view, 5, {0: "cc"}, {0: "pp"}) is None
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) == (0, (5, "bb"), 1, 1)


def test_split_verdict_peers_lagging_on_another_hash_are_counted():
    # documents current behaviour: two peers one round behind on a hash we never held outvote us
    view = {"A": at(4, "qq"), "B": at(4, "qq")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) == (0, (4, "qq"), 2, 1)
    # no previous hash known: every lagging peer is a rival
    assert split_verdict(view, 5, {0: "aa"}, {}) == (0, (4, "qq"), 2, 1)


def test_split_verdict_peers_ahead_are_ignored():
    view = {"A": at(6, "zz"), "B": at(6, "zz"), "C": at(LIAR_ROUND, "zz")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) is None


def test_split_verdict_only_shards_in_my_hashes():
    view = {
        "A": at(5, shards=(0, 1), hashes={0: "aa", 1: "zz"}),
        "B": at(5, shards=(0, 1), hashes={0: "aa", 1: "zz"}),
    }
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) is None
    assert split_verdict(view, 5, {0: "aa", 1: "bb"}, {0: "pp", 1: "qq"}) == (1, (5, "zz"), 2, 1)


def test_split_verdict_peers_not_advertising_the_shard_are_ignored():
    view = {"A": at(5, shards=(1,), hashes={1: "zz"}), "B": at(5, shards=(1,), hashes={1: "zz"})}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) is None


def test_split_verdict_first_split_shard_in_my_hashes_order():
    both = {0: "z0", 1: "z1"}
    view = {"A": at(5, shards=(0, 1), hashes=both), "B": at(5, shards=(0, 1), hashes=both)}
    assert split_verdict(view, 5, {0: "a0", 1: "a1"}, {}) == (0, (5, "z0"), 2, 1)
    assert split_verdict(view, 5, {1: "a1", 0: "a0"}, {}) == (1, (5, "z1"), 2, 1)


def test_split_verdict_largest_of_several_rival_groups():
    view = {"X": at(5, "xx"), "Y1": at(5, "yy"), "Y2": at(5, "yy"), "Y3": at(5, "yy"), "W": at(5, "ww")}
    assert split_verdict(view, 5, {0: "aa"}, {0: "pp"}) == (0, (5, "yy"), 3, 1)


# ---------------------------------------------------------------------------------- is_minority


@pytest.mark.parametrize(
    "visible, known, expected",
    [
        (0, 2, True),
        (1, 2, False),
        (2, 2, False),
        (1, 4, True),
        (2, 4, False),
        (0, 0, False),
        (0, 1, False),  # 1 of 2 nodes: exactly half is not a minority
        (1, 3, False),  # 2 of 4: exactly half
        (0, 3, True),
        (3, 8, True),  # 4 of 9
        (4, 8, False),  # 5 of 9
        (49, 100, True),
        (50, 100, False),
    ],
)
def test_is_minority(visible, known, expected):
    assert is_minority(visible, known) is expected


# ------------------------------------------------------------------------------------- coverage


def test_coverage_counts_me_excludes_syncing_ignores_out_of_range():
    view = {
        "A": at(5, shards=(0, 1)),
        "B": at(5, shards=(0,), syncing=True),
        "C": at(5, shards=(1, 5, -1)),
        "M": at(5, shards=(0, 1, 2)),  # me in the view: counted via `trained` only
    }
    assert coverage(view, "M", [0, 7], 3) == {0: 2, 1: 2, 2: 0}


def test_coverage_no_peers():
    assert coverage({}, "M", [1], 3) == {0: 0, 1: 1, 2: 0}
    assert coverage({}, "M", [], 2) == {0: 0, 1: 0}
    assert coverage({}, "M", [0], 0) == {}


def test_coverage_trained_iterable_consumed_once():
    view = {"A": at(5, shards=(2,))}
    assert coverage(view, "M", iter([0, 2]), 3) == {0: 1, 1: 0, 2: 2}


def test_coverage_many_peers():
    view = {p: at(1, shards=(0, 1)) for p in "ABCD"} | {"E": at(1, shards=(1,))}
    assert coverage(view, "M", [1], 2) == {0: 4, 1: 6}


# ---------------------------------------------------------------------------------------- applied_elsewhere


def test_applied_elsewhere_sees_another_state_only_at_or_after_the_round():
    mine = {0: "start"}
    assert not applied_elsewhere({}, 4, mine)
    assert not applied_elsewhere({"b": at(4, "start")}, 4, mine)  # every trainer lost that sum
    assert not applied_elsewhere({"b": at(3, "older")}, 4, mine)  # still finishing the round: not evidence
    assert not applied_elsewhere({"b": at(4, hashes={1: "x"})}, 4, mine)  # it does not say what it holds of shard 0
    assert applied_elsewhere({"b": at(4, "start"), "c": at(5, "applied")}, 4, mine)
    assert applied_elsewhere({"b": at(4, hashes={0: "start", 1: "y"})}, 4, {0: "start", 1: "z"})
