"""Model Stock (Jang et al. 2024, arXiv 2403.19522)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from evomerge.methods.steps import Inputs, Prepared


def model_stock(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """Move from the average of the fine-tunes back towards the base by the paper's ratio
    ``t = N cos(theta) / (1 + (N - 1) cos(theta))``, where ``theta`` is the angle between the
    fine-tunes' task vectors (with more than two fine-tunes: the mean of the pairwise cosines, as
    mergekit does). ``filter_wise`` computes one angle per row instead of one per tensor.
    """
    if len(tensors) < 2:
        raise ValueError("model_stock needs at least two fine-tuned models besides the base")
    shape = base.shape
    t = model_stock_ratio(base, tensors, filter_wise=filter_wise)
    w0 = base.unsqueeze(0) if filter_wise and base.dim() == 1 else (base if filter_wise else base.reshape(-1))
    ws = [x.unsqueeze(0) if filter_wise and x.dim() == 1 else (x if filter_wise else x.reshape(-1)) for x in tensors]
    return model_stock_combine(t, w0, ws).reshape(shape)


def model_stock_ratio(base: Tensor, tensors: Sequence[Tensor], *, filter_wise: bool = False) -> Tensor:
    """The interpolation ratio ``t``: shape ``(1,)``, or ``(rows, 1)`` with ``filter_wise``."""
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base  # (rows, cols)
        ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in tensors]
    else:
        w0 = base.reshape(-1)  # (N,)
        ws = [x.reshape(-1) for x in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            a, b = offsets[i], offsets[j]
            norms = torch.linalg.vector_norm(a, dim=-1) * torch.linalg.vector_norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)  # (rows, 1) or (1,)
    n = len(ws)
    denom = 1 + (n - 1) * cos
    # anti-aligned task vectors make the ratio blow up: fall back to the base there (as mergekit 0.1.5)
    small = denom.abs() < 1e-6
    return torch.where(small, torch.zeros_like(cos), (n * cos) / torch.where(small, torch.ones_like(denom), denom))


def model_stock_combine(t: Tensor, w0: Tensor, ws: Sequence[Tensor]) -> Tensor:
    """``t * mean(ws) + (1 - t) * w0`` (elementwise; models summed in order, the mean a
    multiplication by ``1 / n``)."""
    acc = ws[0]
    for w in ws[1:]:
        acc = acc + w
    w_avg = acc * (1.0 / len(ws)) if len(ws) != 1 else acc
    return t * w_avg + (1 - t) * w0


# --------------------------------------------------------------------------- steps (evomerge.methods.steps)
@dataclass
class MeanTowardBase(Prepared):
    """The ratio ``t`` (trial-invariant): shape ``(1,)``, or one per vector along the last dimension
    (``filter_wise``, laid out in the tensor's order)."""

    t: Tensor
    filter_wise: bool


def model_stock_prepare(inputs: Inputs, p: Mapping[str, Any]) -> MeanTowardBase:
    if inputs.n < 2:
        raise ValueError("model_stock needs at least two fine-tuned models besides the base")
    fw = bool(p["filter_wise"])
    t = inputs.memo(("model_stock_ratio", fw), tuple(range(inputs.n)), lambda: model_stock_ratio(
        inputs.base(), [inputs.x(i) for i in range(inputs.n)], filter_wise=fw))
    return MeanTowardBase(t, fw)


def model_stock_combine_step(prep: MeanTowardBase, inputs: Inputs, sl: slice | None) -> Tensor:
    b = inputs.base_flat()
    xs = [inputs.x_flat(i) for i in range(inputs.n)]
    whole = sl is None
    if sl is None:
        sl = slice(0, inputs.numel)
    t = prep.t
    if prep.filter_wise:  # the ratio of each element's vector (the engine broadcasts the same values)
        idx = torch.arange(sl.start, sl.stop, device=t.device) // inputs.shape[-1]
        t = t.reshape(-1)[idx]
    out = model_stock_combine(t, inputs.cv(b[sl]), [inputs.cv(x[sl]) for x in xs])
    return out.view(inputs.shape) if whole else out
