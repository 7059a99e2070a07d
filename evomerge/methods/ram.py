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

The masks are elementwise (one comparison per entry and model), so the combine step computes
them chunk by chunk (:func:`ram_combine_step`); keeping them between candidates would cost as
much memory traffic as recomputing them from the sources it reads anyway. RAM+'s overlap counts
are a reduction over the whole tensor: memoized per ``epsilon`` (trial-invariant when ``epsilon``
is not searched; a few integers per tensor and value when it is), then ``lambda`` per trial.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from evomerge.methods.steps import Inputs, Prepared

RAM_EPSILON = 1e-5
RAMPLUS_R = 0.1
RAMPLUS_ALPHA = 0.2

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


# --------------------------------------------------------------------------- steps (evomerge.methods.steps)
@dataclass
class SharedUpdateMix(Prepared):
    """RAM's elementwise step: the threshold and (RAM+) each model's boost of unique updates."""

    epsilon: float
    lambdas: Tensor | None = None  # (n,) float32


def _chunk_deltas(inputs: Inputs, sl: slice) -> tuple[Tensor, list[Tensor]]:
    b = inputs.cv(inputs.base_flat()[sl])
    return b, [inputs.cv(inputs.x_flat(i)[sl]) - b for i in range(inputs.n)]


def ram_prepare(inputs: Inputs, p: Mapping[str, Any]) -> SharedUpdateMix:
    return SharedUpdateMix(float(p["epsilon"]))


def ram_overlap_counts_chunked(inputs: Inputs, epsilon: float) -> tuple[list[int], list[int]]:
    """:func:`ram_overlap_counts` of the whole tensor, summed over chunks (exact integers)."""
    parts = inputs.map_chunks(lambda sl: ram_overlap_counts(ram_masks(_chunk_deltas(inputs, sl)[1], epsilon)))
    n = inputs.n
    return [sum(s[i] for s, _ in parts) for i in range(n)], [sum(u[i] for _, u in parts) for i in range(n)]


def ramplus_prepare(inputs: Inputs, p: Mapping[str, Any]) -> SharedUpdateMix:
    eps = float(p["epsilon"])
    shared, unique = inputs.memo(("ram_overlap_counts", eps), tuple(range(inputs.n)),
                                 lambda: ram_overlap_counts_chunked(inputs, eps))
    lambdas = ramplus_lambdas(ramplus_rho(shared, unique, eps), r=float(p["r"]), alpha=float(p["alpha"]))
    return SharedUpdateMix(eps, lambdas.to(inputs.device))


def ram_combine_step(prep: SharedUpdateMix, inputs: Inputs, sl: slice | None) -> Tensor:
    """:func:`ram_combine` on the elements ``sl`` (masks computed there: elementwise)."""
    b, ds = _chunk_deltas(inputs, slice(0, inputs.numel) if sl is None else sl)
    out = ram_combine(b, ds, ram_masks(ds, prep.epsilon), prep.lambdas)
    return out.view(inputs.shape) if sl is None else out
