"""Interpolating methods: linear (model soup), slerp, nuslerp, nearswap, passthrough.

Pure functions, tensors in, tensor out; they compute in the dtype they are given (the engine
hands them float32 by default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from evomerge.methods.steps import Inputs, Prepared

SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: vectors are treated as colinear -> lerp
SLERP_NORM_EPS = 1e-8


def linear(tensors: Sequence[Tensor], *, weights: Sequence[float], normalize: bool = True) -> Tensor:
    """Model soup: ``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``.

    A weight sum of (almost) zero is not divided by (mergekit would return inf/NaN). The terms
    are added in model order and the division is a multiplication by ``1 / sum`` (computed in
    float64), so every implementation rounds identically.
    """
    bufs = [torch.empty_like(tensors[0]) for _ in range(2)]
    return weighted_sum_into(tensors, weights, linear_normalizer(weights, normalize), bufs)


def weighted_sum_into(xs: Sequence[Tensor], weights: Sequence[float], factor: float | None,
                      bufs: Sequence[Tensor]) -> Tensor:
    """``(x0*w0 + x1*w1 + ...) * factor`` (each product rounded, then added in order) computed in
    the two buffers ``bufs`` (shaped like the ``xs``); returns the first."""
    out, tmp = bufs[0], bufs[1]
    torch.mul(xs[0], float(weights[0]), out=out)
    for x, w in zip(xs[1:], weights[1:]):
        out.add_(torch.mul(x, float(w), out=tmp))
    return out if factor is None else out.mul_(factor)


def linear_normalizer(weights: Sequence[float], normalize: bool) -> float | None:
    """What :func:`linear` multiplies the weighted sum by: ``1 / sum(weights)``, or None when it
    does not divide (``normalize`` off, a sum of 1, or a sum of ~0)."""
    if not normalize:
        return None
    total = float(sum(float(w) for w in weights))
    return 1.0 / total if abs(total) >= 1e-8 and total != 1.0 else None


def slerp(base: Tensor, other: Tensor, *, t: float) -> Tensor:
    """Spherical interpolation between ``base`` (t=0) and ``other`` (t=1) over the whole tensor
    flattened; falls back to linear interpolation when the two directions are nearly colinear
    (``|cos| > 0.9995``), as mergekit does."""
    c0, c1 = slerp_coefficients(slerp_dot(base, other), t)
    return base * c0 + other * c1


def slerp_dot(base: Tensor, other: Tensor) -> float:
    """The cosine between the two tensors (flattened): slerp's only reduction."""
    return float((_unit(base) * _unit(other)).sum())


def slerp_coefficients(dot: float, t: float) -> tuple[float, float]:
    """``(c0, c1)`` with ``slerp = base * c0 + other * c1``."""
    if abs(dot) > SLERP_DOT_THRESHOLD:
        return 1 - t, t
    theta0 = math.acos(dot)
    sin0 = math.sin(theta0)
    return math.sin(theta0 - theta0 * t) / sin0, math.sin(theta0 * t) / sin0


def _unit(x: Tensor) -> Tensor:
    norm = float(torch.linalg.vector_norm(x))
    return x / norm if norm > SLERP_NORM_EPS else x


def nuslerp(
    tensors: Sequence[Tensor],
    *,
    weights: Sequence[float],
    base: Tensor | None = None,
    row_wise: bool = False,
    flatten: bool = True,
) -> Tensor:
    """mergekit's NuSLERP: slerp between two models with ``t = w_1 / (w_0 + w_1)``.

    With ``base`` it interpolates the task vectors ``x_i - base`` and adds the base back.
    ``flatten`` treats the tensor as one vector; otherwise each row (``row_wise``, dim 0) or each
    column (dim -1, the default) is interpolated on its own.
    """
    if len(tensors) != 2:
        raise ValueError("nuslerp merges exactly two models")
    total = float(weights[0]) + float(weights[1])
    t = 0.5 if abs(total) < 1e-6 else float(weights[1]) / total
    v0, v1 = tensors
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    out = _nuslerp_vectors(t, v0, v1, dim=0 if row_wise else -1, flatten=flatten)
    return out if base is None else base + out


def _nuslerp_vectors(t: float, v0: Tensor, v1: Tensor, *, dim: int, flatten: bool) -> Tensor:
    shape = v0.shape
    v0, v1 = nuslerp_view(v0, dim, flatten), nuslerp_view(v1, dim, flatten)
    out = nuslerp_combine(t, v0, v1, *nuslerp_angles(v0, v1))
    return nuslerp_unview(out, shape, dim, flatten)


def nuslerp_view(v: Tensor, dim: int, flatten: bool) -> Tensor:
    """The tensor as vectors along its last dimension (the whole tensor when ``flatten``)."""
    if flatten:
        return v.reshape(-1)  # (N,)
    return v.transpose(dim, -1) if dim != -1 else v


def nuslerp_unview(out: Tensor, shape: torch.Size, dim: int, flatten: bool) -> Tensor:
    if not flatten and dim != -1:
        out = out.transpose(dim, -1)
    return out.reshape(shape)


def nuslerp_angles(v0: Tensor, v1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(theta, safe_sin, colinear)`` per vector (shape ``(..., 1)``): everything of nuslerp that
    does not depend on ``t``."""
    n0 = v0 / torch.linalg.vector_norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    n1 = v1 / torch.linalg.vector_norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (n0 * n1).sum(dim=-1, keepdim=True).clamp(-1, 1)  # (..., 1)
    theta = torch.acos(cos)
    sin = torch.sin(theta)
    colinear = sin.abs() < 1e-8  # (..., 1)
    safe_sin = torch.where(colinear, torch.ones_like(sin), sin)
    return theta, safe_sin, colinear


def nuslerp_coefficients(t: float, theta: Tensor) -> tuple[Tensor, Tensor]:
    """``(sin((1 - t) theta), sin(t theta))`` per vector."""
    return torch.sin((1 - t) * theta), torch.sin(t * theta)


def nuslerp_combine(t: float, v0: Tensor, v1: Tensor, theta: Tensor, safe_sin: Tensor, colinear: Tensor) -> Tensor:
    """The elementwise half of nuslerp (the order of operations is part of the contract)."""
    a, b = nuslerp_coefficients(t, theta)
    spherical = (v0 * a + v1 * b) / safe_sin
    return torch.where(colinear, v0 * (1 - t) + v1 * t, spherical)


def nearswap(base: Tensor, other: Tensor, *, t: float) -> Tensor:
    """DistanceBlend: take ``other`` where it is close to ``base``; per element the weight of
    ``other`` is ``clamp(t / |base - other|, 0, 1)`` (distances below 1e-6 count as 1e-6)."""
    return nearswap_into(base, other, t, [torch.empty_like(base) for _ in range(3)])


def nearswap_into(base: Tensor, other: Tensor, t: float, bufs: Sequence[Tensor]) -> Tensor:
    """:func:`nearswap` in three buffers shaped like ``base``: ``w = clamp(reciprocal(dist) * t,
    0, 1)`` (what ``t / dist`` computes in torch; explicit for the kernels), then
    ``w * other + (1 - w) * base``."""
    w, out, tmp = bufs[0], bufs[1], bufs[2]
    torch.sub(base, other, out=w).abs_().clamp_(min=1e-6).reciprocal_().mul_(float(t)).clamp_(0, 1)
    torch.mul(w, other, out=out)
    torch.mul(w, -1.0, out=tmp).add_(1.0).mul_(base)  # (1 - w) * base
    return out.add_(tmp)


def passthrough(tensors: Sequence[Tensor], *, scale: float | None = None) -> Tensor:
    """Copy one model's tensor (frankenmerge slices), optionally multiplied by ``scale``."""
    if len(tensors) != 1:
        raise ValueError("passthrough takes exactly one tensor per output tensor")
    x = tensors[0]
    return x if scale is None or scale == 1 else x * scale


# --------------------------------------------------------------------------- steps (evomerge.methods.steps)
def _chunk(inputs: Inputs, flat: Tensor, sl: slice | None) -> Tensor:
    return inputs.cv(flat if sl is None else flat[sl])


def _shaped(inputs: Inputs, out: Tensor, sl: slice | None) -> Tensor:
    return out.view(inputs.shape) if sl is None else out


@dataclass
class WeightedSum(Prepared):
    """``(t0*w0 + t1*w1 + ...) * factor`` of input tensors (``terms``: -1 = the base, i = model i)."""

    terms: tuple[int, ...]
    weights: tuple[float, ...]
    factor: float | None = None

    def term(self, inputs: Inputs, j: int) -> Tensor:
        return inputs.base_flat() if j < 0 else inputs.x_flat(j)


def weighted_sum_combine(prep: WeightedSum, inputs: Inputs, sl: slice | None) -> Tensor:
    xs = [_chunk(inputs, prep.term(inputs, j), sl) for j in prep.terms]
    if len(xs) == 1 and prep.weights[0] == 1 and prep.factor is None:
        return _shaped(inputs, xs[0], sl)  # a copy (passthrough without scale)
    out = weighted_sum_into(xs, prep.weights, prep.factor, inputs.scratch(xs[0].numel(), 2))
    return _shaped(inputs, out, sl)


def linear_prepare(inputs: Inputs, p: Mapping[str, Any]) -> WeightedSum:
    weights = tuple(float(w) for w in p["weight"])
    return WeightedSum(tuple(range(inputs.n)), weights, linear_normalizer(p["weight"], p["normalize"]))


def passthrough_prepare(inputs: Inputs, p: Mapping[str, Any]) -> WeightedSum:
    if inputs.n != 1:
        raise ValueError("passthrough takes exactly one tensor per output tensor")
    scale = p["scale"][0]
    return WeightedSum((0,), (1.0 if scale is None else float(scale),))


def slerp_prepare(inputs: Inputs, p: Mapping[str, Any]) -> WeightedSum:
    dot = inputs.memo(("slerp_dot",), (0,), lambda: slerp_dot(inputs.base(), inputs.x(0)))
    c0, c1 = slerp_coefficients(dot, p["t"])
    return WeightedSum((-1, 0), (c0, c1))


@dataclass
class DistanceBlend(Prepared):
    t: float


def nearswap_prepare(inputs: Inputs, p: Mapping[str, Any]) -> DistanceBlend:
    return DistanceBlend(float(p["t"]))


def nearswap_combine(prep: DistanceBlend, inputs: Inputs, sl: slice | None) -> Tensor:
    b, x = _chunk(inputs, inputs.base_flat(), sl), _chunk(inputs, inputs.x_flat(0), sl)
    return _shaped(inputs, nearswap_into(b, x, prep.t, inputs.scratch(b.numel(), 3)), sl)


@dataclass
class SphericalBlend(Prepared):
    """nuslerp's angles (trial-invariant) and ``t``; chunked only when ``flatten``."""

    t: float
    theta: Tensor
    safe_sin: Tensor
    colinear: Tensor
    dim: int
    flatten: bool

    @property
    def chunked(self) -> bool:  # type: ignore[override]
        return self.flatten

    def coefficients(self) -> tuple[Tensor, Tensor]:
        return nuslerp_coefficients(self.t, self.theta)


def nuslerp_prepare(inputs: Inputs, p: Mapping[str, Any]) -> SphericalBlend:
    if inputs.n != 2:
        raise ValueError("nuslerp merges exactly two models")
    w = p["weight"]
    total = float(w[0]) + float(w[1])
    t = 0.5 if abs(total) < 1e-6 else float(w[1]) / total
    dim, flatten = (0 if p["nuslerp_row_wise"] else -1), bool(p["nuslerp_flatten"])
    theta, safe_sin, colinear = inputs.memo(("nuslerp_angles", dim, flatten), (0, 1), lambda: nuslerp_angles(
        nuslerp_view(inputs.delta(0), dim, flatten), nuslerp_view(inputs.delta(1), dim, flatten)))
    return SphericalBlend(t, theta, safe_sin, colinear, dim, flatten)


def nuslerp_combine_step(prep: SphericalBlend, inputs: Inputs, sl: slice | None) -> Tensor:
    args = (prep.theta, prep.safe_sin, prep.colinear)
    if prep.flatten:
        x0, x1 = _chunk(inputs, inputs.x_flat(0), sl), _chunk(inputs, inputs.x_flat(1), sl)
        if not inputs.has_base:
            return _shaped(inputs, nuslerp_combine(prep.t, x0, x1, *args), sl)
        bb = _chunk(inputs, inputs.base_flat(), sl)
        return _shaped(inputs, bb + nuslerp_combine(prep.t, x0 - bb, x1 - bb, *args), sl)
    v0, v1 = inputs.delta(0), inputs.delta(1)
    out = nuslerp_unview(nuslerp_combine(prep.t, nuslerp_view(v0, prep.dim, False), nuslerp_view(v1, prep.dim, False),
                                         *args), v0.shape, prep.dim, False)
    return inputs.base() + out if inputs.has_base else out
