"""Arcee Fusion: take the other model's value where it matters, keep the base elsewhere
(mergekit 0.1.5's ``arcee_fusion``; https://arcee.ai).

For a base ``b`` and one model ``x``:

1. importance ``I = |x - b| * KL(softmax(x) || softmax(b))``, the softmax and the KL taken along
   the last dimension (one KL per row; a 1-D tensor is one row), with ``1e-8`` added to both
   probability vectors: ``KL = sum_j p_j log(p_j / q_j)``;
2. threshold ``t = median + 1.5 (Q3 - Q1)`` of the importances (Tukey's upper fence), the
   quantile ``q`` being the ``floor(q (N - 1))``-th smallest value (no interpolation);
3. result ``b + (x - b) * [I >= t]``.

mergekit estimates the quartiles from 1,000,000 entries drawn with replacement when the tensor
is larger than that (from the global RNG). ``sample_size`` does the same here, from the
``generator`` passed (seeded like the global RNG, it draws the same entries); ``sample_size=None``
uses exact quantiles of every entry (deterministic). Up to that size both are exact. The
function's default is mergekit's (sampling); the registry's steps use exact quantiles: no seed
dimension in the search and one cached mask per tensor; identical to mergekit up to 1,000,000
entries, and above that the value mergekit's random sample estimates.

The method has no parameters: the mask is trial-invariant (a cache, :func:`fusion_caches`), the
combine step is elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

from evomerge.methods.steps import Cache, Inputs, Prepared

FUSION_PROB_EPS = 1e-8  # added to both softmax outputs before the KL
FUSION_SAMPLE_SIZE = 1_000_000  # mergekit's quantile sample size
FUSION_FENCE = 1.5  # Tukey's fence: median + 1.5 * IQR

def fusion_importance(base: Tensor, other: Tensor) -> Tensor:
    """``|x - b| * KL(softmax(x) || softmax(b))`` along the last dimension; shaped like ``base``."""
    p = torch.softmax(other, dim=-1) + FUSION_PROB_EPS
    q = torch.softmax(base, dim=-1) + FUSION_PROB_EPS
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)  # (..., 1)
    return (other - base).abs() * kl


def fusion_threshold(
    importance: Tensor, *, sample_size: int | None = FUSION_SAMPLE_SIZE, generator: torch.Generator | None = None
) -> Tensor:
    """``median + 1.5 (Q3 - Q1)`` (0-dim, the importance's dtype), from a sample of
    ``sample_size`` entries drawn with replacement when the tensor is larger than that."""
    flat = importance.reshape(-1)  # (N,)
    if sample_size is not None and flat.numel() > sample_size:
        picks = torch.randint(flat.numel(), (sample_size,), generator=generator, device=flat.device)
        flat = flat[picks]
    last = flat.numel() - 1
    q1, q2, q3 = (torch.kthvalue(flat, k + 1).values for k in (last // 4, last // 2, (3 * last) // 4))
    return q2 + FUSION_FENCE * (q3 - q1)


def fusion_mask(
    base: Tensor, other: Tensor, *, sample_size: int | None = FUSION_SAMPLE_SIZE, generator: torch.Generator | None = None
) -> Tensor:
    """Where the other model's value is taken (bool, shaped like ``base``): the prepare step."""
    importance = fusion_importance(base, other)
    return importance >= fusion_threshold(importance, sample_size=sample_size, generator=generator)


def arcee_fusion(
    base: Tensor, other: Tensor, *, sample_size: int | None = FUSION_SAMPLE_SIZE, generator: torch.Generator | None = None
) -> Tensor:
    """``b + (x - b) * mask``."""
    mask = fusion_mask(base, other, sample_size=sample_size, generator=generator)
    return base + (other - base) * mask.to(base.dtype)


# --------------------------------------------------------------------------- steps (evomerge.methods.steps)
def fusion_mask_cache(inputs: Inputs) -> Cache:
    """The mask of exact quantiles (one byte per entry), computed from the base and the model."""
    return Cache("fusion_mask", "fusion mask", inputs.numel,
                 lambda: fusion_mask(inputs.base(), inputs.x(0), sample_size=None), reads=(0,))


def fusion_caches(inputs: Inputs, p: Mapping[str, Any]) -> list[Cache]:
    return [fusion_mask_cache(inputs)]


@dataclass
class MaskedTake(Prepared):
    """Where the model's value is taken (bool, flat)."""

    mask: Tensor


def fusion_prepare(inputs: Inputs, p: Mapping[str, Any]) -> MaskedTake:
    if inputs.n != 1:
        raise ValueError("arcee_fusion merges a base and exactly one model")
    mask = inputs.cached(fusion_mask_cache(inputs))
    if mask is None:
        mask = fusion_mask(inputs.base(), inputs.x(0), sample_size=None)
    return MaskedTake(mask.reshape(-1))


def fusion_combine(prep: MaskedTake, inputs: Inputs, sl: slice | None) -> Tensor:
    """``b + (x - b) * mask`` on the elements ``sl`` (the order :func:`arcee_fusion` uses)."""
    whole = slice(0, inputs.numel) if sl is None else sl
    b, x = inputs.cv(inputs.base_flat()[whole]), inputs.cv(inputs.x_flat(0)[whole])
    out = b + (x - b) * prep.mask[whole].to(b.dtype)
    return out.view(inputs.shape) if sl is None else out
