"""Karcher mean: the weighted Riemannian barycentre of the models' directions on the unit
hypersphere, scaled by their weighted mean norm (mergekit 0.1.5's ``karcher``;
arXiv 2603.04972).

For tensors ``x_i`` with norms ``n_i`` and weights ``a_i`` (mergekit's method: ``1 / n`` each),
the directions ``u_i = x_i / n_i`` of the tensors with ``n_i > tol`` are averaged by Riemannian
gradient descent with unit step, starting from their normalized arithmetic mean (or the first
of them, when that mean is shorter than ``tol``):

    ``T = sum_i a'_i theta_i / sin(theta_i) * (u_i - cos(theta_i) m)``,  ``theta_i = acos <m, u_i>``

(``a'`` the weights renormalized over those tensors; a ``u_i`` within ``tol`` radians of ``m``
adds nothing; nor does one at angle 0, where mergekit's ``0 / sin 0`` with ``tol = 0``
gives NaN), then ``m <- cos|T| m + sin|T| T / |T|``, renormalized; stop when ``|T| < tol`` or
after ``max_iter`` steps. The result is ``(sum_i a_i n_i) m`` (all tensors, raw weights). No
tensor longer than ``tol``: zeros. One tensor: that tensor.

The mean stays in the span of the ``u_i``, so the whole iteration runs on the ``(n, n)`` Gram
matrix of the tensors in float64 (:func:`karcher_prepare`, trial-invariant) and the tensors are
touched once, by the final weighted sum (:func:`karcher_combine`). mergekit iterates on the full
tensors in float32, with a rounding error that grows with the tensor's size (measured against a
float64 evaluation: about 1 ulp of the largest output entry at 3k entries, 65 at 2M); this
module stays within about 1 ulp. The two agree to mergekit's float32 rounding, not bit for bit. The step
length is read off the Gram matrix, ``sqrt(t^T G t)``, so it is known to about ``1e-8`` (the
square root of float64 rounding): a ``tol`` below that stops only at ``max_iter`` (the steps
themselves stay accurate, and mergekit's float32 iteration has a higher floor).

mergekit's ``karcher`` has no weights: its recipe averages every input tensor with equal weight
(a ``base_model``, if the recipe names one, is one more input: the registry's base use
``"input"``). ``weights`` here is for callers that want the weighted mean (mergekit's own
``karcher_merge_tensors`` takes them too); the registry entry exposes none, so a recipe means the
same thing in both tools.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from evomerge.methods.interpolate import WeightedSum
from evomerge.methods.sphere import gram64, norms_from_gram, weighted_sum
from evomerge.methods.steps import Inputs

KARCHER_MAX_ITER = 10
KARCHER_TOL = 1e-5

class KarcherParts(NamedTuple):
    """The trial-invariant part: the tensors, their norms and their Gram matrix."""

    tensors: list[Tensor]
    norms: list[float]
    gram: Tensor  # (n, n) float64


def karcher_prepare(tensors: Sequence[Tensor]) -> KarcherParts:
    gram = gram64(tensors)
    return KarcherParts(list(tensors), norms_from_gram(gram), gram)


def karcher_mean_coordinates(
    parts: KarcherParts, weights: Sequence[float], *, max_iter: int = KARCHER_MAX_ITER, tol: float = KARCHER_TOL
) -> tuple[list[float], int]:
    """``(beta, steps)``: the mean direction as ``m = sum_i beta_i u_i`` and the number of steps
    taken. ``beta`` is all zeros when no tensor is longer than ``tol``."""
    n = len(parts.norms)
    valid = [i for i in range(n) if parts.norms[i] > tol]
    if not valid:
        return [0.0] * n, 0
    norms = torch.tensor(parts.norms, dtype=torch.float64)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    units_gram = parts.gram / safe[:, None] / safe[None, :]  # <u_i, u_j>
    units_gram[norms == 0, :] = 0.0
    units_gram[:, norms == 0] = 0.0
    a_total = math.fsum(float(weights[i]) for i in valid)
    alpha = torch.zeros(n, dtype=torch.float64)
    for i in valid:
        alpha[i] = float(weights[i]) / a_total

    def length(c: Tensor) -> float:  # |sum_i c_i u_i|
        return math.sqrt(max(float(c @ units_gram @ c), 0.0))

    beta = alpha.clone()
    start = length(beta)
    if start < tol:
        beta = torch.zeros(n, dtype=torch.float64)
        beta[valid[0]] = 1.0
    else:
        beta = beta / start
    steps = 0
    for _ in range(max_iter):
        cos = (units_gram @ beta).clamp(-1.0, 1.0)  # <m, u_i>
        tangent = torch.zeros(n, dtype=torch.float64)
        for i in valid:
            theta = math.acos(float(cos[i]))
            if theta < tol or theta == 0.0:  # no pull (and no 0/0 when tol is 0)
                continue
            c = float(alpha[i]) * theta / math.sin(theta)
            tangent[i] += c
            tangent -= c * float(cos[i]) * beta
        step = length(tangent)
        if step < tol:
            break
        beta = math.cos(step) * beta + (math.sin(step) / step) * tangent
        steps += 1
        size = length(beta)
        if size > tol:
            beta = beta / size
    return beta.tolist(), steps


def karcher_combine(
    parts: KarcherParts,
    weights: Sequence[float] | None = None,
    *,
    max_iter: int = KARCHER_MAX_ITER,
    tol: float = KARCHER_TOL,
) -> Tensor:
    """``(sum_i a_i n_i) * sum_i beta_i x_i / n_i``: one weighted sum of the tensors."""
    return weighted_sum(parts.tensors, karcher_coefficients(parts, weights, max_iter=max_iter, tol=tol))


def karcher_coefficients(
    parts: KarcherParts,
    weights: Sequence[float] | None = None,
    *,
    max_iter: int = KARCHER_MAX_ITER,
    tol: float = KARCHER_TOL,
) -> list[float]:
    """The ``c_i`` with ``karcher = sum_i c_i x_i`` (equal weights unless ``weights``)."""
    n = len(parts.norms)
    w = [1.0 / n] * n if weights is None else [float(x) for x in weights]
    beta, _ = karcher_mean_coordinates(parts, w, max_iter=max_iter, tol=tol)
    scale = math.fsum(wi * ni for wi, ni in zip(w, parts.norms))
    return [scale * b / ni if ni > 0 else 0.0 for b, ni in zip(beta, parts.norms)]


def karcher(
    tensors: Sequence[Tensor],
    *,
    weights: Sequence[float] | None = None,
    max_iter: int = KARCHER_MAX_ITER,
    tol: float = KARCHER_TOL,
) -> Tensor:
    """The Karcher mean of ``tensors`` (equal weights unless ``weights``); one tensor returns it."""
    if len(tensors) == 1:
        return tensors[0]
    return karcher_combine(karcher_prepare(tensors), weights, max_iter=max_iter, tol=tol)


# --------------------------------------------------------------------------- steps (evomerge.methods.steps)
def karcher_prepare_step(inputs: Inputs, p: Mapping[str, Any]) -> WeightedSum:
    """The whole iteration on the memoized Gram matrix (trial-invariant; every input, a recipe's
    base included, is a model here), then one weighted sum of the models."""
    n = inputs.n
    if n == 1:  # that tensor, unchanged
        return WeightedSum((0,), (1.0,))
    gram = inputs.memo(("gram64", "models"), tuple(range(n)), lambda: gram64([inputs.x(i) for i in range(n)]))
    parts = KarcherParts([], norms_from_gram(gram), gram)
    return WeightedSum(tuple(range(n)), tuple(karcher_coefficients(parts, max_iter=int(p["max_iter"]), tol=float(p["tol"]))))
