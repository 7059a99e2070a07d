"""The trial protocol: the contracts of a stage and a fitness, and one trial's life — asked (owned
by this process), its candidate built and stored, evaluated by a worker, told.

A trial fails for reasons of its own only (:func:`is_trial_error`): the candidate's merge is
invalid or non-finite, it runs out of memory, or (in :mod:`evomerge.parallel`) it times out or its
worker dies. A problem of the config stops the search with one line; any other exception is a bug
and stops the search with its traceback (shown under ``-v``).
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Protocol

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from evomerge.config import Racing, Sampler, SearchConfig
from evomerge.errors import CandidateError, ConfigError, EvomergeError, MergeError
from evomerge.fitness import Fitness, HostedFitness, ItemFitness, Score
from evomerge.racing import Items, RaceSpec
from evomerge.samplers import ATTR_EXTRA, ATTR_GENERATION
from evomerge.study import (ATTR_BASELINE, ATTR_ERROR, ATTR_INTERRUPTED, ATTR_ITEM_COUNT, ATTR_ITEM_SEED, ATTR_ITEMS,
                            ATTR_OWNER, ATTR_SCORES, ATTR_SECONDS, TrialReader, best_of, fail_stale_trials, owner,
                            tally, trial_fitness)

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- contracts
class Stage(Protocol):
    """A search stage: the space its trials sample, how a trial's parameters become a stored
    candidate record, and how a worker turns a record into a live model.

    The driver calls ``bounds``, ``x0``, ``baselines``, ``prepare_study`` (a new study),
    ``candidate`` (per trial) and ``summarize``; a worker calls ``open`` once, ``load`` per
    trial and ``close`` at the end."""

    name: str  # "ps" / "dfs"
    sampler_config: Sampler
    budget: int
    workspace: Any  # what ``HostedFitness.bind`` receives once opened (None where nothing to bind)

    def bounds(self) -> dict[str, tuple[float, float]]: ...

    def x0(self) -> dict[str, float] | None: ...

    def baselines(self) -> list[str]: ...

    def open(self) -> None: ...

    def prepare_study(self, study: optuna.Study) -> None: ...

    def candidate(self, params: dict[str, float], baseline: str | None) -> dict[str, Any]: ...

    def load(self, record: dict[str, Any]) -> tuple[Any, Any]: ...

    def summarize(self, params: dict[str, float]) -> str: ...

    def close(self) -> None: ...


def make_fitness(config: SearchConfig, stage: Stage) -> Fitness:
    """The configured fitness (lm-eval tasks built, or the consistency scorer) for ``stage``."""
    if config.fitness.kind == "consistency":
        if stage.name != "ps":
            raise ConfigError("fitness.kind: the consistency fitness scores merge recipes (stage ps) only")
        from evomerge.consistency import ConsistencyFitness

        return ConsistencyFitness(config)  # label-free; builds neighbours in the stage's workspace
    from evomerge.evaluate import LmEvalFitness

    fitness = LmEvalFitness(config.fitness, config.include_paths)
    if config.fitness.races:
        fitness.check_items()
    return fitness


def open_evaluator(config: SearchConfig, stage: Stage) -> Fitness:
    """Build the fitness, then open the stage (load the sources) and bind the two: what a process
    that evaluates trials holds for the whole stage. Returns the fitness."""
    fitness = make_fitness(config, stage)
    stage.open()
    if isinstance(fitness, HostedFitness):
        if stage.workspace is None:
            raise ConfigError(f"fitness: this fitness scores a recipe's neighbours; the {stage.name} stage has none")
        fitness.bind(stage.workspace)
    return fitness


# --------------------------------------------------------------------------- records
@dataclass
class TrialReport:
    number: int
    state: str  # "COMPLETE" / "PRUNED" / "FAIL"
    fitness: float | None
    values: dict[str, float]
    seconds: float
    summary: str
    baseline: str | None
    error: str | None
    best: float | None
    best_number: int | None
    done: int
    total: int


@dataclass
class Candidate:
    """An asked trial and what the driver built for it: the record (recipe attrs, already stored
    on the trial) that a worker evaluates, or the error that kept it from being built."""

    trial: optuna.Trial
    params: dict[str, float]
    baseline: str | None
    record: dict[str, Any] | None
    error: str | None = None
    race: RaceSpec | None = None  # how the worker scores it item by item (None: the fitness's own score)


@dataclass(frozen=True)
class Outcome:
    """A candidate's evaluation, as a worker (this process or a Ray actor) returns it."""

    score: Score | None  # None when it failed
    seconds: float
    error: str | None = None
    fatal: bool = False  # a problem of the config or the sources (not this candidate's): the search stops
    items: dict[str, Any] | None = None  # per-item results (racing.Items.to_attr), when kept
    rungs: tuple[tuple[int, float], ...] = ()  # (items seen, estimate of its fitness) after each rung
    pruned: bool = False  # stopped by racing: ``score`` is None, the last rung holds its estimate


@dataclass
class StageJob:
    """What a runner needs to run a stage's trials: the study, the stage (candidates), the
    distributions to suggest, whether objectives are told one per task, the budget, the callback."""

    study: optuna.Study
    stage: Stage
    distributions: dict[str, FloatDistribution]
    multi: bool
    total: int
    on_trial: Callable[[TrialReport], None] | None = None
    racing: Racing | None = None  # None: no item-level scores (a fitness without items, multi-objective)
    races: bool = False  # race candidates (else every candidate sees every item, still kept per item)
    item_seed: int = 0  # the item order's seed for a study that has none recorded yet
    items: int | None = None  # budget in item evaluations (budget.items)
    _generations: "GenerationBest | None" = field(default=None, init=False, repr=False)

    def budget_left(self) -> int:
        """Trials still to start: the budget less the counted trials and those running anywhere
        (this driver's and other drivers' on a shared storage), read in one storage call; none
        once the trials have used the item budget."""
        now = tally(self.study)  # reads only the trials that changed since the last check
        if now.running and fail_stale_trials(self.study, now.running_trials()):  # a peer killed with kill -9
            now = tally(self.study)
        if self.items is not None and now.items >= self.items:
            return 0
        return self.total - now.counted - now.running

    def ask(self) -> Candidate:
        """Ask the next candidate and set how it is raced (:meth:`race_spec`: its reference may
        depend on its CMA-ES generation, known once it is asked)."""
        cand = ask_candidate(self.study, self.stage, self.distributions)
        if cand.record is not None:
            try:
                cand.race = self.race_spec(cand.trial)
            except BaseException as e:
                interrupt_trial(self.study, cand.trial, _interruption(e))
                raise
        return cand

    def race_spec(self, trial: optuna.Trial | None = None) -> RaceSpec | None:
        """How ``trial`` is scored item by item: the study's item seed (recorded on the first
        call), the rungs and, when racing is on, the reference: the best completed trial with
        every item's result, or with ``racing.against: generation`` the best such trial of the
        trial's CMA-ES generation (the former while the generation has none)."""
        if self.racing is None:
            return None
        seed = self.study.user_attrs.get(ATTR_ITEM_SEED)
        if seed is None:
            seed = self.item_seed
            self.study.set_user_attr(ATTR_ITEM_SEED, seed)
        spec = RaceSpec(int(seed), tuple(self.racing.rungs), self.racing.confidence)
        if not self.races:
            return spec
        ref = self._generation_best(trial) if self.racing.against == "generation" and trial is not None else None
        if ref is None:
            ref = tally(self.study).best  # folded from new trials only: no cost that grows with the study
        if ref is not None and not fully_scored(ref):  # a best trial without every item's result (older study)
            ref = best_of([t for t in self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                           if fully_scored(t)])
        if ref is None:
            return spec
        return RaceSpec(spec.seed, spec.rungs, spec.confidence, ref.system_attrs[ATTR_ITEMS], trial_fitness(ref),
                        ref.number)

    def _generation_best(self, trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
        generation = self.study._storage.get_trial_system_attrs(trial._trial_id).get(ATTR_GENERATION)
        if generation is None:  # an enqueued baseline: in no generation
            return None
        if self._generations is None:
            self._generations = GenerationBest(self.study)
        return self._generations.best(int(generation))

    def report(self, report: TrialReport) -> TrialReport:
        if self.on_trial:
            self.on_trial(report)
        return report


def fully_scored(t: optuna.trial.FrozenTrial) -> bool:
    """A completed trial with every item's result (a racing reference)."""
    items = t.system_attrs.get(ATTR_ITEMS)
    return t.state == TrialState.COMPLETE and isinstance(items, dict) and Items.from_attr(items).complete


class GenerationBest:
    """The best fully scored trial of each CMA-ES generation (:data:`~evomerge.samplers.ATTR_GENERATION`;
    extra candidates, never told to CMA-ES, left out), read incrementally (:class:`TrialReader`)."""

    def __init__(self, study: optuna.Study) -> None:
        self._reader = TrialReader(study)
        self._best: dict[int, optuna.trial.FrozenTrial] = {}

    def best(self, generation: int) -> optuna.trial.FrozenTrial | None:
        for t in self._reader.refresh():
            g = t.system_attrs.get(ATTR_GENERATION)
            if g is None or t.system_attrs.get(ATTR_EXTRA) is not None or not fully_scored(t):
                continue
            held = self._best.get(int(g))
            self._best[int(g)] = best_of([t] + ([held] if held is not None else []))
        return self._best.get(generation)


class StopFlag:
    """First Ctrl-C: finish and record the trials in flight, then stop. Second: abort them."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "StopFlag":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("stopping after the trial in flight is recorded (Ctrl-C again to abort it)")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# --------------------------------------------------------------------------- failures
def is_trial_error(e: BaseException) -> bool:
    """A candidate's own failure, recorded as a failed trial while the search goes on: its merge
    is invalid for the sampled values or non-finite (MergeError), the fitness cannot score it
    (CandidateError), its arithmetic overflowed, or it ran out of host or CUDA memory."""
    if isinstance(e, (MergeError, CandidateError, FloatingPointError, MemoryError)):
        return True
    import torch

    return isinstance(e, torch.OutOfMemoryError)


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


# --------------------------------------------------------------------------- one trial
def ask_owned(study: optuna.Study) -> optuna.Trial:
    """``study.ask()``, except that the trial carries its owner (host:pid) from the moment it is
    RUNNING, so a kill -9 at any point leaves nothing ``study.fail_stale_trials`` cannot attribute.

    A queued (WAITING) trial is labelled before it is claimed and again after (another worker may
    have labelled it in between); a new trial is created RUNNING with the label in one write.
    """
    me = owner()
    storage, study_id = study._storage, study._study_id
    study._thread_local.cached_all_trials = None
    trial_id = None
    for waiting in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            storage.set_trial_user_attr(waiting._trial_id, ATTR_OWNER, me)
            if not storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        storage.set_trial_user_attr(waiting._trial_id, ATTR_OWNER, me)
        trial_id = waiting._trial_id
        break
    if trial_id is None:
        template = optuna.trial.FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
            datetime_complete=None, params={}, distributions={}, user_attrs={ATTR_OWNER: me},
            system_attrs={}, intermediate_values={}, trial_id=-1)
        trial_id = storage.create_new_trial(study_id, template_trial=template)
    return optuna.Trial(study, trial_id)  # runs the sampler's before_trial / sample_relative


def ask_candidate(study: optuna.Study, stage: Stage, distributions: dict[str, FloatDistribution]) -> Candidate:
    """Ask a trial (owned by this process), suggest its params and store its recipe record (how
    it is raced is set by :meth:`StageJob.ask`)."""
    trial = ask_owned(study)
    baseline = trial.user_attrs.get(ATTR_BASELINE)
    params: dict[str, float] = {}
    try:
        if not baseline:
            params = {name: trial.suggest_float(name, d.low, d.high) for name, d in distributions.items()}
        record = stage.candidate(params, baseline)
        for key, value in record.items():
            trial.set_user_attr(key, value)
    except BaseException as e:
        if isinstance(e, Exception) and is_trial_error(e):
            return Candidate(trial, params, baseline, None, error_line(e))
        # Ctrl-C, a problem of the config, a bug: not this candidate's fault, so it is not counted
        reason = "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else f"interrupted ({error_line(e)})"
        interrupt_trial(study, trial, reason)
        raise
    return Candidate(trial, params, baseline, record)


def evaluate(stage: Stage, fitness: Fitness, record: dict[str, Any], race: RaceSpec | None = None) -> Outcome:
    """Build the record's model in the stage's workspace and score it (the worker's side): item
    by item, raced, when ``race`` is given and the fitness keeps items. Anything but a trial
    error or a config error (a bug) propagates."""
    start = time.perf_counter()
    try:
        model, tokenizer = stage.load(record)
        if race is not None and isinstance(fitness, ItemFitness):
            result = fitness.race(model, tokenizer, race)
            items = result.items.to_attr()
            if result.stopped:
                return Outcome(None, time.perf_counter() - start, items=items, rungs=tuple(result.rungs), pruned=True)
            values = {k: float(v.mean()) for k, v in result.items.values.items()}
            score = Score(values, result.items.fitness(fitness.weights), list(values.values()))
            return Outcome(score, time.perf_counter() - start, items=items, rungs=tuple(result.rungs))
        score = fitness.score(model, tokenizer)
    except Exception as e:
        if is_trial_error(e):
            _free_cuda()
            return Outcome(None, time.perf_counter() - start, error_line(e))
        if isinstance(e, EvomergeError):  # the config or the sources: every trial would fail
            return Outcome(None, time.perf_counter() - start, str(e), fatal=True)
        raise
    return Outcome(score, time.perf_counter() - start)


def tell_outcome(study: optuna.Study, stage: Stage, cand: Candidate, outcome: Outcome, multi: bool,
                 total: int) -> TrialReport:
    """Record the outcome on the trial and tell it; raises ConfigError for a fatal outcome (the
    trial is then interrupted: it does not count, its candidate is evaluated again on resume)."""
    trial, summary = cand.trial, stage.summarize(cand.params)
    if outcome.fatal:
        interrupt_trial(study, trial, outcome.error or "interrupted")
        raise ConfigError(outcome.error or "a worker stopped the search")
    if outcome.error is not None:
        trial.set_user_attr(ATTR_ERROR, outcome.error)
        trial.set_user_attr(ATTR_SECONDS, outcome.seconds)
        study.tell(trial, state=TrialState.FAIL)
        return make_report(study, trial.number, "FAIL", None, {}, outcome.seconds, summary, cand.baseline,
                           outcome.error, total)
    trial.set_user_attr(ATTR_SECONDS, outcome.seconds)
    if outcome.items is not None:
        record_items(study, trial, outcome)
    if outcome.pruned:  # its value: the last rung's estimate (Optuna stores it for a PRUNED trial)
        study.tell(trial, state=TrialState.PRUNED)
        return make_report(study, trial.number, "PRUNED", outcome.rungs[-1][1], {}, outcome.seconds, summary,
                           cand.baseline, None, total)
    score = outcome.score
    assert score is not None
    trial.set_user_attr(ATTR_SCORES, score.values)
    study.tell(trial, score.objectives if multi else score.fitness)
    return make_report(study, trial.number, "COMPLETE", score.fitness, score.values, outcome.seconds, summary,
                       cand.baseline, None, total)


def record_items(study: optuna.Study, trial: optuna.Trial, outcome: Outcome) -> None:
    """The trial's per-item results (a system attr: packed, not for display), its item count
    and, as intermediate values at steps = items seen, the estimate after each rung."""
    assert outcome.items is not None
    study._storage.set_trial_system_attr(trial._trial_id, ATTR_ITEMS, outcome.items)
    trial.set_user_attr(ATTR_ITEM_COUNT, Items.from_attr(outcome.items).count)
    for step, estimate in outcome.rungs:
        trial.report(estimate, step)


def interrupt_trial(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Fail a trial as interrupted: it does not count and its candidate is evaluated again. A trial
    already told (a second Ctrl-C that landed just after its tell) is left as it is."""
    if study._storage.get_trial(trial._trial_id).state.is_finished():
        return
    trial.set_user_attr(ATTR_INTERRUPTED, True)
    trial.set_user_attr(ATTR_ERROR, reason)
    study.tell(trial, state=TrialState.FAIL)


def run_one(job: StageJob, fitness: Fitness) -> TrialReport:
    """One trial in this process: ask, evaluate, tell."""
    cand = job.ask()
    if cand.record is None:
        outcome = Outcome(None, 0.0, cand.error)
    else:
        try:
            outcome = evaluate(job.stage, fitness, cand.record, cand.race)
        except BaseException as e:
            interrupt_trial(job.study, cand.trial, _interruption(e))
            raise
    try:
        return tell_outcome(job.study, job.stage, cand, outcome, job.multi, job.total)
    except BaseException as e:  # a second Ctrl-C in the middle of the tell: never left RUNNING
        interrupt_trial(job.study, cand.trial, _interruption(e))
        raise


def _interruption(e: BaseException) -> str:
    return "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else f"interrupted ({error_line(e)})"


def make_report(study: optuna.Study, number: int, state: str, fitness: float | None, values: dict[str, float],
                seconds: float, summary: str, baseline: str | None, error: str | None, total: int) -> TrialReport:
    """The trial's report, with the study's best and progress (read incrementally, see
    :func:`evomerge.study.tally`)."""
    now = tally(study)
    best = now.best
    return TrialReport(number, state, fitness, values, seconds, summary, baseline, error,
                       trial_fitness(best) if best else None, best.number if best else None,
                       now.counted, total)


def _free_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass
