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
def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * N)`` entries of largest magnitude (TIES' trim step).

    Returns a mask of ``delta``'s dtype. ``density >= 1`` keeps everything; when
    ``int(density * N)`` is 0 nothing is kept (mergekit aborts in that case).
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    k = int(density * n)
    mask = torch.zeros_like(delta)
    if k > 0:
        idx = torch.topk(delta.abs().reshape(-1), k, largest=True, sorted=False).indices
        mask.view(-1)[idx] = 1
    return mask


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest-magnitude outliers, then the
    smallest entries, so ``int(density * N)`` entries remain.

    If ``density + gamma > 1`` fewer outliers are dropped so the density is met (as mergekit).
    Unlike mergekit 0.1.x, ``int(gamma * N) == 0`` drops *no* outlier instead of the whole tensor.
    ``density >= 1`` keeps everything (gamma is then ignored, as in mergekit).
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:  # not enough room: trim fewer outliers
        n_top += n_bot
        n_bot = 0
    order = torch.argsort(delta.abs().reshape(-1), descending=False)  # (N,) smallest first
    mask = torch.zeros_like(delta)
    mask.view(-1)[order[n_bot : n - n_top]] = 1
    return mask


def bernoulli_mask(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return torch.ones_like(delta)
    probs = torch.full_like(delta, density)
    return torch.bernoulli(probs, generator=generator)


def della_keep_probs(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities: within each row (dim 1; 1-D tensors are one row),
    rank entries by magnitude and spread the probabilities linearly over
    ``[density - epsilon, density + epsilon]``, larger magnitude -> more likely kept.

    A row of one entry gets ``density`` (mergekit would produce NaN there).
    """
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta  # (rows, cols, ...)
    n = rows.shape[1]
    if n < 2:
        return torch.full_like(delta, density)
    ranks = rows.abs().argsort(dim=1).argsort(dim=1).to(delta.dtype)  # 0 .. n-1 along dim 1
    probs = (density - epsilon) + (ranks / (n - 1)) * (2 * epsilon)
    return probs.reshape(delta.shape)


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
    before = delta.abs().sum()
    after = masked.abs().sum()
    if before < _RESCALE_EPS or after < _RESCALE_EPS:
        return masked
    return masked * (before / after)


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
    return masked / probs


# --------------------------------------------------------------------------- consensus
def sign_consensus(weighted: Tensor, method: Consensus = "sum") -> Tensor:
    """TIES sign election over stacked weighted deltas ``(n_models, *shape)``.

    ``sum``: the elected sign is that of the sum (mass) of the deltas; ``count``: of the sum of
    their signs. Ties go to +. Returns a mask of ``weighted``'s dtype, 1 where a delta agrees
    with the elected sign (zeros never agree).
    """
    signs = weighted.sign()
    score = weighted.sum(dim=0) if method == "sum" else signs.sum(dim=0)  # (*shape)
    elected = torch.where(score >= 0, 1.0, -1.0).to(weighted.dtype)
    return (signs == elected).to(weighted.dtype)


# --------------------------------------------------------------------------- the merge
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
    stacked = torch.stack(deltas, dim=0)  # (n_models, *shape)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device)
    w = w.reshape((n,) + (1,) * base.dim())  # (n_models, 1, ...)
    weighted = stacked * w

    if consensus is not None:
        mask = sign_consensus(weighted, consensus)
        mixed = (weighted * mask).sum(dim=0)
        divisor = (w * mask).sum(dim=0)
        divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        mixed = weighted.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor = torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed
