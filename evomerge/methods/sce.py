"""SCE: Select, Calculate, Erase (FuseChat 2.0, arXiv 2408.07990), with mergekit's semantics."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from evomerge.methods.task_arithmetic import sequential_sum, sign_agreement, top_k_mask


def sce_variance(deltas: Tensor) -> Tensor:
    """Per-position variance of the task vectors ``(n_models, *shape)`` across models."""
    return deltas.var(dim=0, unbiased=False)


def sce_variance_mask(deltas: Tensor, select_topk: float) -> Tensor:
    """Select: keep the ``select_topk`` fraction of positions (among those with non-zero
    variance) where the task vectors ``(n_models, *shape)`` vary most across models; ties by
    flat index (see :func:`~evomerge.methods.task_arithmetic.top_k_mask`)."""
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    var = sce_variance(deltas)  # (*shape)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    return top_k_mask(var, k).to(deltas.dtype)


def sce_weights(deltas: Tensor) -> Tensor:
    """Calculate: each model's weight is its share of the summed mean squared task vector
    (uniform when every task vector is ~zero). Returns ``(n_models,)``."""
    return sce_weights_from_energy(torch.stack([sce_energy(d) for d in deltas.unbind(0)]))


def sce_energy(delta: Tensor) -> Tensor:
    """One task vector's mean square (0-dim)."""
    return (delta * delta).mean()


def sce_weights_from_energy(energy: Tensor) -> Tensor:
    total = energy.sum()
    uniform = torch.full_like(energy, 1.0 / energy.shape[0])
    return torch.where(total.abs() < 1e-6, uniform, energy / torch.where(total.abs() < 1e-6, torch.ones_like(total), total))


def sce_combine(base: Tensor, deltas: Sequence[Tensor], weights: Tensor) -> Tensor:
    """Erase and merge: ``base + sum_i d_i w_i keep_i / max(sum_i w_i keep_i, 1e-6)`` with TIES
    ``sum`` sign election (the order of operations is part of the contract)."""
    keep = sign_agreement(deltas, "sum")
    w = [weights[i] * keep[i] for i in range(len(deltas))]
    num = sequential_sum([d * wi for d, wi in zip(deltas, w)])
    return base + num / sequential_sum(w).clamp(min=1e-6)


def sce(base: Tensor, tensors: Sequence[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """Select high-variance positions, weight task vectors by their energy, erase the entries
    whose sign disagrees with the elected (TIES ``sum``) sign, and average what is left."""
    if not tensors:
        return base
    deltas = [x - base for x in tensors]
    if select_topk < 1:
        mask = sce_variance_mask(torch.stack(deltas, dim=0), select_topk)
        deltas = [d * mask for d in deltas]
    weights = sce_weights_from_energy(torch.stack([sce_energy(d) for d in deltas]))
    return sce_combine(base, deltas, weights)
