"""A verifier's judgement of one audited round, from what the audited peer serves (no network)."""

import numpy as np
import pytest
import torch

from protocol.verification import ACCEPT, REJECT, Tolerances, audit_seed, compare

from node.train.trainer import Trainer, outgoing_tensors
from node.verify.lsh import UpdateSigner
from node.verify.replay import Replayer
from node.verify.service import judge_audit, make_commitment

TOL = Tolerances(0.08, 0.10, 1.02)
SEED = audit_seed("run", "peer", 3, b"c" * 32, "ab" * 16)


@pytest.fixture(scope="module")
def setting(corpus, tiny_config):
    trainer = Trainer(tiny_config(), corpus, shard=2, sampler_seed=9)
    trainer.run_round()
    trainer.apply_outer_step(None)
    trainer.run_round()
    signer = UpdateSigner(trainer.numel, seed=1)
    return trainer, Replayer(trainer.cfg, corpus), signer


def audit(setting, sent_delta, committed_delta=None, tamper=None):
    trainer, replayer, signer = setting
    phi = trainer.slow_weights
    outgoing = {"theta": (phi + sent_delta).numpy()}
    commitment, served = make_commitment("run", "peer", 3, trainer.round_start, outgoing,
                                         sent_delta if committed_delta is None else committed_delta, signer, 4)
    served = {name: array.copy() for name, array in served.items()}
    if tamper:
        served[tamper][0] += 1e-3
    return judge_audit(commitment, SEED, served, replayer, signer, TOL, 4)


def honest(setting):
    trainer = setting[0]
    return trainer.fast_weights() - trainer.slow_weights


def test_honest_round_is_accepted_exactly(setting):
    judgement = audit(setting, honest(setting))
    assert judgement.verdict == ACCEPT and judgement.comparison.rel_l2 == 0.0 and judgement.reason == ""


def test_a_consistent_cheater_is_caught_by_the_replay(setting):
    judgement = audit(setting, -honest(setting))
    assert judgement.verdict == REJECT and judgement.reason.startswith("exceeds")
    assert judgement.comparison.hamming > 0.9


def test_committing_one_update_and_sending_another_is_caught(setting):
    judgement = audit(setting, -honest(setting), committed_delta=honest(setting))
    assert judgement.verdict == REJECT and judgement.reason == "committed signature does not describe the sent update"


def test_served_state_must_match_the_commitment(setting):
    assert audit(setting, honest(setting), tamper="adam_v").reason == "start state does not match the committed digest"
    assert audit(setting, honest(setting), tamper="sent.theta").reason == "sent tensors do not match the committed digest"


def test_null_space_of_the_public_projection_is_seen_by_the_audit_projection(setting):
    """A peer that knows the run-wide LSH seed can add anything the public fold cannot see."""
    trainer, _, signer = setting
    delta = honest(setting)
    noise = torch.randn(delta.shape, generator=torch.Generator().manual_seed(0))
    hidden = signer.null_space_part(noise)
    assert float(signer.fold(hidden).abs().max()) < 1e-5 * float(signer.fold(noise).abs().max())  # float32 residue
    hidden *= 0.5 * delta.norm() / hidden.norm()
    assert compare(signer.sign(delta + hidden), signer.sign(delta), TOL).hamming == 0.0  # invisible to it
    judgement = audit(setting, delta + hidden)
    assert judgement.verdict == REJECT and judgement.reason.startswith("exceeds")
    assert np.isfinite(judgement.comparison.rel_l2) and judgement.comparison.rel_l2 > 0.3


# ----------------------------------------------------------------------------- a bfloat16 wire (protocol/codecs.py)
def audit_bf16(setting, fast, judged_as="bfloat16", wire_dtype="bfloat16", reference=None):
    """A peer that sends `fast` in `wire_dtype` and commits to the update as sent, judged by a verifier."""
    trainer, replayer, signer = setting
    outgoing = outgoing_tensors(trainer.slow_weights, fast, True, wire_dtype, reference)
    commitment, served = make_commitment("run", "peer", 3, trainer.round_start, outgoing, None, signer, 4)
    return judge_audit(commitment, SEED, served, replayer, signer, TOL, 4, judged_as, reference)


def test_an_honest_bfloat16_round_is_accepted_because_the_replay_is_rounded_like_the_wire(setting):
    trainer = setting[0]
    judgement = audit_bf16(setting, trainer.fast_weights())
    assert judgement.verdict == ACCEPT and judgement.comparison.rel_l2 < 1e-6, judgement
    # without rounding the replay, the wire's rounding error alone (2^-8 of each weight) is far larger than
    # float32 replay noise: compared raw it is a sizeable part of the update
    raw = audit_bf16(setting, trainer.fast_weights(), judged_as="float32")
    assert raw.comparison.rel_l2 > 100 * max(judgement.comparison.rel_l2, 1e-9)


def test_a_bfloat16_cheater_is_still_caught(setting):
    trainer = setting[0]
    judgement = audit_bf16(setting, trainer.slow_weights - honest(setting))
    assert judgement.verdict == REJECT and judgement.reason.startswith("exceeds")


# ----------------------------------------------------------------------------- a blockwise8 wire
@pytest.fixture(scope="module")
def initial_reference(corpus, tiny_config):
    """The swarm's shared blockwise8 reference: what a node of this run builds before training."""
    return Trainer(tiny_config(wire_dtype="blockwise8"), corpus, shard=0, sampler_seed=0).wire_reference


def test_an_honest_blockwise8_round_is_accepted_and_a_cheater_caught(setting, initial_reference):
    trainer = setting[0]
    judgement = audit_bf16(setting, trainer.fast_weights(), "blockwise8", "blockwise8", initial_reference)
    assert judgement.verdict == ACCEPT and judgement.comparison.rel_l2 < 1e-6, judgement
    # the 8-bit wire is coarse: compared unrounded, an honest round would be far off the replay
    raw = audit_bf16(setting, trainer.fast_weights(), "float32", "blockwise8", initial_reference)
    assert raw.comparison.rel_l2 > 100 * max(judgement.comparison.rel_l2, 1e-9)
    cheat = audit_bf16(setting, trainer.slow_weights - honest(setting), "blockwise8", "blockwise8", initial_reference)
    assert cheat.verdict == REJECT and cheat.reason.startswith("exceeds")
