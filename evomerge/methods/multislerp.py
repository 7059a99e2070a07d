"""Multi-SLERP: a weighted barycentre of several models on the hypersphere (mergekit 0.1.5's
``multislerp``; https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

The method as mergekit states it, for points ``v_i`` (the models, or their task vectors
``x_i - base`` when a base is given) and weights ``w_i`` (divided by their sum when
``normalize_weights``):

1. project to the unit sphere: ``u_i = v_i / (|v_i| + eps)``;
2. take the weighted Euclidean mean ``m = sum_i w_i u_i`` and its direction ``m^ = m / |m|``;
3. project each ``u_i`` onto the tangent plane at ``m^``: ``t_i = u_i - <u_i, m^> m^``;
4. average there, ``T = sum_i w_i t_i``, and map back with the exponential map,
   ``m^ cos(|T| + eps) + T sin(|T| + eps) / (|T| + eps)``;
5. scale by the weighted mean norm ``s = sum_i w_i |v_i|`` (and add the base back).

Step 4 moves nowhere: ``sum_i w_i <u_i, m^> = <m, m^> = |m|``, so ``T = m - |m| m^ = 0``
exactly. The result is therefore the closed form

    ``s * cos(eps) * m / |m|  =  sum_i k_i v_i``  with  ``k_i = s cos(eps) w_i / ((|v_i| + eps) |m|)``

and ``|m|^2 = sum_ij w_i w_j G_ij / ((|v_i| + eps)(|v_j| + eps))`` with ``G`` the Gram matrix of
the ``v_i``. That is what this module computes: the Gram matrix once (trial-invariant,
:func:`multislerp_prepare`), then per trial a few scalars and one weighted sum
(:func:`multislerp_combine`). mergekit runs the literal steps on the full float32 tensors (the
``T`` it computes is rounding noise); its rounding error grows with the tensor's size (measured
against a float64 evaluation: about 1 ulp of the largest output entry at 3k entries, 3-16 at
130k, 250-1000 at 2M), while this closed form stays within about 1 ulp at every size. So the two
agree to mergekit's float32 rounding, not bit for bit. A barycentre that does move in the tangent space (iterated to a fixed
point) is the weighted Karcher mean: see :mod:`evomerge.methods.karcher`.

Edge cases, as mergekit:
- one model: that model's tensor, unchanged (the base and the weight are ignored);
- ``|m| < eps`` (the weighted directions cancel): with two models the weighted sum
  ``w_0 v_0 + w_1 v_1`` (+ base); with more, an error (there is no direction to take);
- a zero vector contributes no direction (``u_i = 0``) and no norm (also with ``eps = 0``,
  where mergekit's ``0 / 0`` gives NaN).
Departure: when every model with a non-zero weight is a zero vector (with a base: every such
model equals the base, as untouched tensors of fine-tunes do), the result is the zero vector
(the base); mergekit raises for three or more models.
Departure: with ``normalize_weights`` a weight sum of (almost) zero (``|sum| < 1e-8``) is not
divided by (mergekit divides and returns NaN), as :func:`evomerge.methods.interpolate.linear`.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

from torch import Tensor

from evomerge.methods.interpolate import WeightedSum, weighted_sum_combine
from evomerge.methods.sphere import gram64, norms_from_gram, weighted_sum
from evomerge.methods.steps import Inputs, Prepared
from evomerge.methods.task_arithmetic import MM_NONE, SM_NONE, ModelSpec, TaskVectorMix, gta_combine

MULTISLERP_EPS = 1e-8
WEIGHT_SUM_EPS = 1e-8  # below this |sum of weights| normalize_weights does not divide

class MultislerpParts(NamedTuple):
    """The trial-invariant part: the points (models or task vectors), their norms and Gram matrix."""

    vectors: list[Tensor]  # n x (*shape): x_i, or x_i - base
    norms: list[float]  # |v_i|
    gram: Tensor  # (n, n) float64, <v_i, v_j>


def multislerp_prepare(tensors: Sequence[Tensor], *, base: Tensor | None = None) -> MultislerpParts:
    """Everything of multislerp that does not depend on the weights."""
    vectors = [x - base for x in tensors] if base is not None else list(tensors)
    gram = gram64(vectors)
    return MultislerpParts(vectors, norms_from_gram(gram), gram)


def multislerp_coefficients(
    parts: MultislerpParts, weights: Sequence[float], *, normalize_weights: bool = True, eps: float = MULTISLERP_EPS
) -> list[float]:
    """The ``k_i`` with ``multislerp = sum_i k_i v_i`` (+ base); raises ValueError when the
    weighted directions of three or more models cancel."""
    w = [float(x) for x in weights]
    total = math.fsum(w)
    if normalize_weights and abs(total) >= WEIGHT_SUM_EPS:
        w = [x / total for x in w]
    n = len(w)
    a = [w[i] / (parts.norms[i] + eps) if parts.norms[i] > 0 else 0.0 for i in range(n)]  # m = sum_i a_i v_i
    g = parts.gram.tolist()
    mean_sq = math.fsum(a[i] * a[j] * g[i][j] for i in range(n) for j in range(n))
    mean_norm = math.sqrt(max(mean_sq, 0.0))
    if mean_norm < eps:
        if n == 2:
            return w
        if all(wi == 0 or ni == 0 for wi, ni in zip(w, parts.norms)):
            return [0.0] * n  # nothing to average: the zero vector (the base, with a base)
        raise ValueError(
            "multislerp: the weighted directions of the models cancel (antipodal tensors with "
            "balancing weights); change the weights"
        )
    scale = math.fsum(wi * ni for wi, ni in zip(w, parts.norms)) * math.cos(eps) / mean_norm
    return [scale * ai for ai in a]


def multislerp_combine(
    parts: MultislerpParts,
    weights: Sequence[float],
    *,
    base: Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = MULTISLERP_EPS,
) -> Tensor:
    """The per-trial step: ``sum_i k_i v_i`` (+ base)."""
    out = weighted_sum(parts.vectors, multislerp_coefficients(parts, weights, normalize_weights=normalize_weights, eps=eps))
    return out if base is None else base + out


def multislerp(
    tensors: Sequence[Tensor],
    *,
    weights: Sequence[float],
    base: Tensor | None = None,
    normalize_weights: bool = True,
    eps: float = MULTISLERP_EPS,
) -> Tensor:
    """Multi-SLERP of ``tensors`` (see the module docstring); one model returns it unchanged."""
    if len(tensors) == 1:
        return tensors[0]
    parts = multislerp_prepare(tensors, base=base)
    return multislerp_combine(parts, weights, base=base, normalize_weights=normalize_weights, eps=eps)


# --------------------------------------------------------------------------- steps (evomerge.methods.steps)
def multislerp_gram(inputs: Inputs) -> Tensor:
    """The float64 Gram matrix of the points (task vectors with a base, else the models),
    memoized: the trial-invariant part (karcher's Gram of the same models is the same value)."""
    n = inputs.n
    key = ("gram64", "deltas" if inputs.has_base else "models")
    return inputs.memo(key, tuple(range(n)), lambda: gram64([inputs.delta(i) for i in range(n)]))


def multislerp_prepare_step(inputs: Inputs, p: Mapping[str, Any]) -> WeightedSum | TaskVectorMix:
    """Per trial: the coefficients ``k_i`` from the cached Gram matrix, as the linear mix the
    fused kernels know: a weighted sum of the models, or (with a base) task arithmetic with
    weights ``k_i`` (``base + sum_i (x_i - base) k_i``, the order :func:`multislerp_combine` uses)."""
    n = inputs.n
    if n == 1:  # that model, unchanged
        return WeightedSum((0,), (1.0,))
    gram = multislerp_gram(inputs)
    parts = MultislerpParts([], norms_from_gram(gram), gram)
    k = multislerp_coefficients(parts, p["weight"], normalize_weights=bool(p["normalize_weights"]), eps=float(p["eps"]))
    if not inputs.has_base:
        return WeightedSum(tuple(range(n)), tuple(k))
    return TaskVectorMix([ModelSpec(MM_NONE, SM_NONE, ki, inputs.shape) for ki in k], k, None, False, 1.0)


def multislerp_combine_step(prep: Prepared, inputs: Inputs, sl: slice | None) -> Tensor:
    if isinstance(prep, WeightedSum):
        return weighted_sum_combine(prep, inputs, sl)
    return gta_combine(prep, inputs, sl)  # type: ignore[arg-type]


def multislerp_kernel(prep: Prepared) -> str:
    """The fused kernel of the prepared value (see :mod:`evomerge.kernels`)."""
    return "weighted_sum" if isinstance(prep, WeightedSum) else "task_vector_mix"
