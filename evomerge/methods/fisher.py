"""Fisher merging (Matena & Raffel, "Merging Models with Fisher-Weighted Averaging", 2022,
https://arxiv.org/abs/2111.09832): a per-parameter weighted average in which each model's
parameter counts as much as that model's (diagonal) Fisher information says it matters,

    ``theta* = sum_i w_i F_i theta_i / sum_i w_i F_i``    (elementwise)

with ``F_i`` the diagonal Fisher of model ``i`` (the mean of squared gradients of the
log-likelihood of calibration text, computed by :mod:`evomerge.statistics`, kind ``"fisher"``)
and ``w_i`` the per-model ``weight`` (the paper's lambda_i).

``fisher_floor``: every ``F_i`` is raised to at least this value before weighting (the paper's
reference code does the same). It keeps the denominator away from zero where no model's
parameter got a gradient (positions the calibration text never touches, e.g. unused embedding
rows), and there the merge falls back to the plain ``weight``-weighted average. Fisher values
are in the units of squared gradients of a sequence log-likelihood; the default 1e-6 is far
below those of parameters the text uses.

A tensor for which the statistics hold no Fisher (none was computed for it) is averaged with the
weights alone, as if every ``F_i`` were at the floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from evomerge.methods.steps import Cache, Inputs, Prepared

FISHER_FLOOR = 1e-6


def fisher_merge(tensors: Sequence[Tensor], fishers: Sequence[Tensor | None], *, weights: Sequence[float],
                 floor: float = FISHER_FLOOR) -> Tensor:
    """``sum_i w_i max(F_i, floor) x_i / sum_i w_i max(F_i, floor)``; ``fishers[i]`` is shaped
    like ``tensors[i]`` (None: no Fisher, counts as ``floor`` everywhere)."""
    num = torch.zeros_like(tensors[0])
    den = torch.zeros_like(tensors[0])
    for x, f, w in zip(tensors, fishers, weights):
        wf = _weighted(f, float(w), floor, x)
        num.add_(wf * x)
        den.add_(wf)
    return num / den


def _weighted(f: Tensor | None, w: float, floor: float, like: Tensor) -> Tensor:
    if f is None:
        return torch.full_like(like, w * floor)
    return f.to(like.dtype).clamp_min(floor).mul_(w)  # clamp_min makes a new tensor: f is not written


def positive_weights(params: Mapping[str, Any]) -> str | None:
    """The registry's extra check: weights are non-negative, not all zero (else 0 / 0)."""
    ws = [float(w) for w in params["weight"]]
    if any(w < 0 for w in ws) or sum(ws) <= 0:
        return f"weight: expected non-negative weights with a positive sum, got {ws}"
    return None


# --------------------------------------------------------------------------- the two steps
def fisher_caches(inputs: Inputs, params: Mapping[str, Any]) -> list[Cache]:
    """Each model's Fisher for this tensor, kept per worker where the memory plan has room."""
    nbytes = inputs.numel * 4
    return [Cache("stat.fisher", "fisher", nbytes, lambda i=i: inputs.stat(i), reads=(i,)) for i in range(inputs.n)]


@dataclass
class FisherMix(Prepared):
    fishers: list[Tensor | None]  # per model, flat (as stored) or None
    weights: list[float]
    floor: float


def fisher_prepare(inputs: Inputs, p: Mapping[str, Any]) -> FisherMix:
    caches = fisher_caches(inputs, p)
    fishers = []
    for i, cache in enumerate(caches):
        f = inputs.cached(cache)
        if f is None:
            f = inputs.stat(i)
        fishers.append(None if f is None else f.reshape(-1))
    return FisherMix(fishers, [float(w) for w in p["weight"]], float(p["fisher_floor"]))


def fisher_combine(prep: FisherMix, inputs: Inputs, sl: slice | None) -> Tensor:
    whole = slice(0, inputs.numel) if sl is None else sl
    xs = [inputs.cv(inputs.x_flat(i)[whole]) for i in range(inputs.n)]
    fs = [None if f is None else f[whole].to(inputs.device) for f in prep.fishers]
    out = fisher_merge(xs, fs, weights=prep.weights, floor=prep.floor)
    return out if sl is not None else out.view(inputs.shape)
