"""Wire formats of an exchange's tensors (protocol/codecs.py), against torch's own conversion."""

import numpy as np
import pytest
import torch

from protocol import TensorAssembler, TensorSpec, codecs, tensor_messages
from protocol.errors import InvalidField, NonFiniteTensor


def weights(n: int = 100_003) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = (rng.standard_normal(n) * rng.choice([1e-30, 1e-6, 1e-2, 1.0, 1e5], n)).astype("<f4")
    # zeros, subnormals, exact ties (1 + 2^-8 rounds down to even, 1 + 3·2^-8 up), the largest finite values
    x[:8] = [0.0, -0.0, 1e-40, -1e-45, 1.00390625, 1.01171875, 3.3e38, -3.3e38]
    return x


def test_bfloat16_is_torchs_round_to_nearest_even_bit_for_bit(monkeypatch):
    monkeypatch.setattr(codecs, "_BLOCK", 4096)  # several blocks, the last one partial
    x = weights()
    expected = torch.from_numpy(x).to(torch.bfloat16)
    assert np.array_equal(codecs.encode(x, "bfloat16"), expected.view(torch.int16).numpy().view("<u2"))
    assert np.array_equal(codecs.round_trip(x, "bfloat16"), expected.float().numpy())


def test_a_round_trip_is_exact_the_second_time_and_bounded_the_first():
    x = weights()
    once = codecs.round_trip(x, "bfloat16")
    assert np.array_equal(codecs.round_trip(once, "bfloat16"), once)  # what a node commits to is what arrives
    normal = np.abs(x) > 1e-37
    assert np.all(np.abs(once[normal] - x[normal]) <= np.abs(x[normal]) * 2.0**-8)
    assert codecs.encode(x, "bfloat16").nbytes * 2 == x.nbytes


def test_float32_is_the_identity_and_unknown_formats_are_refused():
    x = weights(1000)
    assert np.array_equal(codecs.round_trip(x, "float32"), x)
    with pytest.raises(ValueError, match="unknown wire dtype 'int8'"):
        codecs.encode(x, "int8")


def test_bfloat16_travels_through_the_chunked_tensor_transfer():
    x = codecs.round_trip(weights(50_000), "bfloat16")
    spec = TensorSpec("theta", "bfloat16", (x.size,))
    assembler = TensorAssembler(spec, chunk_bytes=4096)
    done = False
    for message in tensor_messages(spec, codecs.encode(x, "bfloat16").tobytes(), 4096):
        done = assembler.feed(message)
    assert done and np.array_equal(codecs.decode(assembler.array(), "bfloat16"), x)


# ----------------------------------------------------------------------------- blockwise8
def moved(n: int, scale: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(weights that moved by about `scale` from their start, the shared reference of that start)."""
    rng = np.random.default_rng(seed)
    start = (rng.standard_normal(n) * rng.choice([1e-3, 2e-2, 1.0], n)).astype("<f4")
    start[:4] = 0.0  # a reference of zeros in the first block
    return (start + rng.standard_normal(n).astype("<f4") * np.float32(scale)), codecs.make_reference(start)


@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-6, 1e-3, 1.0, 1e4])
@pytest.mark.parametrize("with_reference", [True, False])
def test_blockwise8_recoded_is_bit_identical_so_what_a_node_commits_is_what_arrives(scale, with_reference):
    x, reference = moved(3 * codecs.BLOCK + 17, scale)  # several blocks, the last one partial
    reference = reference if with_reference else None
    once = codecs.round_trip(x, "blockwise8", reference)
    wire = codecs.encode(once, "blockwise8", reference)
    assert np.array_equal(codecs.decode(wire, "blockwise8", reference), once)
    assert wire.size == codecs.wire_numel(x.size, "blockwise8") == 4 * 4 + x.size


def test_blockwise8_error_is_a_fraction_of_the_difference_from_the_reference_not_of_the_weight():
    x, reference = moved(40 * codecs.BLOCK, 1e-3)
    start = codecs.decode(reference, "bfloat16")
    sent = codecs.round_trip(x, "blockwise8", reference)
    rows = lambda a: a.reshape(-1, codecs.BLOCK)  # noqa: E731
    largest_difference = np.abs(rows(x - start)).max(axis=1, keepdims=True)
    floor = 2.0**-15 * np.abs(rows(start)).max(axis=1, keepdims=True)
    bound = np.maximum(largest_difference / 127, floor) + np.abs(rows(x)) * 2.0**-23
    assert (np.abs(rows(sent - x)) <= bound).all()
    # against the difference the error is ~1%; quantizing the raw weights would drown it
    assert np.linalg.norm(sent - x) < 0.02 * np.linalg.norm(x - start)
    raw = codecs.round_trip(x, "blockwise8")
    assert np.linalg.norm(raw - x) > 3 * np.linalg.norm(x - start)


def test_blockwise8_is_four_times_smaller_with_its_scales():
    n = 19_210_240  # the 19M model of the WAN measurements
    assert codecs.wire_bytes(n, "float32") / codecs.wire_bytes(n, "blockwise8") > 3.96
    assert codecs.wire_bytes(n, "bfloat16") == 2 * n


def test_blockwise8_refuses_hostile_bytes_with_typed_errors():
    x, reference = moved(2 * codecs.BLOCK, 1e-2)
    good = codecs.encode(x, "blockwise8", reference)

    def with_scale(value) -> np.ndarray:
        bad = good.copy()
        bad[:4].view("<f4")[0] = value
        return bad

    for scale, error in [(np.nan, NonFiniteTensor), (np.inf, NonFiniteTensor), (-1.0, NonFiniteTensor),
                         (0.75, InvalidField), (2.0**127, NonFiniteTensor)]:
        with pytest.raises(error):
            codecs.decode(with_scale(scale), "blockwise8", reference)
    minus_128 = good.copy()
    minus_128[8:].view("i1")[5] = -128
    with pytest.raises(InvalidField, match="-128"):
        codecs.decode(minus_128, "blockwise8", reference)
    with pytest.raises(InvalidField, match="layout"):
        codecs.decode(good[:-(codecs.BLOCK + 1)], "blockwise8")  # scales for 2 blocks, values for 1 less
    with pytest.raises(ValueError, match="reference"):
        codecs.decode(good, "blockwise8", reference[:-1])
    with pytest.raises(ValueError, match="finite"):
        codecs.encode(np.array([1.0, np.nan], dtype="<f4"), "blockwise8")


def test_blockwise8_travels_through_the_chunked_tensor_transfer():
    x, reference = moved(10_000, 1e-3)
    wire = codecs.encode(x, "blockwise8", reference)
    spec = TensorSpec("theta", "blockwise8", (wire.size,))
    assembler = TensorAssembler(spec, chunk_bytes=4096)
    done = False
    for message in tensor_messages(spec, wire.tobytes(), 4096):
        done = assembler.feed(message)
    assert done and np.array_equal(codecs.decode(assembler.array(), "blockwise8", reference),
                                   codecs.round_trip(x, "blockwise8", reference))


def test_only_weights_are_coded_against_the_reference():
    reference = codecs.make_reference(np.ones(3, dtype="<f4"))
    assert codecs.reference_for("theta", reference) is reference
    assert codecs.reference_for("phi", reference) is reference
    assert codecs.reference_for("delta_update", reference) is None
