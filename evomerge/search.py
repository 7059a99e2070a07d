"""The search loop: run (or resume) each configured stage's study, ask -> evaluate -> tell, until
its budget counts. The study (:mod:`evomerge.study`) is the single source of truth, so running
the same command again continues it; the stages are in :mod:`evomerge.stages`, one trial's
protocol in :mod:`evomerge.trials`, where trials run in :mod:`evomerge.workers`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import optuna
from optuna.distributions import FloatDistribution

from evomerge.config import Sampler, SearchConfig
from evomerge.elites import run_elites
from evomerge.errors import ConfigError
from evomerge.stages import PsStage, dfs_stage, moe_candidates
from evomerge.study import best_trial, counted, enqueue_baselines, fail_stale_trials, open_study, trial_fitness
from evomerge.trials import Stage, StageJob, StopFlag, TrialReport
from evomerge.workers import open_runner

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- samplers
def make_sampler(config: SearchConfig, bounds: dict[str, tuple[float, float]], sampler: Sampler | None = None,
                 x0: dict[str, float] | None = None, workers: int = 1) -> optuna.samplers.BaseSampler:
    """The stage's sampler. With several workers CMA-ES's population (when not set) is pycma's
    default rounded up to a multiple of the worker count, so a generation keeps every worker busy.
    Only the first generation reads it (later ones come from the stored state), so resuming a
    study with another worker count keeps its population."""
    s = sampler or config.sampler
    if s.name == "cmaes":
        from evomerge.samplers import PyCmaSampler

        space = {k: FloatDistribution(lo, hi) for k, (lo, hi) in bounds.items()}
        popsize = s.popsize if s.popsize is not None or workers < 2 else parallel_popsize(len(space), workers)
        return PyCmaSampler(space, seed=config.seed, sigma0=s.sigma0, popsize=popsize, x0=x0)
    if s.name == "tpe":
        return optuna.samplers.TPESampler(seed=config.seed, multivariate=True)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=config.seed)
    if s.name == "qmc":
        return optuna.samplers.QMCSampler(seed=config.seed, scramble=True)
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=config.seed, population_size=s.popsize or 20)
    raise ConfigError(f"sampler.name: unknown sampler {s.name!r}")


def parallel_popsize(dimensions: int, workers: int) -> int:
    """pycma's default population ``4 + floor(3 ln n)`` rounded up to a multiple of ``workers``."""
    default = 4 + int(3 * math.log(max(dimensions, 1)))
    return -(-default // workers) * workers


@dataclass
class SearchResult:
    study_name: str
    storage_url: str
    completed: int
    best_number: int | None
    best_fitness: float | None
    interrupted: bool = False
    reports: list[TrialReport] = field(default_factory=list)


def _prepare(study: optuna.Study, stage: Stage) -> None:
    """A new study's stage attrs and, first in its queue, the baselines."""
    stage.prepare_study(study)
    if stage.sampler_config.baselines:
        enqueue_baselines(study, stage.baselines())


# --------------------------------------------------------------------------- running stages
def run_search(config: SearchConfig, *, fresh: bool = False, fork: bool = False, trials: int | None = None,
               stages: list[str] | None = None, on_trial: Callable[[TrialReport], None] | None = None,
               on_start: Callable[[dict[str, Any]], None] | None = None) -> SearchResult:
    """Run (or resume) every configured stage in order; returns the last stage's result.

    ``trials`` overrides the budget of the stage(s) run. The dfs stage searches over the best ps
    trial's model, written once to ``runs/<study>/ps_trial<N>/`` and recorded in the dfs study."""
    result: SearchResult | None = None
    ps_name: str | None = None
    for stage_name in stages or config.stages:
        if stage_name == "ps":
            stage: Stage = PsStage(config)
            result = _run_stage(config, stage, fresh=fresh, fork=fork, trials=trials, on_trial=on_trial,
                                on_start=on_start)
            ps_name = result.study_name
            if result.interrupted:
                return result
        else:
            if stage_name == "moe":
                from evomerge.moe_stage import MoeStage

                stage = MoeStage(config, moe_candidates(config, ps_name or config.stage_study("ps")))
            else:
                stage = dfs_stage(config, ps_name or config.stage_study("ps"))
            name = f"{ps_name}.{stage_name}" if ps_name else None
            result = _run_stage(config, stage, fresh=fresh, fork=fork, trials=trials, on_trial=on_trial,
                                on_start=on_start, name=name)
    assert result is not None
    return result


def _run_stage(config: SearchConfig, stage: Stage, *, fresh: bool, fork: bool, trials: int | None,
               on_trial: Callable[[TrialReport], None] | None, on_start: Callable[[dict[str, Any]], None] | None,
               name: str | None = None) -> SearchResult:
    total = trials if trials is not None else stage.budget
    bounds = stage.bounds()
    # the runner validates tasks and models (it builds the fitness) before a study is created, so a
    # bad config leaves nothing behind
    with open_runner(config, stage) as runner:
        sampler = make_sampler(config, bounds, stage.sampler_config, stage.x0(), workers=runner.workers)
        study, created = open_study(config, sampler, fresh=fresh, fork=fork, stage=stage.name, name=name,
                                    prepare=lambda new: _prepare(new, stage))
        fail_stale_trials(study)
        multi = config.fitness.objective == "multi" and stage.name == "ps"
        itemized = config.fitness.kind == "lm_eval" and not multi
        job = StageJob(study, stage, {k: FloatDistribution(lo, hi) for k, (lo, hi) in bounds.items()}, multi, total,
                       on_trial, racing=config.fitness.racing if itemized else None, races=itemized and config.fitness.races,
                       item_seed=config.seed,
                       items=(config.budget if stage.name == "ps" else config.dfs.budget).items)
        if on_start:
            on_start({"study": study.study_name, "stage": stage.name, "storage": config.storage_url,
                      "created": created, "dimensions": len(job.distributions), "done": counted(study),
                      "total": total, "workers": runner.workers})
        result = SearchResult(study.study_name, config.storage_url, 0, None, None)
        with StopFlag() as stop:
            result.reports = runner.run(job, stop)
            result.interrupted = stop.requested and counted(study) < total
            if itemized and config.fitness.elites and not stop.requested:
                run_elites(study, runner.score_elites, config)
    result.completed = counted(study)
    best = best_trial(study)
    if best is not None:
        result.best_number, result.best_fitness = best.number, trial_fitness(best)
    return result



def validate(config: SearchConfig, stages: list[str] | None = None) -> None:
    """What a dry run checks beyond the config's schema, reading no weights: the merge's local
    sources agree in layers and shapes (safetensors headers) and each task of
    ``fitness.include_path`` reports its metric (the task's YAML config). A real run checks the
    same, and built-in tasks too, before its study exists (when the ps stage is set up and the
    fitness is built)."""
    from evomerge.stages import check_sources

    if "ps" in (stages or config.stages):
        check_sources(config)
    if config.fitness.kind == "lm_eval":
        from evomerge.evaluate import check_local_task_metrics

        check_local_task_metrics(config.fitness, config.include_paths)
