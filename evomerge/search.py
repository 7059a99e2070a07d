"""The search: an Optuna study (the single source of truth, resumable) driven by ask/tell.

Everything needed to resume lives in the study: the config and its fingerprint in the study's
user attrs; each trial's recipe, per-task scores, timing, owner process and failure reason in
the trial's user attrs; the CMA-ES state in trial system attrs (see ``samplers``). Running the
same command again continues the study.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError, EvomergeError
from evomerge.methods import get_method

log = logging.getLogger(__name__)

ATTR_CONFIG = "evomerge:config"
ATTR_FINGERPRINT = "evomerge:fingerprint"
ATTR_SPACE = "evomerge:space"
ATTR_RECIPE = "evomerge:recipe"
ATTR_BASELINE = "evomerge:baseline"
ATTR_SCORES = "evomerge:scores"
ATTR_SECONDS = "evomerge:seconds"
ATTR_ERROR = "evomerge:error"
ATTR_INTERRUPTED = "evomerge:interrupted"
ATTR_OWNER = "evomerge:owner"
ATTR_WORKER = "evomerge:worker"  # host:pid of the Ray actor that evaluated the trial (parallel runs)
ATTR_STAGE = "evomerge:stage"
ATTR_PATH = "evomerge:path"  # dfs trials: [[source layer, scale], ...]
ATTR_DFS_SOURCES = "evomerge:dfs_sources"  # dfs studies: [[model, layer index], ...]
ATTR_DFS_REFS = "evomerge:dfs_refs"  # dfs studies: {model name: folder or hub id}
ATTR_DFS_HOST = "evomerge:dfs_host"
ATTR_PS_TRIAL = "evomerge:ps_trial"  # dfs studies: the ps trial whose model is the "ps" source


# --------------------------------------------------------------------------- storage and study
def storage_for(url: str) -> optuna.storages.BaseStorage:
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
    except Exception as e:  # SQLAlchemy errors: bad URL, server down, missing driver
        raise ConfigError(f"storage: cannot open {url}: {str(e).splitlines()[0]}") from None


def load_existing_study(name: str, storage_url: str) -> optuna.Study:
    storage = storage_for(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if name not in names:
        known = f"; studies there: {', '.join(names)}" if names else ""
        raise ConfigError(f"--study: no study named {name!r} in {storage_url}{known}")
    return optuna.load_study(study_name=name, storage=storage)


def directions(config: SearchConfig) -> list[str]:
    if config.fitness.objective == "multi":
        return ["maximize"] * len(config.fitness.tasks)
    return ["maximize"]


def open_study(config: SearchConfig, sampler: optuna.samplers.BaseSampler, *, fresh: bool = False,
               fork: bool = False, stage: str = "ps", name: str | None = None,
               prepare: Callable[[optuna.Study], None] | None = None) -> tuple[optuna.Study, bool]:
    """Create the stage's study or resume it. Returns ``(study, created)``. A study whose
    search-relevant config differs is refused unless ``fresh`` (delete and restart) or ``fork``
    (new study beside it).

    A new study gets its config, then ``prepare(study)`` (space attrs, baselines), then its
    fingerprint, last: another driver opening the same study at the same moment waits for the
    fingerprint (see :func:`_settled_summaries`) and so finds the study complete."""
    storage = storage_for(config.storage_url)
    name = name or config.stage_study(stage)
    relevant = config.search_relevant() if stage == "ps" else config.dfs_relevant()
    existing = (_settled_summaries(storage, name) if not fresh
                else {s.study_name: s for s in optuna.get_all_study_summaries(storage)})
    if name in existing and fresh:
        optuna.delete_study(study_name=name, storage=storage)
        log.info("deleted study %s (--fresh)", name)
        del existing[name]
    if name in existing:
        attrs = existing[name].user_attrs
        if attrs.get(ATTR_FINGERPRINT) != config.fingerprint(stage):
            if not fork:
                raise ConfigError(
                    f"study {name!r} in {config.storage_url} was made with a different config "
                    f"({_config_diff(attrs.get(ATTR_CONFIG), relevant)}); "
                    "run with --fork to start a new study beside it, or --fresh to replace it")
            k = 1
            while f"{name}.fork{k}" in existing:
                k += 1
            name = f"{name}.fork{k}"
            log.info("config changed: forking into study %s", name)
        else:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
            return study, False
    dirs = directions(config) if stage == "ps" else ["maximize"]
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=dirs)
    except optuna.exceptions.DuplicatedStudyError:  # another driver created it just now: join it
        return open_study(config, sampler, fork=fork, stage=stage, name=name, prepare=prepare)
    study.set_user_attr(ATTR_CONFIG, relevant)
    study.set_user_attr(ATTR_STAGE, stage)
    if prepare is not None:
        prepare(study)
    study.set_user_attr(ATTR_FINGERPRINT, config.fingerprint(stage))
    return study, True


SETTLE_S = 60.0  # longest wait for a study another driver is setting up


def _settled_summaries(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any]:
    """The storage's study summaries, once study ``name`` (if there) has its fingerprint: a study
    without one is being set up by another driver (a few writes), or was left half made by a
    driver killed in those writes (then, after :data:`SETTLE_S`, it is refused as made with a
    different config)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
        if name not in existing or ATTR_FINGERPRINT in existing[name].user_attrs or time.monotonic() > deadline:
            return existing
        time.sleep(0.5)


def _config_diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "no evomerge config recorded"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "changed: " + ", ".join(changed) if changed else "different fingerprint"


def _owner() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: optuna.Study) -> int:
    """Trials left RUNNING by a process of this host that no longer exists (kill -9, power
    loss) are marked FAILED and interrupted, so their candidates are evaluated again."""
    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(ATTR_OWNER, "")
        h, _, pid = owner.rpartition(":")
        if h == host and pid.isdigit() and not _pid_alive(int(pid)) and int(pid) != os.getpid():
            study._storage.set_trial_user_attr(t._trial_id, ATTR_INTERRUPTED, True)
            study._storage.set_trial_user_attr(t._trial_id, ATTR_ERROR, "interrupted (its process died)")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            n += 1
    if n:
        log.info("marked %d trial(s) of a dead process as interrupted", n)
    return n


def counted(study: optuna.Study) -> int:
    """Trials that count toward the budget: completed, or failed for a reason of their own."""
    return _counted_of(study.get_trials(deepcopy=False))


def _counted_of(trials: list[optuna.trial.FrozenTrial]) -> int:
    return sum(1 for t in trials if t.state == TrialState.COMPLETE
               or (t.state == TrialState.FAIL and not t.user_attrs.get(ATTR_INTERRUPTED)))


# --------------------------------------------------------------------------- samplers
def make_sampler(config: SearchConfig, bounds: dict[str, tuple[float, float]], sampler: Any = None,
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


# --------------------------------------------------------------------------- the loop
@dataclass
class TrialReport:
    number: int
    state: str  # "COMPLETE" / "FAIL"
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
class SearchResult:
    study_name: str
    storage_url: str
    completed: int
    best_number: int | None
    best_fitness: float | None
    interrupted: bool = False
    reports: list[TrialReport] = field(default_factory=list)


class _StopFlag:
    """First Ctrl-C: finish and record the trial in flight, then stop. Second: abort it."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> "_StopFlag":
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


def _prepare(study: optuna.Study, stage: Any) -> None:
    """A new study's stage attrs and, first in its queue, the baselines."""
    stage.prepare_study(study)
    if stage.sampler_config.baselines:
        enqueue_baselines(study, stage.baselines())


def enqueue_baselines(study: optuna.Study, names: list[str]) -> None:
    for name in names:
        study.enqueue_trial({}, user_attrs={ATTR_BASELINE: name})


def summarize(space: Any, params: dict[str, float]) -> str:
    """Key params in one short string: the method and each knob's mean per model."""
    if not params:
        return ""
    parts = []
    if len(space.methods) > 1:
        parts.append(space.method_of(params).name)
    by: dict[tuple[str, str | None], list[float]] = {}
    for d in space.dims:
        by.setdefault((d.knob, d.model), []).append(params[d.name])
    for (knob, model), vals in by.items():
        label = f"{model}.{knob}" if model else knob
        parts.append(f"{label}={sum(vals) / len(vals):.2f}")
    return " ".join(parts)


# --------------------------------------------------------------------------- stages
class PsStage:
    """Parameter space: a merge recipe per trial, written in place into one live model."""

    name = "ps"

    def __init__(self, config: SearchConfig):
        from evomerge.checkpoint import Checkpoint
        from evomerge.space import build_space

        self.config = config
        self.template = config.base_ref or next(iter(config.source_refs.values()))
        with Checkpoint.open(self.template) as ck:
            num_layers = ck.num_layers
        self.space = build_space(config, num_layers)
        self.sampler_config = config.sampler
        self.budget = config.budget.trials
        self.workspace: Any = None

    def bounds(self) -> dict[str, tuple[float, float]]:
        return self.space.bounds()

    def x0(self) -> dict[str, float] | None:
        return None

    def baselines(self) -> list[str]:
        names = list(self.config.models)
        return names + (["uniform"] if len(names) > 1 else [])

    def open(self) -> None:
        from evomerge.engine import TORCH_DTYPES
        from evomerge.workspace import Workspace

        refs = list(self.config.source_refs.values()) + ([self.config.base_ref] if self.config.base_ref else [])
        self.workspace = Workspace(refs, template=self.template, device=self.config.device,
                                   dtype=TORCH_DTYPES[self.config.dtype])
        # statistics of data-aware methods: once per worker, before any trial (not in a trial's time)
        for kind in dict.fromkeys(m.needs for m in map(get_method, self.config.merge.methods) if m.needs):
            seconds = self.workspace.ensure_statistics(kind, self.config.calibration_ref,
                                                       list(self.config.source_refs.values()))
            log.info("statistics %s: %.1f s (0 = read from the cache)", kind, seconds)

    def prepare_study(self, study: optuna.Study) -> None:
        study.set_user_attr(ATTR_SPACE, {k: list(v) for k, v in self.bounds().items()})

    def candidate(self, params: dict[str, float], baseline: str | None) -> dict[str, Any]:
        if baseline == "uniform":
            recipe = self.space.uniform_recipe()
        elif baseline:
            recipe = self.space.parent_recipe(baseline)
        else:
            recipe = self.space.decode(params)
        return {ATTR_RECIPE: recipe.to_dict()}

    def load(self, record: dict[str, Any]) -> tuple[Any, Any]:
        from evomerge.recipe import Recipe

        self.workspace.load(Recipe.from_dict(record[ATTR_RECIPE]))
        return self.workspace.model, self.workspace.tokenizer

    def summarize(self, params: dict[str, float]) -> str:
        return summarize(self.space, params)

    def close(self) -> None:
        if self.workspace is not None:
            self.workspace.close()


def _param_split(ck: Any) -> tuple[int, int]:
    """(parameters of the checkpoint's largest layer, parameters outside the layers)."""
    per_layer: dict[int, int] = {}
    other = 0
    for tensor in ck.tensor_names():
        numel = math.prod(ck.shape(tensor))
        index = ck.arch.layer_index(tensor)
        if index is None:
            other += numel
        else:
            per_layer[index] = per_layer.get(index, 0) + numel
    return max(per_layer.values(), default=0), other


def _layers_for_budget(config: SearchConfig, max_params: float, layer_params: int, other_params: int) -> int:
    """``dfs.max_params`` as a number of hops (the smaller of it and ``dfs.max_layers``), given the
    largest source layer and the host's parameters outside the layers."""
    from evomerge.dfs import layers_within

    n = layers_within(max_params, layer_params, other_params)
    need = 1 + (config.dfs.keep_first and config.dfs.keep_last)
    if n < need:
        raise ConfigError(f"dfs.max_params: {max_params:.4g} parameters leave room for {n} layer(s) "
                          f"({other_params:,} outside the layers, {layer_params:,} per layer); need at least {need}")
    log.info("dfs.max_params %.4g: at most %d layers (%s per layer, %s outside)", max_params, n,
             f"{layer_params:,}", f"{other_params:,}")
    max_layers = config.dfs.max_layers
    return n if max_layers is None else min(n, max_layers)


class DfsStage:
    """Data-flow space: a path through source layers per trial, run without copying weights."""

    name = "dfs"

    def __init__(self, config: SearchConfig, refs: dict[str, str], ps_trial: int | None = None):
        from evomerge.checkpoint import Checkpoint
        from evomerge.dfs import DfsSpace
        from evomerge.layerpath import SourceLayer

        self.config = config
        self.refs = refs  # dfs model name -> folder (the PS winner is a folder too)
        self.ps_trial = ps_trial
        d = config.dfs
        sources = []
        layer_params, other_params = 0, 0  # for dfs.max_params
        for name in config.dfs_models:
            with Checkpoint.open(refs[name]) as ck:
                sources += [SourceLayer(name, i) for i in range(ck.num_layers)]
                if d.max_params is not None:
                    largest, other = _param_split(ck)
                    layer_params = max(layer_params, largest)
                    other_params = other if name == config.dfs_host else other_params
        max_layers = d.max_layers
        if d.max_params is not None:
            max_layers = _layers_for_budget(config, d.max_params, layer_params, other_params)
        self.space = DfsSpace(tuple(sources), config.dfs_host, d.repeats, d.scales, tuple(d.scale_range),
                              max_layers, d.keep_first, d.keep_last)
        self.sampler_config = d.sampler
        self.budget = d.budget.trials
        self.paths: Any = None

    def bounds(self) -> dict[str, tuple[float, float]]:
        return self.space.bounds()

    def x0(self) -> dict[str, float] | None:
        return self.space.x0()

    def baselines(self) -> list[str]:
        return [self.config.dfs_host]

    def open(self) -> None:
        from evomerge.engine import TORCH_DTYPES
        from evomerge.layerpath import LayerPathModel

        self.paths = LayerPathModel({n: self.refs[n] for n in self.config.dfs_models}, host=self.config.dfs_host,
                                    device=self.config.device, dtype=TORCH_DTYPES[self.config.dtype])
        if self.paths.tokenizer is not None and self.paths.tokenizer.pad_token is None:
            self.paths.tokenizer.pad_token = self.paths.tokenizer.eos_token

    def prepare_study(self, study: optuna.Study) -> None:
        study.set_user_attr(ATTR_SPACE, {k: list(v) for k, v in self.bounds().items()})
        study.set_user_attr(ATTR_DFS_SOURCES, [[s.model, s.index] for s in self.space.sources])
        study.set_user_attr(ATTR_DFS_REFS, self.refs)
        study.set_user_attr(ATTR_DFS_HOST, self.config.dfs_host)
        if self.ps_trial is not None:
            study.set_user_attr(ATTR_PS_TRIAL, self.ps_trial)

    def candidate(self, params: dict[str, float], baseline: str | None) -> dict[str, Any]:
        from evomerge.layerpath import passthrough_recipe

        hops = self.space.host_path() if baseline else self.space.decode(params)
        recipe, _ = passthrough_recipe(hops, self.space.sources, self.refs, dtype=self.config.dtype,
                                       host=self.config.dfs_host)
        return {ATTR_PATH: [[h.layer, h.scale] for h in hops], ATTR_RECIPE: recipe.to_dict()}

    def load(self, record: dict[str, Any]) -> tuple[Any, Any]:
        from evomerge.layerpath import Hop

        self.paths.set_path([Hop(int(layer), float(scale)) for layer, scale in record[ATTR_PATH]])
        return self.paths.model, self.paths.tokenizer

    def summarize(self, params: dict[str, float]) -> str:
        if not params:
            return ""
        hops = self.space.decode(params)
        names = [f"{self.space.sources[h.layer].model}{self.space.sources[h.layer].index}" for h in hops]
        shown = " ".join(names[:12]) + (" ..." if len(names) > 12 else "")
        return f"{len(hops)} hops: {shown}"

    def close(self) -> None:
        if self.paths is not None:
            self.paths.restore()


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
            stage: Any = PsStage(config)
            result = _run_stage(config, stage, fresh=fresh, fork=fork, trials=trials, on_trial=on_trial,
                                on_start=on_start)
            ps_name = result.study_name
            if result.interrupted:
                return result
        else:
            stage = dfs_stage(config, ps_name or config.stage_study("ps"))
            dfs_name = f"{ps_name}.dfs" if ps_name else None
            result = _run_stage(config, stage, fresh=fresh, fork=fork, trials=trials, on_trial=on_trial,
                                on_start=on_start, name=dfs_name)
    assert result is not None
    return result


def dfs_stage(config: SearchConfig, ps_study: str) -> DfsStage:
    """The dfs stage, with the PS winner (recorded in an existing dfs study, else the best ps
    trial) materialised as a model folder."""
    refs = {n: config.source_refs[n] for n in config.dfs_models if n != "ps"}
    ps_trial = None
    if "ps" in config.dfs_models:
        from evomerge.engine import merge_to_dir
        from evomerge.export import trial_recipe

        storage = storage_for(config.storage_url)
        names = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
        if ps_study not in names:
            raise ConfigError(f"stage dfs: no ps study {ps_study!r} yet; run the ps stage first")
        recorded = names.get(f"{ps_study}.dfs")
        study = optuna.load_study(study_name=ps_study, storage=storage)
        number = recorded.user_attrs.get(ATTR_PS_TRIAL) if recorded is not None else None
        recipe, trial = trial_recipe(study, number)
        ps_trial = trial.number
        folder = config.artifacts_dir / f"ps_trial{ps_trial}"
        if not (folder / "config.json").exists():
            log.info("writing the ps winner (trial %d) to %s", ps_trial, folder)
            merge_to_dir(recipe, folder, device=config.device, overwrite=True)
        refs = {"ps": str(folder), **refs}
    return DfsStage(config, refs, ps_trial)


def _run_stage(config: SearchConfig, stage: Any, *, fresh: bool, fork: bool, trials: int | None,
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
        job = StageJob(study, stage, {k: FloatDistribution(lo, hi) for k, (lo, hi) in bounds.items()},
                       config.fitness.objective == "multi" and stage.name == "ps", total, on_trial)
        if on_start:
            on_start({"study": study.study_name, "stage": stage.name, "storage": config.storage_url,
                      "created": created, "dimensions": len(job.distributions), "done": counted(study),
                      "total": total, "workers": runner.workers})
        result = SearchResult(study.study_name, config.storage_url, 0, None, None)
        with _StopFlag() as stop:
            result.reports = runner.run(job, stop)
            result.interrupted = stop.requested and counted(study) < total
    result.completed = counted(study)
    best = best_trial(study)
    if best is not None:
        result.best_number, result.best_fitness = best.number, trial_fitness(best)
    return result


def make_fitness(config: SearchConfig, stage: Any) -> Any:
    """The configured fitness (lm-eval tasks built, or the consistency scorer) for ``stage``."""
    if config.fitness.kind == "consistency":
        if stage.name != "ps":
            raise ConfigError("fitness.kind: the consistency fitness scores merge recipes (stage ps) only")
        from evomerge.consistency import ConsistencyFitness

        return ConsistencyFitness(config)  # label-free; builds neighbours in the stage's workspace
    from evomerge.evaluate import LmEvalFitness

    return LmEvalFitness(config.fitness, config.include_paths)


def open_evaluator(config: SearchConfig, stage: Any) -> Any:
    """Build the fitness, then open the stage (load the sources) and bind the two: what a process
    that evaluates trials holds for the whole stage. Returns the fitness."""
    fitness = make_fitness(config, stage)
    stage.open()
    if hasattr(fitness, "bind"):
        fitness.bind(stage.workspace)
    return fitness


def open_runner(config: SearchConfig, stage: Any) -> Any:
    """In-process trials (one worker, no timeout, no cluster: no Ray imported) or a pool of Ray
    actors (:mod:`evomerge.parallel`). Both are context managers with ``workers`` and ``run``."""
    if uses_ray(config):
        from evomerge.parallel import RayRunner

        return RayRunner(config, stage)
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


@dataclass
class StageJob:
    """What a runner needs to run a stage's trials: the study, the stage (candidates), the
    distributions to suggest, whether objectives are told one per task, the budget, the callback."""

    study: optuna.Study
    stage: Any
    distributions: dict[str, FloatDistribution]
    multi: bool
    total: int
    on_trial: Callable[[TrialReport], None] | None = None

    def budget_left(self) -> int:
        """Trials still to start: the budget less the counted trials and those running anywhere
        (this driver's and other drivers' on a shared storage), read in one storage call."""
        trials = self.study.get_trials(deepcopy=False)
        running = sum(1 for t in trials if t.state == TrialState.RUNNING)
        return self.total - _counted_of(trials) - running

    def report(self, report: TrialReport) -> TrialReport:
        if self.on_trial:
            self.on_trial(report)
        return report


class InProcessRunner:
    """One trial at a time in this process, with the stage's workspace and the fitness."""

    workers = 1

    def __init__(self, config: SearchConfig, stage: Any):
        self.stage = stage
        self.fitness = open_evaluator(config, stage)

    def __enter__(self) -> "InProcessRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stage.close()

    def run(self, job: StageJob, stop: _StopFlag) -> list[TrialReport]:
        reports = []
        while job.budget_left() > 0 and not stop.requested:
            reports.append(job.report(_run_one(job, self.fitness)))
        return reports


def ask_owned(study: optuna.Study) -> optuna.Trial:
    """``study.ask()``, except that the trial carries its owner (host:pid) from the moment it is
    RUNNING, so a kill -9 at any point leaves nothing :func:`fail_stale_trials` cannot attribute.

    A queued (WAITING) trial is labelled before it is claimed and again after (another worker may
    have labelled it in between); a new trial is created RUNNING with the label in one write.
    """
    owner = _owner()
    storage, study_id = study._storage, study._study_id
    study._thread_local.cached_all_trials = None
    trial_id = None
    for waiting in storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,)):
        try:
            storage.set_trial_user_attr(waiting._trial_id, ATTR_OWNER, owner)
            if not storage.set_trial_state_values(waiting._trial_id, state=TrialState.RUNNING):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
        storage.set_trial_user_attr(waiting._trial_id, ATTR_OWNER, owner)
        trial_id = waiting._trial_id
        break
    if trial_id is None:
        template = optuna.trial.FrozenTrial(
            number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
            datetime_complete=None, params={}, distributions={}, user_attrs={ATTR_OWNER: owner},
            system_attrs={}, intermediate_values={}, trial_id=-1)
        trial_id = storage.create_new_trial(study_id, template_trial=template)
    return optuna.Trial(study, trial_id)  # runs the sampler's before_trial / sample_relative


@dataclass
class Candidate:
    """An asked trial and what the driver built for it: the record (recipe attrs, already stored
    on the trial) that a worker evaluates, or the error that kept it from being built."""

    trial: optuna.Trial
    params: dict[str, float]
    baseline: str | None
    record: dict[str, Any] | None
    error: str | None = None


@dataclass(frozen=True)
class Outcome:
    """A candidate's evaluation, as a worker (this process or a Ray actor) returns it."""

    score: Any  # evaluate.Score, None when it failed
    seconds: float
    error: str | None = None
    fatal: bool = False  # a config problem (not this candidate's): the search stops


def ask_candidate(study: optuna.Study, stage: Any, distributions: dict[str, FloatDistribution]) -> Candidate:
    """Ask a trial (owned by this process), suggest its params and store its recipe record."""
    trial = ask_owned(study)
    baseline = trial.user_attrs.get(ATTR_BASELINE)
    params: dict[str, float] = {}
    try:
        if not baseline:
            params = {name: trial.suggest_float(name, d.low, d.high) for name, d in distributions.items()}
        record = stage.candidate(params, baseline)
        for key, value in record.items():
            trial.set_user_attr(key, value)
    except ConfigError as e:  # a problem with the config, not with this candidate: stop here
        trial.set_user_attr(ATTR_ERROR, str(e))
        study.tell(trial, state=TrialState.FAIL)
        raise
    except KeyboardInterrupt:
        interrupt_trial(study, trial, "interrupted (Ctrl-C)")
        raise
    except TRIAL_ERRORS as e:
        return Candidate(trial, params, baseline, None, error_line(e))
    return Candidate(trial, params, baseline, record)


# a candidate's own failure (bad weights, invalid knob values, out of memory): recorded, search goes on
TRIAL_ERRORS = (EvomergeError, RuntimeError, ValueError, FloatingPointError, MemoryError)


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def evaluate(stage: Any, fitness: Any, record: dict[str, Any]) -> Outcome:
    """Build the record's model in the stage's workspace and score it (the worker's side)."""
    start = time.perf_counter()
    try:
        model, tokenizer = stage.load(record)
        score = fitness.score(model, tokenizer)
    except ConfigError as e:
        return Outcome(None, time.perf_counter() - start, str(e), fatal=True)
    except TRIAL_ERRORS as e:
        _free_cuda()
        return Outcome(None, time.perf_counter() - start, error_line(e))
    return Outcome(score, time.perf_counter() - start)


def tell_outcome(study: optuna.Study, stage: Any, cand: Candidate, outcome: Outcome, multi: bool,
                 total: int) -> TrialReport:
    """Record the outcome on the trial and tell it; raises ConfigError for a fatal outcome."""
    trial, summary = cand.trial, stage.summarize(cand.params)
    if outcome.error is not None:
        trial.set_user_attr(ATTR_ERROR, outcome.error)
        if not outcome.fatal:
            trial.set_user_attr(ATTR_SECONDS, outcome.seconds)
        study.tell(trial, state=TrialState.FAIL)
        if outcome.fatal:
            raise ConfigError(outcome.error)
        return _report(study, trial.number, "FAIL", None, {}, outcome.seconds, summary, cand.baseline,
                       outcome.error, total)
    score = outcome.score
    trial.set_user_attr(ATTR_SCORES, score.values)
    trial.set_user_attr(ATTR_SECONDS, outcome.seconds)
    study.tell(trial, score.objectives if multi else score.fitness)
    return _report(study, trial.number, "COMPLETE", score.fitness, score.values, outcome.seconds, summary,
                   cand.baseline, None, total)


def interrupt_trial(study: optuna.Study, trial: optuna.Trial, reason: str) -> None:
    """Fail a trial as interrupted: it does not count and its candidate is evaluated again."""
    trial.set_user_attr(ATTR_INTERRUPTED, True)
    trial.set_user_attr(ATTR_ERROR, reason)
    study.tell(trial, state=TrialState.FAIL)


def _run_one(job: StageJob, fitness: Any) -> TrialReport:
    """One trial in this process: ask, evaluate, tell."""
    cand = ask_candidate(job.study, job.stage, job.distributions)
    if cand.record is None:
        outcome = Outcome(None, 0.0, cand.error)
    else:
        try:
            outcome = evaluate(job.stage, fitness, cand.record)
        except KeyboardInterrupt:
            interrupt_trial(job.study, cand.trial, "interrupted (Ctrl-C)")
            raise
    return tell_outcome(job.study, job.stage, cand, outcome, job.multi, job.total)


def _report(study: optuna.Study, number: int, state: str, fitness: float | None, values: dict[str, float],
            seconds: float, summary: str, baseline: str | None, error: str | None, total: int) -> TrialReport:
    """The trial's report, with the study's best and progress read from storage once."""
    trials = study.get_trials(deepcopy=False)
    best = _best_of(trials)
    return TrialReport(number, state, fitness, values, seconds, summary, baseline, error,
                       trial_fitness(best) if best else None, best.number if best else None,
                       _counted_of(trials), total)


def _free_cuda() -> None:
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover
        pass


# --------------------------------------------------------------------------- reading studies
def trial_fitness(t: optuna.trial.FrozenTrial) -> float | None:
    if t.state != TrialState.COMPLETE or t.values is None:
        return None
    return float(sum(t.values)) if len(t.values) > 1 else float(t.values[0])


def best_trial(study: optuna.Study, include_baselines: bool = True) -> optuna.trial.FrozenTrial | None:
    """The completed trial with the highest fitness (sum of objectives for multi-objective studies)."""
    return _best_of(study.get_trials(deepcopy=False), include_baselines)


def _best_of(trials: list[optuna.trial.FrozenTrial], include_baselines: bool = True) -> optuna.trial.FrozenTrial | None:
    done = [t for t in trials if t.state == TrialState.COMPLETE
            and (include_baselines or not t.user_attrs.get(ATTR_BASELINE))]
    if not done:
        return None
    return max(done, key=lambda t: (trial_fitness(t), -t.number))


def leaderboard(study: optuna.Study, top: int = 10) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.FAIL):
            continue
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "fitness": trial_fitness(t),
            "scores": t.user_attrs.get(ATTR_SCORES, {}),
            "seconds": t.user_attrs.get(ATTR_SECONDS),
            "baseline": t.user_attrs.get(ATTR_BASELINE),
            "method": (t.user_attrs.get(ATTR_RECIPE) or {}).get("merge_method"),
            "error": t.user_attrs.get(ATTR_ERROR),
        })
    complete = sorted((r for r in rows if r["fitness"] is not None), key=lambda r: (-r["fitness"], r["number"]))
    baselines = [r for r in complete if r["baseline"]]
    best = [r for r in complete if not r["baseline"]][:top]
    return best + [b for b in baselines if b not in best]
