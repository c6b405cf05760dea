"""The pure verification rules: distances, tolerances, records and their signed bytes, lottery, committee, verdict."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.verification import (
    ACCEPT,
    COMMITTEE_SIZE,
    REJECT,
    Commitment,
    InvalidRecord,
    Receipt,
    Tolerances,
    UpdateSignature,
    Vote,
    audit_seed,
    committee_ranking,
    compare,
    data_assignment,
    decide,
    envelope,
    hamming_fraction,
    is_sampled,
    norm_ratio,
    open_envelope,
    signing_bytes,
    sketch_rel_l2,
    stand_in_rank,
)

TOL = Tolerances(max_hamming=0.1, max_rel_l2=0.25, max_norm_ratio=1.1)
PEERS = [f"peer{i:02d}" for i in range(12)]


def signature(bits: bytes = b"\x0f" * 32, sketch=(1.0, 2.0, 3.0), norm: float = 5.0) -> UpdateSignature:
    return UpdateSignature(bits, tuple(sketch), norm)


def commitment(**changes) -> Commitment:
    fields = dict(run_id="run", peer="peerA", round=7, start_digest="ab" * 32, theta_digest="cd" * 32,
                  data=data_assignment(3, {"rng": {"state": {"state": 2**100, "inc": 5}}, "batches_drawn": 9}, 40),
                  global_step=350, inner_steps=50, update=signature())
    fields.update(changes)
    return Commitment(**fields)


def test_distances():
    assert hamming_fraction(b"\x00\x00", b"\xff\x00") == 0.5
    assert hamming_fraction(b"\x0f", b"\x0f") == 0.0
    with pytest.raises(ValueError):
        hamming_fraction(b"\x00", b"\x00\x00")
    assert sketch_rel_l2((1.0, 0.0), (1.0, 0.0)) == 0.0
    assert sketch_rel_l2((2.0, 0.0), (1.0, 0.0)) == pytest.approx(1.0)
    assert sketch_rel_l2((1.0,), (0.0,)) == math.inf
    assert norm_ratio(2.0, 1.0) == norm_ratio(1.0, 2.0) == 2.0
    assert norm_ratio(0.0, 1.0) == math.inf and norm_ratio(0.0, 0.0) == 1.0


def test_compare_sees_direction_scale_and_norm():
    honest = signature()
    assert compare(honest, honest, TOL).ok
    flipped = signature(bits=bytes(b ^ 0xFF for b in honest.bits), sketch=(-1.0, -2.0, -3.0))
    assert set(compare(flipped, honest, TOL).failed) == {"hamming", "rel_l2"}
    doubled = signature(sketch=(2.0, 4.0, 6.0), norm=10.0)  # SimHash alone cannot see a scaled update
    result = compare(doubled, honest, TOL)
    assert result.hamming == 0.0 and set(result.failed) == {"rel_l2", "norm_ratio"}
    nan = signature(norm=float("nan"))
    assert "norm_ratio" in compare(nan, honest, TOL).failed  # NaN never passes a tolerance
    assert "hamming 0.0000 (max 0.1000)" in result.evidence(TOL)


@pytest.mark.parametrize("record", [
    commitment(),
    Receipt("run", "peerA", "peerB", 7, "cd" * 32, "ef" * 16, 1.5e9, b"sender's signature"),
    Vote("run", "peerA", 7, "peerC", REJECT, "exceeds rel_l2", 0.01, 0.9, 1.0),
])
def test_envelope_round_trip_and_signed_bytes(record):
    blob = envelope(record, b"sig")
    opened, sig = open_envelope(blob, type(record))
    assert opened == record and sig == b"sig"
    assert signing_bytes(opened) == signing_bytes(record)
    assert signing_bytes(record).startswith(b"gossiptrain/verify/1/" + record.KIND.encode())


def test_signed_bytes_cover_every_field():
    base = signing_bytes(commitment())
    for change in (dict(round=8), dict(peer="peerB"), dict(start_digest="00" * 32), dict(global_step=351),
                   dict(update=signature(norm=5.0001)), dict(update=signature(bits=b"\x0e" + b"\x0f" * 31))):
        assert signing_bytes(commitment(**change)) != base, change
    assert commitment().digest() != commitment(round=8).digest()


@pytest.mark.parametrize("blob", [
    b"\xc1", b"", 5, b"\x80",
    envelope(Receipt("run", "a", "b", 1, "cd" * 32, "ef" * 16, 1.5e9, b"att"), b"s"),  # wrong kind for a Vote
    envelope(Vote("run", "a", 1, "c", ACCEPT, "", 0.0, 0.0, 1.0), b""),  # empty signature
    b"\x00" * 20_000,
])
def test_malformed_envelopes_are_typed_errors(blob):
    with pytest.raises(InvalidRecord):
        open_envelope(blob, Vote)


def test_malformed_record_fields():
    good = commitment().to_wire()
    for key, value in (("start_digest", "XYZ"), ("round", -1), ("norm", float("inf")), ("sketch", []),
                       ("bits", "text"), ("run_id", 5), ("theta_digest", "ab" * 31)):
        with pytest.raises(InvalidRecord):
            Commitment.from_wire({**good, key: value})
    with pytest.raises(InvalidRecord):
        Vote.from_wire({**Vote("r", "a", 1, "c", ACCEPT, "", 0.0, 0.0, 1.0).to_wire(), "verdict": "maybe"})


def test_lottery_rate_and_seed_depend_on_the_receivers_nonce():
    digest = commitment().digest()
    seeds = [audit_seed("run", "peerA", 7, digest, f"{n:032x}") for n in range(4000)]
    assert len(set(seeds)) == 4000
    rate = sum(is_sampled(seed, 0.1) for seed in seeds) / len(seeds)
    assert 0.08 < rate < 0.12
    assert not any(is_sampled(seed, 0.0) for seed in seeds) and all(is_sampled(seed, 1.0) for seed in seeds)


def test_committee_ranking_is_stable_under_view_differences():
    seed = audit_seed("run", "peer00", 3, b"x" * 32, "00" * 16)
    full = committee_ranking(seed, PEERS, "peer00")
    assert "peer00" not in full and len(full) == len(PEERS) - 1
    subset = committee_ranking(seed, PEERS[:6], "peer00")
    assert subset == [p for p in full if p in subset]  # a smaller view keeps the same relative order
    other = committee_ranking(audit_seed("run", "peer00", 4, b"x" * 32, "00" * 16), PEERS, "peer00")
    assert other != full  # another round, another committee


def test_decide_two_of_three():
    ranking = PEERS[1:8]
    c1, c2, c3, r1, r2, r3 = ranking[:6]
    assert decide({}, ranking, 2) is None
    assert decide({c1: REJECT}, ranking, 2) is None
    assert decide({c1: REJECT, c2: REJECT}, ranking, 2) == REJECT
    assert decide({c1: REJECT, c2: ACCEPT}, ranking, 2) is None  # a missing vote is never an accept
    assert decide({c1: REJECT, c2: ACCEPT, c3: ACCEPT}, ranking, 2) == ACCEPT
    assert decide({c1: REJECT, r1: REJECT}, ranking, 2) == REJECT  # a reserve stands in for a silent member
    assert decide({c1: REJECT, r3: REJECT}, ranking, 2) is None  # beyond the reserves: not eligible
    assert decide({"outsider": REJECT, "other": REJECT}, ranking, 2) is None
    # only the best-ranked three voters count
    assert decide({c1: ACCEPT, c2: ACCEPT, r1: REJECT, r2: REJECT}, ranking, 2) == ACCEPT


@given(st.dictionaries(st.sampled_from(PEERS), st.sampled_from([ACCEPT, REJECT]), max_size=len(PEERS)),
       st.integers(0, 4))
def test_decide_never_flags_without_two_eligible_rejects(votes, reserves):
    ranking = PEERS[:9]
    verdict = decide(votes, ranking, reserves)
    eligible = [votes[p] for p in ranking[: COMMITTEE_SIZE + reserves] if p in votes]
    if verdict == REJECT:
        assert eligible[:COMMITTEE_SIZE].count(REJECT) >= 2
    if verdict == ACCEPT:
        assert eligible[:COMMITTEE_SIZE].count(ACCEPT) >= 2


def test_reserves_stand_in_one_vote_timeout_after_another():
    ranking = PEERS[:6]
    assert stand_in_rank(ranking, set(), ranking[0], 0.0, 10.0)
    assert stand_in_rank(ranking, set(), ranking[2], 0.0, 10.0)
    assert not stand_in_rank(ranking, set(), ranking[3], 9.0, 10.0)
    assert stand_in_rank(ranking, {ranking[0]}, ranking[3], 10.0, 10.0)
    assert not stand_in_rank(ranking, set(ranking[:3]), ranking[3], 50.0, 10.0)  # the committee voted
    assert not stand_in_rank(ranking, set(), ranking[4], 15.0, 10.0)  # second reserve waits two timeouts
    assert not stand_in_rank(ranking, set(), "stranger", 99.0, 10.0)
