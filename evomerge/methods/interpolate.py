"""Interpolating methods: linear (model soup), slerp, nuslerp, nearswap, passthrough.

Pure functions, tensors in, tensor out; they compute in the dtype they are given (the engine
hands them float32 by default).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

SLERP_DOT_THRESHOLD = 0.9995  # |cos| above this: vectors are treated as colinear -> lerp
SLERP_NORM_EPS = 1e-8


def linear(tensors: Sequence[Tensor], *, weights: Sequence[float], normalize: bool = True) -> Tensor:
    """Model soup: ``sum_i w_i x_i``, divided by ``sum_i w_i`` when ``normalize``.

    A weight sum of (almost) zero is not divided by (mergekit would return inf/NaN). The terms
    are added in model order and the division is a multiplication by ``1 / sum`` (computed in
    float64), so every implementation rounds identically.
    """
    out = tensors[0] * float(weights[0])
    for x, w in zip(tensors[1:], weights[1:]):
        out = out + x * float(w)
    factor = linear_normalizer(weights, normalize)
    return out if factor is None else out * factor


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
    """NearSwap: take ``other`` where it is close to ``base``; per element the weight of
    ``other`` is ``clamp(t / |base - other|, 0, 1)`` (distances below 1e-6 count as 1e-6)."""
    dist = (base - other).abs().clamp(min=1e-6)
    w = (torch.reciprocal(dist) * t).clamp(0, 1)  # what `t / dist` computes in torch; explicit for the kernels
    return w * other + (1 - w) * base


def passthrough(tensors: Sequence[Tensor], *, scale: float | None = None) -> Tensor:
    """Copy one model's tensor (frankenmerge slices), optionally multiplied by ``scale``."""
    if len(tensors) != 1:
        raise ValueError("passthrough takes exactly one tensor per output tensor")
    x = tensors[0]
    return x if scale is None or scale == 1 else x * scale
