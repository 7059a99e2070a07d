"""ElectedMix: Select, Calculate, Erase (FuseChat 2.0, arXiv 2408.07990), with mergekit's semantics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from evomerge.methods.steps import Cache, Inputs, Prepared, rank_dtype
from evomerge.methods.task_arithmetic import descending_ranks, sequential_sum, sign_agreement, top_k_mask


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


# --------------------------------------------------------------------------- steps (evomerge.methods.steps)
def _all(inputs: Inputs) -> tuple[int, ...]:
    return tuple(range(inputs.n))


def _variance(inputs: Inputs) -> Tensor:
    return sce_variance(torch.stack([inputs.delta(i) for i in range(inputs.n)], dim=0))


def variance_ranks(inputs: Inputs) -> Cache:
    """Descending ranks of the per-position variance (``select_topk`` becomes ``rank < k``)."""
    return Cache("variance_ranks", "variance ranks", inputs.numel * rank_dtype(inputs.numel).itemsize,
                 lambda: descending_ranks(_variance(inputs)).to(rank_dtype(inputs.numel)), reads=_all(inputs))


def sce_caches(inputs: Inputs, p: Mapping[str, Any]) -> list[Cache]:
    return [variance_ranks(inputs)]


@dataclass
class ElectedMix(Prepared):
    """The combine step's inputs: the sources (``from_x``: task vector = source - base) or the
    masked task vectors (compute dtype, flat), and the models' weights."""

    ds: list[Tensor]
    weights: Tensor
    from_x: bool


def sce_prepare(inputs: Inputs, p: Mapping[str, Any]) -> ElectedMix:
    """Below ``select_topk = 1`` the masked task vectors are materialized, because the weights are
    their energies, a reduction over the whole tensor."""
    topk = p["select_topk"]
    b = inputs.base_flat()
    xs = [inputs.x_flat(i) for i in range(inputs.n)]
    if topk >= 1:
        energy = inputs.memo(("sce_energy",), _all(inputs), lambda: torch.stack(
            [sce_energy(inputs.delta(i)) for i in range(inputs.n)]))
        return ElectedMix(xs, sce_weights_from_energy(energy), True)
    rank = inputs.cached(variance_ranks(inputs))
    if rank is not None:
        nnz = inputs.memo(("sce_nonzero_variance",), _all(inputs), lambda: int(torch.count_nonzero(_variance(inputs))))
        k = int(nnz * topk)
        r = rank.view(-1)
        mask = lambda sl: r[sl] < k  # noqa: E731
    else:
        full = sce_variance_mask(torch.stack([inputs.delta(i) for i in range(inputs.n)]), topk).view(-1)
        mask = lambda sl: full[sl]  # noqa: E731
    bufs = [torch.empty(inputs.numel, dtype=inputs.dtype, device=inputs.device) for _ in xs]
    cv = inputs.cv

    def one(sl: slice) -> None:
        m = mask(sl)
        bb = cv(b[sl])
        for x, buf in zip(xs, bufs):
            torch.mul(cv(x[sl]) - bb, m, out=buf[sl])

    inputs.map_chunks(one)
    weights = sce_weights_from_energy(torch.stack([sce_energy(buf.view(inputs.shape)) for buf in bufs]))
    return ElectedMix(bufs, weights, False)


def sce_combine_step(prep: ElectedMix, inputs: Inputs, sl: slice | None) -> Tensor:
    cv = inputs.cv
    whole = slice(0, inputs.numel) if sl is None else sl
    bb = cv(inputs.base_flat()[whole])
    ds = [cv(x[whole]) - bb for x in prep.ds] if prep.from_x else [d[whole] for d in prep.ds]
    out = sce_combine(bb, ds, prep.weights)
    return out.view(inputs.shape) if sl is None else out
