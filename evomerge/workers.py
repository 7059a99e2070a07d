"""Where trials run: in this process (one worker, no timeout, no cluster: Ray is not imported),
or in a pool of Ray actors (:mod:`evomerge.parallel`). Both runners are context managers with
``workers`` and ``run(job, stop)``."""

from __future__ import annotations

from typing import Any, Protocol

from evomerge.config import SearchConfig
from evomerge.elites import EliteScorer
from evomerge.trials import Fitness, Stage, StageJob, StopFlag, TrialReport, open_evaluator, run_one


class Runner(Protocol):
    workers: int

    def __enter__(self) -> "Runner": ...

    def __exit__(self, *exc: Any) -> None: ...

    def run(self, job: StageJob, stop: StopFlag) -> list[TrialReport]: ...

    def score_elites(self, records: list[dict[str, Any]], seed: int, dev: list[bool]) -> list[dict[str, Any]]:
        """Each record's model on every item (where ``dev``) and the held-out tasks (:mod:`evomerge.elites`)."""
        ...


def open_runner(config: SearchConfig, stage: Stage) -> Runner:
    """In-process trials, or a pool of Ray actors when :func:`uses_ray`."""
    if uses_ray(config):
        from evomerge.parallel import RayRunner

        return RayRunner(config, stage, workers=default_workers(config))
    return InProcessRunner(config, stage)


def uses_ray(config: SearchConfig) -> bool:
    """Several workers, a cluster, or a trial timeout (only a separate process can be stopped)."""
    return bool(config.ray_address or config.budget.timeout_s or default_workers(config) > 1)


def default_workers(config: SearchConfig) -> int:
    """``workers`` as configured, else one per visible local GPU for a cuda device, else 1."""
    if config.workers is not None:
        return config.workers
    if config.device.startswith("cuda"):
        import torch

        return max(1, torch.cuda.device_count())
    return 1


class InProcessRunner:
    """One trial at a time in this process, with the stage's workspace and the fitness."""

    workers = 1

    def __init__(self, config: SearchConfig, stage: Stage):
        self.stage = stage
        self.fitness: Fitness = open_evaluator(config, stage)
        self.elites = EliteScorer(config, self.fitness)

    def __enter__(self) -> "InProcessRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stage.close()

    def run(self, job: StageJob, stop: StopFlag) -> list[TrialReport]:
        reports = []
        while job.budget_left() > 0 and not stop.requested:
            reports.append(job.report(run_one(job, self.fitness)))
        return reports

    def score_elites(self, records: list[dict[str, Any]], seed: int, dev: list[bool]) -> list[dict[str, Any]]:
        return [self.elites.score(self.stage, record, seed, d) for record, d in zip(records, dev)]
