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

import logging
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import Tensor

from evomerge.methods.steps import Cache, Inputs, Prepared, WholeInputs, rank_dtype

log = logging.getLogger(__name__)

Consensus = Literal["sum", "count"]
Sparsifier = Literal["magnitude", "random", "magnitude_outliers", "della_magprune"]
RescaleMode = Literal["l1", "keep_prob"]

_RESCALE_EPS = 1e-7  # below this norm a masked delta is returned unscaled (as mergekit does)


# --------------------------------------------------------------------------- masks
def top_k_mask(values: Tensor, k: int) -> Tensor:
    """Bool mask of the ``k`` largest entries of ``values``, ties broken by flat index (lower
    index first): exactly the first ``k`` entries of a *stable* descending sort, so the result is
    deterministic on every device (``torch.topk`` alone picks arbitrarily among ties).

    Equivalently ``descending_ranks(values) < k``; the workspace (#6) uses cached ranks, the engine
    this function (one ``topk`` plus a scan over the entries tied with the k-th value).
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if k <= 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if k >= n:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    thr = torch.topk(flat, k, largest=True, sorted=False).values.min()  # the k-th largest value
    above = flat > thr
    tied = flat == thr
    room = k - above.sum()  # how many of the tied entries are kept (0-dim, no host sync)
    keep = above | (tied & (torch.cumsum(tied, 0) <= room))
    return keep.reshape(values.shape)


def descending_ranks(values: Tensor) -> Tensor:
    """Each entry's position (int64) in the stable descending order of ``values`` (value desc,
    flat index asc): ``top_k_mask(values, k) == (descending_ranks(values) < k)`` for every k."""
    flat = values.reshape(-1)
    order = torch.sort(flat, descending=True, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(flat.numel(), device=flat.device)
    return ranks.reshape(values.shape)


def magnitude_mask(delta: Tensor, density: float) -> Tensor:
    """Keep the ``int(density * N)`` entries of largest magnitude (TIES' trim step); among equal
    magnitudes the lower flat index is kept (see :func:`top_k_mask`).

    Returns a mask of ``delta``'s dtype. ``density >= 1`` keeps everything; when
    ``int(density * N)`` is 0 nothing is kept (mergekit aborts in that case).
    """
    if density >= 1:
        return torch.ones_like(delta)
    return top_k_mask(delta.abs(), int(density * delta.numel())).to(delta.dtype)


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """``(n_top, n_bot)``: how many largest-magnitude outliers and smallest entries breadcrumbs
    drops from ``n`` entries so that ``int(density * n)`` remain."""
    keep = int(density * n)
    n_top = int(gamma * n)
    n_bot = n - keep - n_top
    if n_bot < 0:  # not enough room: trim fewer outliers
        n_top += n_bot
        n_bot = 0
    return n_top, n_bot


def breadcrumbs_mask(delta: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` fraction of largest-magnitude outliers, then the
    smallest entries, so ``int(density * N)`` entries remain (the entries of descending magnitude
    rank ``n_top <= r < N - n_bot``; ties by flat index, as :func:`top_k_mask`).

    If ``density + gamma > 1`` fewer outliers are dropped so the density is met (as mergekit).
    Unlike mergekit 0.1.x, ``int(gamma * N) == 0`` drops *no* outlier instead of the whole tensor.
    ``density >= 1`` keeps everything (gamma is then ignored, as in mergekit).
    """
    n = delta.numel()
    if density >= 1:
        return torch.ones_like(delta)
    n_top, n_bot = breadcrumbs_counts(n, density, gamma)
    mag = delta.abs()
    keep = top_k_mask(mag, n - n_bot)
    if n_top > 0:
        keep = keep & ~top_k_mask(mag, n_top)
    return keep.to(delta.dtype)


def bernoulli_mask(delta: Tensor, density: float, generator: torch.Generator | None) -> Tensor:
    """DARE: keep each entry independently with probability ``density``."""
    if density >= 1:
        return torch.ones_like(delta)
    probs = torch.full_like(delta, density)
    return torch.bernoulli(probs, generator=generator)


def della_row_ranks(delta: Tensor) -> Tensor:
    """Ascending magnitude rank (int64) of each entry within its row (dim 1; a 1-D tensor is one
    row), ties by position (a stable sort), shaped like ``delta``."""
    rows = delta.unsqueeze(0) if delta.dim() < 2 else delta  # (rows, cols, ...)
    n = rows.shape[1]
    order = torch.sort(rows.abs(), dim=1, stable=True).indices
    shape = [1] * rows.dim()
    shape[1] = n
    ramp = torch.arange(n, device=delta.device).reshape(shape).expand_as(order)
    ranks = torch.empty_like(order).scatter_(1, order, ramp)
    return ranks.reshape(delta.shape)


def della_probs_from_ranks(ranks: Tensor, n: int, density: float, epsilon: float,
                           dtype: torch.dtype = torch.float32) -> Tensor:
    """``(density - epsilon) + rank * 2 epsilon / (n - 1)``, as ``rank * step + low`` (two
    roundings in ``dtype``; the workspace's fused kernels compute exactly this)."""
    step = 2 * epsilon / (n - 1)
    return ranks.to(dtype) * step + (density - epsilon)


def della_keep_probs(delta: Tensor, density: float, epsilon: float) -> Tensor:
    """DELLA's MagPrune keep probabilities: within each row (dim 1; 1-D tensors are one row),
    rank entries by magnitude (ties by position) and spread the probabilities linearly over
    ``[density - epsilon, density + epsilon]``, larger magnitude -> more likely kept.

    A row of one entry gets ``density`` (mergekit would produce NaN there).
    """
    n = delta.shape[1] if delta.dim() >= 2 else delta.shape[0]
    if n < 2:
        return torch.full_like(delta, density)
    return della_probs_from_ranks(della_row_ranks(delta), n, density, epsilon, delta.dtype)


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
    return masked * l1_scale(delta.abs().sum(), masked.abs().sum())


def l1_scale(before: Tensor, after: Tensor) -> Tensor:
    """The L1 rescale factor ``before / after`` as a 0-dim tensor; 1 when either norm is below
    1e-7 (then the masked delta is returned unscaled, as mergekit does). No host sync."""
    small = (before < _RESCALE_EPS) | (after < _RESCALE_EPS)
    return torch.where(small, torch.ones_like(before), before / torch.where(small, torch.ones_like(after), after))


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
    if isinstance(probs, float):
        return masked * (1.0 / probs)  # a multiply, not a division by a Python scalar (same on every device)
    return masked / probs


# --------------------------------------------------------------------------- consensus
def sequential_sum(tensors: Sequence[Tensor]) -> Tensor:
    """``((t0 + t1) + t2) + ...``: sums across models in a fixed order, so every implementation
    (the engine, the workspace's chunked and fused kernels) rounds identically."""
    acc = tensors[0]
    for t in tensors[1:]:
        acc = acc + t
    return acc


def sign_consensus(weighted: Tensor, method: Consensus = "sum") -> Tensor:
    """TIES sign election over stacked weighted deltas ``(n_models, *shape)``.

    ``sum``: the elected sign is that of the sum (mass) of the deltas; ``count``: of the sum of
    their signs. Ties go to +. Returns a mask of ``weighted``'s dtype, 1 where a delta agrees
    with the elected sign (zeros never agree).
    """
    return torch.stack(sign_agreement(list(weighted.unbind(0)), method), dim=0)


def sign_agreement(weighted: Sequence[Tensor], method: Consensus = "sum") -> list[Tensor]:
    """:func:`sign_consensus` on a list of per-model tensors; returns one 0/1 mask per model."""
    signs = [w.sign() for w in weighted]
    score = sequential_sum(weighted if method == "sum" else signs)
    elected = torch.where(score >= 0, 1.0, -1.0).to(weighted[0].dtype)
    return [(s == elected).to(weighted[0].dtype) for s in signs]


# --------------------------------------------------------------------------- the merge
def mix_task_vectors(
    base: Tensor,
    sparse: Sequence[Tensor],
    weights: Sequence[float],
    *,
    consensus: Consensus | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
) -> Tensor:
    """``base + lambda * mix(w_i * sparse_i)``: the elementwise half of
    :func:`generalized_task_arithmetic` (sparsified task vectors in, merged tensor out).

    The order of operations is part of the contract: the workspace reproduces it exactly.
    """
    weighted = [d * float(w) for d, w in zip(sparse, weights)]
    if consensus is not None:
        agree = sign_agreement(weighted, consensus)
        mixed = sequential_sum([x * a for x, a in zip(weighted, agree)])
        if normalize:
            divisor = sequential_sum([a * float(w) for a, w in zip(agree, weights)])
            divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
            mixed = mixed / divisor
    else:
        mixed = sequential_sum(weighted)
        if normalize:
            total = linear_total(weights)
            if total != 1.0:
                mixed = mixed * (1.0 / total)
    if lambda_ != 1:
        mixed = mixed * float(lambda_)
    return base + mixed


def linear_total(weights: Sequence[float]) -> float:
    """The divisor of a normalized, consensus-free mix: the sum of the weights (in float64),
    or 1 where it is (almost) zero."""
    total = float(sum(float(w) for w in weights))
    return 1.0 if abs(total) < 1e-8 else total


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
    params = {
        "weight": list(weights),
        "density": list(densities) if densities is not None else [1.0] * n,
        "gamma": list(gammas) if gammas is not None else [0.01] * n,
        "epsilon": list(epsilons) if epsilons is not None else [0.15] * n,
        "normalize": normalize, "rescale": rescale, "rescale_mode": rescale_mode, "lambda": lambda_,
    }
    inputs = WholeInputs(base, tensors, generators)
    prep = gta_prepare(inputs, params, sparsifier=sparsifier, consensus=consensus)
    prep.reduce(inputs)
    return gta_combine(prep, inputs, None)


# --------------------------------------------------------------------------- steps (evomerge.methods.steps)
_F32_ONE_BITS = 0x3F800000  # the bit pattern of 1.0f
_VERIFIED: set[tuple[str, int]] = set()  # (device type, numel) where torch.rand was checked against torch.bernoulli


def bernoulli_thresholds(seed: int, shape: Sequence[int], device: torch.device, *,
                         verify: bool = True, force_search: bool = False) -> Tensor:
    """``p*`` (float32, ``shape``) such that, for a generator ``torch.Generator(device).manual_seed(seed)``,
    ``torch.bernoulli(p, generator=g) == (p >= p*)`` for every float32 probability tensor ``p`` of
    this shape on ``device``: a seeded mask becomes one comparison, identical to the draw.

    ``torch.bernoulli`` draws one uniform per entry, independent of ``p``, and keeps the entry when
    the uniform is below ``p`` (``<`` on CPU, ``<=`` on CUDA); the smallest float ``p`` that keeps
    it is ``p*``. On CPU ``torch.rand`` draws the same uniforms (checked against one Bernoulli draw
    unless ``verify`` is off); elsewhere, or if that check fails, ``p*`` is found by a bisection over
    the float32 bit patterns of ``[0, 1]`` (31 Bernoulli draws).
    """
    shape = tuple(shape)

    def gen() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    if device.type == "cpu" and not force_search:
        u = torch.rand(shape, generator=gen(), device=device)
        cand = torch.nextafter(u, torch.full((), float("inf")))
        if not verify:
            return cand
        probe = torch.rand(shape, generator=torch.Generator(device=device).manual_seed(seed ^ 0x5EED), device=device)
        if torch.equal(torch.bernoulli(probe, generator=gen()).bool(), probe >= cand):
            return cand
        log.warning("torch.rand and torch.bernoulli draw differently here; searching Bernoulli thresholds")
    lo = torch.zeros(shape, dtype=torch.int32, device=device)
    hi = torch.full(shape, _F32_ONE_BITS, dtype=torch.int32, device=device)
    for _ in range(32):
        if not bool((hi - lo > 1).any()):
            break
        mid = (lo + hi) >> 1
        hit = torch.bernoulli(mid.view(torch.float32), generator=gen()).bool()
        hi = torch.where(hit, mid, hi)
        lo = torch.where(hit, lo, mid)
    return hi.view(torch.float32)


def _ncols(shape: Sequence[int]) -> int:
    return shape[1] if len(shape) >= 2 else shape[0]


def magnitude_ranks(inputs: Inputs, i: int) -> Cache:
    """Descending magnitude ranks of task vector ``i``: TIES' and breadcrumbs' masks at any
    density are one comparison (``top_k_mask(|d|, k) == ranks < k``)."""
    n = inputs.numel
    return Cache("magnitude_ranks", "magnitude ranks", n * rank_dtype(n).itemsize,
                 lambda: descending_ranks(inputs.delta(i).abs()).to(rank_dtype(n)), reads=(i,))


def row_ranks(inputs: Inputs, i: int) -> Cache:
    """DELLA's ascending per-row magnitude ranks of task vector ``i``."""
    ncols = _ncols(inputs.shape)
    return Cache("row_ranks", "row ranks", inputs.numel * rank_dtype(ncols).itemsize,
                 lambda: della_row_ranks(inputs.delta(i)).to(rank_dtype(ncols)), reads=(i,))


def thresholds(inputs: Inputs, i: int) -> Cache:
    """Model ``i``'s Bernoulli thresholds (its seeded generator; see :func:`bernoulli_thresholds`)."""

    def build() -> Tensor:
        key = (inputs.device.type, inputs.numel)
        out = bernoulli_thresholds(inputs.seed(i), inputs.shape, inputs.device, verify=key not in _VERIFIED)
        _VERIFIED.add(key)
        return out

    return Cache("bernoulli_thresholds", "bernoulli thresholds", inputs.numel * 4, build, seeded=i)


def gta_caches(inputs: Inputs, p: Mapping[str, Any], *, sparsifier: Sparsifier | None,
               consensus: Consensus | None = None) -> list[Cache]:
    """Every model's trial-invariant mask data (densities change between candidates: all of it)."""
    out: list[Cache] = []
    for i in range(inputs.n):
        if sparsifier in ("magnitude", "magnitude_outliers"):
            out.append(magnitude_ranks(inputs, i))
        if sparsifier == "della_magprune" and _ncols(inputs.shape) >= 2:
            out.append(row_ranks(inputs, i))
        if sparsifier in ("random", "della_magprune") and inputs.dtype == torch.float32:
            out.append(thresholds(inputs, i))
    return out


# how one model's task vector is masked and rescaled (the fused kernels read the same numbers)
MM_NONE, MM_RANK, MM_MASK, MM_PSTAR_P, MM_PSTAR_ROWRANK, MM_PSTAR_PROBS, MM_MASK_PROBS = range(7)
SM_NONE, SM_SCALE_PTR, SM_MUL, SM_DIV_PROBS = range(4)


@dataclass
class ModelSpec:
    """How one model's task vector is sparsified in a candidate (flat views of whole tensors).

    ``mm`` (mask): none; ``rank`` window ``lo <= a < hi``; full bool mask ``a``; Bernoulli
    thresholds ``a <= f1``; thresholds vs DELLA probabilities ``b * f1 + f2`` (row ranks ``b``);
    thresholds vs full probabilities ``b``; full mask ``a`` with full probabilities ``b``.
    ``sm`` (rescale): none; times ``scale`` (L1, 0-dim); times ``f3``; divided by the probabilities.
    """

    mm: int
    sm: int
    w: float
    shape: tuple[int, ...]
    a: Tensor | None = None
    b: Tensor | None = None
    lo: int = 0
    hi: int = 0
    f1: float = 0.0
    f2: float = 0.0
    f3: float = 0.0
    before: Tensor | None = None
    scale: Tensor | None = None

    def probs(self, sl: slice) -> Tensor:
        if self.mm == MM_PSTAR_ROWRANK:
            return self.b[sl].to(torch.float32) * self.f1 + self.f2  # = della_probs_from_ranks
        return self.b[sl]

    def keep(self, sl: slice) -> Tensor:
        mm = self.mm
        if mm == MM_RANK:
            r = self.a[sl]
            return (r >= self.lo) & (r < self.hi)
        if mm in (MM_MASK, MM_MASK_PROBS):
            return self.a[sl]
        if mm == MM_PSTAR_P:
            return self.a[sl] <= self.f1
        return self.probs(sl) >= self.a[sl]

    def masked(self, d: Tensor, sl: slice) -> Tensor:
        return d if self.mm == MM_NONE else d * self.keep(sl)

    def sparse(self, d: Tensor, sl: slice) -> Tensor:
        x = self.masked(d, sl)
        if self.sm == SM_SCALE_PTR:
            return x * self.scale
        if self.sm == SM_MUL:
            return x * self.f3
        if self.sm == SM_DIV_PROBS:
            return x / self.probs(sl)
        return x

    def l1_scale(self, abs_masked: Tensor) -> Tensor:
        """The engine's ``l1_scale(delta.abs().sum(), masked.abs().sum())``."""
        return l1_scale(self.before, abs_masked.view(self.shape).sum())


@dataclass
class TaskVectorMix(Prepared):
    """Every model's mask and rescale (:class:`ModelSpec`) and the mix's parameters."""

    specs: list[ModelSpec]
    weights: list[float]
    consensus: Consensus | None
    normalize: bool
    lam: float

    def inverse_total(self) -> float | None:
        """What a consensus-free, normalized mix is multiplied by (None: nothing)."""
        if self.consensus is not None or not self.normalize:
            return None
        total = linear_total(self.weights)
        return 1.0 / total if total != 1.0 else None

    @property
    def plain(self) -> bool:
        """Task arithmetic: no mask, no election."""
        return self.consensus is None and all(sp.mm == MM_NONE and sp.sm == SM_NONE for sp in self.specs)

    def reduce(self, inputs: Inputs) -> None:
        """L1 rescale factors: a sum over each whole masked task vector."""
        b = inputs.base_flat()
        cv = inputs.cv
        for i, sp in enumerate(self.specs):
            if sp.sm == SM_SCALE_PTR and sp.scale is None:
                x = inputs.x_flat(i)
                buf = torch.empty(inputs.numel, dtype=inputs.dtype, device=inputs.device)
                inputs.map_chunks(lambda sl, sp=sp, x=x, buf=buf: torch.abs(
                    sp.masked(cv(x[sl]) - cv(b[sl]), sl), out=buf[sl]))
                sp.scale = sp.l1_scale(buf)
                del buf


def gta_prepare(inputs: Inputs, p: Mapping[str, Any], *, sparsifier: Sparsifier | None,
                consensus: Consensus | None) -> TaskVectorMix:
    """Per model: the cached (or, where a backend kept none, computed) pieces of its mask."""
    shape, numel = inputs.shape, inputs.numel
    f32 = inputs.dtype == torch.float32
    specs = []
    for i in range(inputs.n):
        w = float(p["weight"][i])
        density = p["density"][i] if sparsifier else 1.0
        if sparsifier is None or density >= 1:
            specs.append(ModelSpec(MM_NONE, SM_NONE, w, shape))
            continue
        sp = ModelSpec(MM_MASK, SM_NONE, w, shape)
        probs_float = False
        if sparsifier in ("magnitude", "magnitude_outliers"):
            rank = inputs.cached(magnitude_ranks(inputs, i))
            if sparsifier == "magnitude":
                lo, hi = 0, int(density * numel)
            else:
                n_top, n_bot = breadcrumbs_counts(numel, density, p["gamma"][i])
                lo, hi = n_top, numel - n_bot
            if rank is not None:
                sp.mm, sp.a, sp.lo, sp.hi = MM_RANK, rank.view(-1), lo, hi
            else:
                d = inputs.delta(i)
                full = magnitude_mask(d, density) if sparsifier == "magnitude" else breadcrumbs_mask(d, density, p["gamma"][i])
                sp.a = full.view(-1).bool()
        elif sparsifier == "random":
            pstar = inputs.cached(thresholds(inputs, i)) if f32 else None
            probs_float = True
            if pstar is not None:
                sp.mm, sp.a, sp.f1 = MM_PSTAR_P, pstar.view(-1), float(density)
            else:
                sp.a = bernoulli_mask(inputs.delta(i), density, inputs.generator(i)).view(-1).bool()
        else:  # della_magprune
            eps = p["epsilon"][i]
            ncols = _ncols(shape)
            rank = inputs.cached(row_ranks(inputs, i)) if ncols >= 2 else None
            pstar = inputs.cached(thresholds(inputs, i)) if f32 else None
            if rank is not None and f32:
                probs_mode = MM_PSTAR_ROWRANK
                sp.b, sp.f1, sp.f2 = rank.view(-1), 2 * eps / (ncols - 1), density - eps
            else:
                probs_mode = MM_PSTAR_PROBS
                if ncols < 2:
                    sp.b = torch.full((numel,), density, dtype=inputs.dtype, device=inputs.device)
                else:
                    sp.b = della_keep_probs(inputs.delta(i), density, eps).view(-1)
            if pstar is not None:
                sp.mm, sp.a = probs_mode, pstar.view(-1)
            else:
                probs = sp.probs(slice(0, numel))
                sp.mm, sp.b = MM_MASK_PROBS, probs
                sp.a = torch.bernoulli(probs.view(shape), generator=inputs.generator(i)).view(-1).bool()
        if p["rescale"]:
            if p["rescale_mode"] == "l1" or sparsifier in ("magnitude", "magnitude_outliers"):
                sp.sm = SM_SCALE_PTR
                sp.before = inputs.memo(("l1_norm",), (i,), lambda i=i: inputs.delta(i).abs().sum())
            elif probs_float:
                sp.sm, sp.f3 = SM_MUL, 1.0 / density
            else:
                sp.sm = SM_DIV_PROBS
        specs.append(sp)
    return TaskVectorMix(specs, [float(w) for w in p["weight"]], consensus, bool(p["normalize"]), float(p["lambda"]))


def gta_combine(prep: TaskVectorMix, inputs: Inputs, sl: slice | None) -> Tensor:
    whole = sl is None
    sl = slice(0, inputs.numel) if whole else sl
    cv = inputs.cv
    bb = cv(inputs.base_flat()[sl])
    xs = [cv(inputs.x_flat(i)[sl]) for i in range(inputs.n)]
    if prep.plain:
        out = _task_arithmetic_into(bb, xs, prep, inputs.scratch(bb.numel(), 2))
    else:
        sparse = [sp.sparse(x - bb, sl) for sp, x in zip(prep.specs, xs)]
        out = mix_task_vectors(bb, sparse, prep.weights, consensus=prep.consensus, normalize=prep.normalize,
                               lambda_=prep.lam)
    return out.view(inputs.shape) if whole else out


def _task_arithmetic_into(bb: Tensor, xs: Sequence[Tensor], prep: TaskVectorMix, bufs: Sequence[Tensor]) -> Tensor:
    """:func:`mix_task_vectors` without mask or consensus, step by step in two buffers:
    ``base + lambda * (sum_i (x_i - base) * w_i) [/ sum w]``, same order, same rounding."""
    acc, tmp = bufs[0], bufs[1]
    weights = prep.weights
    total = linear_total(weights) if prep.normalize else 1.0
    torch.sub(xs[0], bb, out=acc).mul_(weights[0])
    for x, w in zip(xs[1:], weights[1:]):
        acc.add_(torch.sub(x, bb, out=tmp).mul_(w))
    if total != 1.0:
        acc.mul_(1.0 / total)
    if prep.lam != 1:
        acc.mul_(prep.lam)
    return acc.add_(bb)
