"""Task-vector methods: task arithmetic, TIES, DARE, breadcrumbs, DELLA (and their *_ties/_linear kin).

All of them share one shape, so they are one function, ``generalized_task_arithmetic``, and the
registry (``evomerge.methods``) names the variants as data: which sparsifier, which sign consensus,
which defaults. The building blocks (sparsifiers, rescaling, sign election) are public pure
functions so the workspace (#6) and the tests can use them one by one.

Semantics follow mergekit:
- deltas are ``model - base``; each is sparsified on its own, *then* weighted;
- TIES sign election runs on the weighted deltas (``sum``: sign of their sum, ``>= 0`` counts as +);
- with ``normalize`` the mix is divided by the sum of the weights that survived the election,
  per element (a zero divisor becomes 1);
- ``lambda`` scales the final mixed delta.

Where mergekit and the papers differ we support both (see ``rescale_mode``):
- mergekit rescales the surviving entries of a DARE/DELLA delta so its L1 norm is unchanged
  (``rescale_mode="l1"``, the default, so recipes mean the same thing in both tools);
- the papers divide each survivor by its keep probability (``rescale_mode="keep_prob"``:
  ``1/density`` for DARE, ``1/p_i`` for DELLA), which keeps the delta unbiased in expectation.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import Tensor

Consensus = Literal["sum", "count"]
Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
RescaleMode = Literal["l1", "keep_prob"]

_RESCALE_EPS = 1e-7  # below this norm a masked delta is returned unscaled (as mergekit does)


# --------------------------------------------------------------------------- masks
def top_k_mask(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries of ``values``, ties broken by flat index (lower
    index first): exactly the first ``k`` entries of a *stable* descending sort, so the result is
    deterministic on every device (``torch.topk`` alone picks arbitrarily among ties).

    Equivalently ``descending_ranks(values) < k``; the workspace (#6) uses cached ranks, the engine
    this function (one ``topk`` plus a scan over the entries tied with the k-th value).
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    thr = torch.topk(flat, k, largest=True, sorted=False).values.min()  # the k-th largest value
    above = flat > thr
    tied = flat == thr
    room = k - above.sum()  # how many of the tied entries are kept (0-dim, no host sync)
    keep = above | (tied & (torch.cumsum(tied, 0) <= room))
    return keep.reshape(values.shape)


def descending_ranks(values: Tensor) -> Tensor:
    """Each entry's position (int64) in the stable descending order of ``values`` (value desc,
    flat index asc): ``top_k_mask(values, k) == (descending_ranks(values) < k)`` for every k."""
    flat = values.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel(), device=flat.device)
    return ranks.reshape(values.shape)


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * N)`` entries of largest magnitude (TIES' trim step); among equal
    magnitudes the lower flat index is kept (see :func:`top_k_mask`).

    Returns a mask of ``delta``'s dtype. ``density >= 1`` keeps everything; when
    ``int(density * N)`` is 0 nothing is kept (mergekit aborts in that case).
    """
    if density >= 1:
        return torch.ones_like(delta)
    return top_k_mask(delta.abs(), int(density * delta.numel())).to(delta.dtype)


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """``(n_top, n_bot)``: how many largest-magnitude outliers and smallest entries breadcrumbs
    drops from ``n`` entries so that ``int(density * n)`` remain."""
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:  # not enough room: trim fewer outliers
        n_top += n_bot
        n_bot = 0
    return n_top, n_bot


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest-magnitude outliers, then the
    smallest entries, so ``int(density * N)`` entries remain (the entries of descending magnitude
    rank ``n_top <= r < N - n_bot``; ties by flat index, as :func:`top_k_mask`).

    If ``density + gamma > 1`` fewer outliers are dropped so the density is met (as mergekit).
    Unlike mergekit 0.1.x, ``int(gamma * N) == 0`` drops *no* outlier instead of the whole tensor.
    ``density >= 1`` keeps everything (gamma is then ignored, as in mergekit).
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    n_top, n_bot = breadcrumbs_counts(n, density, gamma)
    mag = delta.abs()
    keep = top_k_mask(mag, n - n_bot)
    if n_top > 0:
        keep = keep & ~top_k_mask(mag, n_top)
    return keep.to(delta.dtype)


def bernoulli_mask(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return torch.ones_like(delta)
    probs = torch.full_like(delta, density)
    return torch.bernoulli(probs, generator=generator)


def della_row_ranks(delta: Tensor) -> Tensor:
    """Ascending magnitude rank (int64) of each entry within its row (dim 1; a 1-D tensor is one
    row), ties by position (a stable sort), shaped like ``delta``."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta  # (rows, cols, ...)
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    shape = [1] * rows.dim()
    shape[1] = n
    ramp = torch.arange(n, device=delta.device).reshape(shape).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, ramp)
    return ranks.reshape(delta.shape)


def della_probs_from_ranks(ranks: Tensor, n: int, density: float, epsilon: float,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """``(density - epsilon) + rank * 2 epsilon / (n - 1)``, as ``rank * step + low`` (two
    roundings in ``dtype``; the workspace's fused kernels compute exactly this)."""
    step = 2 * epsilon / (n - 1)
    return ranks.to(dtype) * step + (density - epsilon)


def della_keep_probs(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities: within each row (dim 1; 1-D tensors are one row),
    rank entries by magnitude (ties by position) and spread the probabilities linearly over
    ``[density - epsilon, density + epsilon]``, larger magnitude -> more likely kept.

    A row of one entry gets ``density`` (mergekit would produce NaN there).
    """
    n = delta.shape[1] if delta.dim() >= 2 else delta.shape[0]
    if n < 2:
        return torch.full_like(delta, density)
    return della_probs_from_ranks(della_row_ranks(delta), n, density, epsilon, delta.dtype)


def della_mask(
    delta: Tensor, density: float, epsilon: float, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Sample DELLA's mask; returns ``(mask, keep_probs)``."""
    if density >= 1:
        ones = torch.ones_like(delta)
        return ones, ones
    probs = della_keep_probs(delta, density, epsilon)
    return torch.bernoulli(probs, generator=generator), probs


def rescale_l1(delta: Tensor, masked: Tensor) -> Tensor:
    """Scale ``masked`` so its L1 norm equals ``delta``'s (mergekit's ``rescale``)."""
    return masked * l1_scale(delta.abs().sum(), masked.abs().sum())


def l1_scale(before: Tensor, after: Tensor) -> Tensor:
    """The L1 rescale factor ``before / after`` as a 0-dim tensor; 1 when either norm is below
    1e-7 (then the masked delta is returned unscaled, as mergekit does). No host sync."""
    small = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
    return torch.where(small, torch.ones_like(before), before / torch.where(small, torch.ones_like(after), after))


def sparsify(
    delta: Tensor,
    method: Sparsifier,
    *,
    density: float = 1.0,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    rescale: bool = False,
    rescale_mode: RescaleMode = "l1",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sparsify one task vector. ``rescale`` applies to every sparsifier (mergekit enables it by
    default only for DARE/DELLA); ``keep_prob`` rescaling needs a random sparsifier."""
    if density >= 1:
        return delta
    probs: Tensor | float | None = None
    if method == "magnitude":
        mask = magnitude_mask(delta, density)
    elif method == "magnitude_outliers":
        mask = breadcrumbs_mask(delta, density, gamma)
    elif method == "random":
        mask = bernoulli_mask(delta, density, generator)
        probs = density
    elif method == "della_magprune":
        mask, probs = della_mask(delta, density, epsilon, generator)
    else:
        raise ValueError(f"unknown sparsifier {method!r}")
    masked = delta * mask
    if not rescale:
        return masked
    if rescale_mode == "l1":
        return rescale_l1(delta, masked)
    if probs is None:  # deterministic masks have no keep probability: fall back to L1
        return rescale_l1(delta, masked)
    if isinstance(probs, float):
        return masked * (1.0 / probs)  # a multiply, not a division by a Python scalar (same on every device)
    return masked / probs


# --------------------------------------------------------------------------- consensus
def sequential_sum(tensors: Sequence[Tensor]) -> Tensor:
    """``((t0 + t1) + t2) + ...``: sums across models in a fixed order, so every implementation
    (the engine, the workspace's chunked and fused kernels) rounds identically."""
    acc = tensors[0]
    for t in tensors[1:]:
        acc = acc + t
    return acc


def sign_consensus(weighted: Tensor, method: Consensus = "sum") -> Tensor:
    """TIES sign election over stacked weighted deltas ``(n_models, *shape)``.

    ``sum``: the elected sign is that of the sum (mass) of the deltas; ``count``: of the sum of
    their signs. Ties go to +. Returns a mask of ``weighted``'s dtype, 1 where a delta agrees
    with the elected sign (zeros never agree).
    """
    return torch.stack(sign_agreement(list(weighted.unbind(0)), method), dim=0)


def sign_agreement(weighted: Sequence[Tensor], method: Consensus = "sum") -> list[Tensor]:
    """:func:`sign_consensus` on a list of per-model tensors; returns one 0/1 mask per model."""
    signs = [w.sign() for w in weighted]
    score = sequential_sum(weighted if method == "sum" else signs)
    elected = torch.where(score >= 0, 1.0, -1.0).to(weighted[0].dtype)
    return [(s == elected).to(weighted[0].dtype) for s in signs]


# --------------------------------------------------------------------------- the merge
def mix_task_vectors(
    base: Tensor,
    sparse: Sequence[Tensor],
    weights: Sequence[float],
    *,
    consensus: Consensus | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """``base + lambda * mix(w_i * sparse_i)``: the elementwise half of
    :func:`generalized_task_arithmetic` (sparsified task vectors in, merged tensor out).

    The order of operations is part of the contract: the workspace reproduces it exactly.
    """
    weighted = [d * float(w) for d, w in zip(sparse, weights)]
    if consensus is not None:
        agree = sign_agreement(weighted, consensus)
        mixed = sequential_sum([x * a for x, a in zip(weighted, agree)])
        if normalize:
            divisor = sequential_sum([a * float(w) for a, w in zip(agree, weights)])
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
            mixed = mixed / divisor
    else:
        mixed = sequential_sum(weighted)
        if normalize:
            total = linear_total(weights)
            if total != 1.0:
                mixed = mixed * (1.0 / total)
    if lambda_ != 1:
        mixed = mixed * float(lambda_)
    return base + mixed


def linear_total(weights: Sequence[float]) -> float:
    """The divisor of a normalized, consensus-free mix: the sum of the weights (in float64),
    or 1 where it is (almost) zero."""
    total = float(sum(float(w) for w in weights))
    return 1.0 if abs(total) < 1e-8 else total


def generalized_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    sparsifier: Sparsifier | None = None,
    consensus: Consensus | None = None,
    normalize: bool = False,
    rescale: bool = False,
    rescale_mode: RescaleMode = "l1",
    lambda_: float = 1.0,
    generators: Sequence[torch.Generator | None] | None = None,
) -> Tensor:
    """``base + lambda * mix(sparsify(model_i - base) * weight_i)``.

    ``generators[i]`` drives model i's random mask (DARE/DELLA); pass one per model so masks do
    not depend on the order anything else is computed in.
    """
    if not tensors:
        return base
    n = len(tensors)
    densities = densities if densities is not None else [1.0] * n
    gammas = gammas if gammas is not None else [0.01] * n
    epsilons = epsilons if epsilons is not None else [0.15] * n
    generators = generators if generators is not None else [None] * n

    deltas = []
    for i, x in enumerate(tensors):
        d = x - base
        if sparsifier is not None:
            d = sparsify(
                d,
                sparsifier,
                density=densities[i],
                gamma=gammas[i],
                epsilon=epsilons[i],
                rescale=rescale,
                rescale_mode=rescale_mode,
                generator=generators[i],
            )
        deltas.append(d)
    return mix_task_vectors(base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)
