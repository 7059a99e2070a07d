"""Tests for the merge methods (``evomerge.methods``).

1. Known answers: every method against a float64 reference written here from the formulas
   (plain loops / NumPy, never the code under test), float64 inputs at 1e-12 relative tolerance
   and float32 inputs at float32 tolerance.
2. Properties over every method in the registry (so a new method is covered automatically).
3. Statistics of the random masks (DARE, DELLA).
4. Parameter validation.
5. Parity with mergekit's own functions, skipped when mergekit is not importable.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evomerge.errors import ConfigError
from evomerge.methods import METHODS, Method, get_method, run_method
from evomerge.methods.interpolate import linear, nearswap, nuslerp, passthrough, slerp
from evomerge.methods.model_stock import model_stock
from evomerge.methods.sce import sce, sce_variance_mask, sce_weights
from evomerge.methods.task_arithmetic import (
    bernoulli_mask,
    breadcrumbs_mask,
    della_keep_probs,
    della_mask,
    magnitude_mask,
    sign_consensus,
    sparsify,
)

F64, F32 = torch.float64, torch.float32
DTYPES = [F64, F32]
RTOL = {F64: 1e-12, F32: 2e-5}


# =========================================================================== helpers
def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make(shape, n: int, seed: int, dtype=F64, scale: float = 1.0):
    """A base and ``n`` models ``base + scale * noise``, drawn in float64, then cast."""
    g = gen(seed)
    base = torch.randn(shape, generator=g, dtype=F64)
    xs = [base + scale * torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


def np64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(F64).numpy().copy()


def assert_matches(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype, rtol: float | None = None):
    """``actual`` has ``dtype`` and the reference's shape and values (relative to its scale)."""
    assert actual.dtype == dtype
    assert tuple(actual.shape) == expected.shape
    rtol = RTOL[dtype] if rtol is None else rtol
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(np64(actual), expected, rtol=rtol, atol=rtol * max(scale, 1e-30))


def gta_params(method: str, n: int, **overrides) -> dict[str, Any]:
    """Defaults of a task-vector method, for ``n`` models, with overrides."""
    p = resolved_defaults(METHODS[method], n, np.random.default_rng(0))
    p.update(overrides)
    return p


# =========================================================================== references
def ref_linear(xs, w, normalize):
    out = np.zeros_like(xs[0])
    for x, wi in zip(xs, w):
        out = out + wi * x
    total = sum(w)
    if normalize and abs(total) >= 1e-8:  # documented departure: ~zero sum is not divided by
        out = out / total
    return out


def ref_slerp(t, a, b):
    """Slerp of whole tensors (Wikipedia / mergekit), lerp when |cos| > 0.9995."""
    va, vb = a.ravel(), b.ravel()
    na, nb = math.sqrt(sum(v * v for v in va)), math.sqrt(sum(v * v for v in vb))
    ua = va / na if na > 1e-8 else va
    ub = vb / nb if nb > 1e-8 else vb
    dot = float(sum(p * q for p, q in zip(ua, ub)))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_slerp_vector(t, v0, v1):
    """nuslerp on one vector: unit vectors clamp their norm at 1e-7; lerp when sin(theta) < 1e-8."""
    n0 = v0 / max(np.linalg.norm(v0), 1e-7)
    n1 = v1 / max(np.linalg.norm(v1), 1e-7)
    cos = min(max(float(np.dot(n0, n1)), -1.0), 1.0)
    theta = math.acos(cos)
    s = math.sin(theta)
    if abs(s) < 1e-8:
        return (1 - t) * v0 + t * v1
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / s


def ref_nuslerp(xs, w, base=None, row_wise=False, flatten=True):
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    v0, v1 = xs
    if base is not None:
        v0, v1 = v0 - base, v1 - base
    out = np.empty_like(v0)
    if flatten:
        out = ref_slerp_vector(t, v0.ravel(), v1.ravel()).reshape(v0.shape)
    else:
        axis = 0 if row_wise else v0.ndim - 1  # the vectors run along this axis
        a0, a1 = np.moveaxis(v0, axis, -1), np.moveaxis(v1, axis, -1)
        res = np.empty_like(a0)
        for idx in np.ndindex(a0.shape[:-1]):
            res[idx] = ref_slerp_vector(t, a0[idx], a1[idx])
        out = np.moveaxis(res, -1, axis)
    return out if base is None else base + out


def ref_nearswap(t, a, b):
    out = np.empty_like(a)
    for idx in np.ndindex(a.shape):
        d = max(abs(a[idx] - b[idx]), 1e-6)
        w = min(max(t / d, 0.0), 1.0)
        out[idx] = w * b[idx] + (1 - w) * a[idx]
    return out


def ref_magnitude_mask(d, density):
    """Keep the int(density*N) largest magnitudes (none if that is 0)."""
    if density >= 1:
        return np.ones_like(d)
    k = int(density * d.size)
    mask = np.zeros(d.size)
    largest_first = sorted(range(d.size), key=lambda i: -abs(d.ravel()[i]))
    for i in largest_first[:k]:
        mask[i] = 1
    return mask.reshape(d.shape)


def ref_breadcrumbs_mask(d, density, gamma):
    """Drop int(gamma*N) largest (fewer if needed), then the smallest, keeping int(density*N)."""
    if density >= 1:
        return np.ones_like(d)
    n = d.size
    keep = int(density * n)
    n_top = min(int(gamma * n), n - keep)
    smallest_first = sorted(range(n), key=lambda i: abs(d.ravel()[i]))
    mask = np.zeros(n)
    for i in smallest_first[n - n_top - keep : n - n_top]:
        mask[i] = 1
    return mask.reshape(d.shape)


def ref_della_probs(d, density, epsilon):
    """Per row (dim 1), rank by magnitude r = 0..n-1, p = density - eps + 2 eps r / (n - 1)."""
    rows = d[None] if d.ndim < 2 else d
    out = np.empty_like(rows)
    n = rows.shape[1]
    for idx in np.ndindex(rows.shape[:1] + rows.shape[2:]):
        sl = (idx[0], slice(None)) + tuple(idx[1:])
        row = rows[sl]
        if n < 2:
            out[sl] = density
            continue
        order = sorted(range(n), key=lambda i: abs(row[i]))
        probs = np.empty(n)
        for rank, i in enumerate(order):
            probs[i] = (density - epsilon) + 2 * epsilon * rank / (n - 1)
        out[sl] = probs
    return out.reshape(d.shape)


def ref_gta(base, sparse_deltas, w, *, consensus, normalize, lam=1.0):
    """base + lam * mix(w_i * delta_i); TIES: elect the sign of the weighted sum (>= 0 -> +),
    keep agreeing entries, divide by the sum of the agreeing weights (0 -> 1)."""
    out = np.empty_like(base)
    for idx in np.ndindex(base.shape):
        weighted = [wi * d[idx] for wi, d in zip(w, sparse_deltas)]
        if consensus:
            elected = 1.0 if sum(weighted) >= 0 else -1.0
            num = sum(v for v in weighted if np.sign(v) == elected)
            den = sum(wi for wi, v in zip(w, weighted) if np.sign(v) == elected)
            den = 1.0 if den == 0 else den
        else:
            num = sum(weighted)
            den = sum(w)
            den = 1.0 if abs(den) < 1e-8 else den
        mixed = num / den if normalize else num
        out[idx] = base[idx] + lam * mixed
    return out


def ref_model_stock(base, xs, filter_wise):
    n = len(xs)
    if filter_wise:
        rows = lambda a: a.reshape(1, -1) if a.ndim == 1 else a.reshape(-1, a.shape[-1])
    else:
        rows = lambda a: a.reshape(1, -1)
    b = rows(base)
    ws = [rows(x) for x in xs]
    out = np.empty_like(b)
    for r in range(b.shape[0]):
        offs = [w[r] - b[r] for w in ws]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                norms = np.linalg.norm(offs[i]) * np.linalg.norm(offs[j])
                c = float(np.dot(offs[i], offs[j])) / max(norms, 1e-6)
                cosines.append(min(max(c, -1.0), 1.0))
        cos = sum(cosines) / len(cosines)
        t = n * cos / (1 + (n - 1) * cos)
        avg = sum(w[r] for w in ws) / n
        out[r] = t * avg + (1 - t) * b[r]
    return out.reshape(base.shape)


def ref_sce(base, xs, select_topk):
    deltas = [x - base for x in xs]
    n = len(deltas)
    if select_topk < 1:
        var = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            vals = [d[idx] for d in deltas]
            mean = sum(vals) / n
            var[idx] = sum((v - mean) ** 2 for v in vals) / n
        k = int(int(np.count_nonzero(var)) * select_topk)
        keep = np.zeros(base.size)
        for i in sorted(range(base.size), key=lambda i: -var.ravel()[i])[:k]:
            keep[i] = 1
        deltas = [d * keep.reshape(base.shape) for d in deltas]
    energy = [float(np.mean(d**2)) for d in deltas]
    total = sum(energy)
    weights = [1.0 / n] * n if abs(total) < 1e-6 else [e / total for e in energy]
    out = np.empty_like(base)
    for idx in np.ndindex(base.shape):
        vals = [d[idx] for d in deltas]
        elected = 1.0 if sum(vals) >= 0 else -1.0  # sign of the unweighted sum
        num = sum(wi * v for wi, v in zip(weights, vals) if np.sign(v) == elected)
        den = sum(wi for wi, v in zip(weights, vals) if np.sign(v) == elected)
        out[idx] = base[idx] + num / max(den, 1e-6)
    return out


# =========================================================================== 1. known answers
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_known_answer(dtype, normalize):
    _, xs = make((5, 7), 3, seed=1, dtype=dtype)
    w = [0.5, 1.25, -0.3]
    out = linear(xs, weights=w, normalize=normalize)
    assert_matches(out, ref_linear([np64(x) for x in xs], w, normalize), dtype)
    via_registry = run_method(METHODS["linear"], None, xs, {"weight": w, "normalize": normalize})
    assert torch.equal(via_registry, out)


def test_linear_zero_weight_sum_is_not_divided():
    _, xs = make((4,), 2, seed=2)
    out = linear(xs, weights=[1.0, -1.0], normalize=True)
    np.testing.assert_allclose(np64(out), np64(xs[0]) - np64(xs[1]), rtol=1e-12)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.25, 0.5, 0.8])
def test_slerp_general(dtype, t):
    a, (b,) = make((6, 8), 1, seed=3, dtype=dtype)
    out = slerp(a, b, t=t)
    assert_matches(out, ref_slerp(t, np64(a), np64(b)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_slerp_endpoints_exact(dtype):
    a, (b,) = make((6, 8), 1, seed=4, dtype=dtype)
    assert torch.equal(slerp(a, b, t=0.0), a)
    assert torch.equal(slerp(a, b, t=1.0), b)
    via_registry = run_method(METHODS["slerp"], a, [b], {"t": 0.0})
    assert torch.equal(via_registry, a)


def test_slerp_keeps_unit_norm():
    a, (b,) = make((50,), 1, seed=5)
    a, b = a / a.norm(), b / b.norm()
    for t in (0.1, 0.37, 0.9):
        assert float(slerp(a, b, t=t).norm()) == pytest.approx(1.0, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("factor", [2.5, -1.5])
def test_slerp_colinear_falls_back_to_lerp(dtype, factor):
    g = gen(6)
    a = torch.randn(4, 9, generator=g, dtype=F64)
    b = factor * a + 1e-3 * torch.randn(4, 9, generator=g, dtype=F64)
    cos = float((a * b).sum() / (a.norm() * b.norm()))
    assert abs(cos) > 0.9995  # precondition: the fallback branch is taken
    a, b = a.to(dtype), b.to(dtype)
    t = 0.3
    out = slerp(a, b, t=t)
    assert_matches(out, (1 - t) * np64(a) + t * np64(b), dtype)
    assert_matches(out, ref_slerp(t, np64(a), np64(b)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [True, False])
@pytest.mark.parametrize(
    "row_wise,flatten", [(False, True), (True, True), (True, False), (False, False)],
    ids=["flatten", "flatten-rowflag", "row_wise", "column_wise"],
)
@pytest.mark.parametrize("shape", [(5, 6), (3, 4, 5), (7,)], ids=["2d", "3d", "1d"])
def test_nuslerp_known_answer(dtype, with_base, row_wise, flatten, shape):
    base, xs = make(shape, 2, seed=7, dtype=dtype)
    w = [0.4, 1.1]
    out = nuslerp(xs, weights=w, base=base if with_base else None, row_wise=row_wise, flatten=flatten)
    ref = ref_nuslerp([np64(x) for x in xs], w, np64(base) if with_base else None, row_wise, flatten)
    assert_matches(out, ref, dtype)
    p = {"weight": w, "nuslerp_row_wise": row_wise, "nuslerp_flatten": flatten}
    via_registry = run_method(METHODS["nuslerp"], base if with_base else None, xs, p)
    assert torch.equal(via_registry, out)


def test_nuslerp_row_and_column_modes_differ_and_follow_the_axis():
    """row_wise slerps the vectors along dim 0, the default along dim -1 (mergekit's dims)."""
    _, xs = make((4, 6), 2, seed=8)
    w = [1.0, 1.0]
    rows = nuslerp(xs, weights=w, row_wise=True, flatten=False)
    cols = nuslerp(xs, weights=w, row_wise=False, flatten=False)
    a0, a1 = np64(xs[0]), np64(xs[1])
    for j in range(6):
        np.testing.assert_allclose(np64(rows)[:, j], ref_slerp_vector(0.5, a0[:, j], a1[:, j]), rtol=1e-12)
    for i in range(4):
        np.testing.assert_allclose(np64(cols)[i], ref_slerp_vector(0.5, a0[i], a1[i]), rtol=1e-12)
    assert not torch.allclose(rows, cols)


@pytest.mark.parametrize("w,t", [([1.0, -1.0], 0.5), ([0.0, 0.0], 0.5), ([1.0, 3.0], 0.75), ([2.0, 0.0], 0.0)])
def test_nuslerp_t_from_weights(w, t):
    base, xs = make((3, 5), 2, seed=9)
    out = nuslerp(xs, weights=w, base=base)
    ref = np64(base) + ref_slerp_vector(t, (np64(xs[0]) - np64(base)).ravel(), (np64(xs[1]) - np64(base)).ravel()).reshape(3, 5)
    assert_matches(out, ref, F64)


def test_nuslerp_colinear_and_zero_rows():
    g = gen(10)
    v0 = torch.randn(4, 6, generator=g, dtype=F64)
    v1 = torch.randn(4, 6, generator=g, dtype=F64)
    v1[1] = 3.0 * v0[1]  # colinear row (sin(theta) ~ 1e-8: either branch gives the lerp)
    v0[2] = 0.0  # zero row
    v0[3], v1[3] = 0.0, 0.0
    v0[3, 0], v1[3, 0] = 1.5, -2.0  # exactly antiparallel: sin(pi) ~ 1e-16 -> must take the lerp
    out = nuslerp([v0, v1], weights=[0.7, 0.3], flatten=False)
    ref = ref_nuslerp([np64(v0), np64(v1)], [0.7, 0.3], flatten=False)
    assert_matches(out, ref, F64)
    np.testing.assert_allclose(np64(out)[1], 0.7 * np64(v0)[1] + 0.3 * np64(v1)[1], rtol=1e-12)
    assert out[3].tolist() == pytest.approx([0.7 * 1.5 - 0.3 * 2.0, 0, 0, 0, 0, 0], rel=1e-12)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nearswap_hand_made(dtype):
    """Weight of the other model: clamp(t / max(|a - b|, 1e-6), 0, 1); with a = 0 and b >= t the
    result is exactly t, below t it is b."""
    a = torch.zeros(6, dtype=dtype)
    b = torch.tensor([0.0, 5e-7, 2e-6, 1e-3, 1.0, -4e-6], dtype=dtype)
    out = nearswap(a, b, t=1e-6)
    # weights: 1 (clamped distance), 1, 0.5, 1e-3, 1e-6, 0.25
    np.testing.assert_allclose(np64(out), [0.0, np64(b)[1], 1e-6, 1e-6, 1e-6, -1e-6], rtol=RTOL[dtype] * 10)
    # a distance below 1e-6 counts as 1e-6: weight 0.2 here, not 1
    a2, b2 = torch.tensor([0.0], dtype=F64), torch.tensor([5e-7], dtype=F64)
    assert float(nearswap(a2, b2, t=2e-7)) == pytest.approx(0.2 * 5e-7, rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("t", [0.0, 2e-7, 0.05, 0.3, 10.0])
def test_nearswap_known_answer(dtype, t):
    g = gen(11)
    a = torch.randn(6, 7, generator=g, dtype=F64)
    spread = torch.logspace(-4, 0, 42, dtype=F64).reshape(6, 7)  # distances from tiny to large
    b = a + spread * torch.randn(6, 7, generator=g, dtype=F64)
    b[0, 0] = a[0, 0]  # an exact match (distance clamped to 1e-6)
    a, b = a.to(dtype), b.to(dtype)
    out = nearswap(a, b, t=t)
    assert_matches(out, ref_nearswap(t, np64(a), np64(b)), dtype)
    via_registry = run_method(METHODS["nearswap"], a, [b], {"t": t})
    assert torch.equal(via_registry, out)
    if t == 0.0:
        assert torch.equal(out, a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (False, 0.6), (True, 1.0), (True, 1.4)])
def test_task_arithmetic_known_answer(dtype, normalize, lam):
    base, xs = make((5, 6), 3, seed=12, dtype=dtype)
    w = [0.3, 0.9, -0.2]
    out = run_method(METHODS["task_arithmetic"], base, xs, gta_params("task_arithmetic", 3, weight=w, normalize=normalize, **{"lambda": lam}))
    b = np64(base)
    mixed = sum(wi * (np64(x) - b) for wi, x in zip(w, xs))
    if normalize:
        mixed = mixed / sum(w)
    assert_matches(out, b + lam * mixed, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_known_answer(dtype, normalize):
    base, xs = make((6, 7), 3, seed=13, dtype=dtype)
    w, dens = [0.8, 1.3, 0.5], [0.5, 0.7, 0.3]
    out = run_method(METHODS["ties"], base, xs, gta_params("ties", 3, weight=w, density=dens, normalize=normalize))
    b = np64(base)
    deltas = [np64(x - base) for x in xs]  # the delta as the code rounds it
    sparse = [d * ref_magnitude_mask(d, p) for d, p in zip(deltas, dens)]
    assert_matches(out, ref_gta(b, sparse, w, consensus=True, normalize=normalize), dtype)


def test_ties_hand_made_election():
    """Base 0, three models, density 1; columns are hand-picked election cases."""
    base = torch.zeros(6, dtype=F64)
    d = torch.tensor(
        [
            # +/-/+ unweighted -> +, but weighted (1, -3, 1) -> -;  tie -> +;  zero delta never votes
            [1.0, 1.0, 0.0, 0.0, 2.0, -1.0],
            [-1.0, -1.0, 0.0, 2.0, -1.0, -1.0],
            [1.0, 0.0, 0.0, 0.0, 0.5, 0.0],
        ],
        dtype=F64,
    )
    w = [1.0, 3.0, 1.0]
    # column 0: weighted (1, -3, 1), sum -1 -> elect -, keep model 2: -3 / 3 = -1
    # column 1: weighted (1, -3, 0), sum -2 -> -, keep model 2: -3 / 3 = -1
    # column 2: all zero -> nothing kept, divisor 0 -> 1: 0
    # column 3: weighted (0, 6, 0) -> +, keep model 2 only: 6 / 3 = 2
    # column 4: weighted (2, -3, 0.5), sum -0.5 -> -, keep model 2: -3 / 3 = -1
    # column 5: weighted (-1, -3, 0) -> -, keep models 1, 2: -4 / 4 = -1
    p = gta_params("ties", 3, weight=w, density=[1.0] * 3, normalize=True)
    out = run_method(METHODS["ties"], base, [base + d[i] for i in range(3)], p)
    assert out.tolist() == [-1.0, -1.0, 0.0, 2.0, -1.0, -1.0]
    p["normalize"] = False
    out = run_method(METHODS["ties"], base, [base + d[i] for i in range(3)], p)
    assert out.tolist() == [-3.0, -3.0, 0.0, 6.0, -3.0, -4.0]
    # an exact tie (sum 0) elects +
    tie = run_method(METHODS["ties"], base[:1], [base[:1] + 1.0, base[:1] - 1.0], gta_params("ties", 2, weight=[1.0, 1.0]))
    assert tie.tolist() == [1.0]


def test_sign_consensus_sum_and_count():
    weighted = torch.tensor([[3.0, 1.0, 0.0], [-1.0, -1.0, 0.0], [-1.0, 0.5, 0.0]], dtype=F64)
    # column 0: sum +1 -> +, count (1 vs 2) -> -; column 1: sum 0.5 -> +, count +1 -> +
    assert sign_consensus(weighted, "sum").tolist() == [[1, 1, 0], [0, 0, 0], [0, 1, 0]]
    assert sign_consensus(weighted, "count").tolist() == [[0, 1, 0], [1, 0, 0], [1, 1, 0]]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method,normalize", [("breadcrumbs", False), ("breadcrumbs", True), ("breadcrumbs_ties", False), ("breadcrumbs_ties", True)])
def test_breadcrumbs_known_answer(dtype, method, normalize):
    base, xs = make((10, 10), 2, seed=14, dtype=dtype)
    w, dens, gams = [0.6, 1.1], [0.5, 0.3], [0.1, 0.05]
    p = gta_params(method, 2, weight=w, density=dens, gamma=gams, normalize=normalize)
    out = run_method(METHODS[method], base, xs, p)
    deltas = [np64(x - base) for x in xs]
    sparse = [d * ref_breadcrumbs_mask(d, dd, gg) for d, dd, gg in zip(deltas, dens, gams)]
    ref = ref_gta(np64(base), sparse, w, consensus=method == "breadcrumbs_ties", normalize=normalize)
    assert_matches(out, ref, dtype)


def test_breadcrumbs_mask_two_tails():
    d = torch.arange(1, 101, dtype=F64) * torch.tensor([1.0, -1.0]).repeat(50)  # |d| = 1..100
    mask = breadcrumbs_mask(d, 0.5, 0.1)
    kept = sorted(int(abs(v)) for v in d[mask.bool()].tolist())
    assert kept == list(range(41, 91))  # drop 10 largest (91..100) and 40 smallest (1..40)


def test_breadcrumbs_gamma_below_one_element_drops_no_outlier():
    """int(gamma*N) == 0: documented departure, no outlier dropped (mergekit zeroes the tensor)."""
    base, (x,) = make((4, 5), 1, seed=15)
    d = x - base
    mask = breadcrumbs_mask(d, 0.5, 0.01)
    assert int(mask.sum()) == 10
    assert torch.equal(mask, magnitude_mask(d, 0.5))
    np.testing.assert_array_equal(np64(mask), ref_breadcrumbs_mask(np64(d), 0.5, 0.01))
    out = run_method(METHODS["breadcrumbs"], base, [x], gta_params("breadcrumbs", 1, weight=[1.0], density=[0.5], gamma=[0.01]))
    np.testing.assert_allclose(np64(out - base), np64(d * mask), rtol=1e-12, atol=1e-15)
    assert int((out != base).sum()) == 10


def test_breadcrumbs_density_plus_gamma_above_one():
    d = torch.arange(1, 21, dtype=F64)  # |d| = 1..20
    mask = breadcrumbs_mask(d, 0.8, 0.3)  # keep 16, so only 4 (not 6) outliers can go
    assert d[mask.bool()].tolist() == [float(v) for v in range(1, 17)]
    np.testing.assert_array_equal(np64(mask), ref_breadcrumbs_mask(np64(d), 0.8, 0.3))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    density=st.floats(0.0, 1.0, exclude_min=True),
    gamma=st.floats(0.0, 1.0, exclude_max=True),
    seed=st.integers(0, 2**16),
)
def test_masks_keep_exactly_int_density_n(n, density, gamma, seed):
    d = torch.randn(n, generator=gen(seed), dtype=F64)
    expected = n if density >= 1 else int(density * n)
    assert int(magnitude_mask(d, density).sum()) == expected
    bc = breadcrumbs_mask(d, density, gamma)
    assert int(bc.sum()) == expected
    np.testing.assert_array_equal(np64(bc), ref_breadcrumbs_mask(np64(d), density, gamma))
    np.testing.assert_array_equal(np64(magnitude_mask(d, density)), ref_magnitude_mask(np64(d), density))


def test_magnitude_mask_int_density_n_zero_keeps_nothing():
    d = torch.randn(5, generator=gen(16), dtype=F64)
    assert int(magnitude_mask(d, 0.1).sum()) == 0  # documented departure (mergekit asserts)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["l1", "keep_prob"])
def test_dare_linear_single_model(dtype, mode):
    base, (x,) = make((40, 50), 1, seed=17, dtype=dtype)
    density, w, lam = 0.3, 0.7, 1.3
    p = gta_params("dare_linear", 1, weight=[w], density=[density], rescale_mode=mode, **{"lambda": lam})
    out = run_method(METHODS["dare_linear"], base, [x], p, [gen(5)])
    delta = x - base
    kept = out != base  # dropped entries are exactly the base
    # the mask is the Bernoulli(density) draw of the generator that was passed
    assert torch.equal(kept, bernoulli_mask(delta, density, gen(5)).bool())
    frac, sigma = float(kept.to(F64).mean()), math.sqrt(density * (1 - density) / kept.numel())
    assert abs(frac - density) < 4 * sigma
    dn = np64(delta)
    km = np64(kept.to(F64))
    scale = 1 / density if mode == "keep_prob" else np.abs(dn).sum() / np.abs(dn * km).sum()
    assert_matches(out, np64(base) + lam * w * scale * dn * km, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
@pytest.mark.parametrize("mode", ["l1", "keep_prob"])
def test_random_methods_compose_sparsify_then_mix(dtype, method, mode):
    """The merge equals: sparsify each delta with its own generator, then the TIES / linear mix."""
    base, xs = make((6, 9), 3, seed=18, dtype=dtype)
    w, dens, eps = [0.9, 0.4, 1.2], [0.5, 0.6, 0.4], [0.1, 0.2, 0.15]
    kind = "random" if method.startswith("dare") else "della_magprune"
    extra = {"epsilon": eps} if kind == "della_magprune" else {}
    p = gta_params(method, 3, weight=w, density=dens, rescale_mode=mode, **extra)
    out = run_method(METHODS[method], base, xs, p, [gen(100 + i) for i in range(3)])
    sparse = [
        np64(sparsify(x - base, kind, density=dens[i], epsilon=eps[i], rescale=p["rescale"],
                      rescale_mode=mode, generator=gen(100 + i)))
        for i, x in enumerate(xs)
    ]
    ref = ref_gta(np64(base), sparse, w, consensus=method in ("dare_ties", "della"), normalize=p["normalize"], lam=p["lambda"])
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(9,), (5, 8), (3, 4, 6), (6, 1), (1,)], ids=["1d", "2d", "3d", "col", "single"])
def test_della_keep_probs_exact(dtype, shape):
    d = torch.randn(shape, generator=gen(19), dtype=F64).to(dtype)
    probs = della_keep_probs(d, 0.4, 0.15)
    assert probs.dtype == dtype
    assert_matches(probs, ref_della_probs(np64(d), 0.4, 0.15), dtype, rtol=1e-12 if dtype == F64 else 1e-6)


def test_della_keep_probs_hand_made():
    d = torch.tensor([[0.1, -3.0, 2.0], [5.0, 0.0, -1.0]], dtype=F64)
    probs = della_keep_probs(d, 0.5, 0.2)
    np.testing.assert_allclose(np64(probs), [[0.3, 0.7, 0.5], [0.7, 0.3, 0.5]], rtol=1e-12)


@pytest.mark.parametrize("mode", ["l1", "keep_prob"])
def test_della_sparsify_survivors_scaled(mode):
    d = torch.randn(30, 40, generator=gen(20), dtype=F64)
    out = sparsify(d, "della_magprune", density=0.5, epsilon=0.2, rescale=True, rescale_mode=mode, generator=gen(21))
    mask, probs = della_mask(d, 0.5, 0.2, gen(21))
    assert torch.equal(out != 0, mask.bool())
    ratio = np64(out)[np64(mask) == 1] / np64(d)[np64(mask) == 1]
    if mode == "keep_prob":
        np.testing.assert_allclose(ratio, 1 / ref_della_probs(np64(d), 0.5, 0.2)[np64(mask) == 1], rtol=1e-12)
    else:
        np.testing.assert_allclose(ratio, np.abs(np64(d)).sum() / np.abs(np64(d * mask)).sum(), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("shape", [(6, 10), (12,), (2, 3, 8)], ids=["2d", "1d", "3d"])
def test_model_stock_known_answer(dtype, filter_wise, n, shape):
    g = gen(22)
    base = torch.randn(shape, generator=g, dtype=F64)
    shared = torch.randn(shape, generator=g, dtype=F64)  # correlated task vectors: 0 < cos < 1
    xs = [base + shared + 0.8 * torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]
    base, xs = base.to(dtype), [x.to(dtype) for x in xs]
    out = model_stock(base, xs, filter_wise=filter_wise)
    ref = ref_model_stock(np64(base), [np64(x) for x in xs], filter_wise)
    assert_matches(out, ref, dtype, rtol=1e-12 if dtype == F64 else 5e-5)
    via_registry = run_method(METHODS["model_stock"], base, xs, {"filter_wise": filter_wise})
    assert torch.equal(via_registry, out)


def test_model_stock_angle_formula_hand_made():
    base = torch.zeros(2, dtype=F64)
    # N=2, offsets at 60 degrees: cos 0.5, t = 2*0.5 / (1 + 0.5) = 2/3
    xs = [torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.5, math.sqrt(3) / 2], dtype=F64)]
    np.testing.assert_allclose(np64(model_stock(base, xs)), (2 / 3) * np64((xs[0] + xs[1]) / 2), rtol=1e-12)
    # orthogonal offsets: t = 0 -> the base; identical offsets: t = 1 -> the average
    ortho = [torch.tensor([2.0, 0.0], dtype=F64), torch.tensor([0.0, 3.0], dtype=F64)]
    assert torch.equal(model_stock(base + 1, [o + 1 for o in ortho]), base + 1)
    same = [torch.tensor([1.0, 2.0], dtype=F64)] * 3
    np.testing.assert_allclose(np64(model_stock(base, same)), [1.0, 2.0], rtol=1e-12)
    # N=3: mean of the pairwise cosines (1, 0, 0) = 1/3, t = 3*(1/3) / (1 + 2/3) = 3/5
    e1, e2 = torch.tensor([1.0, 0.0], dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    out = model_stock(base, [e1, 2 * e1, e2])
    np.testing.assert_allclose(np64(out), 0.6 * np64((e1 + 2 * e1 + e2) / 3), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("topk", [1.0, 0.5, 0.2])
def test_sce_known_answer(dtype, topk):
    base, xs = make((6, 7), 3, seed=23, dtype=dtype)
    out = sce(base, xs, select_topk=topk)
    # reference from the deltas as the code rounds them (float32: x - base in float32)
    b = np64(base)
    ref = ref_sce(b, [b + np64(x - base) for x in xs], topk)
    assert_matches(out, ref, dtype)
    via_registry = run_method(METHODS["sce"], base, xs, {"select_topk": topk, "int8_mask": False})
    assert torch.equal(via_registry, out)


def test_sce_hand_made():
    base = torch.zeros(4, dtype=F64)
    d1 = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=F64)
    d2 = torch.tensor([1.0, -2.0, 0.0, 4.0], dtype=F64)
    # topk=1: energies 1.5 and 5.25; per column: both agree (1), tie -> + keeps model 1 (2),
    # all zero (0), + keeps model 2 (4)
    assert sce(base, [d1, d2], select_topk=1.0).tolist() == [1.0, 2.0, 0.0, 4.0]
    np.testing.assert_allclose(np64(sce_weights(torch.stack([d1, d2]))), [1.5 / 6.75, 5.25 / 6.75], rtol=1e-12)
    # topk=0.5: variances (0, 4, 0, 6.25), two non-zero -> keep 1 position (the last)
    assert sce_variance_mask(torch.stack([d1, d2]), 0.5).tolist() == [0.0, 0.0, 0.0, 1.0]
    assert sce(base, [d1, d2], select_topk=0.5).tolist() == [0.0, 0.0, 0.0, 4.0]
    # all task vectors zero: uniform weights
    assert sce_weights(torch.zeros(3, 4, dtype=F64)).tolist() == [1 / 3] * 3


@pytest.mark.parametrize("dtype", DTYPES)
def test_passthrough_scale(dtype):
    _, (x,) = make((3, 4), 1, seed=24, dtype=dtype)
    assert torch.equal(passthrough([x]), x)
    assert_matches(passthrough([x], scale=2.5), 2.5 * np64(x), dtype)
    assert torch.equal(run_method(METHODS["passthrough"], None, [x], {"scale": [None]}), x)
    assert_matches(run_method(METHODS["passthrough"], None, [x], {"scale": [0.5]}), 0.5 * np64(x), dtype)
    with pytest.raises(ValueError):
        passthrough([x, x])


# =========================================================================== 2. registry properties
def _value_in_search(param, rng) -> Any:
    if param.kind is bool:
        return bool(rng.integers(2))
    if param.kind is str:
        return param.choices[int(rng.integers(len(param.choices)))]
    assert param.search is not None, f"{param.name} needs a search range to be sampled"
    lo, hi = param.search
    if param.kind is int:
        return int(rng.integers(int(lo), int(hi) + 1))
    return float(rng.uniform(lo, hi))


def resolved_defaults(m: Method, n: int, rng) -> dict[str, Any]:
    """Each param's default; required params without one get a value from their search range."""
    p: dict[str, Any] = {}
    for q in m.params:

        def one(q=q):
            return q.default if q.default is not None or not q.required else _value_in_search(q, rng)

        p[q.name] = one() if q.scope == "global" else [one() for _ in range(n)]
    return p


def sampled_params(m: Method, n: int, rng, **force) -> dict[str, Any]:
    """Every param drawn from its search range (bools/choices at random), valid by construction."""
    for _ in range(200):
        p: dict[str, Any] = {}
        for q in m.params:
            if q.name in force:
                v = force[q.name]
                p[q.name] = v if q.scope == "global" else [v] * n
            elif q.scope == "global":
                p[q.name] = _value_in_search(q, rng)
            else:
                p[q.name] = [_value_in_search(q, rng) for _ in range(n)]
        if all(check(p) is None for check in m.extra_checks):
            for q in m.params:
                values = [p[q.name]] if q.scope == "global" else p[q.name]
                assert all(v is None or q.check(v) is None for v in values), (q.name, values)
            return p
    raise AssertionError(f"could not sample valid params for {m.name}")


def n_models(m: Method) -> int:
    hi = 3 if m.max_models is None else m.max_models
    return max(m.min_models, min(3, hi))


CASES = [
    pytest.param(name, with_base, id=f"{name}{'' if with_base == (m.base in ('required', 'optional')) else ('+base' if with_base else '-base')}")
    for name, m in METHODS.items()
    for with_base in ([True, False] if m.base == "optional" else [m.base == "required"])
]
WEIGHTED = [name for name, m in METHODS.items() if any(q.name == "weight" for q in m.model_params)]
STOCHASTIC = [name for name, m in METHODS.items() if m.stochastic]
DETERMINISTIC = [name for name, m in METHODS.items() if not m.stochastic]
SHAPES = [(7,), (6, 9), (3, 4, 5)]


def inputs_for(m: Method, with_base: bool, shape, dtype, seed: int, n: int | None = None):
    base, xs = make(shape, n or n_models(m), seed, dtype)
    return (base if with_base else None), xs


def test_registry_is_covered():
    """Sanity of the lists the parametrised tests iterate over."""
    assert len(METHODS) >= 15
    assert set(STOCHASTIC) == {"dare_ties", "dare_linear", "della", "della_linear"}
    assert {"linear", "nuslerp", "task_arithmetic", "ties"} <= set(WEIGHTED)
    for name, m in METHODS.items():
        assert m.name == name and get_method(name) is m
        assert m.min_models >= 1 and (m.max_models is None or m.max_models >= m.min_models)
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        get_method("nope")


@pytest.mark.parametrize("dtype", [F64, F32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("name,with_base", CASES)
def test_shape_dtype_finite(name, with_base, shape, dtype):
    m = METHODS[name]
    base, xs = inputs_for(m, with_base, shape, dtype, seed=30)
    for i, p in enumerate([resolved_defaults(m, len(xs), np.random.default_rng(0)),
                           sampled_params(m, len(xs), np.random.default_rng(31))]):
        out = run_method(m, base, xs, p, [gen(40 + j) for j in range(len(xs))])
        assert out.shape == xs[0].shape and out.dtype == dtype, (i, p)
        assert torch.isfinite(out).all(), (i, p)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,with_base", CASES)
def test_identical_inputs_return_that_input(name, with_base, dtype):
    """All models == base: the merge is that tensor (defaults, and random valid params for the
    methods that are anchored at the base, for which it holds for any params)."""
    m = METHODS[name]
    x = torch.randn(5, 8, generator=gen(32), dtype=F64).to(dtype)
    n = n_models(m)
    rng = np.random.default_rng(33)
    params = [resolved_defaults(m, n, rng)]
    if with_base:
        params += [sampled_params(m, n, rng) for _ in range(5)]
    for p in params:
        out = run_method(m, x.clone() if with_base else None, [x.clone() for _ in range(n)], p, [gen(j) for j in range(n)])
        assert_matches(out, np64(x), dtype, rtol=1e-14 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", WEIGHTED)
def test_one_hot_weights_return_that_model(name, dtype):
    """Weight c on model k, 0 elsewhere, density 1: the merge is model k, for c=1 always and for
    any c when the method normalises (linear, normalize=true; nuslerp's t=w2/(w1+w2))."""
    m = METHODS[name]
    n = n_models(m)
    base, xs = make((6, 7), n, seed=34, dtype=dtype)
    normalizes = m.param("normalize") is not None or name == "nuslerp"
    for use_base in [True, False] if m.base == "optional" else [m.base == "required"]:
        for k in range(n):
            for c, normalize in [(1.0, False), (1.0, True), (2.5, True)]:
                if normalize and not normalizes:
                    continue
                p = resolved_defaults(m, n, np.random.default_rng(0))
                p["weight"] = [c if i == k else 0.0 for i in range(n)]
                if "density" in p:
                    p["density"] = [1.0] * n
                if "normalize" in p:
                    p["normalize"] = normalize
                out = run_method(m, base if use_base else None, xs, p, [gen(j) for j in range(n)])
                assert_matches(out, np64(xs[k]), dtype, rtol=1e-13 if dtype == F64 else 1e-6)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_methods_reproducible(name):
    m = METHODS[name]
    base, xs = make((8, 16), 3, seed=35)
    p = sampled_params(m, 3, np.random.default_rng(36), density=0.5)
    run = lambda seeds: run_method(m, base, xs, p, [gen(s) for s in seeds])
    state = torch.get_rng_state()
    a = run([1, 2, 3])
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not used
    torch.manual_seed(12345)  # and does not matter
    assert torch.equal(run([1, 2, 3]), a)
    assert not torch.equal(run([1, 2, 4]), a)
    assert not torch.equal(run([7, 8, 9]), a)


@pytest.mark.parametrize("name", [n for n in STOCHASTIC if n.endswith("_linear")])
def test_each_model_uses_its_own_generator(name):
    """Without sign election or normalisation the mix is additive, so model i's contribution
    must depend only on generators[i]."""
    m = METHODS[name]
    base, xs = make((8, 16), 2, seed=37)
    p2 = sampled_params(m, 2, np.random.default_rng(38), density=0.5, normalize=False)
    p1 = {k: (v[:1] if isinstance(v, list) else v) for k, v in p2.items()}
    p1b = {k: (v[1:] if isinstance(v, list) else v) for k, v in p2.items()}
    both = run_method(m, base, xs, p2, [gen(1), gen(2)])
    first = run_method(m, base, xs[:1], p1, [gen(1)])
    second = run_method(m, base, xs[1:], p1b, [gen(2)])
    np.testing.assert_allclose(np64(both - base), np64(first - base) + np64(second - base), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,with_base", [c for c in CASES if c.values[0] in DETERMINISTIC])
def test_deterministic_methods_ignore_generators(name, with_base):
    m = METHODS[name]
    base, xs = inputs_for(m, with_base, (6, 9), F64, seed=39)
    p = sampled_params(m, len(xs), np.random.default_rng(40))
    ref = run_method(m, base, xs, p, None)
    assert torch.equal(run_method(m, base, xs, p, [gen(1 + j) for j in range(len(xs))]), ref)
    assert torch.equal(run_method(m, base, xs, p, [gen(99 + j) for j in range(len(xs))]), ref)
    torch.manual_seed(4321)
    assert torch.equal(run_method(m, base, xs, p, None), ref)


@pytest.mark.parametrize("name,with_base", CASES)
def test_inputs_are_not_modified(name, with_base):
    m = METHODS[name]
    base, xs = inputs_for(m, with_base, (6, 9), F64, seed=41)
    copies = (None if base is None else base.clone(), [x.clone() for x in xs])
    p = sampled_params(m, len(xs), np.random.default_rng(42))
    run_method(m, base, xs, p, [gen(j) for j in range(len(xs))])
    if base is not None:
        assert torch.equal(base, copies[0])
    assert all(torch.equal(x, c) for x, c in zip(xs, copies[1]))


# =========================================================================== 3. statistics
def test_dare_keep_fraction():
    d = torch.randn(100_000, generator=gen(50), dtype=F64)
    for density in (0.1, 0.5, 0.9):
        mask = bernoulli_mask(d, density, gen(51))
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        sigma = math.sqrt(density * (1 - density) / d.numel())
        assert abs(float(mask.mean()) - density) < 4 * sigma
        out = sparsify(d, "random", density=density, generator=gen(51))
        assert torch.equal(out, d * mask)


@pytest.mark.parametrize("kind", ["random", "della_magprune"])
def test_keep_prob_rescale_is_unbiased(kind):
    """E[sparsified] = delta under keep_prob: mean over S seeds within a few standard errors
    (var per draw = delta^2 (1-p)/p); without rescale the same estimate is visibly biased."""
    d = torch.randn(20, 50, generator=gen(52), dtype=F64)
    density, eps, S = 0.4, 0.2, 400
    probs = np.full(d.shape, density) if kind == "random" else ref_della_probs(np64(d), density, eps)
    total = np.zeros(d.shape)
    plain = np.zeros(d.shape)
    for s in range(S):
        total += np64(sparsify(d, kind, density=density, epsilon=eps, rescale=True, rescale_mode="keep_prob", generator=gen(1000 + s)))
        plain += np64(sparsify(d, kind, density=density, epsilon=eps, rescale=False, generator=gen(1000 + s)))
    dn = np64(d)
    se = np.abs(dn) * np.sqrt((1 - probs) / (probs * S))
    z = (total / S - dn) / se
    assert np.abs(z).max() < 5.5
    assert 0.8 < float(np.mean(z**2)) < 1.2  # chi-square / 1000 dof: sd 0.045
    z_plain = (plain / S - dn) / se
    assert float(np.mean(z_plain**2)) > 10  # the test can tell a biased estimate apart


@pytest.mark.parametrize("kind", ["random", "della_magprune", "magnitude", "magnitude_outliers"])
def test_l1_rescale_preserves_l1_norm(kind):
    d = torch.randn(30, 40, generator=gen(53), dtype=F64)
    for density in (0.1, 0.5, 0.9):
        out = sparsify(d, kind, density=density, epsilon=0.05, gamma=0.02, rescale=True, rescale_mode="l1", generator=gen(54))
        assert float(out.abs().sum()) == pytest.approx(float(d.abs().sum()), rel=1e-12)
        assert int((out != 0).sum()) < d.numel()


def test_della_keep_rate_follows_linear_ramp():
    rows, n, density, eps = 4000, 20, 0.5, 0.2
    d = torch.randn(rows, n, generator=gen(55), dtype=F64)
    mask, _ = della_mask(d, density, eps, gen(56))
    m = np64(mask)
    ranks = np.argsort(np.argsort(np.abs(np64(d)), axis=1), axis=1)  # 0 = smallest magnitude
    rates = np.array([m[ranks == r].mean() for r in range(n)])
    expected = density - eps + 2 * eps * np.arange(n) / (n - 1)
    sigma = np.sqrt(expected * (1 - expected) / rows)
    assert np.all(np.abs(rates - expected) < 4.5 * sigma)
    slope = np.polyfit(np.arange(n), rates, 1)[0]
    assert slope == pytest.approx(2 * eps / (n - 1), rel=0.1)
    # bucketed: the lowest quarter of ranks is kept clearly less often than the top quarter
    assert rates[: n // 4].mean() < density - eps / 2 < density + eps / 2 < rates[-n // 4 :].mean()


# =========================================================================== 4. parameter checks
PARAM_CASES = [
    ("ties", "density", 0, False), ("ties", "density", 0.0, False), ("ties", "density", 1.5, False),
    ("ties", "density", -0.1, False), ("ties", "density", 0.5, True), ("ties", "density", 1.0, True),
    ("ties", "density", 1, True), ("ties", "density", float("nan"), False), ("ties", "density", float("inf"), False),
    ("ties", "density", "0.5", False), ("ties", "density", True, False),
    ("slerp", "t", -0.1, False), ("slerp", "t", 1.1, False), ("slerp", "t", 0.0, True), ("slerp", "t", 0.5, True),
    ("slerp", "t", 1.0, True),
    ("breadcrumbs", "gamma", 1.0, False), ("breadcrumbs", "gamma", -0.01, False), ("breadcrumbs", "gamma", 0.0, True),
    ("breadcrumbs", "gamma", 0.99, True),
    ("della", "epsilon", 0.5, False), ("della", "epsilon", -0.1, False), ("della", "epsilon", 0.0, True),
    ("della", "epsilon", 0.49, True),
    ("sce", "select_topk", 0.0, False), ("sce", "select_topk", 1.01, False), ("sce", "select_topk", 1.0, True),
    ("nearswap", "t", -1e-3, False), ("nearswap", "t", 0.0, True), ("nearswap", "t", 5.0, True),
    ("ties", "normalize", "yes", False), ("ties", "normalize", 1, False), ("ties", "normalize", True, True),
    ("ties", "rescale_mode", "l2", False), ("ties", "rescale_mode", "l1", True), ("ties", "rescale_mode", "keep_prob", True),
    ("linear", "weight", -0.5, True), ("linear", "weight", 3.0, True), ("linear", "weight", None, False),
    ("model_stock", "filter_wise", False, True), ("model_stock", "filter_wise", "false", False),
    ("karcher", "max_iter", 3, True), ("karcher", "max_iter", 3.0, True), ("karcher", "max_iter", 0, True),
    ("karcher", "max_iter", 2.5, False), ("karcher", "max_iter", -1, False), ("karcher", "max_iter", True, False),
    ("karcher", "max_iter", "3", False), ("karcher", "tol", 0.0, False), ("karcher", "tol", 1e-9, True),
    ("multislerp", "eps", -1e-9, False), ("multislerp", "eps", 0.0, True), ("ram", "epsilon", -1e-5, False),
    ("ramplus_tl", "r", -0.1, False), ("ramplus_tl", "alpha", 3.0, True),
]


@pytest.mark.parametrize("method,name,value,ok", PARAM_CASES)
def test_param_check(method, name, value, ok):
    msg = METHODS[method].param(name).check(value)
    if ok:
        assert msg is None
    else:
        assert isinstance(msg, str) and msg


def test_param_check_messages_name_the_interval():
    assert METHODS["ties"].param("density").check(1.5) == "expected a value in (0, 1]"
    assert METHODS["slerp"].param("t").check(-0.1) == "expected a value in [0, 1]"
    assert METHODS["breadcrumbs"].param("gamma").check(1.0) == "expected a value in [0, 1)"
    assert METHODS["nearswap"].param("t").check(-1.0) == "expected a value in [0, inf)"
    assert METHODS["karcher"].param("max_iter").check(2.5) == "expected an integer"


@pytest.mark.parametrize("name", list(METHODS))
def test_registry_defaults_and_search_ranges_are_valid(name):
    for q in METHODS[name].params:
        if q.default is not None:
            assert q.check(q.default) is None, q.name
        if q.required:
            assert q.default is None and q.search is not None, q.name
        if q.search is not None:
            lo, hi = q.search
            assert lo <= hi and q.check(lo) is None and q.check(hi) is None, q.name


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_epsilon_bounds_check(method):
    (check,) = METHODS[method].extra_checks
    assert check({"density": [0.5], "epsilon": [0.15]}) is None
    assert check({"density": [0.5, 0.3], "epsilon": [0.15, 0.29]}) is None
    assert check({"density": [1.0], "epsilon": [0.45]}) is None  # not sparsified: no bound
    assert check({"density": [0.75], "epsilon": [0.0]}) is None
    for d, e in [(0.1, 0.15), (0.9, 0.15), (0.75, 0.25), (0.25, 0.25)]:
        msg = check({"density": [d], "epsilon": [e]})
        assert isinstance(msg, str) and "epsilon" in msg, (d, e)
    msg = check({"density": [0.5, 0.1], "epsilon": [0.15, 0.15]})
    assert "model 2" in msg


# =========================================================================== 5. mergekit parity
try:  # mergekit >= 0.1.5: functional API (registry.get(name)([TensorGroup], parameters=...))
    from mergekit.merge_methods import registry as _mk_registry
    from mergekit.merge_methods.base import TensorGroup as _MkTensorGroup

    _MK_FUNCTIONAL = callable(getattr(_mk_registry, "get", None)) and hasattr(_MkTensorGroup, "from_tensors")
except Exception:  # noqa: BLE001 - any import problem means: no parity tests
    _MK_FUNCTIONAL = False
try:
    import mergekit.sparsify as _mk_sparsify
    from mergekit.merge_methods.generalized_task_arithmetic import get_mask as _mk_get_mask
except Exception:  # noqa: BLE001
    _mk_sparsify = None

needs_mergekit = pytest.mark.skipif(_mk_sparsify is None, reason="mergekit not importable")
needs_mergekit_api = pytest.mark.skipif(not _MK_FUNCTIONAL, reason="mergekit with the functional merge API not importable")


def mk_merge(name, base, xs, params):
    tensors = ([] if base is None else [base]) + list(xs)
    group = _MkTensorGroup.from_tensors(tensors, base_index=None if base is None else 0)
    return _mk_registry.get(name)([group], parameters=params)[0]


MK_CASES = [
    ("linear", {"weight": [0.3, 0.5, 0.9], "normalize": True}),
    ("linear", {"weight": [0.3, 0.5, 0.9], "normalize": False}),
    ("slerp", {"t": 0.0}), ("slerp", {"t": 0.35}), ("slerp", {"t": 1.0}),
    ("nuslerp", {"weight": [0.3, 0.9], "nuslerp_flatten": True, "nuslerp_row_wise": False}),
    ("nuslerp", {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": True}),
    ("nuslerp", {"weight": [0.3, 0.9], "nuslerp_flatten": False, "nuslerp_row_wise": False}),
    ("nuslerp", {"weight": [1.0, -1.0], "nuslerp_flatten": False, "nuslerp_row_wise": False}),
    ("nearswap", {"t": 0.3}),
    ("task_arithmetic", {"weight": [0.3, 0.5, -0.4], "normalize": False, "lambda": 1.2}),
    ("task_arithmetic", {"weight": [0.3, 0.5, 0.4], "normalize": True}),
    ("ties", {"weight": [0.8, 1.3, 0.5], "density": [0.5, 0.7, 0.3]}),
    ("ties", {"weight": [0.8, 1.3, 0.5], "density": [0.5, 0.7, 0.3], "normalize": False, "rescale": True}),
    ("breadcrumbs", {"weight": [0.6, 1.1, 0.3], "density": [0.5, 0.3, 0.8], "gamma": [0.1, 0.05, 0.3]}),
    ("breadcrumbs_ties", {"weight": [0.6, 1.1, 0.3], "density": [0.5, 0.3, 0.8], "gamma": [0.1, 0.05, 0.3], "normalize": True}),
    ("model_stock", {"filter_wise": False}), ("model_stock", {"filter_wise": True}),
    ("sce", {"select_topk": 1.0}), ("sce", {"select_topk": 0.4}),
    ("passthrough", {"scale": [1.5]}),
    ("multislerp", {"weight": [0.3, 0.5, 0.9]}),
    ("multislerp", {"weight": [0.3, 0.5, 0.9], "normalize_weights": False, "eps": 1e-3}),
    ("karcher", {"max_iter": 10, "tol": 1e-5}), ("karcher", {"max_iter": 2, "tol": 1e-7}),
    ("arcee_fusion", {}),
    ("ram", {"epsilon": 0.4}),
    ("ramplus_tl", {"r": 0.7, "alpha": 0.9, "epsilon": 0.4}),
]


def _our_params(name: str, n: int, mk_params: dict) -> dict:
    p = resolved_defaults(METHODS[name], n, np.random.default_rng(0))
    p.update(mk_params)
    return p


@needs_mergekit_api
@pytest.mark.parametrize("shape", [(6, 10), (12,)], ids=["2d", "1d"])
@pytest.mark.parametrize("name,params", MK_CASES, ids=lambda v: v if isinstance(v, str) else None)
def test_mergekit_parity_deterministic(name, params, shape):
    m = METHODS[name]
    n = len(params["weight"]) if "weight" in params else (1 if m.max_models == 1 else 3)
    g = gen(60)
    base = torch.randn(shape, generator=g, dtype=F64)
    shared = torch.randn(shape, generator=g, dtype=F64)
    xs = [base + 0.5 * shared + 0.3 * torch.randn(shape, generator=g, dtype=F64) for _ in range(n)]
    with_base = m.base in ("required", "optional")
    ours = run_method(m, base if with_base else None, xs, _our_params(name, n, params))
    theirs = mk_merge(name, base if with_base else None, xs, params)
    np.testing.assert_allclose(np64(ours), np64(theirs), rtol=1e-12, atol=1e-12)
    if m.base == "optional":  # without the optional base, too
        theirs = mk_merge(name, None, xs, params)
        ours = run_method(m, None, xs, _our_params(name, n, params))
        np.testing.assert_allclose(np64(ours), np64(theirs), rtol=1e-12, atol=1e-12)
    if m.base == "input":  # a base is one more input
        theirs = mk_merge(name, base, xs, params)
        ours = run_method(m, None, [*xs, base], _our_params(name, n + 1, params))
        np.testing.assert_allclose(np64(ours), np64(theirs), rtol=1e-12, atol=1e-12)


@needs_mergekit_api
@pytest.mark.parametrize("name", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_mergekit_parity_random(name):
    """mergekit draws masks from the global RNG, model after model; one generator shared by all
    models, seeded alike, draws the same masks (float32, mergekit's CPU work dtype)."""
    base, xs = make((8, 12), 3, seed=61, dtype=F32)
    params = {"weight": [0.8, 1.3, 0.5], "density": [0.5, 0.7, 0.3]}
    if name.startswith("della"):
        params["epsilon"] = [0.1, 0.2, 0.15]
    shared = gen(62)
    ours = run_method(METHODS[name], base, xs, _our_params(name, 3, params), [shared] * 3)
    torch.manual_seed(62)
    theirs = mk_merge(name, base, xs, params)
    np.testing.assert_allclose(np64(ours), np64(theirs), rtol=1e-6, atol=1e-6)
    assert not torch.equal(ours, run_method(METHODS[name], base, xs, _our_params(name, 3, params), [gen(63)] * 3))


@needs_mergekit
@pytest.mark.parametrize("density,gamma", [(0.5, 0.1), (0.3, 0.05), (0.8, 0.3), (0.9, 0.02)])
def test_mergekit_parity_sparsifiers(density, gamma):
    d = torch.randn(10, 10, generator=gen(64), dtype=F64)
    assert torch.equal(magnitude_mask(d, density) * d, _mk_sparsify.magnitude(d, density))
    assert torch.equal(breadcrumbs_mask(d, density, gamma) * d, _mk_sparsify.magnitude_outliers(d, density, gamma=gamma))
    ours = sparsify(d, "magnitude", density=density, rescale=True)
    theirs = _mk_sparsify.magnitude(d, density, rescale_norm=_mk_sparsify.RescaleNorm.l1)
    np.testing.assert_allclose(np64(ours), np64(theirs), rtol=1e-12)
    d32 = d.to(F32)
    torch.manual_seed(65)
    theirs = _mk_sparsify.della_magprune(d32, density, 0.05, rescale_norm=_mk_sparsify.RescaleNorm.l1)
    ours = sparsify(d32, "della_magprune", density=density, epsilon=0.05, rescale=True, generator=gen(65))
    np.testing.assert_allclose(np64(ours), np64(theirs), rtol=1e-6, atol=1e-7)


@needs_mergekit
def test_mergekit_parity_sign_mask():
    w = torch.randn(4, 9, 7, generator=gen(66), dtype=F64)
    w[:, 0, 0] = 0.0
    for method in ("sum", "count"):
        assert torch.equal(sign_consensus(w, method).bool(), _mk_get_mask(w, method=method))


# =========================================================================== 6. pinned random streams
# SHA-256 of merged tensors (and of the raw DARE/DELLA masks) for a fixed recipe seed, tensor name and
# inputs. A change to the seeding scheme (tensor_seed, generator use, draw order) changes every
# exported recipe's meaning: it must fail here, not pass silently. Computed from the code
# before the registry refactor (commit 5594513), so the refactor is proven to keep them.
GOLDEN_SEED = 1234
GOLDEN_TENSOR = "model.layers.3.mlp.down_proj.weight"
GOLDEN_OUTPUTS = {
    "dare_ties": "43a4d08d16012c7fe42fc6cc6987d5ae8b1a69c02d2e55ce30b27e0ec2a1917e",
    "dare_linear": "e130932ebbc15501a58fe5e0dea2bf1fc998035165f2ff07cad8026ab399576f",
    "della": "d3082b96263d6c6306952a83b47c7c144953abd89b2d830428d71bc41ec29836",
    "della_linear": "fba496bc2c8754201d36e597e38d2393e1c5039bc43ccb398ae65d82a41f4014",
}
GOLDEN_MASKS = {
    "dare": "12d598e4f04fd22e648a07d3b7afcc06a72dae8a5786a9d5d98c4f4dc054bd2f",
    "della": "17c0333fb42e1f826826c7a09b780c3c492fed17a79e73c216e4f7f8f9fdf693",
}


def _golden_inputs(n: int = 3, shape=(24, 40)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Inputs from a closed formula (no RNG): float32 base and ``n`` models."""
    k = torch.arange(shape[0] * shape[1], dtype=F64).reshape(shape)
    base = torch.sin(k * 0.37).to(F32)
    xs = [(torch.sin(k * 0.37) + 0.05 * torch.cos(k * (0.11 + 0.07 * i) + i)).to(F32) for i in range(n)]
    return base, xs


def _golden_params(m: Method, n: int) -> dict[str, Any]:
    p = resolved_defaults(m, n, np.random.default_rng(0))
    p["weight"] = [0.7, 0.4, 0.9][:n]
    if "density" in p:
        p["density"] = [0.5, 0.35, 0.6][:n]
    if "epsilon" in p:
        p["epsilon"] = [0.1, 0.2, 0.15][:n]
    return p


def _digest(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()


def golden_output(name: str) -> str:
    from evomerge.engine import TensorTask, execute_task

    m = METHODS[name]
    base, xs = _golden_inputs()
    refs = {("base", GOLDEN_TENSOR): base, **{(f"m{i}", GOLDEN_TENSOR): x for i, x in enumerate(xs)}}
    task = TensorTask(GOLDEN_TENSOR, ("base", GOLDEN_TENSOR), tuple((f"m{i}", GOLDEN_TENSOR) for i in range(len(xs))),
                      _golden_params(m, len(xs)))
    out = execute_task(task, m, refs.__getitem__, seed=GOLDEN_SEED, device=torch.device("cpu"))
    return _digest(out)


def golden_mask(kind: str) -> str:
    from evomerge.engine import tensor_seed

    base, xs = _golden_inputs()
    g = torch.Generator().manual_seed(tensor_seed(GOLDEN_SEED, GOLDEN_TENSOR, 0))
    d = xs[0] - base
    mask = bernoulli_mask(d, 0.4, g) if kind == "dare" else della_mask(d, 0.4, 0.15, g)[0]
    return _digest(mask.to(torch.uint8))


def test_golden_digests_cover_every_stochastic_method():
    assert set(GOLDEN_OUTPUTS) == set(STOCHASTIC), "a new stochastic method needs a golden digest here"


@pytest.mark.parametrize("name", STOCHASTIC)
def test_golden_output_digest(name):
    assert golden_output(name) == GOLDEN_OUTPUTS.get(name), f"{name}: the seeded output changed"


@pytest.mark.parametrize("kind", ["dare", "della"])
def test_golden_mask_digest(kind):
    assert golden_mask(kind) == GOLDEN_MASKS[kind], f"{kind}: the seeded mask changed"


# =========================================================================== 7. recipe-level parity
# The same YAML recipe through ``evomerge merge`` (the CLI) and mergekit 0.1.5's ``run_merge`` (what
# ``mergekit-yaml`` runs) on tiny float32 Llama models, every tensor. The elementwise methods agree
# bit for bit; multislerp and karcher to mergekit's float32 rounding (see their modules).
def _mk_run_merge():
    try:
        from mergekit.config import MergeConfiguration
        from mergekit.merge import MergeOptions, run_merge
    except Exception:  # noqa: BLE001 - no mergekit: no parity test
        return None
    return lambda recipe, out: run_merge(MergeConfiguration.model_validate(recipe), str(out),
                                         options=MergeOptions(copy_tokenizer=False))


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, str]:
    """A 3-layer tiny Llama and three fine-tunes of it (float32)."""
    from conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("recipe_parity")
    base = make_tiny_llama(root / "base", seed=20, num_layers=3)
    out = {"base": str(base)}
    for i, name in enumerate("abc"):
        out[name] = str(make_tiny_llama(root / name, seed=21 + i, base=base, num_layers=3))
    return out


def _split(attn: Any, rest: Any) -> list[dict]:
    return [{"filter": "self_attn", "value": attn}, {"value": rest}]


# name -> (recipe without models' paths filled in, exact?)
RECIPE_CASES: dict[str, tuple[dict, bool]] = {
    "multislerp+base": ({"merge_method": "multislerp", "base_model": "base",
                         "models": [{"model": "a", "parameters": {"weight": [0.2, 0.8]}},
                                    {"model": "b", "parameters": {"weight": 0.5}},
                                    {"model": "c", "parameters": {"weight": _split(0.3, 0.9)}}]}, False),
    "multislerp": ({"merge_method": "multislerp", "parameters": {"normalize_weights": False, "eps": 1e-6},
                    "models": [{"model": "a", "parameters": {"weight": 0.3}},
                               {"model": "b", "parameters": {"weight": [0.6, 0.1]}}]}, False),
    "karcher+base": ({"merge_method": "karcher", "base_model": "base", "parameters": {"max_iter": 5, "tol": 1e-6},
                      "models": [{"model": "a"}, {"model": "b"}]}, False),
    "karcher": ({"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]}, False),
    "arcee_fusion": ({"merge_method": "arcee_fusion", "base_model": "base", "models": [{"model": "a"}]}, True),
    "ram": ({"merge_method": "ram", "base_model": "base", "parameters": {"epsilon": [0.01, 0.03]},
             "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]}, True),
    "ramplus_tl": ({"merge_method": "ramplus_tl", "base_model": "base",
                    "parameters": {"r": 0.5, "alpha": _split(0.1, 0.9), "epsilon": 0.015},
                    "models": [{"model": "a"}, {"model": "b"}, {"model": "c"}]}, True),
}


def _fill(recipe: dict, paths: dict[str, str]) -> dict:
    out = {**recipe, "dtype": "float32", "models": [{**m, "model": paths[m["model"]]} for m in recipe["models"]]}
    if "base_model" in recipe:
        out["base_model"] = paths[recipe["base_model"]]
    return out


@pytest.mark.skipif(_mk_run_merge() is None, reason="mergekit not importable")
@pytest.mark.parametrize("case", list(RECIPE_CASES))
def test_recipe_parity_with_mergekit_yaml(llamas, case, tmp_path):
    import yaml
    from click.testing import CliRunner

    from conftest import load_state
    from evomerge.cli import main

    recipe, exact = RECIPE_CASES[case]
    recipe = _fill(recipe, llamas)
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "ours")])
    assert res.exit_code == 0, res.output
    _mk_run_merge()(recipe, tmp_path / "mk")
    ours, theirs = load_state(tmp_path / "ours"), load_state(tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    for name, t in theirs.items():
        assert ours[name].dtype == t.dtype == F32, name
        if exact:
            assert torch.equal(ours[name], t), name
        else:  # mergekit's float32 rounding of the literal steps (8 ulps of the largest entry bounds it here)
            ulp = torch.finfo(F32).eps * float(t.abs().max())
            assert float((ours[name] - t).abs().max()) <= 8 * ulp, name
