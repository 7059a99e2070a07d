"""Tests for mergekit 0.1.5's five methods evomerge adds: multislerp, karcher, arcee_fusion, ram,
ramplus_tl (``evomerge/methods/{multislerp,karcher,arcee_fusion,ram}.py``).

1. Known answers: hand-checkable cases, and every method against a float64 reference written
   here from the method's stated steps (NumPy, literal steps; never the code under test):
   float64 inputs at 1e-12 relative tolerance, float32 inputs at float32 tolerance.
2. Properties: shape and dtype kept, identical inputs, one-hot weights, finite output, the
   prepare/combine split equals the one-call function.
3. Edge cases: zero vectors, 1-D tensors, non-default eps/epsilon, Karcher convergence.
4. Parity with mergekit 0.1.5's own methods on random float32 tensors (skipped without mergekit).

The registry's shared suites (``tests/test_methods.py``: shape, dtype, identical inputs, one-hot
weights, parameter ranges, mergekit's table; ``tests/test_workspace.py``: workspace == engine;
recipe-level parity with ``mergekit-yaml``) cover these methods' registry entries; the test
``test_registry_steps_equal_the_functions`` ties the entries' steps to the functions tested here.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evomerge.methods import METHODS, run_method
from evomerge.methods.arcee_fusion import arcee_fusion, fusion_mask, fusion_threshold
from evomerge.methods.karcher import karcher, karcher_combine, karcher_mean_coordinates, karcher_prepare
from evomerge.methods.multislerp import multislerp, multislerp_combine, multislerp_prepare
from evomerge.methods.ram import (
    ram,
    ram_combine,
    ram_masks,
    ram_overlap_counts,
    ram_task_vectors,
    ramplus_lambdas,
    ramplus_rho,
    ramplus_tl,
)
from evomerge.methods.sphere import gram64
from test_methods import RTOL, assert_matches, gen, make, np64  # the shared float64-reference helpers

F64, F32 = torch.float64, torch.float32
DTYPES = [F64, F32]
SHAPES = [(6, 10), (12,), (2, 3, 8)]
SHAPE_IDS = ["2d", "1d", "3d"]
ULP32 = torch.finfo(F32).eps


# =========================================================================== helpers
def make_sparse(shape, n: int, seed: int, dtype=F64, keep: float = 0.4):
    """A base and ``n`` models whose task vectors are zero outside a random ``keep`` fraction."""
    g = gen(seed)
    base = torch.randn(shape, generator=g, dtype=F64)
    xs = [base + torch.randn(shape, generator=g, dtype=F64) * (torch.rand(shape, generator=g, dtype=F64) < keep)
          for _ in range(n)]
    return base.to(dtype), [x.to(dtype) for x in xs]


# =========================================================================== references
def ref_multislerp(xs, w, base=None, normalize=True, eps=1e-8):
    """mergekit's stated steps, literally: unit vectors, weighted mean direction, tangent
    projection, exponential map, weighted mean norm."""
    if len(xs) == 1:
        return xs[0]
    vs = [x - base if base is not None else x for x in xs]
    w = np.array(w, dtype=np.float64)
    if normalize and abs(w.sum()) >= 1e-8:
        w = w / w.sum()
    norms = [float(np.sqrt(np.sum(v * v))) for v in vs]
    us = [v.ravel() / (nv + eps) for v, nv in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, us))
    mean_norm = float(np.sqrt(np.sum(mean * mean)))
    if mean_norm < eps:
        assert len(xs) == 2
        out = w[0] * vs[0] + w[1] * vs[1]
    else:
        mh = mean / mean_norm
        tangent = sum(wi * (u - np.dot(u, mh) * mh) for wi, u in zip(w, us))
        tn = float(np.sqrt(np.sum(tangent * tangent))) + eps
        out = (mh * math.cos(tn) + tangent * (math.sin(tn) / tn)) * sum(wi * nv for wi, nv in zip(w, norms))
        out = out.reshape(vs[0].shape)
    return out if base is None else base + out


def ref_karcher(xs, alphas=None, max_iter=10, tol=1e-5):
    """Weighted Karcher mean on the unit sphere by Riemannian gradient descent (unit step) on the
    full vectors, as mergekit states it; scaled by the weighted mean norm."""
    n = len(xs)
    if n == 1:
        return xs[0]
    alphas = [1.0 / n] * n if alphas is None else list(alphas)
    norms = [float(np.sqrt(np.sum(x * x))) for x in xs]
    units = [x.ravel() / nx if nx > 0 else np.zeros(x.size) for x, nx in zip(xs, norms)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return np.zeros_like(xs[0])
    a = {i: alphas[i] / sum(alphas[j] for j in valid) for i in valid}
    mean = sum(a[i] * units[i] for i in valid)
    mn = np.linalg.norm(mean)
    mean = units[valid[0]].copy() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for i in valid:
            dot = min(max(float(np.dot(mean, units[i])), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += a[i] * theta / math.sin(theta) * (units[i] - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        un = np.linalg.norm(mean)
        if un > tol:
            mean = mean / un
    return (sum(al * nx for al, nx in zip(alphas, norms)) * mean).reshape(xs[0].shape)


def ref_fusion(b, x):
    """Importance |x - b| * KL(softmax(x) || softmax(b)) per row; Tukey's upper fence from the
    floor(q (N-1))-th smallest importances; take x where importance >= fence."""
    rows_b = b.reshape(-1, b.shape[-1])
    rows_x = x.reshape(-1, x.shape[-1])
    imp = np.empty_like(rows_b)
    for r in range(rows_b.shape[0]):
        p = np.exp(rows_x[r] - rows_x[r].max())
        p = p / p.sum() + 1e-8
        q = np.exp(rows_b[r] - rows_b[r].max())
        q = q / q.sum() + 1e-8
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        imp[r] = np.abs(rows_x[r] - rows_b[r]) * kl
    s = np.sort(imp.ravel())
    last = s.size - 1
    fence = s[last // 2] + 1.5 * (s[(3 * last) // 4] - s[last // 4])
    mask = (imp >= fence).reshape(b.shape)
    return np.where(mask, x, b)


def ref_ram(b, xs, epsilon=1e-5, plus=False, r=0.1, alpha=0.2):
    """Entry by entry: average the task-vector entries above epsilon over the models that have
    them; RAM+ scales a model's unique entries by 1 + r clip(shared/max(unique, eps), 0, alpha)."""
    ds = [(x - b).ravel() for x in xs]
    touched = [np.abs(d) > epsilon for d in ds]
    count = sum(t.astype(int) for t in touched)
    lam = [1.0] * len(xs)
    if plus:
        for i, t in enumerate(touched):
            shared = int(np.sum(t & (count > 1)))
            unique = int(np.sum(t & (count == 1)))
            lam[i] = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
    out = b.ravel().copy()
    for k in range(out.size):
        for i, d in enumerate(ds):
            if touched[i][k]:
                out[k] += d[k] * (lam[i] if count[k] == 1 else 1.0 / count[k])
    return out.reshape(b.shape)


# =========================================================================== 1. known answers
def test_multislerp_hand_made():
    """Two orthogonal directions, norms 2 and 4, equal weights: the bisector, scaled by 3
    (eps = 0: eps shortens the unit vectors unequally, |v| / (|v| + eps), tilting by 1e-9)."""
    a = torch.tensor([2.0, 0.0], dtype=F64)
    b = torch.tensor([0.0, 4.0], dtype=F64)
    out = multislerp([a, b], weights=[1.0, 1.0], eps=0.0)
    np.testing.assert_allclose(np64(out), [3 / math.sqrt(2), 3 / math.sqrt(2)], rtol=1e-12)
    out = multislerp([a, b], weights=[3.0, 1.0], eps=0.0)  # direction (3/4, 1/4)/|.|, norm 3/4*2 + 1/4*4
    d = np.array([0.75, 0.25]) / math.hypot(0.75, 0.25)
    np.testing.assert_allclose(np64(out), 2.5 * d, rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_multislerp_known_answer(dtype, with_base, normalize, shape):
    base, xs = make(shape, 3, seed=1, dtype=dtype)
    w = [0.3, 0.5, 0.9]
    out = multislerp(xs, weights=w, base=base if with_base else None, normalize_weights=normalize)
    ref = ref_multislerp([np64(x) for x in xs], w, np64(base) if with_base else None, normalize)
    assert_matches(out, ref, dtype)


@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.05])
def test_multislerp_non_default_eps(eps):
    """eps shrinks the unit vectors and enters the exponential map as cos(eps)."""
    base, xs = make((5, 7), 3, seed=2, scale=0.2)
    w = [0.2, 0.7, 0.4]
    out = multislerp(xs, weights=w, base=base, eps=eps)
    assert_matches(out, ref_multislerp([np64(x) for x in xs], w, np64(base), eps=eps), F64)


def test_multislerp_two_antipodal_models_fall_back_to_the_weighted_sum():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    out = multislerp([x, -x], weights=[1.0, 1.0])
    np.testing.assert_array_equal(np64(out), np.zeros(3))
    out = multislerp([x, -3 * x], weights=[1.0, 1.0])  # unit directions cancel; the sum does not
    np.testing.assert_allclose(np64(out), np64(-x), rtol=1e-15)


def test_multislerp_three_cancelling_models_is_an_error():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64)
    with pytest.raises(ValueError, match="cancel"):
        multislerp([x, -x, 2 * x], weights=[0.5, 0.5, 0.0])
    # in a merge: one line naming the tensor
    from evomerge.engine import TensorTask, execute_task
    from evomerge.errors import MergeError

    refs = {("a", "w"): x, ("b", "w"): -x, ("c", "w"): 2 * x}
    task = TensorTask("w", None, tuple(refs), {"weight": [0.5, 0.5, 0.0], "normalize_weights": True, "eps": 1e-8})
    with pytest.raises(MergeError, match="^w: multislerp: the weighted directions"):
        execute_task(task, METHODS["multislerp"], refs.__getitem__, seed=0, device=torch.device("cpu"),
                     compute_dtype=F64)


def test_multislerp_zero_vector_adds_no_direction_and_no_norm():
    a = torch.tensor([3.0, 0.0, 0.0], dtype=F64)
    b = torch.tensor([0.0, 0.0, 1.0], dtype=F64)
    z = torch.zeros(3, dtype=F64)
    out = multislerp([a, z, b], weights=[1.0, 1.0, 1.0])
    ref = ref_multislerp([np64(a), np64(z), np64(b)], [1.0, 1.0, 1.0])
    assert_matches(out, ref, F64)
    out = multislerp([a, z, b], weights=[1.0, 1.0, 1.0], eps=0.0)  # no 0 / 0 (mergekit: NaN)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(np64(out), (4 / 3) * np.array([1, 0, 1]) / math.sqrt(2), rtol=1e-12)


@pytest.mark.parametrize("n", [2, 3])
def test_multislerp_models_equal_to_the_base_give_the_base(n):
    """Documented departure for n >= 3: mergekit raises (no direction); the base is the limit."""
    base = torch.randn(4, 5, generator=gen(18), dtype=F64)
    assert torch.equal(multislerp([base.clone() for _ in range(n)], weights=[0.5] * n, base=base), base)
    other = base + 1.0
    out = multislerp([base.clone(), base.clone(), other], weights=[0.5, 0.5, 0.0], base=base)
    assert torch.equal(out, base)


def test_multislerp_zero_weight_sum_is_not_divided():
    """Documented departure: mergekit divides by the zero sum (NaN)."""
    base, xs = make((4, 3), 2, seed=3)
    out = multislerp(xs, weights=[1.0, -1.0], base=base)
    assert torch.isfinite(out).all()
    assert_matches(out, ref_multislerp([np64(x) for x in xs], [1.0, -1.0], np64(base)), F64)


def test_karcher_on_a_circle_is_the_mean_angle():
    """On a circle the Karcher mean of points within half a turn is the weighted mean of their
    angles, reached in one unit step; the result has the weighted mean norm."""
    angles, norms, w = [0.0, 0.2, 1.3], [1.0, 2.0, 3.0], [0.5, 0.3, 0.2]
    xs = [torch.tensor([r * math.cos(a), r * math.sin(a)], dtype=F64) for a, r in zip(angles, norms)]
    mean_angle = sum(wi * a for wi, a in zip(w, angles))
    scale = sum(wi * r for wi, r in zip(w, norms))
    out = karcher(xs, weights=w, max_iter=1, tol=1e-12)
    np.testing.assert_allclose(np64(out), [scale * math.cos(mean_angle), scale * math.sin(mean_angle)], rtol=1e-12)
    beta, steps = karcher_mean_coordinates(karcher_prepare(xs), w, max_iter=50, tol=1e-7)
    assert steps == 1  # the second step's length is below tol


def test_karcher_two_points_is_the_midpoint_without_iterating():
    a = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    b = torch.tensor([0.0, 3.0, 0.0], dtype=F64)
    out = karcher([a, b])
    np.testing.assert_allclose(np64(out), [math.sqrt(2), math.sqrt(2), 0.0], rtol=1e-12)
    assert karcher_mean_coordinates(karcher_prepare([a, b]), [0.5, 0.5])[1] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (0, 1e-5), (1, 1e-5), (3, 1e-9)])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_karcher_known_answer(dtype, max_iter, tol, shape):
    _, xs = make(shape, 4, seed=4, dtype=dtype, scale=1.5)
    out = karcher(xs, max_iter=max_iter, tol=tol)
    assert_matches(out, ref_karcher([np64(x) for x in xs], None, max_iter, tol), dtype)


def test_karcher_weighted_known_answer():
    _, xs = make((7, 5), 3, seed=5, scale=2.0)
    w = [0.2, 0.5, 1.3]
    assert_matches(karcher(xs, weights=w), ref_karcher([np64(x) for x in xs], w), F64)


def test_karcher_converges_to_a_critical_point():
    """With room to converge, the weighted sum of the log maps at the mean vanishes, before the
    iteration cap."""
    g = gen(6)
    xs = [torch.randn(40, generator=g, dtype=F64) + 1.5 * torch.ones(40, dtype=F64) for _ in range(5)]
    w = [0.1, 0.3, 0.2, 0.25, 0.15]
    parts = karcher_prepare(xs)
    units = [np64(x) / np.linalg.norm(np64(x)) for x in xs]

    def gradient(beta):
        m = sum(b * u for b, u in zip(beta, units))
        np.testing.assert_allclose(np.linalg.norm(m), 1.0, rtol=1e-12)
        grad = np.zeros_like(m)
        for wi, u in zip(w, units):
            theta = math.acos(min(max(float(m @ u), -1.0), 1.0))
            grad += wi * theta / math.sin(theta) * (u - math.cos(theta) * m)
        return float(np.linalg.norm(grad))

    beta, steps = karcher_mean_coordinates(parts, w, max_iter=200, tol=1e-7)
    assert 1 < steps < 200  # stopped by tol, not by the cap
    assert gradient(beta) < 1e-7
    # below the step length's float64 floor (~1e-8) it runs to max_iter, and the mean keeps improving
    beta, steps = karcher_mean_coordinates(parts, w, max_iter=60, tol=0.0)
    assert steps == 60 and gradient(beta) < 1e-13
    np.testing.assert_allclose(ref_karcher([np64(x) for x in xs], w, 60, 0.0), np64(karcher(xs, weights=w, max_iter=60, tol=0.0)), rtol=1e-12)


def test_karcher_zero_vectors():
    """A zero tensor is left out of the direction but counts (with norm 0) in the scale; all
    zero (or all shorter than tol) gives zeros."""
    a = torch.tensor([2.0, 0.0], dtype=F64)
    b = torch.tensor([0.0, 2.0], dtype=F64)
    z = torch.zeros(2, dtype=F64)
    out = karcher([a, z, b])
    np.testing.assert_allclose(np64(out), (4 / 3) * np.array([1.0, 1.0]) / math.sqrt(2), rtol=1e-12)
    assert torch.equal(karcher([z, z.clone()]), z)
    tiny = torch.full((2,), 1e-7, dtype=F64)
    assert torch.equal(karcher([tiny, -tiny]), z)


def test_fusion_threshold_hand_made():
    """Quartiles are the floor(q (N-1))-th smallest values: for 0..8, 2, 4, 6 -> 4 + 1.5 * 4."""
    assert float(fusion_threshold(torch.arange(9, dtype=F64))) == 10.0
    assert float(fusion_threshold(torch.arange(10, dtype=F64).flip(0))) == 10.0  # indices 2, 4, 6 again
    assert float(fusion_threshold(torch.arange(12, dtype=F64))) == 5.0 + 1.5 * (8.0 - 2.0)


def test_fusion_hand_made():
    """One row, five entries unchanged: quartiles (sorted importances, indices 2, 4, 6) are 0, 0
    and the importance of a 0.01 change, so the fence is that of a 0.015 change: the 0.02 and
    the 3.0 changes are taken, the 0.01 ones are not."""
    base = torch.zeros(1, 9, dtype=F64)
    other = base.clone()
    other[0, :4] = torch.tensor([0.01, -0.01, 0.02, 0.0], dtype=F64)
    other[0, 8] = 3.0
    out = arcee_fusion(base, other)
    expected = np.zeros((1, 9))
    expected[0, 2], expected[0, 8] = 0.02, 3.0
    np.testing.assert_array_equal(np64(out), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_fusion_known_answer(dtype, shape):
    base, (x,) = make(shape, 1, seed=7, dtype=dtype, scale=0.3)
    assert_matches(arcee_fusion(base, x), ref_fusion(np64(base), np64(x)), dtype)


def test_fusion_samples_large_tensors_from_the_generator():
    base, (x,) = make((40, 50), 1, seed=8, scale=0.3)
    exact = fusion_mask(base, x, sample_size=None)
    assert torch.equal(exact, fusion_mask(base, x, sample_size=2000))  # not larger than the sample: exact
    a = fusion_mask(base, x, sample_size=300, generator=gen(1))
    assert torch.equal(a, fusion_mask(base, x, sample_size=300, generator=gen(1)))
    assert not torch.equal(a, fusion_mask(base, x, sample_size=300, generator=gen(2)))


def test_ram_hand_made():
    base = torch.zeros(4, dtype=F64)
    d = [torch.tensor(v, dtype=F64) for v in ([1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 5.0])]
    np.testing.assert_array_equal(np64(ram(base, d)), [2.0, 0.0, 3.0, 5.0])
    # model 3 shares 1 entry and owns 1: rho = 1; models 1 and 2 own none: rho = shared / 1e-5
    masks = ram_masks(ram_task_vectors(base, d))
    assert ram_overlap_counts(masks) == ([2, 1, 1], [0, 0, 1])
    np.testing.assert_allclose(np64(ramplus_tl(base, d, r=0.1, alpha=0.2)), [2.0, 0.0, 3.0, 5.1], rtol=1e-7)
    np.testing.assert_array_equal(np64(ramplus_tl(base, d, r=0.5, alpha=2.0)), [2.0, 0.0, 3.0, 7.5])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("epsilon", [1e-5, 0.0, 0.3])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ram_known_answer(dtype, epsilon, shape):
    base, xs = make_sparse(shape, 4, seed=9, dtype=dtype)
    assert_matches(ram(base, xs, epsilon=epsilon), ref_ram(np64(base), [np64(x) for x in xs], epsilon), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r,alpha,epsilon", [(0.1, 0.2, 1e-5), (0.8, 0.9, 1e-5), (1.0, 5.0, 0.3), (0.0, 0.5, 1e-5)])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
def test_ramplus_known_answer(dtype, r, alpha, epsilon, shape):
    """rho and lambda are float32 (as in mergekit): float64 inputs match to float32 lambda."""
    base, xs = make_sparse(shape, 3, seed=10, dtype=dtype, keep=0.6)
    ref = ref_ram(np64(base), [np64(x) for x in xs], epsilon, plus=True, r=r, alpha=alpha)
    assert_matches(ramplus_tl(base, xs, r=r, alpha=alpha, epsilon=epsilon), ref, dtype, rtol=RTOL[F32])


def test_ramplus_global_rho():
    """The paper's variant: rho given (counted over the whole model) instead of per tensor."""
    base, xs = make_sparse((6, 5), 3, seed=11)
    out = ramplus_tl(base, xs, r=0.5, alpha=1.0, rho=[0.0, 0.4, 3.0])
    lam = [1.0, 1.0 + 0.5 * 0.4, 1.5]
    deltas = [np64(x - base) for x in xs]
    touched = [np.abs(d) > 1e-5 for d in deltas]
    count = sum(t.astype(int) for t in touched)
    expected = np64(base) + sum(
        np.where(t, d * np.where(count == 1, np.float32(li), 1.0 / np.maximum(count, 1)), 0.0)
        for d, t, li in zip(deltas, touched, lam)
    )
    assert_matches(out, expected, F64, rtol=RTOL[F32])  # lambda is float32


# =========================================================================== 2. properties
NAMES = ["multislerp", "karcher", "arcee_fusion", "ram", "ramplus_tl"]


def n_models(name):
    return 1 if name == "arcee_fusion" else 3


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_one_hot_weights_return_that_model(dtype, with_base):
    base, xs = make((4, 9), 3, seed=14, dtype=dtype)
    for k in range(3):
        w = [1.0 if i == k else 0.0 for i in range(3)]
        out = multislerp(xs, weights=w, base=base if with_base else None)
        assert_matches(out, np64(xs[k]), dtype, rtol=4 * RTOL[dtype])


def test_single_model_is_returned_unchanged():
    base, (x,) = make((3, 4), 1, seed=15)
    assert multislerp([x], weights=[0.3], base=base) is x
    assert karcher([x]) is x
    assert torch.equal(ram(base, [x], epsilon=0.0), x)  # one model: every change is unique
    assert torch.equal(ram(base, []), base) and torch.equal(ramplus_tl(base, []), base)


def test_prepare_combine_split_equals_one_call():
    """The trial-invariant parts, prepared once, give the one-call result for every trial."""
    base, xs = make((8, 6), 3, seed=16, dtype=F32)
    parts = multislerp_prepare(xs, base=base)
    for w in ([0.2, 0.3, 0.5], [1.0, 0.0, 0.4]):
        assert torch.equal(multislerp_combine(parts, w, base=base), multislerp(xs, weights=w, base=base))
    kparts = karcher_prepare(xs)
    assert torch.equal(karcher_combine(kparts, max_iter=4), karcher(xs, max_iter=4))
    deltas = ram_task_vectors(base, xs)
    masks = ram_masks(deltas, 0.5)
    for r, alpha in ((0.1, 0.2), (0.9, 0.7)):
        lam = ramplus_lambdas(ramplus_rho(*ram_overlap_counts(masks), 0.5), r=r, alpha=alpha)
        assert torch.equal(ram_combine(base, deltas, masks, lam), ramplus_tl(base, xs, r=r, alpha=alpha, epsilon=0.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,with_base", [("multislerp", False), ("multislerp", True), ("karcher", False),
                                            ("arcee_fusion", True), ("ram", True), ("ramplus_tl", True)])
def test_registry_steps_equal_the_functions(name, with_base, dtype):
    """The registry entry (prepare, then combine) gives the function's result bit for bit."""
    base, xs = make_sparse((7, 9), n_models(name), seed=18, dtype=dtype, keep=0.5)
    params = {
        "multislerp": {"weight": [0.2, 0.5, 0.9], "normalize_weights": True, "eps": 1e-8},
        "karcher": {"max_iter": 4, "tol": 1e-6},
        "arcee_fusion": {},
        "ram": {"epsilon": 0.3},
        "ramplus_tl": {"r": 0.6, "alpha": 0.4, "epsilon": 0.3},
    }[name]
    ours = run_method(METHODS[name], base if with_base else None, xs, params)
    if name == "multislerp":
        expected = multislerp(xs, weights=params["weight"], base=base if with_base else None)
    elif name == "karcher":
        expected = karcher(xs, max_iter=4, tol=1e-6)
    elif name == "arcee_fusion":
        expected = arcee_fusion(base, xs[0], sample_size=None)
    elif name == "ram":
        expected = ram(base, xs, epsilon=0.3)
    else:
        expected = ramplus_tl(base, xs, r=0.6, alpha=0.4, epsilon=0.3)
    assert torch.equal(ours, expected)


def test_gram_is_chunk_independent():
    _, xs = make((37, 11), 3, seed=17, dtype=F32)
    full = gram64(xs)
    np.testing.assert_allclose(gram64(xs, chunk=50).numpy(), full.numpy(), rtol=1e-13)
    flat = np.stack([np64(x).ravel() for x in xs])
    np.testing.assert_allclose(full.numpy(), flat @ flat.T, rtol=1e-13)


# =========================================================================== 4. mergekit parity
try:  # mergekit >= 0.1.5: functional API (registry.get(name)([TensorGroup], parameters=...))
    from mergekit.merge_methods import registry as _mk_registry
    from mergekit.merge_methods.base import TensorGroup as _MkTensorGroup
    from mergekit.merge_methods.karcher import karcher_merge_tensors as _mk_karcher_tensors

    _MK = callable(getattr(_mk_registry, "get", None)) and all(
        _mk_registry.get(name) is not None for name in NAMES)
except Exception:  # noqa: BLE001 - any import problem means: no parity tests
    _MK = False

needs_mergekit = pytest.mark.skipif(not _MK, reason="mergekit 0.1.5 (with these five methods) not importable")


def mk_merge(name, base, xs, params):
    tensors = ([] if base is None else [base]) + list(xs)
    group = _MkTensorGroup.from_tensors(tensors, base_index=None if base is None else 0)
    return _mk_registry.get(name)([group], parameters=params)[0]


def parity_inputs(shape, n, seed):
    """float32 models sharing a direction (as fine-tunes of one base do), plus the base."""
    g = gen(seed)
    base = torch.randn(shape, generator=g, dtype=F32)
    shared = torch.randn(shape, generator=g, dtype=F32)
    xs = [base + 0.5 * shared + 0.3 * torch.randn(shape, generator=g, dtype=F32) for _ in range(n)]
    return base, xs


def assert_within_ulps(ours, theirs, ulps, ref=None):
    """|ours - theirs| <= ulps * eps32 * max|theirs| (float32 rounding of the result); with a
    float64 reference, also: ours is within 2 such ulps of it and no farther from it than
    mergekit's float32 result is."""
    assert ours.dtype == theirs.dtype == F32 and ours.shape == theirs.shape
    ulp = ULP32 * float(theirs.abs().max())
    assert float((ours - theirs).abs().max()) <= ulps * ulp
    if ref is not None:
        ours_err = float(np.abs(np64(ours) - ref).max())
        assert ours_err <= 2 * ulp
        assert ours_err <= max(float(np.abs(np64(theirs) - ref).max()), ulp)


# multislerp and karcher: the same math, different float32 roundings. mergekit runs every step on
# the float32 tensors (its error grows with the size: measured 1 ulp of the largest output entry
# at 3k entries, 4-16 at 130k, 250-1000 at 2M); we reduce through a float64 Gram matrix and stay
# within 1 ulp of the float64 reference at every size. At the sizes here 8 ulps bounds the gap.
@needs_mergekit
@pytest.mark.parametrize("shape", [(64, 48), (33,), (4, 5, 6)], ids=["2d", "1d", "3d"])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("params", [
    {"weight": [0.3, 0.5, 0.9]},
    {"weight": [0.3, 0.5, 0.9], "normalize_weights": False},
    {"weight": [1.0, 0.0, 0.2], "eps": 1e-3},
])
def test_parity_multislerp(shape, with_base, params):
    base, xs = parity_inputs(shape, 3, seed=20)
    base = base if with_base else None
    ours = multislerp(xs, weights=params["weight"], base=base, normalize_weights=params.get("normalize_weights", True),
                      eps=params.get("eps", 1e-8))
    theirs = mk_merge("multislerp", base, xs, params)
    ref = ref_multislerp([np64(x) for x in xs], params["weight"], None if base is None else np64(base),
                         params.get("normalize_weights", True), params.get("eps", 1e-8))
    assert_within_ulps(ours, theirs, 8, ref)


@needs_mergekit
def test_parity_multislerp_edges():
    """One model (returned as is), a zero vector, two antipodal models (weighted sum)."""
    base, xs = parity_inputs((10, 7), 3, seed=21)
    assert torch.equal(multislerp(xs[:1], weights=[0.4], base=base), mk_merge("multislerp", base, xs[:1], {"weight": [0.4]}))
    zs = [xs[0], torch.zeros_like(xs[1]), xs[2]]
    assert_within_ulps(multislerp(zs, weights=[0.2, 0.5, 0.3]), mk_merge("multislerp", None, zs, {"weight": [0.2, 0.5, 0.3]}), 8)
    anti = [xs[0], -xs[0]]
    assert torch.equal(multislerp(anti, weights=[1.0, 1.0]), mk_merge("multislerp", None, anti, {"weight": [1.0, 1.0]}))
    with pytest.raises(ValueError):
        mk_merge("multislerp", None, [xs[0], -xs[0], xs[0] * 2], {"weight": [0.5, 0.5, 0.0]})


@needs_mergekit
@pytest.mark.parametrize("shape", [(64, 48), (33,), (4, 5, 6)], ids=["2d", "1d", "3d"])
@pytest.mark.parametrize("max_iter,tol", [(10, 1e-5), (0, 1e-5), (2, 1e-5), (50, 1e-7)])
def test_parity_karcher(shape, max_iter, tol):
    _, xs = parity_inputs(shape, 4, seed=22)
    xs = [x * (i + 1) for i, x in enumerate(xs)]  # different norms
    ours = karcher(xs, max_iter=max_iter, tol=tol)
    ref = ref_karcher([np64(x) for x in xs], None, max_iter, tol)
    assert_within_ulps(ours, mk_merge("karcher", None, xs, {"max_iter": max_iter, "tol": tol}), 8, ref)


@needs_mergekit
def test_parity_karcher_edges():
    """Weighted (mergekit's karcher_merge_tensors), a base_model (just one more input to
    mergekit's karcher), zero vectors."""
    base, xs = parity_inputs((20, 9), 3, seed=23)
    w = [0.2, 0.5, 1.3]
    assert_within_ulps(karcher(xs, weights=w), _mk_karcher_tensors(xs, w), 8)
    assert_within_ulps(karcher([base, *xs]), mk_merge("karcher", base, xs, {}), 8)
    zs = [xs[0], torch.zeros_like(xs[1]), xs[2]]
    assert_within_ulps(karcher(zs), mk_merge("karcher", None, zs, {}), 8)
    z = torch.zeros(5, dtype=F32)
    assert torch.equal(karcher([z, z.clone()]), mk_merge("karcher", None, [z, z.clone()], {}))


# arcee_fusion, ram, ramplus_tl: the same elementwise float32 operations in the same order: exact.
@needs_mergekit
@pytest.mark.parametrize("shape", [(64, 48), (33,), (4, 5, 6)], ids=["2d", "1d", "3d"])
def test_parity_arcee_fusion(shape):
    base, (x,) = parity_inputs(shape, 1, seed=24)
    assert torch.equal(arcee_fusion(base, x), mk_merge("arcee_fusion", base, [x], {}))


@needs_mergekit
def test_parity_arcee_fusion_sampled_quantiles():
    """Above 1,000,000 entries mergekit samples from the global RNG; a generator seeded alike
    draws the same sample."""
    base, (x,) = parity_inputs((1001, 1000), 1, seed=25)
    ours = arcee_fusion(base, x, generator=gen(26))
    torch.manual_seed(26)
    assert torch.equal(ours, mk_merge("arcee_fusion", base, [x], {}))


@needs_mergekit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 48), (33,), (4, 5, 6)], ids=["2d", "1d", "3d"])
@pytest.mark.parametrize("epsilon", [1e-5, 0.0, 0.4])
def test_parity_ram(shape, epsilon, dtype):
    base, xs = make_sparse(shape, 4, seed=27, dtype=dtype)
    assert torch.equal(ram(base, xs, epsilon=epsilon), mk_merge("ram", base, xs, {"epsilon": epsilon}))


@needs_mergekit
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 48), (33,), (4, 5, 6)], ids=["2d", "1d", "3d"])
@pytest.mark.parametrize("r,alpha,epsilon", [(0.1, 0.2, 1e-5), (0.7, 0.9, 0.4), (1.0, 5.0, 1e-5)])
def test_parity_ramplus_tl(shape, r, alpha, epsilon, dtype):
    base, xs = make_sparse(shape, 4, seed=28, dtype=dtype, keep=0.6)
    params = {"r": r, "alpha": alpha, "epsilon": epsilon}
    assert torch.equal(ramplus_tl(base, xs, **params), mk_merge("ramplus_tl", base, xs, params))
