"""Reinforced Agent Merging: RAM and RAM+ (mergekit 0.1.5's ``ram`` and ``ramplus_tl``;
arXiv 2601.13572).

RL fine-tunes change few parameters, so averaging their task vectors dilutes each model's
updates by the models that did not touch them. RAM averages only over the models that did: with
task vectors ``d_i = x_i - base``, model ``i`` *touches* an entry when ``|d_i| > epsilon``, and
with ``c`` the number of models touching it

    ``merged = base + sum_i [touched_i] d_i * (lambda_i if c == 1 else 1 / c)``

(entries nobody touches keep the base). RAM has ``lambda_i = 1``. RAM+ boosts the *unique*
updates (``c == 1``) of a model that shares much of its update with others:

    ``lambda_i = 1 + r * clip(rho_i, 0, alpha)``,  ``rho_i = shared_i / max(unique_i, epsilon)``

where ``shared_i`` and ``unique_i`` count model ``i``'s touched entries with ``c > 1`` and
``c == 1``.

Where the counts come from is the one difference between mergekit and the paper: mergekit's
``ramplus_tl`` ("tensor-local") counts within each tensor, so ``rho`` differs from tensor to
tensor; the paper's RAM+ counts over the whole model. Both are supported: by default
:func:`ramplus_tl` counts within the tensor (mergekit's semantics); pass ``rho`` (one per model,
e.g. from :func:`ram_overlap_counts` summed over every tensor of the model) for the paper's.
As in mergekit, ``rho`` and ``lambda`` are computed in float32 whatever the tensors' dtype.

Trial-invariant: the task vectors (:func:`ram_task_vectors`). The masks and counts depend on
``epsilon`` (:func:`ram_masks`; also trial-invariant when ``epsilon`` is not searched), the
combine step (:func:`ram_combine`) on ``lambda``.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

RAM_EPSILON = 1e-5
RAMPLUS_R = 0.1
RAMPLUS_ALPHA = 0.2

# Searching epsilon: a bf16 weight of magnitude ~0.02 moves in steps of ~1e-4, so thresholds from
# 1e-6 (any stored change counts) to 1e-3 (only large updates count) span "touched = changed at
# all" to "touched = changed a lot". (Param has no log scale yet; a log scale suits this range.)
_EPSILON = {"name": "epsilon", "scope": "global", "default": RAM_EPSILON, "low": 0.0, "search": (1e-6, 1e-3),
            "doc": "a task-vector entry counts as an update when its magnitude is above this"}

# The registry entries this module asks for (field names of evomerge.methods.Param).
SPEC = {
    "name": "ram",
    "base": "required",
    "min_models": 1,
    "max_models": None,
    "stochastic": False,
    "reference": "https://arxiv.org/abs/2601.13572",
    "summary": "average each update over only the models that made it",
    "params": (_EPSILON,),
}
SPEC_PLUS = {
    "name": "ramplus_tl",
    "base": "required",
    "min_models": 1,
    "max_models": None,
    "stochastic": False,
    "reference": "https://arxiv.org/abs/2601.13572",
    "summary": "RAM, with each model's unique updates boosted by its shared/unique ratio (per tensor)",
    "params": (
        # lambda <= 1 + r * alpha: r and alpha in [0, 1] allow unique updates up to doubled; more
        # would push them past any single model's update.
        {"name": "r", "scope": "global", "default": RAMPLUS_R, "low": 0.0, "search": (0.0, 1.0),
         "doc": "strength of the boost of unique updates"},
        {"name": "alpha", "scope": "global", "default": RAMPLUS_ALPHA, "low": 0.0, "search": (0.0, 1.0),
         "doc": "cap on the shared/unique ratio"},
        _EPSILON,
    ),
}


class RamMasks(NamedTuple):
    touched: list[Tensor]  # n x (*shape) bool: |d_i| > epsilon
    count: Tensor  # (*shape) int64: how many models touch each entry


def ram_task_vectors(base: Tensor, tensors: Sequence[Tensor]) -> list[Tensor]:
    """``d_i = x_i - base``: the prepare step."""
    return [x - base for x in tensors]


def ram_masks(deltas: Sequence[Tensor], epsilon: float = RAM_EPSILON) -> RamMasks:
    touched = [d.abs() > epsilon for d in deltas]
    count = torch.stack(touched).sum(dim=0)  # (*shape)
    return RamMasks(touched, count)


def ram_overlap_counts(masks: RamMasks) -> tuple[list[int], list[int]]:
    """``(shared, unique)`` per model: its touched entries that others touch too / no one else."""
    shared = [int((t & (masks.count > 1)).sum()) for t in masks.touched]
    unique = [int((t & (masks.count == 1)).sum()) for t in masks.touched]
    return shared, unique


def ramplus_rho(shared: Sequence[int], unique: Sequence[int], epsilon: float = RAM_EPSILON) -> Tensor:
    """``shared_i / max(unique_i, epsilon)`` per model, float32 ``(n,)``."""
    s = torch.tensor(list(shared), dtype=torch.float32)
    u = torch.tensor(list(unique), dtype=torch.float32)
    return s / u.clamp(min=epsilon)


def ramplus_lambdas(rho: Tensor, *, r: float = RAMPLUS_R, alpha: float = RAMPLUS_ALPHA) -> Tensor:
    """``1 + r * clip(rho, 0, alpha)``, float32 ``(n,)``."""
    return 1 + r * rho.to(torch.float32).clamp(min=0, max=alpha)


def ram_combine(base: Tensor, deltas: Sequence[Tensor], masks: RamMasks, lambdas: Tensor | None = None) -> Tensor:
    """``base + sum_i [touched_i] d_i * (lambda_i if c == 1 else 1 / c)``, summed in model order."""
    unique = masks.count == 1
    divisor = masks.count.clamp(min=1)  # (*shape)
    merged = torch.zeros_like(base)
    for i, (d, touched) in enumerate(zip(deltas, masks.touched)):
        kept = torch.where(touched, d, torch.zeros_like(d))
        if lambdas is None:
            term = kept / divisor  # unique entries: / 1, exact
        else:
            term = torch.where(unique, kept * lambdas[i], kept / divisor)
        merged = merged + term
    return base + merged


def ram(base: Tensor, tensors: Sequence[Tensor], *, epsilon: float = RAM_EPSILON) -> Tensor:
    """RAM: the mean of each entry's updates over the models that made them."""
    if not tensors:
        return base
    deltas = ram_task_vectors(base, tensors)
    return ram_combine(base, deltas, ram_masks(deltas, epsilon))


def ramplus_tl(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    r: float = RAMPLUS_R,
    alpha: float = RAMPLUS_ALPHA,
    epsilon: float = RAM_EPSILON,
    rho: Sequence[float] | Tensor | None = None,
) -> Tensor:
    """RAM+ with ``rho`` counted within this tensor (mergekit), or the ``rho`` given (the paper:
    counted over the whole model)."""
    if not tensors:
        return base
    deltas = ram_task_vectors(base, tensors)
    masks = ram_masks(deltas, epsilon)
    if rho is None:
        rho = ramplus_rho(*ram_overlap_counts(masks), epsilon)
    lambdas = ramplus_lambdas(torch.as_tensor(rho, dtype=torch.float32), r=r, alpha=alpha)
    return ram_combine(base, deltas, masks, lambdas.to(base.device))
