"""Locality-sensitive signatures of an update Δ (SimHash bits + projection sketch + norm).

A dense Gaussian projection of a 100M-parameter update to 256 dimensions would cost
25.6 GFLOP and 100 GB of matrix. Instead the projection is structured, in two stages:

1. a signed fold (a count sketch with buckets i mod m): y_b = Σ_{i ≡ b (mod m)} s_i Δ_i with
   seeded random signs s_i = ±1 — one pass over Δ, O(n), memory-bound. The random signs
   make cross terms cancel in expectation, so ⟨y(a), y(b)⟩ estimates ⟨a, b⟩;
2. a dense seeded Gaussian G (k × m, here 256 × 4096) on y.

SimHash bits are sign(G y) (random-hyperplane LSH: the fraction of differing bits
estimates angle/π); the first `sketch_dims` projections divided by sqrt(sketch_dims) form
a Johnson–Lindenstrauss sketch whose differences estimate relative L2 distances; the
exact norm is carried separately (SimHash cannot see scale).

The signs are generated once per node from the run's seed and kept as int8 (n bytes).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from protocol.verification import UpdateSignature

DEFAULT_BITS = 256
DEFAULT_SKETCH = 128
DEFAULT_BUCKETS = 4096
_SIGN_CHUNK = 1 << 22


class UpdateSigner:
    def __init__(self, numel: int, seed: int, bits: int = DEFAULT_BITS, sketch_dims: int = DEFAULT_SKETCH,
                 buckets: int = DEFAULT_BUCKETS, device: torch.device | str = "cpu") -> None:
        if bits % 8 or not 0 < sketch_dims <= bits:
            raise ValueError("bits must be a multiple of 8 and sketch_dims in (0, bits]")
        self.numel, self.bits, self.sketch_dims = numel, bits, sketch_dims
        self.buckets = min(buckets, max(1, numel))
        self.device = torch.device(device)
        generator = torch.Generator().manual_seed(seed)
        signs = torch.empty(numel, dtype=torch.int8)
        for start in range(0, numel, _SIGN_CHUNK):  # bounded temporary memory
            stop = min(numel, start + _SIGN_CHUNK)
            signs[start:stop] = torch.randint(0, 2, (stop - start,), generator=generator, dtype=torch.int8) * 2 - 1
        self.signs = signs.to(self.device)
        self.projection = torch.randn(bits, self.buckets, generator=generator, dtype=torch.float64).to(self.device)
        # chunks of whole bucket rows: element i of any chunk lands in bucket i mod m
        self.chunk = max(self.buckets, _SIGN_CHUNK // self.buckets * self.buckets)

    @torch.no_grad()
    def fold(self, delta: torch.Tensor) -> torch.Tensor:
        """Stage 1: the signed fold of Δ into `buckets` sums (float64 accumulation)."""
        return self._fold_and_norm(delta)[0]

    @torch.no_grad()
    def _fold_and_norm(self, delta: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The fold and ‖Δ‖ in one chunked pass (no full-size float64 copy of Δ)."""
        if delta.shape != (self.numel,):
            raise ValueError(f"update of shape {tuple(delta.shape)}, expected ({self.numel},)")
        folded = torch.zeros(self.buckets, dtype=torch.float64, device=self.device)
        squares = torch.zeros((), dtype=torch.float64, device=self.device)
        for start in range(0, self.numel, self.chunk):
            stop = min(self.numel, start + self.chunk)
            chunk = delta[start:stop].to(self.device, torch.float64)
            squares += chunk.square().sum()
            part = chunk * self.signs[start:stop]
            pad = (-part.numel()) % self.buckets  # only the last chunk is short
            if pad:
                part = torch.cat([part, part.new_zeros(pad)])
            folded += part.view(-1, self.buckets).sum(0)
        return folded, math.sqrt(float(squares))

    @torch.no_grad()
    def null_space_part(self, vector: torch.Tensor) -> torch.Tensor:
        """The part of `vector` this projection cannot see (its signed fold is zero): v − Fᵀ(F v)/c, with
        F the fold and c the elements per bucket. What a peer knowing the seed could hide in an update."""
        index = torch.arange(self.numel, device=self.device) % self.buckets
        counts = torch.bincount(index, minlength=self.buckets).double()
        back = self.signs.double() * (self.fold(vector) / counts)[index]
        return (vector.to(self.device, torch.float64) - back).float()

    @torch.no_grad()
    def sign(self, delta: torch.Tensor) -> UpdateSignature:
        folded, norm = self._fold_and_norm(delta)
        projected = self.projection @ folded
        bits = (projected > 0).cpu().numpy()
        packed = np.packbits(bits, bitorder="little").tobytes()
        sketch = (projected[: self.sketch_dims] / math.sqrt(self.sketch_dims)).cpu().tolist()
        return UpdateSignature(packed, tuple(sketch), norm)
