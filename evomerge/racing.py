"""Racing: item-level scores, the study's item order, and the paired bound that stops a candidate
early.

Every trial keeps its per-item results (:class:`Items`: one packed vector per fitness entry, in
the study's item order). The order is a permutation of each task's items drawn once per study from
a seed stored in the study (:data:`~evomerge.study.ATTR_ITEM_SEED`), so every candidate sees the
same items in the same order and two candidates are compared *paired*, item by item.

A raced candidate is scored on growing prefixes of that order (the rungs, e.g. 1/8, 1/4, 1/2, then
all items). After each rung before the last, :func:`decide` bounds the difference ``Δ`` between the
candidate's and the reference's fitness on *all* items (the reference: the incumbent, or with
``racing.against: generation`` the best fully scored trial of the candidate's CMA-ES generation,
see :meth:`evomerge.trials.StageJob.race_spec`):

* per task ``k``, the paired differences ``d_i = x_i(candidate) - x_i(reference)`` on the ``n_k``
  items seen so far are a simple random sample without replacement from the task's ``N_k`` items
  (the order is a random permutation);
* ``Δ̂ = Σ_k w_k mean(d)`` estimates ``Δ`` without bias, with the stratified variance
  ``Σ_k w_k² s_k²/n_k (1 - n_k/N_k)``. ``s_k²`` is the sample variance of ``d`` together with two
  pseudo-differences, -1 and +1 (the ends of the range), so a rung whose differences happen to be
  all equal does not claim zero spread (else one lost item would stop a candidate); the factor is
  the finite-population correction, zero once every item is seen. With one item per task there is
  nothing to bound with and the candidate goes on;
* the one-sided upper bound ``Δ̂ + t_{1-α, ν} · se`` uses Student's t with ``ν = Σ(n_k - 1)``
  degrees of freedom, and ``α = (1 - confidence) / looks`` (Bonferroni over the rungs, the looks);
* the candidate stops when the bound is below zero: it cannot beat the reference.

So a candidate whose fitness on all items would be at least the reference's is stopped with
probability at most ``1 - confidence`` over all its rungs together -- approximately: the t
interval relies on the central limit theorem (``scripts/bench_racing.py`` measures the rate on
fully evaluated candidates). A stopped candidate is told the reference-relative estimate
``F(reference) + Δ̂`` (a paired control-variate estimate of its fitness on all items), as the last
of its intermediate values: Optuna stores it as the PRUNED trial's value, which TPE and the pycma
sampler read.
"""

from __future__ import annotations

import base64
import math
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------- the item order
def item_order(seed: int, task: str, size: int) -> np.ndarray:
    """The study's order of a task's ``size`` items: a permutation drawn from ``(seed, task)``."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())]).permutation(size)


def rung_sizes(fractions: Sequence[float], size: int) -> list[int]:
    """Items seen after each rung (``ceil(f * size)``, at least 1), then all ``size``; repeats dropped."""
    sizes = [min(size, max(1, math.ceil(f * size))) for f in fractions] + [size]
    return sorted(set(sizes))


# --------------------------------------------------------------------------- per-item results
def pack(values: np.ndarray) -> dict[str, Any]:
    """One result vector, compactly: a bitset when every value is 0 or 1, else float32; base64."""
    values = np.asarray(values, dtype=np.float64)
    if np.isin(values, (0.0, 1.0)).all():
        return {"n": int(values.size), "bits": base64.b64encode(np.packbits(values.astype(np.uint8))).decode()}
    return {"n": int(values.size), "f32": base64.b64encode(values.astype("<f4").tobytes()).decode()}


def unpack(data: Mapping[str, Any]) -> np.ndarray:
    n = int(data["n"])
    if "bits" in data:
        return np.unpackbits(np.frombuffer(base64.b64decode(data["bits"]), dtype=np.uint8))[:n].astype(np.float64)
    return np.frombuffer(base64.b64decode(data["f32"]), dtype="<f4").astype(np.float64)[:n]


@dataclass
class Items:
    """A trial's per-item results: fitness entry label -> values of the first ``n`` items of the
    study's order; ``sizes``: label -> the task's item count ``N``."""

    values: dict[str, np.ndarray]
    sizes: dict[str, int]

    def to_attr(self) -> dict[str, Any]:
        return {label: {**pack(v), "of": self.sizes[label]} for label, v in self.values.items()}

    @classmethod
    def from_attr(cls, data: Mapping[str, Any]) -> "Items":
        return cls({k: unpack(v) for k, v in data.items()}, {k: int(v["of"]) for k, v in data.items()})

    @property
    def count(self) -> int:
        """Item evaluations these results took."""
        return sum(int(v.size) for v in self.values.values())

    @property
    def complete(self) -> bool:
        return all(self.values[k].size == n for k, n in self.sizes.items())

    def fitness(self, weights: Mapping[str, float]) -> float:
        return float(sum(w * self.values[k].mean() for k, w in weights.items()))


# --------------------------------------------------------------------------- the paired bound
@dataclass(frozen=True)
class Decision:
    estimate: float  # the reference-relative estimate of the candidate's fitness on all items
    difference: float  # Δ̂
    upper: float  # the one-sided upper confidence bound on Δ
    stop: bool


def decide(candidate: Items, reference: Items, reference_fitness: float, weights: Mapping[str, float], *,
           confidence: float, looks: int) -> Decision:
    """Whether the candidate, seen on its first items, can still beat the reference (which saw
    all of them); see the module docstring for the bound."""
    from scipy.stats import t as student_t

    diff, var, dof = 0.0, 0.0, 0
    for label, w in weights.items():
        x = candidate.values[label]
        n, size = x.size, candidate.sizes[label]
        d = x - reference.values[label][:n]  # paired: the same items, in the same order
        diff += w * float(d.mean())
        if n > 1:
            var += w * w * float(np.r_[d, -1.0, 1.0].var(ddof=1)) / n * (1 - n / size)
            dof += n - 1
    if dof < 1:  # a single item per task: no spread to bound with
        return Decision(reference_fitness + diff, diff, math.inf, False)
    alpha = (1 - confidence) / max(looks, 1)
    upper = diff + float(student_t.ppf(1 - alpha, dof)) * math.sqrt(max(var, 0.0))
    return Decision(reference_fitness + diff, diff, upper, upper < 0)


def interval(items: Items, weights: Mapping[str, float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The fitness on the items and its normal ``confidence`` interval as an estimate of the
    fitness on new items like them: ``(estimate, low, high)``."""
    from scipy.stats import norm

    est = items.fitness(weights)
    var = sum(w * w * float(items.values[k].var(ddof=1)) / items.values[k].size
              for k, w in weights.items() if items.values[k].size > 1)
    half = float(norm.ppf(0.5 + confidence / 2)) * math.sqrt(var)
    return est, est - half, est + half


# --------------------------------------------------------------------------- one race
@dataclass(frozen=True)
class RaceSpec:
    """What a worker needs to race a candidate: the study's item seed, the rung fractions, the
    confidence and the reference (None: no incumbent yet, the candidate sees every item)."""

    seed: int
    rungs: tuple[float, ...]
    confidence: float
    reference: dict[str, Any] | None = None  # Items.to_attr() of the reference trial
    reference_fitness: float | None = None
    reference_number: int | None = None


@dataclass
class RaceResult:
    items: Items
    rungs: list[tuple[int, float]] = field(default_factory=list)  # (items seen, estimate) after each rung
    stopped: bool = False
    decision: Decision | None = None


ScoreItems = Callable[[dict[str, Sequence[int]]], dict[str, np.ndarray]]


def race(score_items: ScoreItems, orders: dict[str, np.ndarray], labels: dict[str, str],
         weights: Mapping[str, float], spec: RaceSpec) -> RaceResult:
    """Score rung after rung. ``orders``: task -> the study's item order; ``labels``: fitness
    label -> its task; ``score_items({task: item indices})`` -> {label: values, in that order}."""
    sizes = {label: int(orders[task].size) for label, task in labels.items()}
    plans = {task: rung_sizes(spec.rungs if spec.reference is not None else (), int(o.size))
             for task, o in orders.items()}
    steps = max(len(p) for p in plans.values())
    plans = {task: [p[min(i, len(p) - 1)] for i in range(steps)] for task, p in plans.items()}  # same rung count
    reference = Items.from_attr(spec.reference) if spec.reference is not None else None
    values: dict[str, list[np.ndarray]] = {label: [] for label in labels}
    seen = {task: 0 for task in orders}
    result = RaceResult(Items({}, sizes))
    for step in range(steps):
        wanted = {task: orders[task][seen[task]:plans[task][step]].tolist() for task in orders}
        wanted = {task: idx for task, idx in wanted.items() if idx}
        if wanted:
            scored = score_items(wanted)
            for label, task in labels.items():
                if task in wanted:
                    values[label].append(np.asarray(scored[label], dtype=np.float64))
        seen = {task: plans[task][step] for task in orders}
        items = Items({k: np.concatenate(v) if v else np.zeros(0) for k, v in values.items()}, sizes)
        result.items = items
        n = sum(seen.values())
        if items.complete:
            result.rungs.append((n, items.fitness(weights)))
            return result
        assert reference is not None and spec.reference_fitness is not None
        d = decide(items, reference, spec.reference_fitness, weights, confidence=spec.confidence, looks=steps - 1)
        result.rungs.append((n, d.estimate))
        result.decision = d
        if d.stop:
            result.stopped = True
            return result
    return result
