"""Wire formats of an exchange's tensors (protocol/codecs.py), against torch's own conversion."""

import numpy as np
import pytest
import torch

from protocol import TensorAssembler, TensorSpec, codecs, tensor_messages


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
