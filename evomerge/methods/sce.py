"""SCE: Select, Calculate, Erase (FuseChat 2.0, arXiv 2408.07990), with mergekit's semantics."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from evomerge.methods.task_arithmetic import sign_consensus


def sce_variance_mask(deltas: Tensor, select_topk: float) -> Tensor:
    """Select: keep the ``select_topk`` fraction of positions (among those with non-zero
    variance) where the task vectors ``(n_models, *shape)`` vary most across models."""
    if select_topk >= 1:
        return torch.ones_like(deltas[0])
    var = deltas.var(dim=0, unbiased=False)  # (*shape)
    k = int(int(torch.count_nonzero(var)) * select_topk)
    mask = torch.zeros_like(var)
    if k > 0:
        idx = torch.topk(var.reshape(-1), k, largest=True, sorted=False).indices
        mask.view(-1)[idx] = 1
    return mask


def sce_weights(deltas: Tensor) -> Tensor:
    """Calculate: each model's weight is its share of the summed mean squared task vector
    (uniform when every task vector is ~zero). Returns ``(n_models,)``."""
    energy = (deltas**2).mean(dim=tuple(range(1, deltas.dim())))  # (n_models,)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1.0 / energy.shape[0])
    return energy / total


def sce(base: Tensor, tensors: Sequence[Tensor], *, select_topk: float = 1.0) -> Tensor:
    """Select high-variance positions, weight task vectors by their energy, erase the entries
    whose sign disagrees with the elected (TIES ``sum``) sign, and average what is left."""
    if not tensors:
        return base
    deltas = torch.stack([x - base for x in tensors], dim=0)  # (n_models, *shape)
    deltas = deltas * sce_variance_mask(deltas, select_topk).unsqueeze(0)
    keep = sign_consensus(deltas, "sum")
    w = sce_weights(deltas).reshape((len(tensors),) + (1,) * base.dim()) * keep
    return base + (deltas * w).sum(dim=0) / w.sum(dim=0).clamp(min=1e-6)
