"""CMA-ES (pycma, ask/tell) as an Optuna sampler whose whole state lives in the study.

:class:`PyCmaSampler` keeps **no optimisation state in the sampler object**.  Like Optuna's own
``CmaEsSampler`` it persists the optimiser in trial *system attrs* of the study's storage, so a
study can be stopped at any moment (Ctrl-C, crash, preemption) and resumed by simply creating a
new sampler with the same arguments and calling :func:`optuna.load_study` -- in the same process
or a new one, with one or many workers on one shared RDB storage.

How it works
------------
* The search space is fixed and given up front (named float distributions), so the very first
  trial is already a CMA-ES candidate (no random start-up phase).
  CMA-ES runs in the unit cube: each dimension is mapped linearly from ``[low, high]`` (in log
  space for ``log=True`` distributions) to ``[0, 1]`` and pycma gets ``bounds=[0, 1]``.
  ``sigma0`` is in that unit space; ``x0`` defaults to the centre of the box.
* A *generation* is the ``popsize`` candidates of one ``es.ask()``.  The trial whose sampling opens
  a generation stores the pickled :class:`cma.CMAEvolutionStrategy` (after ``ask``), the
  generation number and the asked unit-space solutions (pickle -> zlib -> base64, split into
  chunks of :data:`CHUNK_CHARS` characters because RDB storages limit attr lengths).  Every
  ``sample_relative`` call restores the newest state from the study, never from ``self``.
* Each CMA trial is assigned one candidate *index* of the current generation (the lowest free
  one).  When every index has a finished trial, the next sampling call tells all of them
  (in index order) and asks the next generation.
* ``ask`` is made deterministic from ``(seed, generation)``: pycma draws from numpy's *global*
  RNG, so the global state is saved, seeded, used and restored around every pycma call (under a
  lock).  Hence an interrupted-and-resumed study produces exactly the same candidates as an
  uninterrupted one, and the caller's global numpy RNG stream is left untouched.  Two pycma
  details matter for that across processes: its default ``randn`` option pickles a frozen copy
  of the global RandomState (so a module-level ``randn`` is passed instead), and its solution
  archives are keyed by salted ``hash(bytes)`` (so they are re-keyed after unpickling, see
  :func:`_rehash_archives`).

Finished trials
---------------
* ``COMPLETE`` with a finite value: its value (negated for ``maximize``; pycma minimises).
* ``FAIL`` marked interrupted -- user attr or system attr :data:`INTERRUPTED_ATTR` is ``True``
  (the search loop sets it for killed / stale / Ctrl-C'd trials): the trial does not count; its
  index is released and the *same candidate* is handed to the next trial (re-evaluated).
* ``PRUNED`` with a finite value (racing's estimate of its fitness): that value, like ``COMPLETE``.
* Any other ``FAIL`` (NaN weights, OOM, ...), a ``PRUNED`` trial without a value or a ``COMPLETE`` one with a
  non-finite value is a *bad result* and gets a penalty, see :func:`penalized_fitness`:
  ``worst + max(1, worst - best)`` over the finite results of the same generation (in pycma's
  minimisation scale), or :data:`FAILED_PENALTY` if nothing in the generation has a finite result.
  The penalty only needs to rank below every real result: CMA-ES is rank based.

Enqueued trials
---------------
Trials with ``fixed_params`` in their system attrs (:meth:`optuna.Study.enqueue_trial`, e.g.
baselines) are not CMA candidates: ``sample_relative`` returns ``{}`` and assigns no index, so
they take their fixed values (parameters they do not fix go to ``independent_sampler``) and they
neither advance nor disturb the CMA sequence.

Parallel workers
----------------
When every index of the current generation is already held by a ``RUNNING`` trial, the sampler
neither blocks nor hands out a duplicate: it returns an **extra** candidate, drawn from the current
search distribution (``es.ask(1)`` on a throw-away copy, seeded from
``(seed, generation, extra number)``), marked with :data:`ATTR_EXTRA` and never told to CMA-ES
(its result is only recorded in the study, so it can still become the best trial).  Within one
process sampling is serialised by a lock; between processes sharing a storage races cannot be
fully prevented: two workers may pick the same free index (or both open the same next
generation).  Each claim is re-checked once written, after :data:`CLAIM_SETTLE_S` when other
trials are running (the lower trial number keeps the index, the other moves on to the next free
one), which leaves only claims whose writes are further apart than that; a remaining
duplicate is tolerated: it is evaluated, the *first finished* trial of an
index counts, and when several trials hold the state of the same generation the one with the
lowest trial number wins (they are computed from the same data, so they normally agree).

Notes
-----
* Restarts (IPOP): when one of pycma's termination criteria (``es.stop()``) holds after a
  generation is told -- the fitness went flat (``tolflatfitness``, ``tolfun``: accuracies on a
  fixed item set are steps, so this happens), the step size collapsed (``tolx``), no progress
  (``tolstagnation``) -- the next generation comes from a new ES started at ``x0`` with ``sigma0``
  and the population times pycma's ``incpopsize`` (2), as ``cma.fmin(restarts=...)`` does. The
  search loop owns the budget, so restarts go on until it is spent; the payload counts them
  (``restarts``).
* The state is a pickle read back from the study's storage: only load studies you trust, and
  resume with a compatible ``cma`` version.
* Trial system attrs used (all prefixed ``evomerge:cma:``): ``generation``, ``index``, ``extra``
  on CMA trials; ``state:<i>`` chunks and ``state_meta`` (``{"generation", "chunks", "format"}``)
  on the trial that opened a generation.
"""

from __future__ import annotations

import base64
import logging
import math
import pickle
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import cma
import numpy as np
import optuna
from cma.utilities.utils import SolutionDict
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.study import Study, StudyDirection
from optuna.trial import FrozenTrial, TrialState

from evomerge.study import TrialReader

__all__ = [
    "ATTR_EXTRA",
    "ATTR_GENERATION",
    "ATTR_INDEX",
    "ATTR_PREFIX",
    "ATTR_STATE_META",
    "CHUNK_CHARS",
    "FAILED_PENALTY",
    "INTERRUPTED_ATTR",
    "PyCmaSampler",
    "cma_state",
    "is_interrupted",
    "penalized_fitness",
]

#: User attr (or system attr) set by the search loop on a FAILED trial that was interrupted
#: (killed, stale, Ctrl-C) rather than failing on its own: its candidate is re-evaluated.
INTERRUPTED_ATTR = "evomerge:interrupted"

ATTR_PREFIX = "evomerge:cma:"
ATTR_GENERATION = ATTR_PREFIX + "generation"  # int: generation a CMA trial belongs to
ATTR_INDEX = ATTR_PREFIX + "index"  # int: candidate index within that generation
ATTR_EXTRA = ATTR_PREFIX + "extra"  # int: extra-candidate number (parallel overflow, never told)
ATTR_STATE_META = ATTR_PREFIX + "state_meta"  # dict on the trial that opened a generation
ATTR_STATE_CHUNK = ATTR_PREFIX + "state:"  # + chunk number: the encoded pickle

#: Max characters per state chunk (RDB storages cap attribute values at ~2 kB on MySQL).
CHUNK_CHARS = 2000
#: Penalty (pycma minimisation scale) for bad results of a generation without any finite result.
FAILED_PENALTY = 1e10

_STATE_FORMAT = 1
#: IPOP: population factor at each restart (the default of ``cma.fmin``'s ``incpopsize``).
INCPOPSIZE = 2
_log = logging.getLogger(__name__)
# Seed-stream purposes, so that the draws for a generation and for its extras never coincide.
_PURPOSE_ASK = 0
_PURPOSE_EXTRA = 1
# pycma uses numpy's global RNG: serialise every pycma call in this process.
_LOCK = threading.RLock()
# Wait between writing an index claim and checking it, when other trials are running: a claim of
# another process written a moment later is then seen, and the higher-numbered trial moves on
# (two drivers on PostgreSQL duplicated a candidate without it).
CLAIM_SETTLE_S = 0.05


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@contextmanager
def _seeded_global_numpy(*entropy: int) -> Iterator[None]:
    """Seed numpy's global RNG from ``entropy`` for the block, then restore the caller's state."""
    saved = np.random.get_state()
    try:
        seq = np.random.SeedSequence([int(e) & 0xFFFFFFFFFFFFFFFF for e in entropy])
        np.random.seed(seq.generate_state(4))
        yield
    finally:
        np.random.set_state(saved)


def is_interrupted(trial: FrozenTrial) -> bool:
    """True when ``trial`` is marked interrupted (:data:`INTERRUPTED_ATTR`, user or system attr)."""
    return (
        trial.user_attrs.get(INTERRUPTED_ATTR) is True
        or trial.system_attrs.get(INTERRUPTED_ATTR) is True
    )


def penalized_fitness(values: Sequence[float | None]) -> list[float]:
    """pycma fitnesses (minimisation scale) for one generation, with bad results penalised.

    ``values[i]`` is the minimisation-scale result of candidate ``i`` or ``None`` for a bad result
    (failed, pruned or non-finite).  Bad results get ``worst + max(1, worst - best)`` over the
    finite results of the generation -- strictly worse than every real result, by a margin that
    scales with the generation's spread -- or :data:`FAILED_PENALTY` when there is none.
    """
    good = [float(v) for v in values if v is not None and math.isfinite(v)]
    if good:
        worst, best = max(good), min(good)
        penalty = worst + max(1.0, worst - best)
    else:
        penalty = FAILED_PENALTY
    return [float(v) if v is not None and math.isfinite(v) else penalty for v in values]


def _global_randn(*shape: int) -> np.ndarray:
    """pycma's ``randn`` option. A module function is pickled *by reference*, so a restored ES
    keeps drawing from numpy's (seeded) global RNG; pycma's default ``np.random.randn`` is a
    bound method that pickles a frozen *copy* of the global RandomState."""
    return np.random.randn(*shape)


def _rehash_archives(es: cma.CMAEvolutionStrategy) -> None:
    """Re-key pycma's solution archives after unpickling.

    pycma finds the genotype of a told solution in ``SolutionDict`` archives keyed by
    ``hash(x.tobytes())``, and bytes hashing is salted per process (PYTHONHASHSEED). A state
    pickled by another process would miss every lookup and pycma would fall back to the inexact
    inverse boundary transform; re-keying with this process's hashes restores exact behaviour.
    """
    holders = [es, getattr(es, "gp", None), getattr(es, "_round_integer_variables", None)]
    for holder in holders:
        for value in list(getattr(holder, "__dict__", {}).values()):
            if not isinstance(value, SolutionDict):
                continue
            unhashed = getattr(value, "_unhashed_keys", None)
            if not isinstance(unhashed, dict):
                continue

            def rekey(k: Any, unhashed: dict = unhashed, sd: SolutionDict = value) -> Any:
                return sd.key(unhashed[k]) if k in unhashed else k

            value.data = {rekey(k): v for k, v in value.data.items()}
            value.data_with_same_key = {rekey(k): v for k, v in value.data_with_same_key.items()}
            value._unhashed_keys = {rekey(k): v for k, v in unhashed.items()}


def _encode(payload: dict[str, Any]) -> list[str]:
    text = base64.b64encode(zlib.compress(pickle.dumps(payload, protocol=4), 6)).decode("ascii")
    return [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]


def _decode(chunks: Sequence[str]) -> dict[str, Any]:
    payload = pickle.loads(zlib.decompress(base64.b64decode("".join(chunks).encode("ascii"))))
    _rehash_archives(payload["es"])
    return payload


def _space_spec(search_space: dict[str, FloatDistribution]) -> list[tuple[str, float, float, bool]]:
    return [(name, float(d.low), float(d.high), bool(d.log)) for name, d in search_space.items()]


def _unit_value(low: float, high: float, log: bool, value: float) -> float:
    if log:
        low, high, value = math.log(low), math.log(high), math.log(value)
    return 0.5 if high == low else (value - low) / (high - low)


def _from_unit(spec: Sequence[tuple[str, float, float, bool]], x: Sequence[float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for (name, low, high, log), u in zip(spec, x):
        u = min(max(float(u), 0.0), 1.0)
        if log:
            v = math.exp(math.log(low) + u * (math.log(high) - math.log(low)))
        else:
            v = low + u * (high - low)
        out[name] = min(max(v, low), high)  # guard against rounding just outside the box
    return out


def _load_state(trials: Sequence[FrozenTrial]) -> tuple[dict[str, Any], FrozenTrial] | None:
    """The newest complete state in ``trials``: highest generation, ties -> lowest trial number."""
    holder: FrozenTrial | None = None
    for t in trials:
        meta = t.system_attrs.get(ATTR_STATE_META)
        if not isinstance(meta, dict):
            continue
        if holder is None or meta["generation"] > holder.system_attrs[ATTR_STATE_META]["generation"]:
            holder = t
    if holder is None:
        return None
    meta = holder.system_attrs[ATTR_STATE_META]
    chunks = [holder.system_attrs[f"{ATTR_STATE_CHUNK}{i}"] for i in range(meta["chunks"])]
    return _decode(chunks), holder


def _mean_in_bounds(es: cma.CMAEvolutionStrategy) -> np.ndarray:
    """The distribution mean as a point of the box (pycma's ``xfavorite``).

    ``es.mean`` is a genotype: with pycma's ``BoundTransform`` it may lie outside ``[0, 1]``
    (the box is reflected periodically), so it is mapped into the box first."""
    with _LOCK, _seeded_global_numpy(0):
        return np.asarray(es.to_phenotype(es.mean, into_bounds=es.boundary_handler.repair))


def cma_state(study: Study) -> dict[str, Any] | None:
    """The restored CMA-ES state of ``study`` (for tests and reports), or ``None`` before any.

    Keys: ``generation``, ``restarts``, ``popsize``, ``sigma`` (unit space), ``mean`` (parameter
    space, mapped into the box), ``solutions`` (this generation's candidates, parameter space), ``es`` (the restored
    :class:`cma.CMAEvolutionStrategy`, after this generation's ``ask``; the previous generations'
    results are in it, e.g. ``es.countevals``, ``es.fit.fit``) and ``trial_number`` (the trial
    holding the state).
    """
    loaded = _load_state(study._storage.get_all_trials(study._study_id, deepcopy=False))
    if loaded is None:
        return None
    payload, holder = loaded
    es: cma.CMAEvolutionStrategy = payload["es"]
    spec = payload["space"]
    return {
        "generation": payload["generation"],
        "restarts": int(payload.get("restarts", 0)),
        "popsize": len(payload["solutions"]),
        "sigma": float(es.sigma),
        "mean": _from_unit(spec, _mean_in_bounds(es)),
        "solutions": [_from_unit(spec, x) for x in payload["solutions"]],
        "es": es,
        "trial_number": holder.number,
    }


class _StudyView:
    """What the sampler reads of a study, kept up to date incrementally (:class:`TrialReader`), so
    a sampling call costs the same at trial 10 and at trial 10,000: the trials that hold a stored
    state and the CMA trials, each by generation. A read cache only: the study stays the one
    source of truth (another process's trials are read at the next refresh)."""

    def __init__(self, study: Study) -> None:
        self.reader = TrialReader(study)
        self._finished: dict[int, list[FrozenTrial]] = {}  # generation -> finished CMA trials
        self._holders: dict[int, list[FrozenTrial]] = {}  # generation -> finished state holders

    def refresh(self) -> None:
        for t in self.reader.refresh():
            g = t.system_attrs.get(ATTR_GENERATION)
            if isinstance(g, int):
                self._finished.setdefault(g, []).append(t)
            meta = t.system_attrs.get(ATTR_STATE_META)
            if isinstance(meta, dict):
                self._holders.setdefault(int(meta["generation"]), []).append(t)

    def holders(self, generation: int | None = None) -> list[FrozenTrial]:
        """Trials holding a state of ``generation`` (default: of the newest finished one), plus every
        running holder: enough for :func:`_load_state` to find the newest state."""
        if generation is None:
            generation = max(self._holders, default=-1)
        running = [t for t in self.reader.unfinished.values() if ATTR_STATE_META in t.system_attrs]
        return self._holders.get(generation, []) + running

    def of_generation(self, generation: int) -> list[FrozenTrial]:
        """The CMA trials of ``generation``, finished and unfinished."""
        unfinished = [t for t in self.reader.unfinished.values()
                      if t.system_attrs.get(ATTR_GENERATION) == generation]
        return self._finished.get(generation, []) + unfinished


# --------------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------------
class PyCmaSampler(optuna.samplers.BaseSampler):
    """CMA-ES (pycma) over a fixed float search space; all state is stored in the study.

    Args:
        search_space: name -> :class:`~optuna.distributions.FloatDistribution` (``log`` allowed,
            ``step`` not). The objective must suggest these names with these distributions.
        seed: seeds every generation's ``ask`` (with the generation number) and the default
            independent sampler. Same seed + same results -> same candidates, resumed or not.
        sigma0: initial step size in the unit cube (each dimension scaled to ``[0, 1]``).
        popsize: candidates per generation; ``None`` = pycma's default ``4 + floor(3 ln n)``.
        x0: initial mean in parameter space (missing names: centre of their range).
        independent_sampler: for parameters outside ``search_space``
            (default ``RandomSampler(seed)``).
    """

    def __init__(
        self,
        search_space: dict[str, FloatDistribution],
        *,
        seed: int = 0,
        sigma0: float = 0.25,
        popsize: int | None = None,
        x0: dict[str, float] | None = None,
        independent_sampler: optuna.samplers.BaseSampler | None = None,
    ) -> None:
        if not search_space:
            raise ValueError("PyCmaSampler needs a non-empty search space")
        for name, dist in search_space.items():
            if not isinstance(dist, FloatDistribution):
                raise ValueError(
                    f"PyCmaSampler supports FloatDistribution only; {name!r} is {dist!r}"
                )
            if dist.step is not None:
                raise ValueError(f"PyCmaSampler does not support step; {name!r} has step={dist.step}")
        if not (sigma0 > 0 and math.isfinite(sigma0)):
            raise ValueError(f"sigma0 must be a positive finite number, got {sigma0!r}")
        if popsize is not None and int(popsize) < 2:
            raise ValueError(f"popsize must be >= 2, got {popsize!r}")
        self._search_space = dict(search_space)
        self._spec = _space_spec(self._search_space)
        self._seed = int(seed)
        self._sigma0 = float(sigma0)
        self._popsize = None if popsize is None else int(popsize)
        x0 = dict(x0 or {})
        unknown = set(x0) - set(self._search_space)
        if unknown:
            raise ValueError(f"x0 names not in the search space: {sorted(unknown)}")
        for name, v in x0.items():
            d = self._search_space[name]
            if not d.low <= v <= d.high:
                raise ValueError(f"x0[{name!r}]={v} is outside [{d.low}, {d.high}]")
        self._x0_unit = np.asarray(
            [_unit_value(lo, hi, log, x0[name]) if name in x0 else 0.5
             for name, lo, hi, log in self._spec],
            dtype=float,
        )
        self._independent_sampler = independent_sampler or optuna.samplers.RandomSampler(seed=seed)
        self._views: dict[tuple[int, int], _StudyView] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_views"] = {}  # a read cache, rebuilt from the study
        return state

    # -- Optuna interface ---------------------------------------------------------------------
    def reseed_rng(self) -> None:
        self._independent_sampler.reseed_rng()

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        self._check_single_objective(study)
        return dict(self._search_space)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        self._check_single_objective(study)
        if not search_space or "fixed_params" in trial.system_attrs:
            return {}  # enqueued trial (e.g. a baseline): not a CMA candidate
        with _LOCK:
            return self._sample(study, trial)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._independent_sampler.sample_independent(
            study, trial, param_name, param_distribution
        )

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._independent_sampler.before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._independent_sampler.after_trial(study, trial, state, values)

    # -- internals ----------------------------------------------------------------------------
    def _check_single_objective(self, study: Study) -> None:
        if study._is_multi_objective():
            raise ValueError(
                "PyCmaSampler supports single-objective studies only "
                f"(this study has {len(study.directions)} objectives)"
            )

    def _view(self, study: Study) -> _StudyView:
        key = (id(study._storage), study._study_id)
        if key not in self._views:
            self._views[key] = _StudyView(study)
        view = self._views[key]
        view.refresh()
        return view

    def _sample(self, study: Study, trial: FrozenTrial) -> dict[str, Any]:
        storage, trial_id = study._storage, trial._trial_id
        view = self._view(study)
        me = view.reader.unfinished.get(trial_id, trial)

        # Already assigned (sample_relative called again for the same trial): same answer.
        if ATTR_GENERATION in me.system_attrs:
            return self._reassigned(view, me)

        loaded = _load_state(view.holders())
        if loaded is None:
            payload = self._open_generation(storage, trial_id, None, [], study.direction)
        else:
            payload = loaded[0]
            self._check_compatible(payload)

        g = payload["generation"]
        popsize = len(payload["solutions"])
        done, running, n_extra = self._generation_status(view.of_generation(g), g, trial_id, popsize)
        if len(done) == popsize:
            results = [done[i] for i in range(popsize)]
            payload = self._open_generation(storage, trial_id, payload, results, study.direction)
            g, done, running, n_extra = payload["generation"], {}, set(), 0

        # Claim the lowest free index, then verify: if a lower-numbered running trial (another
        # process) claimed the same index meanwhile, move on to the next free one. This narrows
        # the cross-process race to near-simultaneous claims; what remains is tolerated.
        taken = set(done) | running
        claimed = False
        # another process may be claiming right now only if another trial is running
        settle = any(t.state == TrialState.RUNNING and t._trial_id != trial_id
                     for t in view.reader.unfinished.values())
        while True:
            free = [i for i in range(popsize) if i not in taken]
            if not free:
                break
            index = free[0]
            storage.set_trial_system_attr(trial_id, ATTR_INDEX, index)
            storage.set_trial_system_attr(trial_id, ATTR_GENERATION, g)
            claimed = True
            if settle:  # let a concurrent claim land before checking (once)
                time.sleep(CLAIM_SETTLE_S)
                settle = False
            if not self._lost_claim(view, me, g, index):
                return _from_unit(self._spec, payload["solutions"][index])
            taken.add(index)

        # Every index is held by a running trial: hand out an extra candidate (never told).
        storage.set_trial_system_attr(trial_id, ATTR_EXTRA, n_extra)
        if claimed:
            storage.set_trial_system_attr(trial_id, ATTR_INDEX, None)
        storage.set_trial_system_attr(trial_id, ATTR_GENERATION, g)
        return _from_unit(self._spec, self._extra_candidate(payload, n_extra))

    @staticmethod
    def _lost_claim(view: _StudyView, me: FrozenTrial, g: int, index: int) -> bool:
        """Whether a lower-numbered running trial also holds index ``index`` of generation ``g``."""
        view.refresh()
        for t in view.reader.unfinished.values():
            if (
                t.state == TrialState.RUNNING
                and t.number < me.number
                and t.system_attrs.get(ATTR_GENERATION) == g
                and t.system_attrs.get(ATTR_INDEX) == index
                and ATTR_EXTRA not in t.system_attrs
            ):
                return True
        return False

    def _generation_status(
        self, trials: Sequence[FrozenTrial], generation: int, own_id: int, popsize: int
    ) -> tuple[dict[int, FrozenTrial], set[int], int]:
        """(first finished trial per index, indices held by running trials, extras so far)."""
        finished: dict[int, list[FrozenTrial]] = {}
        running: set[int] = set()
        n_extra = 0
        for t in trials:
            if t._trial_id == own_id or t.system_attrs.get(ATTR_GENERATION) != generation:
                continue
            if ATTR_EXTRA in t.system_attrs:
                n_extra = max(n_extra, int(t.system_attrs[ATTR_EXTRA]) + 1)
                continue
            index = t.system_attrs.get(ATTR_INDEX)
            if not isinstance(index, int) or not 0 <= index < popsize:
                continue
            if not t.state.is_finished():
                running.add(index)
            elif t.state == TrialState.FAIL and is_interrupted(t):
                continue  # released: the same candidate goes to the next trial
            else:
                finished.setdefault(index, []).append(t)
        # Duplicated index (race between processes): the first finished trial counts.
        first = {
            i: min(ts, key=lambda t: (t.datetime_complete is None, t.datetime_complete or 0, t.number))
            for i, ts in finished.items()
        }
        return first, running, n_extra

    def _open_generation(
        self,
        storage: optuna.storages.BaseStorage,
        trial_id: int,
        payload: dict[str, Any] | None,
        results: Sequence[FrozenTrial],
        direction: StudyDirection,
    ) -> dict[str, Any]:
        """Tell ``results`` to the restored ES (or create it), ask the next generation, store it.
        When one of pycma's termination criteria holds after the tell, the search restarts IPOP-style
        (what ``cma.fmin(restarts=...)`` does): a new ES from ``x0`` with ``sigma0`` and the
        population multiplied by pycma's ``incpopsize``."""
        restarts = 0 if payload is None else int(payload.get("restarts", 0))
        if payload is None:
            generation = 0
            es = self._new_es(self._popsize, generation)
        else:
            es = payload["es"]
            sign = 1.0 if direction == StudyDirection.MINIMIZE else -1.0
            values: list[float | None] = []
            for t in results:
                # a PRUNED trial's value is racing's estimate of its fitness (evomerge.racing)
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.value is not None and math.isfinite(t.value):
                    values.append(sign * float(t.value))
                else:
                    values.append(None)  # FAIL (not interrupted), PRUNED without a value, non-finite: penalty
            generation = payload["generation"] + 1
            with _seeded_global_numpy(self._seed, generation, _PURPOSE_ASK):
                es.tell(list(payload["solutions"]), penalized_fitness(values))
                stop = es.stop()
            if stop:
                restarts += 1
                popsize = int(es.popsize * INCPOPSIZE)
                _log.info("CMA-ES: %s after generation %d; restart %d with population %d",
                          ", ".join(sorted(stop)), generation - 1, restarts, popsize)
                es = self._new_es(popsize, generation)
        with _seeded_global_numpy(self._seed, generation, _PURPOSE_ASK):
            solutions = np.asarray(es.ask(), dtype=float)
        new_payload = {
            "format": _STATE_FORMAT,
            "generation": generation,
            "restarts": restarts,
            "es": es,
            "solutions": solutions,
            "space": self._spec,
            "seed": self._seed,
        }
        chunks = _encode(new_payload)
        for i, chunk in enumerate(chunks):
            storage.set_trial_system_attr(trial_id, f"{ATTR_STATE_CHUNK}{i}", chunk)
        # The meta attr is written last: a half-written state is never picked up.
        storage.set_trial_system_attr(
            trial_id,
            ATTR_STATE_META,
            {"generation": generation, "chunks": len(chunks), "format": _STATE_FORMAT},
        )
        return new_payload

    def _new_es(self, popsize: int | None, generation: int) -> cma.CMAEvolutionStrategy:
        opts: dict[str, Any] = {
            "bounds": [0.0, 1.0],
            "seed": np.nan,  # pycma must not seed the global RNG: we do, per generation
            "verbose": -9,
            "verb_disp": 0,
            "verb_log": 0,
            "signals_filename": "",  # never read a cma_signals.in file from the cwd
            "randn": _global_randn,
        }
        if popsize is not None:
            opts["popsize"] = popsize
        with _seeded_global_numpy(self._seed, generation, _PURPOSE_ASK):
            return cma.CMAEvolutionStrategy(self._x0_unit.tolist(), self._sigma0, opts)

    def _extra_candidate(self, payload: dict[str, Any], extra: int) -> np.ndarray:
        """An extra draw from the generation's distribution, deterministic in (seed, gen, extra)."""
        es = pickle.loads(pickle.dumps(payload["es"]))  # throw-away copy; never told
        _rehash_archives(es)
        with _seeded_global_numpy(self._seed, payload["generation"], _PURPOSE_EXTRA, extra):
            return np.asarray(es.ask(1)[0], dtype=float)

    def _reassigned(self, view: _StudyView, me: FrozenTrial) -> dict[str, Any]:
        g = me.system_attrs[ATTR_GENERATION]
        loaded = _load_state(view.holders(g))
        if loaded is None:
            raise RuntimeError(f"trial {me.number}: no stored CMA-ES state for generation {g}")
        payload = loaded[0]
        self._check_compatible(payload)
        if ATTR_EXTRA in me.system_attrs:
            x = self._extra_candidate(payload, int(me.system_attrs[ATTR_EXTRA]))
        else:
            x = payload["solutions"][int(me.system_attrs[ATTR_INDEX])]
        return _from_unit(self._spec, x)

    def _check_compatible(self, payload: dict[str, Any]) -> None:
        stored = [tuple(s) for s in payload["space"]]
        if stored != [tuple(s) for s in self._spec]:
            raise ValueError(
                "PyCmaSampler: the study's stored CMA-ES state was created for a different "
                f"search space ({stored}) than this sampler's ({self._spec}); resume it with the "
                "same search space or start a new study"
            )
