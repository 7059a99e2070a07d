"""Trials in parallel: Ray actors evaluate, this process (the driver) owns the study.

Each worker is a Ray actor (one GPU each for a cuda device, else one CPU) that builds the stage's
workspace and the fitness once and keeps them for the whole stage; it only ever receives a trial's
record (the recipe the driver built and stored) and returns an :class:`~evomerge.trials.Outcome`.
The driver asks a trial (``ask_owned``: owned by this process, so a resume after kill -9 fails
it), hands it to an idle worker, and tells each result the moment it arrives, then asks the next:
with TPE, random or QMC no worker waits for another. CMA-ES hands out the indices of its current
generation (its population defaults to a multiple of the worker count, see
``search.make_sampler``) and, when all are taken, extra candidates from the same distribution
(see ``samplers``), so a generation barrier does not leave workers idle either.

Failures:

* an actor that dies during a trial (killed, out of memory, node lost) fails that trial with
  the reason in ``evomerge:error``; a new actor replaces it and the study goes on;
* a trial still running after ``budget.timeout_s`` is failed ("timed out after Ns"), its actor
  killed and replaced;
* Ctrl-C: no new trial starts, trials in flight finish and are recorded; a second Ctrl-C (or any
  error of the driver) marks the trials in flight interrupted (not counted, evaluated again on
  resume) and stops the actors.

The driver starts a local Ray runtime (and shuts it down after), joins a cluster given by
``ray_address``, or uses the runtime already initialised in this process (tests).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

import evomerge
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError, EvomergeError
from evomerge.elites import EliteScorer
from evomerge.racing import RaceSpec
from evomerge.study import ATTR_WORKER
from evomerge.trials import (Candidate, Fitness, Outcome, Stage, StageJob, StopFlag, TrialReport,
                             error_line, evaluate, interrupt_trial, make_report, open_evaluator, tell_outcome)

log = logging.getLogger(__name__)

# longest wait for a result before the stop flag and the timeouts are looked at again; Python runs
# a signal handler only between waits, so this is also how late a Ctrl-C is seen (and two presses
# within it count as one)
POLL_S = 0.25
MAX_START_FAILURES = 3  # replacement actors that die while starting, in a row, before giving up
# passed on to workers (a cluster's workers do not inherit the driver's environment)
FORWARDED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_TOKEN")


class TrialWorker:
    """The actor: one stage workspace and one fitness, built once, scoring records."""

    def __init__(self, config: SearchConfig, stage: Stage, gpu: bool):
        self.error: str | None = None
        self.fitness: Fitness | None = None
        if gpu:  # Ray exposes this actor's GPU as the only visible one
            stage.config = config = config.model_copy(update={"device": "cuda"})
        self.stage = stage
        try:
            self.fitness = open_evaluator(config, stage)
            self.elites = EliteScorer(config, self.fitness)
        except EvomergeError as e:  # reported by ready(): one clear line in the driver
            self.error = str(e)
        except Exception as e:  # e.g. a model folder missing on this worker's machine
            self.error = f"a worker on {socket.gethostname()} could not start: {error_line(e)}"

    def ready(self) -> tuple[str, str | None]:
        """(host:pid of this worker, the error that kept it from starting or None)."""
        return f"{socket.gethostname()}:{os.getpid()}", self.error

    def score(self, record: dict[str, Any], race: RaceSpec | None = None) -> Outcome:
        assert self.fitness is not None  # ready() reported the error otherwise
        return evaluate(self.stage, self.fitness, record, race)

    def elite(self, record: dict[str, Any], seed: int, dev: bool) -> dict[str, Any]:
        return self.elites.score(self.stage, record, seed, dev)


@dataclass(eq=False)  # a slot of the pool: its actor is replaced in place when it dies
class _Worker:
    actor: Any  # None once dead, until restarted
    name: str = ""  # host:pid of the current actor, known once ready


@dataclass
class _Flight:
    worker: _Worker
    cand: Candidate
    started: float  # time.monotonic() at dispatch


class RayRunner:
    """A pool of :class:`TrialWorker` actors and the driver loop that keeps them busy."""

    def __init__(self, config: SearchConfig, stage: Stage, workers: int):
        self.config, self.stage = config, stage
        self.timeout = config.budget.timeout_s
        self.gpu = config.device.startswith("cuda")
        self._owns_ray = _connect(config, workers)
        try:
            self.workers = _check_resources(config, self.gpu, workers)
            self._actor_class = ray.remote(TrialWorker).options(
                num_cpus=1, num_gpus=1 if self.gpu else 0, max_restarts=0, max_task_retries=0)
            self.pool = [self._start() for _ in range(self.workers)]
            for worker in self.pool:
                self._wait_ready(worker)
        except BaseException:
            self.close()
            raise
        log.info("%d Ray worker(s) ready: %s", self.workers, ", ".join(w.name for w in self.pool))

    def __enter__(self) -> "RayRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for worker in getattr(self, "pool", []):
            if worker.actor is not None:
                ray.kill(worker.actor, no_restart=True)
        self.pool = []
        if self._owns_ray and ray.is_initialized():
            ray.shutdown()

    # ------------------------------------------------------------------ actors
    def _new_actor(self) -> Any:
        return self._actor_class.remote(self.config, self.stage, self.gpu)

    def _start(self) -> _Worker:
        return _Worker(self._new_actor())

    def _wait_ready(self, worker: _Worker) -> None:
        try:
            self._take_ready(worker, worker.actor.ready.remote())
        except RayActorError as e:  # died while loading (out of memory, crash)
            raise EvomergeError(f"workers: a worker died while starting: {_first_line(e)}") from None

    def _take_ready(self, worker: _Worker, ref: Any) -> None:
        name, error = ray.get(ref)
        if error is not None:
            raise ConfigError(error)
        worker.name = name

    def _restart(self, worker: _Worker) -> Any:
        """Kill the worker's actor (if alive) and start a new one in its place, without waiting:
        returns the ref that is ready once the new actor has loaded everything."""
        if worker.actor is not None:
            ray.kill(worker.actor, no_restart=True)
        worker.actor = self._new_actor()
        return worker.actor.ready.remote()

    # ------------------------------------------------------------------ the driver loop
    def run(self, job: StageJob, stop: StopFlag) -> list[TrialReport]:
        """Keep every worker busy until the budget is used (or Ctrl-C); tell results as they
        come. Dead or hung workers are restarted in the background while the others go on."""
        idle = list(self.pool)
        flights: dict[Any, _Flight] = {}
        starting: dict[Any, _Worker] = {}  # ready() ref of a replacement -> its worker
        reports: list[TrialReport] = []
        failed_starts = 0
        try:
            while True:
                while idle and not stop.requested and job.budget_left() > 0:
                    report = self._dispatch(job, idle, flights)
                    if report is not None:  # the candidate could not even be built
                        reports.append(job.report(report))
                if not flights and (not starting or stop.requested or job.budget_left() <= 0):
                    return reports
                done, _ = ray.wait([*flights, *starting], num_returns=1, timeout=self._wait_s(flights))
                for ref in done:
                    if ref in starting:
                        worker = starting.pop(ref)
                        try:
                            self._take_ready(worker, ref)
                        except RayActorError as e:
                            failed_starts += 1
                            if failed_starts >= MAX_START_FAILURES:
                                raise EvomergeError(f"workers: {failed_starts} replacement workers died while "
                                                    f"starting; last: {_first_line(e)}") from None
                            worker.actor = None
                            starting[self._restart(worker)] = worker
                            continue
                        failed_starts = 0
                        log.info("worker %s started", worker.name)
                        idle.append(worker)
                        continue
                    flight = flights[ref]  # in flight until told: a second Ctrl-C during the tell interrupts it
                    report = self._finish(job, ref, flight, stop)
                    del flights[ref]
                    reports.append(job.report(report))
                    if flight.worker.actor is None:  # died: replaced
                        starting[self._restart(flight.worker)] = flight.worker
                    elif not stop.requested:
                        idle.append(flight.worker)
                for ref, flight in self._expired(flights):
                    del flights[ref]
                    reports.append(job.report(self._time_out(job, flight)))
                    starting[self._restart(flight.worker)] = flight.worker
        except BaseException as e:  # second Ctrl-C, a config error, a lost connection
            for flight in flights.values():
                interrupt_trial(job.study, flight.cand.trial, _interruption(e))
            raise

    def score_elites(self, records: list[dict[str, Any]], seed: int, dev: list[bool]) -> list[dict[str, Any]]:
        """The records spread over the pool (an actor runs its share one after another)."""
        refs = [self.pool[i % len(self.pool)].actor.elite.remote(r, seed, d) for i, (r, d) in enumerate(zip(records, dev))]
        return ray.get(refs)

    def _dispatch(self, job: StageJob, idle: list[_Worker], flights: dict[Any, _Flight]) -> TrialReport | None:
        cand = job.ask()
        if cand.record is None:
            return tell_outcome(job.study, job.stage, cand, Outcome(None, 0.0, cand.error), job.multi, job.total)
        try:
            worker = idle.pop()
            cand.trial.set_user_attr(ATTR_WORKER, worker.name)
            flights[worker.actor.score.remote(cand.record, cand.race)] = _Flight(worker, cand, time.monotonic())
        except BaseException as e:  # a second Ctrl-C before the trial is in flight: it is not left RUNNING
            interrupt_trial(job.study, cand.trial, _interruption(e))
            raise
        return None

    def _finish(self, job: StageJob, ref: Any, flight: _Flight, stop: StopFlag) -> TrialReport:
        """Tell a returned trial; a worker that died fails it (or, after Ctrl-C, interrupts it)
        and is marked for replacement (``actor = None``)."""
        try:
            outcome = ray.get(ref)
        except RayActorError as e:
            seconds = time.monotonic() - flight.started
            flight.worker.actor = None
            if stop.requested:  # Ctrl-C reaches local workers too: not the candidate's fault
                interrupt_trial(job.study, flight.cand.trial, "interrupted (its worker stopped after Ctrl-C)")
                return _interrupted_report(job, flight, seconds)
            log.warning("worker %s died during trial %d: %s", flight.worker.name, flight.cand.trial.number,
                        _first_line(e))
            outcome = Outcome(None, seconds, f"worker {flight.worker.name} died: {_first_line(e)}")
        except BaseException as e:  # a second Ctrl-C, or a bug raised in the worker (RayTaskError): stop
            interrupt_trial(job.study, flight.cand.trial, _interruption(e))
            raise
        return tell_outcome(job.study, job.stage, flight.cand, outcome, job.multi, job.total)

    def _wait_s(self, flights: dict[Any, _Flight]) -> float:
        if not self.timeout or not flights:
            return POLL_S
        first_deadline = min(f.started for f in flights.values()) + self.timeout
        return max(0.0, min(POLL_S, first_deadline - time.monotonic()))

    def _expired(self, flights: dict[Any, _Flight]) -> list[tuple[Any, _Flight]]:
        if not self.timeout:
            return []
        now = time.monotonic()
        return [(ref, f) for ref, f in flights.items() if now - f.started > self.timeout]

    def _time_out(self, job: StageJob, flight: _Flight) -> TrialReport:
        log.warning("trial %d timed out after %gs on worker %s; restarting it", flight.cand.trial.number,
                    self.timeout, flight.worker.name)
        outcome = Outcome(None, time.monotonic() - flight.started, f"timed out after {self.timeout:g}s")
        return tell_outcome(job.study, job.stage, flight.cand, outcome, job.multi, job.total)


def _interrupted_report(job: StageJob, flight: _Flight, seconds: float) -> TrialReport:
    return make_report(job.study, flight.cand.trial.number, "FAIL", None, {}, seconds,
                   job.stage.summarize(flight.cand.params), flight.cand.baseline, "interrupted", job.total)


def _interruption(e: BaseException) -> str:
    return "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else f"interrupted ({type(e).__name__})"


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


# --------------------------------------------------------------------------- the Ray runtime
def _connect(config: SearchConfig, workers: int) -> bool:
    """Join ``ray_address``, or start a local runtime; returns whether this call started it (and
    so shuts it down after). A runtime already initialised in this process is used as it is."""
    if config.ray_address:
        _check_reachable(config.ray_address)
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "runtime_env": _runtime_env(),
                              "log_to_driver": log.isEnabledFor(logging.DEBUG), "logging_level": logging.WARNING}
    if config.ray_address:
        _use_cluster_token()
        try:
            ray.init(address=config.ray_address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise ConfigError(f"--ray-address: cannot join the Ray cluster at {config.ray_address}: "
                              f"{_first_line(e)}") from None
    else:
        ray.init(num_cpus=max(workers, os.cpu_count() or 1), **kwargs)
    return True


def _runtime_env() -> dict[str, Any]:
    """Workers import evomerge from the driver's folder when it exists there (a checkout run
    without installing), and get the driver's Hugging Face settings."""
    package_parent = str(Path(evomerge.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)
    env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
    return {"env_vars": {"PYTHONPATH": path, **env}}


def _use_cluster_token() -> None:
    """`ray start --head` enables token authentication by default (Ray >= 2.5x) and keeps the
    token in ~/.ray/auth_token; a driver joining by address only sends it in token mode. With no
    mode set and a token at hand, use it (an explicit RAY_AUTH_MODE is left as it is)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if os.environ.get("RAY_AUTH_TOKEN") or path.is_file():
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # Ray read its config at import: make it see the mode (what Ray's own setup does)
            from ray._raylet import Config

            Config.initialize("")
        except (ImportError, AttributeError):  # a Ray without token authentication
            pass


def _check_reachable(address: str) -> None:
    """One clear line at once for an address nobody listens on (Ray itself retries for minutes)."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--ray-address: expected host:port of a Ray head (`ray start --head`), got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise ConfigError(f"--ray-address: no Ray cluster at {address} ({e.strerror or e}); "
                          "start one with `ray start --head`") from None


def _check_resources(config: SearchConfig, gpu: bool, workers: int) -> int:
    """The worker count (``workers``: as configured, or the local default), checked against what
    the runtime offers (an actor asking for more would wait forever)."""
    resources = ray.cluster_resources()
    kind, have = ("GPU", int(resources.get("GPU", 0))) if gpu else ("CPU", int(resources.get("CPU", 0)))
    if gpu and config.workers is None and have:
        workers = have  # default: every GPU of the cluster
    if workers > have:
        where = f"the Ray cluster at {config.ray_address}" if config.ray_address else "this machine"
        raise ConfigError(f"workers: {workers} {kind} worker(s) asked but {where} has {have} {kind}(s)")
    return workers
