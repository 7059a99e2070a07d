"""What the hypersphere methods (multislerp, karcher) need from the tensors: their Gram matrix.

Both methods treat each (flattened) tensor as a point ``v_i`` and move only on the sphere spanned
by the ``v_i``; every quantity they use is an inner product ``<v_i, v_j>``. So their
trial-invariant part is one small ``(n, n)`` float64 matrix, and their per-trial part is a few
scalar operations on it followed by one weighted sum of the tensors.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

GRAM_CHUNK = 1 << 20  # elements per model cast to float64 at a time (bounds the temporary memory)


def gram64(vectors: Sequence[Tensor], *, chunk: int = GRAM_CHUNK) -> Tensor:
    """``G[i, j] = <v_i, v_j>`` of the flattened tensors, accumulated in float64 over chunks of
    ``chunk`` elements (a fixed order, so the result does not depend on the device's reduction).
    Returns a CPU float64 tensor of shape ``(n, n)``."""
    n = len(vectors)
    flat = [v.reshape(-1) for v in vectors]  # n x (N,)
    total = flat[0].numel()
    gram = torch.zeros(n, n, dtype=torch.float64, device=flat[0].device)
    for start in range(0, total, chunk):
        block = torch.stack([f[start:start + chunk].to(torch.float64) for f in flat])  # (n, chunk)
        gram += block @ block.T
    return gram.cpu()


def norms_from_gram(gram: Tensor) -> list[float]:
    """The Euclidean norm of each vector: ``sqrt(G[i, i])``."""
    return [float(x) for x in gram.diagonal().clamp(min=0).sqrt()]


def weighted_sum(vectors: Sequence[Tensor], coefficients: Sequence[float]) -> Tensor:
    """``sum_i c_i v_i`` in model order, in the vectors' dtype (the combine step of both methods)."""
    out = vectors[0] * float(coefficients[0])
    for v, c in zip(vectors[1:], coefficients[1:]):
        out = out + v * float(c)
    return out
