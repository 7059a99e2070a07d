"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR
2023, https://arxiv.org/abs/2212.09849): merge each linear layer so that the merged layer's
outputs on every model's own inputs are as close as possible (least squares) to that model's.

For a torch ``Linear`` (``y = x W^T``, ``W`` shaped ``(out, in)``) and models ``i`` with inputs
``X_i`` (rows = tokens) and Gram matrices ``G_i = X_i^T X_i`` (``(in, in)``, computed by
:mod:`evomerge.statistics`, kind ``"gram"``), minimising ``sum_i w_i |X_i W^T - X_i W_i^T|^2``
gives

    ``W*^T = (sum_i w_i G_i)^-1  sum_i w_i G_i W_i^T``

``alpha`` shrinks each Gram's off-diagonal part, as the paper does (its "non-diagonal
multiplier"; alpha = 1 is plain least squares, alpha = 0 a per-input-feature weighted average):
``G_i <- alpha G_i + (1 - alpha) diag(G_i)``.

``weight`` (per model, default 1) scales each model's Gram: an evomerge extension that makes
the merge searchable per model; with equal weights it is the paper's RegMean.

Every other tensor (embeddings, norms, biases, a head without statistics) is the
``weight``-weighted average of the models, as the paper averages the non-linear weights.

Numerics: the system is solved in float64. An input feature that no calibration token ever
activates has a zero row and column in every Gram, so the system is singular there; a ridge
``eps = 1e-9 * mean(diag(S))`` pulls the solution toward the weighted average, which is what
those columns get (elsewhere the ridge changes the result by a relative ~1e-9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from evomerge.errors import MergeError
from evomerge.methods.steps import Cache, Inputs, Prepared

RIDGE = 1e-9  # relative to the mean diagonal of the summed Gram


def shrink(gram: Tensor, alpha: float) -> Tensor:
    """``alpha G + (1 - alpha) diag(G)``: the off-diagonal scaled, the diagonal kept exactly."""
    out = gram * alpha
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean(weights_: Sequence[Tensor], grams: Sequence[Tensor], *, weights: Sequence[float], alpha: float) -> Tensor:
    """The merged ``(out, in)`` weight of linear layers ``weights_[i]`` with input Grams
    ``grams[i]`` (``(in, in)``), in the dtype of ``weights_[0]``."""
    dtype = weights_[0].dtype
    s = None
    rhs = None
    avg = None
    total = float(sum(weights))
    for W, G, w in zip(weights_, grams, weights):
        G = shrink(G.to(torch.float64), alpha) * float(w)  # (in, in)
        Wt = W.to(torch.float64).T  # (in, out)
        s = G if s is None else s + G
        term = G @ Wt
        rhs = term if rhs is None else rhs + term
        aw = Wt * (float(w) / total)
        avg = aw if avg is None else avg + aw
    assert s is not None and rhs is not None and avg is not None
    eps = RIDGE * float(s.diagonal().mean().clamp_min(1e-30))
    s.diagonal().add_(eps)
    rhs = rhs + eps * avg
    return torch.linalg.solve(s, rhs).T.to(dtype)  # (out, in)


def average(tensors: Sequence[Tensor], *, weights: Sequence[float]) -> Tensor:
    total = float(sum(weights))
    out = tensors[0] * (float(weights[0]) / total)
    for x, w in zip(tensors[1:], weights[1:]):
        out = out + x * (float(w) / total)
    return out


# --------------------------------------------------------------------------- the two steps
def regmean_caches(inputs: Inputs, params: Mapping[str, Any]) -> list[Cache]:
    """Each model's input Gram for this tensor (a linear weight), kept per worker where the
    memory plan has room."""
    if len(inputs.shape) != 2:
        return []
    nbytes = inputs.shape[1] ** 2 * 4
    return [Cache("stat.gram", "gram", nbytes, lambda i=i: inputs.stat(i), reads=(i,)) for i in range(inputs.n)]


@dataclass
class LeastSquaresMix(Prepared):
    grams: list[Tensor] | None  # per model, (in, in); None: average
    weights: list[float]
    alpha: float
    chunked = False


def regmean_prepare(inputs: Inputs, p: Mapping[str, Any]) -> LeastSquaresMix:
    grams: list[Tensor] | None = []
    for i, cache in enumerate(regmean_caches(inputs, p)):
        g = inputs.cached(cache)
        if g is None:
            g = inputs.stat(i)
        if g is None:
            grams = None
            break
        grams.append(g)
    if not grams:
        grams = None
    if grams is not None and any(tuple(g.shape) != (inputs.shape[1], inputs.shape[1]) for g in grams):
        raise MergeError(f"regmean: Gram shapes {[tuple(g.shape) for g in grams]} do not fit a weight of shape "
                         f"{inputs.shape} (statistics of another model?)")
    return LeastSquaresMix(grams, [float(w) for w in p["weight"]], float(p["alpha"]))


def regmean_combine(prep: LeastSquaresMix, inputs: Inputs, sl: slice | None) -> Tensor:
    xs = [inputs.x(i) for i in range(inputs.n)]
    if prep.grams is None:
        return average(xs, weights=prep.weights)
    return regmean(xs, [g.to(inputs.device) for g in prep.grams], weights=prep.weights, alpha=prep.alpha)
