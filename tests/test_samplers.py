"""Tests for :mod:`evomerge.samplers` (PyCmaSampler: pycma CMA-ES whose state lives in the study).

All objectives are analytic (a shifted, range-normalised sphere), so the whole file runs in
seconds. 8 float dimensions with assorted non-unit bounds -> pycma's default popsize is 10.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from evomerge.samplers import (
    ATTR_EXTRA,
    ATTR_GENERATION,
    ATTR_INDEX,
    ATTR_STATE_META,
    CHUNK_CHARS,
    FAILED_PENALTY,
    INTERRUPTED_ATTR,
    PyCmaSampler,
    cma_state,
    penalized_fitness,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

_BOUNDS = [(-5.0, 10.0), (0.0, 2.0), (-1.0, 1.0), (10.0, 20.0), (-3.0, 0.0), (0.5, 4.0),
           (-100.0, 50.0), (0.001, 0.01)]
_OPT_UNIT = [0.7, 0.25, 0.6, 0.8, 0.3, 0.45, 0.65, 0.35]  # optimum, as fractions of each range
SPACE = {f"w{i}": FloatDistribution(lo, hi) for i, (lo, hi) in enumerate(_BOUNDS)}
OPTIMUM = {k: d.low + u * (d.high - d.low) for (k, d), u in zip(SPACE.items(), _OPT_UNIT)}
POPSIZE = 4 + int(3 * math.log(len(SPACE)))  # pycma's default: 10


def sphere(params: dict[str, float]) -> float:
    return sum(((params[k] - OPTIMUM[k]) / (d.high - d.low)) ** 2 for k, d in SPACE.items())


def objective(trial: optuna.Trial) -> float:
    return sphere({k: trial.suggest_float(k, d.low, d.high) for k, d in SPACE.items()})


def make_study(
    seed: int = 0, storage=None, name: str | None = None, direction: str = "minimize", **kw
) -> optuna.Study:
    return optuna.create_study(
        sampler=PyCmaSampler(SPACE, seed=seed, **kw),
        storage=storage,
        study_name=name,
        direction=direction,
    )


def params_of(trials) -> list[tuple[float, ...]]:
    return [tuple(t.params[k] for k in SPACE) for t in trials]


@pytest.fixture
def db_dir(tmp_path: Path):
    """A folder for SQLite files: tmpfs (/dev/shm) when available, else ``tmp_path``.

    SQLite commits once per attribute write and fsyncs each commit; on a disk-backed tmp_path
    that dominates the runtime (~10 s for 40 trials) without testing anything more.
    """
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = Path(tempfile.mkdtemp(prefix="evomerge-test-", dir=shm))
        yield folder
        shutil.rmtree(folder, ignore_errors=True)
    else:
        yield tmp_path


def is_cma(t: optuna.trial.FrozenTrial) -> bool:
    return ATTR_GENERATION in t.system_attrs


def ask(study: optuna.Study) -> optuna.Trial:
    """A trial with every parameter suggested (what a worker does first)."""
    trial = study.ask()
    for k, d in SPACE.items():
        trial.suggest_float(k, d.low, d.high)
    return trial


# --------------------------------------------------------------------------------------------
def test_optimizes_much_better_than_random_search():
    budget = 15 * POPSIZE
    ratios = []
    for seed in (0, 1, 2):
        cma_study = make_study(seed)
        cma_study.optimize(objective, n_trials=budget)
        rnd = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
        rnd.optimize(objective, n_trials=budget)
        assert cma_study.best_value < rnd.best_value
        ratios.append(rnd.best_value / cma_study.best_value)
        state = cma_state(cma_study)
        assert state["generation"] == 14  # the 15th generation is open, not yet told
        # The search distribution has contracted onto the optimum.
        centre = {k: (d.low + d.high) / 2 for k, d in SPACE.items()}
        assert sphere(state["mean"]) < sphere(centre) / 5
        assert state["sigma"] < 0.25
    assert float(np.median(ratios)) > 4, ratios


def test_first_trial_is_a_cma_candidate_and_all_candidates_are_in_bounds():
    study = make_study(seed=5, sigma0=0.8, x0={"w0": 10.0, "w1": 0.0, "w7": 0.001})
    study.optimize(objective, n_trials=1)
    first = study.trials[0]
    state = cma_state(study)
    assert state["generation"] == 0 and state["popsize"] == POPSIZE
    assert first.system_attrs[ATTR_GENERATION] == 0 and first.system_attrs[ATTR_INDEX] == 0
    assert first.params == state["solutions"][0]
    rnd = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    rnd.optimize(objective, n_trials=1)
    assert first.params != rnd.trials[0].params

    study.optimize(objective, n_trials=6 * POPSIZE - 1)
    values = np.array(params_of(study.trials))
    lows = np.array([d.low for d in SPACE.values()])
    highs = np.array([d.high for d in SPACE.values()])
    assert np.all(values >= lows) and np.all(values <= highs)
    # The huge sigma0 and the corner x0 really pushed candidates against the bounds.
    unit = (values - lows) / (highs - lows)
    assert unit.min() < 0.01 or unit.max() > 0.99


def test_x0_sigma0_and_log_scale():
    space = {"lr": FloatDistribution(1e-5, 1e-1, log=True), "t": FloatDistribution(-2.0, 2.0)}
    study = optuna.create_study(
        sampler=PyCmaSampler(space, seed=0, sigma0=1e-6, popsize=3, x0={"lr": 1e-4})
    )
    study.optimize(lambda t: t.suggest_float("lr", 1e-5, 1e-1, log=True)
                   + t.suggest_float("t", -2.0, 2.0), n_trials=3)
    for t in study.trials:
        assert t.params["lr"] == pytest.approx(1e-4, rel=1e-4)  # x0 (unit 0.25 in log space)
        assert t.params["t"] == pytest.approx(0.0, abs=1e-4)  # default x0 = centre
    assert cma_state(study)["popsize"] == 3
    default = optuna.create_study(sampler=PyCmaSampler(space, seed=0, sigma0=1e-6))
    default.optimize(lambda t: t.suggest_float("lr", 1e-5, 1e-1, log=True)
                     + t.suggest_float("t", -2.0, 2.0), n_trials=1)
    assert default.trials[0].params["lr"] == pytest.approx(1e-3, rel=1e-4)  # log-space centre
    assert cma_state(default)["popsize"] == 4 + int(3 * math.log(2))


@pytest.mark.parametrize("stop", [23, 2 * POPSIZE], ids=["mid-generation", "generation-boundary"])
def test_exact_resume_in_a_fresh_sampler(db_dir: Path, stop: int):
    url = f"sqlite:///{db_dir / 'a.db'}"
    a = make_study(seed=3, storage=url, name="a")
    a.optimize(objective, n_trials=stop)
    del a
    np.random.seed(12345)  # scramble numpy's global RNG: candidates must not depend on it
    resumed = optuna.load_study(study_name="a", storage=url, sampler=PyCmaSampler(SPACE, seed=3))
    resumed.optimize(objective, n_trials=40 - stop)

    b = make_study(seed=3)
    b.optimize(objective, n_trials=40)
    assert len(resumed.trials) == 40
    assert params_of(resumed.trials) == params_of(b.trials)  # exact float equality
    # The state is stored chunked on the trial that opened each generation.
    holders = [t for t in resumed.trials if ATTR_STATE_META in t.system_attrs]
    assert [t.number for t in holders] == [0, POPSIZE, 2 * POPSIZE, 3 * POPSIZE]
    meta = holders[-1].system_attrs[ATTR_STATE_META]
    chunks = [holders[-1].system_attrs[f"evomerge:cma:state:{i}"] for i in range(meta["chunks"])]
    assert meta["generation"] == 3 and meta["chunks"] > 1
    assert all(len(c) <= CHUNK_CHARS for c in chunks)


_RESUME_WORKER = textwrap.dedent(
    """
    import json, sys
    import optuna
    from optuna.distributions import FloatDistribution
    from evomerge.samplers import PyCmaSampler
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, n, space, opt = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), json.loads(sys.argv[4])
    space = {k: FloatDistribution(lo, hi) for k, (lo, hi) in space.items()}
    def objective(t):
        return sum(((t.suggest_float(k, d.low, d.high) - opt[k]) / (d.high - d.low)) ** 2
                   for k, d in space.items())
    sampler = PyCmaSampler(space, seed=11, sigma0=0.7, x0={"w0": 9.5, "w1": 0.1})
    optuna.load_study(study_name="s", storage=url, sampler=sampler).optimize(objective, n_trials=n)
    """
)


def test_exact_resume_in_a_new_process(db_dir: Path):
    """Stop here, resume in a new process (another str/bytes hash salt): same candidates.

    sigma0 is large and x0 sits in a corner so that pycma repairs candidates at the bounds: a
    restored state whose solution archive did not survive the process change would diverge.
    """
    def sampler() -> PyCmaSampler:
        return PyCmaSampler(SPACE, seed=11, sigma0=0.7, x0={"w0": 9.5, "w1": 0.1})

    url = f"sqlite:///{db_dir / 's.db'}"
    stop = 2 * POPSIZE + 4
    optuna.create_study(storage=url, study_name="s", sampler=sampler()).optimize(
        objective, n_trials=stop
    )
    hash_seed = str(int(os.environ.get("PYTHONHASHSEED", "0") or "0") + 1)
    space_json = json.dumps({k: [d.low, d.high] for k, d in SPACE.items()})
    subprocess.run(
        [sys.executable, "-c", _RESUME_WORKER, url, str(40 - stop), space_json, json.dumps(OPTIMUM)],
        check=True,
        env={**os.environ, "PYTHONHASHSEED": hash_seed},
        timeout=120,
    )
    resumed = optuna.load_study(study_name="s", storage=url, sampler=sampler())
    b = optuna.create_study(sampler=sampler())
    b.optimize(objective, n_trials=40)
    assert len(resumed.trials) == 40
    assert params_of(resumed.trials) == params_of(b.trials)
    # ... and the boundary repair that makes this test sharp did happen.
    lows = np.array([d.low for d in SPACE.values()])
    widths = np.array([d.high - d.low for d in SPACE.values()])
    unit = (np.array(params_of(b.trials)) - lows) / widths
    assert unit.min() < 0.02 or unit.max() > 0.98


def test_global_numpy_rng_is_left_alone():
    np.random.seed(7)
    expected = np.random.rand(3)
    np.random.seed(7)
    make_study(seed=1).optimize(objective, n_trials=2 * POPSIZE + 3)
    assert np.array_equal(np.random.rand(3), expected)


def test_interrupted_trial_gets_the_same_candidate_again():
    reference = make_study(seed=4)
    reference.optimize(objective, n_trials=30)

    study = make_study(seed=4)
    # completed-count -> how many times the next trial is interrupted: index 3 of generation 0;
    # the last index of generation 1 (the generation must not advance over a released index);
    # twice in a row at the first index of generation 2.
    interrupts = {3: 1, 2 * POPSIZE - 1: 1, 2 * POPSIZE: 2}
    n_completed = 0
    previous = None
    while n_completed < 30:
        trial = ask(study)
        if previous is not None:
            assert trial.params == previous  # the same candidate, re-evaluated
        if interrupts.get(n_completed, 0) > 0:
            interrupts[n_completed] -= 1
            trial.set_user_attr(INTERRUPTED_ATTR, True)
            study.tell(trial, state=TrialState.FAIL)
            previous = trial.params
            continue
        previous = None
        study.tell(trial, objective(trial))
        n_completed += 1
    assert not any(interrupts.values())
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 4
    completed = study.get_trials(states=(TrialState.COMPLETE,))
    assert params_of(completed) == params_of(reference.trials)
    assert [t.value for t in completed] == [t.value for t in reference.trials]
    assert [t.system_attrs[ATTR_INDEX] for t in completed[:POPSIZE]] == list(range(POPSIZE))


def test_failed_trial_is_penalized_and_generation_advances():
    study = make_study(seed=2, direction="maximize")
    values = {}
    for i in range(POPSIZE):
        trial = ask(study)
        assert study.trials[-1].system_attrs[ATTR_INDEX] == i
        if i == 4:
            study.tell(trial, state=TrialState.FAIL)  # e.g. NaN weights: a bad result
        else:
            values[i] = -objective(trial)
            study.tell(trial, values[i])
    nxt = ask(study)
    frozen = study.trials[-1]
    assert frozen.system_attrs[ATTR_GENERATION] == 1 and frozen.system_attrs[ATTR_INDEX] == 0
    assert nxt.params != study.trials[4].params  # not re-evaluated
    es = cma_state(study)["es"]
    assert es.countevals == POPSIZE
    # maximize -> pycma sees -value; penalty = worst + max(1, worst - best) in that scale.
    internal = [-v for v in values.values()]
    worst, best = max(internal), min(internal)
    assert max(es.fit.fit) == pytest.approx(worst + max(1.0, worst - best))
    assert sorted(es.fit.fit)[:-1] == pytest.approx(sorted(internal))

    # A generation in which every trial fails still advances (flat penalty).
    study.tell(nxt, state=TrialState.FAIL)
    for _ in range(POPSIZE - 1):
        study.tell(ask(study), state=TrialState.FAIL)
    ask(study)
    state = cma_state(study)
    assert state["generation"] == 2 and state["es"].countevals == 2 * POPSIZE
    assert list(state["es"].fit.fit) == [FAILED_PENALTY] * POPSIZE


def test_penalized_fitness_rule():
    assert penalized_fitness([1.0, None, 3.0]) == [1.0, 5.0, 3.0]  # 3 + max(1, 3 - 1)
    assert penalized_fitness([2.0, 2.0, None]) == [2.0, 2.0, 3.0]  # margin at least 1
    assert penalized_fitness([-10.0, float("nan"), 0.5, float("inf")]) == [-10.0, 11.0, 0.5, 11.0]
    assert penalized_fitness([None, None]) == [FAILED_PENALTY, FAILED_PENALTY]


def test_enqueued_trials_keep_fixed_params_and_do_not_disturb_cma():
    reference = make_study(seed=6)
    reference.optimize(objective, n_trials=25)

    study = make_study(seed=6)
    baseline1 = {k: d.low for k, d in SPACE.items()}
    baseline2 = {k: d.high for k, d in SPACE.items()}
    study.enqueue_trial(baseline1)
    study.optimize(objective, n_trials=6)
    study.enqueue_trial(baseline2)
    study.optimize(objective, n_trials=21)
    enqueued = [t for t in study.trials if "fixed_params" in t.system_attrs]
    assert [t.params for t in enqueued] == [baseline1, baseline2]
    assert [t.number for t in enqueued] == [0, 6]
    assert not any(is_cma(t) for t in enqueued)
    cma_trials = [t for t in study.trials if is_cma(t)]
    assert params_of(cma_trials) == params_of(reference.trials)


def test_parallel_workers_get_extra_candidates():
    def run() -> tuple[optuna.Study, list[optuna.Trial]]:
        study = make_study(seed=8)
        return study, [ask(study) for _ in range(POPSIZE + 2)]  # nobody has finished yet

    study, trials = run()
    frozen = study.trials
    params = params_of(frozen)
    assert len(set(params)) == POPSIZE + 2  # all distinct
    assert [t.system_attrs.get(ATTR_INDEX) for t in frozen] == list(range(POPSIZE)) + [None, None]
    assert [t.system_attrs.get(ATTR_EXTRA) for t in frozen[POPSIZE:]] == [0, 1]
    assert all(t.system_attrs[ATTR_GENERATION] == 0 for t in frozen)
    assert params[POPSIZE:] == params_of(run()[0].trials)[POPSIZE:]  # extras are deterministic

    for trial in reversed(trials):  # extras finish first: they must not be told
        study.tell(trial, objective(trial))
    assert cma_state(study)["generation"] == 0
    ask(study)
    state = cma_state(study)
    assert state["generation"] == 1 and state["es"].countevals == POPSIZE
    assert state["trial_number"] == POPSIZE + 2
    assert study.trials[-1].system_attrs[ATTR_INDEX] == 0
    study.tell(study.trials[-1].number, 1.0)
    study.optimize(objective, n_trials=3 * POPSIZE)
    assert cma_state(study)["generation"] == 4


def test_threads_share_one_study():
    study = make_study(seed=9)
    study.optimize(objective, n_trials=4 * POPSIZE, n_jobs=2)
    trials = study.trials
    assert all(t.state == TrialState.COMPLETE and is_cma(t) for t in trials)
    assert len(set(params_of(trials))) == len(trials)
    assert cma_state(study)["generation"] >= 3


def test_duplicate_index_from_a_race_first_finished_counts():
    study = make_study(seed=10)
    first = ask(study)  # index 0
    # Another process raced and assigned index 0 too (simulated through the storage).
    twin = study.ask()
    study._storage.set_trial_system_attr(twin._trial_id, ATTR_INDEX, 0)
    study._storage.set_trial_system_attr(twin._trial_id, ATTR_GENERATION, 0)
    for k, d in SPACE.items():
        twin.suggest_float(k, d.low, d.high)
    assert twin.params == first.params
    study.tell(twin, 5.0)  # finishes first: counts
    study.tell(first, 7.0)  # duplicate result: ignored
    for i in range(1, POPSIZE):
        trial = ask(study)
        assert study.trials[-1].system_attrs[ATTR_INDEX] == i
        study.tell(trial, 10.0 + i)
    ask(study)
    es = cma_state(study)["es"]
    assert cma_state(study)["generation"] == 1
    assert sorted(es.fit.fit) == [5.0] + [10.0 + i for i in range(1, POPSIZE)]


def test_claim_lost_to_a_concurrent_lower_numbered_trial_moves_on(monkeypatch):
    study = make_study(seed=12)
    a, b = study.ask(), study.ask()  # two workers; a (number 0) is slower to sample
    storage = study._storage
    original = storage.set_trial_system_attr
    raced = []

    def racing_write(trial_id, key, value):
        if trial_id == b._trial_id and key == ATTR_INDEX and value == 0 and not raced:
            # a's claim of index 0 lands between b's read of the study and b's re-check.
            original(a._trial_id, ATTR_INDEX, 0)
            original(a._trial_id, ATTR_GENERATION, 0)
            raced.append(True)
        original(trial_id, key, value)

    monkeypatch.setattr(storage, "set_trial_system_attr", racing_write)
    for k, d in SPACE.items():
        b.suggest_float(k, d.low, d.high)
    monkeypatch.undo()
    for k, d in SPACE.items():
        a.suggest_float(k, d.low, d.high)
    assert raced
    state = cma_state(study)
    frozen_a, frozen_b = study.trials
    assert frozen_a.system_attrs[ATTR_INDEX] == 0 and frozen_b.system_attrs[ATTR_INDEX] == 1
    assert frozen_a.params == state["solutions"][0] and frozen_b.params == state["solutions"][1]
    study.tell(a, objective(a))
    study.tell(b, objective(b))
    study.optimize(objective, n_trials=POPSIZE)
    assert cma_state(study)["generation"] == 1 and cma_state(study)["es"].countevals == POPSIZE


def test_multi_objective_study_is_rejected():
    study = optuna.create_study(directions=["minimize", "maximize"], sampler=PyCmaSampler(SPACE))
    trial = study.ask()
    with pytest.raises(ValueError, match="single-objective"):
        trial.suggest_float("w0", -5.0, 10.0)


def test_resuming_with_a_different_search_space_is_rejected():
    study = make_study(seed=0)
    study.optimize(objective, n_trials=2)
    other = {**SPACE, "w0": FloatDistribution(-5.0, 11.0)}
    study.sampler = PyCmaSampler(other, seed=0)
    with pytest.raises(ValueError, match="different search space"):
        ask(study)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        PyCmaSampler({})
    with pytest.raises(ValueError):
        PyCmaSampler({"a": FloatDistribution(0.0, 1.0, step=0.1)})
    with pytest.raises(ValueError):
        PyCmaSampler(SPACE, x0={"w0": 11.0})
    with pytest.raises(ValueError):
        PyCmaSampler(SPACE, x0={"nope": 1.0})
    with pytest.raises(ValueError):
        PyCmaSampler(SPACE, sigma0=0.0)


def test_flat_fitness_restarts_ipop_style_from_x0():
    """Accuracy-like fitness can be flat over a whole generation: pycma's termination criteria
    (tolfun, tolflatfitness) then hold, and the next generation comes from a new ES at x0 with
    twice the population (IPOP), the same way on every run."""
    runs = []
    for _ in range(2):
        study = make_study(direction="maximize")
        study.optimize(lambda t: objective(t) * 0 + 1.0, n_trials=POPSIZE + 2 * POPSIZE + 1)
        runs.append(params_of(study.trials))
        state = cma_state(study)
        assert (state["generation"], state["restarts"], state["popsize"]) == (2, 2, 4 * POPSIZE)
        assert state["sigma"] == pytest.approx(0.25)
        centre = {k: (d.low + d.high) / 2 for k, d in SPACE.items()}
        assert state["mean"] == pytest.approx(centre)
        gens = [t.system_attrs[ATTR_GENERATION] for t in study.trials]
        assert gens == [0] * POPSIZE + [1] * 2 * POPSIZE + [2]
    assert runs[0] == runs[1]


def test_a_progressing_search_does_not_restart():
    study = make_study()
    study.optimize(objective, n_trials=6 * POPSIZE)
    assert cma_state(study)["restarts"] == 0
