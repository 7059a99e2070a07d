"""Fused Triton kernels for the workspace's per-candidate pass on CUDA (#6).

A kernel is keyed on a *prepared value* (see :mod:`evomerge.methods.steps`), never on a method:
a registry entry names the kernel (``Method.kernel``) that consumes what its ``prepare`` returns
(``FusedKernels``): ``weighted_sum``, ``distance_blend``, ``task_vector_mix``, ``spherical_blend``,
``mean_toward_base``, ``elected_mix``. A new method reuses one by returning the same prepared type,
or has none.

Each kernel reads the stored source tensors (bf16/fp16/fp32) once, does the method's float32 math
in registers and writes the live parameter once: the memory-bandwidth floor, give or take the
parameter-independent caches it reads (ranks, Bernoulli thresholds).

Results are bit-identical to the engine (``evomerge merge``) because every kernel performs
exactly the engine's sequence of IEEE float32 operations (see ``evomerge/methods``: fixed-order
sums across models, multiplications by ``1/x`` instead of divisions by Python scalars), with
floating-point contraction (FMA) disabled, divisions correctly rounded (``div_rn``), and the final
float32 -> bfloat16 rounding done as torch does it (round to nearest even). Anything a kernel does
not cover (more than four models, per-vector spherical blends, non-float32 compute) returns False and
the workspace's eager path runs instead.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors (numpy), which is how the tests check
them without a GPU.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import triton
import triton.language as tl

from evomerge.methods import (
    SM_SCALE_PTR,
    DistanceBlend,
    ElectedMix,
    MeanTowardBase,
    SphericalBlend,
    TaskVectorMix,
    WeightedSum,
)
from evomerge.methods.steps import Inputs

BLOCK = 2048
NUM_WARPS = 8
MAX_MODELS = 4
_LAUNCH = {"num_warps": NUM_WARPS, "enable_fp_fusion": False}

OUT_F32, OUT_BF16, OUT_F16 = 0, 1, 2
_OUT_KINDS = {torch.float32: OUT_F32, torch.bfloat16: OUT_BF16, torch.float16: OUT_F16}

# a task vector's mask modes (MM) and rescale modes (SM) are those of evomerge.methods' ModelSpec


# --------------------------------------------------------------------------- helpers
@triton.jit
def _div(a, b):
    return tl.fdiv(a, b, ieee_rounding=True)


@triton.jit
def _store(OUT, offs, m, val, OUT_KIND: tl.constexpr):
    if OUT_KIND == 1:
        # float32 -> bfloat16, round to nearest even (as torch); done on the bits so every backend agrees
        bits = val.to(tl.int32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        tl.store(OUT + offs, (bits >> 16).to(tl.int16).to(tl.bfloat16, bitcast=True), mask=m)
    elif OUT_KIND == 2:
        tl.store(OUT + offs, val.to(tl.float16), mask=m)
    else:
        tl.store(OUT + offs, val, mask=m)


@triton.jit
def _flag(FLAG, val, m):
    bad = ((val != val) | (val == float("inf")) | (val == float("-inf"))) & m
    nbad = tl.sum(bad.to(tl.int32), axis=0)
    if nbad > 0:
        tl.atomic_add(FLAG, nbad)


@triton.jit
def _ld(P, offs, m):
    return tl.load(P + offs, mask=m, other=0).to(tl.float32)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _sparse(bb, X, A, B, S, lo, hi, f1, f2, f3, offs, m, MM: tl.constexpr, SM: tl.constexpr):
    """One model's sparsified task vector: mask (MM), then rescale (SM); the engine's order."""
    d = _ld(X, offs, m) - bb
    if MM == 0:
        s = d
    else:
        probs = d  # placeholder, only read under SM == 3
        if MM == 1:
            r = tl.load(A + offs, mask=m, other=0)
            keep = (r >= lo) & (r < hi)
        elif MM == 2:
            keep = tl.load(A + offs, mask=m, other=0) != 0
        elif MM == 3:
            keep = tl.load(A + offs, mask=m, other=2.0) <= f1
        elif MM == 4:
            probs = tl.load(B + offs, mask=m, other=0).to(tl.float32) * f1 + f2
            keep = probs >= tl.load(A + offs, mask=m, other=2.0)
        elif MM == 5:
            probs = tl.load(B + offs, mask=m, other=1.0)
            keep = probs >= tl.load(A + offs, mask=m, other=2.0)
        else:
            keep = tl.load(A + offs, mask=m, other=0) != 0
            probs = tl.load(B + offs, mask=m, other=1.0)
        s = d * keep.to(tl.float32)
        if SM == 1:
            s = s * tl.load(S)
        elif SM == 2:
            s = s * f3
        elif SM == 3:
            s = _div(s, probs)
    return s


# --------------------------------------------------------------------------- kernels
@triton.jit
def _weighted_sum_kernel(X0, X1, X2, X3, OUT, FLAG, N, w0, w1, w2, w3, inv,
                   NM: tl.constexpr, HAS_INV: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    acc = _ld(X0, offs, m) * w0
    if NM > 1:
        acc = acc + _ld(X1, offs, m) * w1
    if NM > 2:
        acc = acc + _ld(X2, offs, m) * w2
    if NM > 3:
        acc = acc + _ld(X3, offs, m) * w3
    if HAS_INV:
        acc = acc * inv
    _flag(FLAG, acc, m)
    _store(OUT, offs, m, acc, OUT_KIND)


@triton.jit
def _distance_blend_kernel(Bp, Xp, OUT, FLAG, N, t, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    b = _ld(Bp, offs, m)
    x = _ld(Xp, offs, m)
    dist = tl.maximum(tl.abs(b - x), 1e-6)
    w = _div(tl.zeros_like(dist) + 1.0, dist) * t  # torch.reciprocal(dist) * t, as the engine
    w = tl.minimum(tl.maximum(w, 0.0), 1.0)
    out = w * x + (1.0 - w) * b
    _flag(FLAG, out, m)
    _store(OUT, offs, m, out, OUT_KIND)


@triton.jit
def _task_vector_kernel(
    Bp, OUT, FLAG, N,
    X0, A0, B0, S0, lo0, hi0, f10, f20, f30, w0,
    X1, A1, B1, S1, lo1, hi1, f11, f21, f31, w1,
    X2, A2, B2, S2, lo2, hi2, f12, f22, f32, w2,
    X3, A3, B3, S3, lo3, hi3, f13, f23, f33, w3,
    inv, lam,
    NM: tl.constexpr,
    MM0: tl.constexpr, SM0: tl.constexpr, MM1: tl.constexpr, SM1: tl.constexpr,
    MM2: tl.constexpr, SM2: tl.constexpr, MM3: tl.constexpr, SM3: tl.constexpr,
    CONS: tl.constexpr, NORM: tl.constexpr, HAS_INV: tl.constexpr, HAS_LAM: tl.constexpr,
    OUT_KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    bb = _ld(Bp, offs, m)
    t0 = _sparse(bb, X0, A0, B0, S0, lo0, hi0, f10, f20, f30, offs, m, MM0, SM0) * w0
    if NM > 1:
        t1 = _sparse(bb, X1, A1, B1, S1, lo1, hi1, f11, f21, f31, offs, m, MM1, SM1) * w1
    if NM > 2:
        t2 = _sparse(bb, X2, A2, B2, S2, lo2, hi2, f12, f22, f32, offs, m, MM2, SM2) * w2
    if NM > 3:
        t3 = _sparse(bb, X3, A3, B3, S3, lo3, hi3, f13, f23, f33, offs, m, MM3, SM3) * w3
    if CONS == 0:
        mixed = t0
        if NM > 1:
            mixed = mixed + t1
        if NM > 2:
            mixed = mixed + t2
        if NM > 3:
            mixed = mixed + t3
        if HAS_INV:
            mixed = mixed * inv
    else:
        g0 = _sign(t0)
        score = t0 if CONS == 1 else g0
        if NM > 1:
            g1 = _sign(t1)
            score = score + (t1 if CONS == 1 else g1)
        if NM > 2:
            g2 = _sign(t2)
            score = score + (t2 if CONS == 1 else g2)
        if NM > 3:
            g3 = _sign(t3)
            score = score + (t3 if CONS == 1 else g3)
        el = tl.where(score >= 0, 1.0, -1.0)
        a0 = (g0 == el).to(tl.float32)
        mixed = t0 * a0
        if NORM:
            div = a0 * w0
        if NM > 1:
            a1 = (g1 == el).to(tl.float32)
            mixed = mixed + t1 * a1
            if NORM:
                div = div + a1 * w1
        if NM > 2:
            a2 = (g2 == el).to(tl.float32)
            mixed = mixed + t2 * a2
            if NORM:
                div = div + a2 * w2
        if NM > 3:
            a3 = (g3 == el).to(tl.float32)
            mixed = mixed + t3 * a3
            if NORM:
                div = div + a3 * w3
        if NORM:
            div = tl.where(div == 0, 1.0, div)
            mixed = _div(mixed, div)
    if HAS_LAM:
        mixed = mixed * lam
    out = bb + mixed
    _flag(FLAG, out, m)
    _store(OUT, offs, m, out, OUT_KIND)


@triton.jit
def _masked_abs_kernel(Bp, X, A, B, OUT, N, lo, hi, f1, f2, MM: tl.constexpr, BLOCK: tl.constexpr):
    """|task vector * mask| in float32 (the engine's ``masked.abs()``, summed by torch afterwards)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    bb = _ld(Bp, offs, m)
    s = _sparse(bb, X, A, B, A, lo, hi, f1, f2, f1, offs, m, MM, 0)
    tl.store(OUT + offs, tl.abs(s), mask=m)


@triton.jit
def _spherical_kernel(Bp, X0, X1, OUT, FLAG, N, AB, t, omt, HAS_BASE: tl.constexpr, OUT_KIND: tl.constexpr,
                    BLOCK: tl.constexpr):
    """Spherical blend of two whole (flattened) vectors: AB holds [sin((1-t)theta), sin(t theta), safe_sin, colinear] (float32)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    v0 = _ld(X0, offs, m)
    v1 = _ld(X1, offs, m)
    if HAS_BASE:
        bb = _ld(Bp, offs, m)
        v0 = v0 - bb
        v1 = v1 - bb
    a = tl.load(AB)
    b = tl.load(AB + 1)
    ss = tl.load(AB + 2)
    col = tl.load(AB + 3)
    spherical = _div(v0 * a + v1 * b, tl.zeros_like(v0) + ss)
    out = tl.where(col != 0, v0 * omt + v1 * t, spherical)
    if HAS_BASE:
        out = bb + out
    _flag(FLAG, out, m)
    _store(OUT, offs, m, out, OUT_KIND)


@triton.jit
def _toward_base_kernel(Bp, X0, X1, X2, X3, T, OUT, FLAG, N, ncols, inv_n, NM: tl.constexpr,
                        HAS_INV: tl.constexpr, PER_ROW: tl.constexpr, OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    acc = _ld(X0, offs, m)
    if NM > 1:
        acc = acc + _ld(X1, offs, m)
    if NM > 2:
        acc = acc + _ld(X2, offs, m)
    if NM > 3:
        acc = acc + _ld(X3, offs, m)
    if HAS_INV:
        acc = acc * inv_n
    if PER_ROW:
        t = tl.load(T + offs // ncols, mask=m, other=0.0)
    else:
        t = tl.load(T)
    out = t * acc + (1.0 - t) * _ld(Bp, offs, m)
    _flag(FLAG, out, m)
    _store(OUT, offs, m, out, OUT_KIND)


@triton.jit
def _elected_mix_kernel(Bp, D0, D1, D2, D3, W, OUT, FLAG, N, NM: tl.constexpr, FROM_X: tl.constexpr,
                OUT_KIND: tl.constexpr, BLOCK: tl.constexpr):
    """ElectedMix's erase-and-merge; D_i are the sources (FROM_X: task vector = D_i - base) or masked
    float32 task vectors."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    bb = _ld(Bp, offs, m)
    d0 = _ld(D0, offs, m)
    if FROM_X:
        d0 = d0 - bb
    score = d0
    if NM > 1:
        d1 = _ld(D1, offs, m)
        if FROM_X:
            d1 = d1 - bb
        score = score + d1
    if NM > 2:
        d2 = _ld(D2, offs, m)
        if FROM_X:
            d2 = d2 - bb
        score = score + d2
    if NM > 3:
        d3 = _ld(D3, offs, m)
        if FROM_X:
            d3 = d3 - bb
        score = score + d3
    el = tl.where(score >= 0, 1.0, -1.0)
    k0 = tl.load(W) * (_sign(d0) == el).to(tl.float32)
    num = d0 * k0
    den = k0
    if NM > 1:
        k1 = tl.load(W + 1) * (_sign(d1) == el).to(tl.float32)
        num = num + d1 * k1
        den = den + k1
    if NM > 2:
        k2 = tl.load(W + 2) * (_sign(d2) == el).to(tl.float32)
        num = num + d2 * k2
        den = den + k2
    if NM > 3:
        k3 = tl.load(W + 3) * (_sign(d3) == el).to(tl.float32)
        num = num + d3 * k3
        den = den + k3
    out = bb + _div(num, tl.maximum(den, 1e-6))
    _flag(FLAG, out, m)
    _store(OUT, offs, m, out, OUT_KIND)


# --------------------------------------------------------------------------- dispatch
def _grid(n: int) -> tuple[int]:
    return (triton.cdiv(n, BLOCK),)


class FusedKernels:
    """Launches the fused kernel a method names for its prepared value; ``run`` returns False when
    it cannot (the workspace then runs the method's ``combine``)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.dummy = torch.zeros(1, dtype=torch.float32, device=device)
        self._launch: dict[str, Callable[..., bool]] = {
            "weighted_sum": self._weighted_sum, "distance_blend": self._distance_blend,
            "task_vector_mix": self._task_vector_mix, "spherical_blend": self._spherical_blend,
            "mean_toward_base": self._mean_toward_base, "elected_mix": self._elected_mix,
        }

    def _pad(self, xs: list[Any], fill: Any) -> list[Any]:
        return xs + [fill] * (MAX_MODELS - len(xs))

    def run(self, kernel: str, prep: Any, inputs: Inputs, target: torch.Tensor, out_dtype: torch.dtype,
            flag: torch.Tensor) -> bool:
        """Launch ``kernel`` on ``prep`` writing ``target`` (the engine's output dtype: ``out_dtype``)."""
        launch = self._launch.get(kernel)
        if launch is None or inputs.dtype != torch.float32 or target.dtype not in _OUT_KINDS:
            return False
        if not target.is_contiguous() or inputs.n > MAX_MODELS:
            return False
        if out_dtype != target.dtype and out_dtype != torch.float32:
            return False  # the engine would round through another dtype first
        return launch(prep, inputs, target, flag, _OUT_KINDS[target.dtype])

    def _weighted_sum(self, prep: WeightedSum, inputs: Inputs, target: torch.Tensor, flag: torch.Tensor,
                      kind: int) -> bool:
        xs = [prep.term(inputs, j) for j in prep.terms]
        out = target.view(-1)
        n = out.numel()
        inv = prep.factor
        _weighted_sum_kernel[_grid(n)](*self._pad(xs, xs[0]), out, flag, n, *self._pad(list(prep.weights), 0.0),
                                 inv if inv is not None else 1.0, NM=len(xs), HAS_INV=inv is not None,
                                 OUT_KIND=kind, BLOCK=BLOCK, **_LAUNCH)
        return True

    def _distance_blend(self, prep: DistanceBlend, inputs: Inputs, target: torch.Tensor, flag: torch.Tensor, kind: int) -> bool:
        out = target.view(-1)
        n = out.numel()
        _distance_blend_kernel[_grid(n)](inputs.base_flat(), inputs.x_flat(0), out, flag, n, float(prep.t),
                                   OUT_KIND=kind, BLOCK=BLOCK, **_LAUNCH)
        return True

    def _task_vector_mix(self, prep: TaskVectorMix, inputs: Inputs, target: torch.Tensor, flag: torch.Tensor,
                      kind: int) -> bool:
        specs = prep.specs
        base = inputs.base_flat()
        out = target.view(-1)
        n = base.numel()
        args: list[Any] = []
        consts: dict[str, Any] = {}
        for i in range(MAX_MODELS):
            if i < len(specs):
                sp = specs[i]
                x = inputs.x_flat(i)
                a = sp.a.reshape(-1) if sp.a is not None else self.dummy
                b = sp.b.reshape(-1) if sp.b is not None else self.dummy
                s = sp.scale if sp.scale is not None else self.dummy
                if sp.sm == SM_SCALE_PTR and sp.scale is None:  # L1 (the prepared value's reduce): |masked| summed by torch
                    buf = torch.empty(n, dtype=torch.float32, device=self.device)
                    _masked_abs_kernel[_grid(n)](base, x, a, b, buf, n, sp.lo, sp.hi, sp.f1, sp.f2, MM=sp.mm,
                                                 BLOCK=BLOCK, **_LAUNCH)
                    s = sp.l1_scale(buf)
                    del buf
                args += [x, a, b, s, sp.lo, sp.hi, sp.f1, sp.f2, sp.f3, sp.w]
                consts[f"MM{i}"], consts[f"SM{i}"] = sp.mm, sp.sm
            else:
                args += [base, self.dummy, self.dummy, self.dummy, 0, 0, 0.0, 0.0, 0.0, 0.0]
                consts[f"MM{i}"], consts[f"SM{i}"] = 0, 0
        cons = {None: 0, "sum": 1, "count": 2}[prep.consensus]
        inv = prep.inverse_total()
        lam = prep.lam
        _task_vector_kernel[_grid(n)](base, out, flag, n, *args, inv if inv is not None else 1.0, lam, NM=len(specs),
                              CONS=cons, NORM=prep.normalize and cons != 0, HAS_INV=inv is not None,
                              HAS_LAM=lam != 1, OUT_KIND=kind, BLOCK=BLOCK, **consts, **_LAUNCH)
        return True

    def _spherical_blend(self, prep: SphericalBlend, inputs: Inputs, target: torch.Tensor, flag: torch.Tensor, kind: int) -> bool:
        if not prep.flatten:
            return False
        t = prep.t
        a, b = prep.coefficients()
        ab = torch.cat([a.reshape(1), b.reshape(1), prep.safe_sin.reshape(1), prep.colinear.reshape(1).to(torch.float32)])
        x0, x1 = inputs.x_flat(0), inputs.x_flat(1)
        base = inputs.base_flat() if inputs.has_base else x0
        n = x0.numel()
        _spherical_kernel[_grid(n)](base, x0, x1, target.view(-1), flag, n, ab, float(t), float(1 - t),
                                  HAS_BASE=inputs.has_base, OUT_KIND=kind, BLOCK=BLOCK, **_LAUNCH)
        return True

    def _mean_toward_base(self, prep: MeanTowardBase, inputs: Inputs, target: torch.Tensor, flag: torch.Tensor,
                     kind: int) -> bool:
        if prep.filter_wise and len(inputs.shape) > 2:
            return False
        base = inputs.base_flat()
        xs = [inputs.x_flat(i) for i in range(inputs.n)]
        n = base.numel()
        ncols = inputs.shape[-1] if inputs.shape else 1
        k = len(xs)
        tt = prep.t.reshape(-1).contiguous()
        _toward_base_kernel[_grid(n)](base, *self._pad(xs, xs[0]), tt, target.view(-1), flag, n, ncols,
                                      1.0 / k, NM=k, HAS_INV=k != 1, PER_ROW=prep.filter_wise, OUT_KIND=kind,
                                      BLOCK=BLOCK, **_LAUNCH)
        return True

    def _elected_mix(self, prep: ElectedMix, inputs: Inputs, target: torch.Tensor, flag: torch.Tensor, kind: int) -> bool:
        ds = prep.ds
        base = inputs.base_flat()
        n = base.numel()
        _elected_mix_kernel[_grid(n)](base, *self._pad(ds, ds[0]), prep.weights.contiguous(), target.view(-1), flag, n,
                              NM=len(ds), FROM_X=prep.from_x, OUT_KIND=kind, BLOCK=BLOCK, **_LAUNCH)
        return True
