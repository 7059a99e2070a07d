"""Fitness: lm-eval tasks scored on the live merged model; and loading lm-eval tasks for every
reader (the fitness, a sweep's prompts and labels, the dry run's task sizes).

Tasks are built once per process (:func:`load_tasks`) and reused for every trial; the model is
wrapped in one ``HFLM`` whose weights the workspace overwrites in place. Each call reseeds
Python/NumPy/torch exactly as ``lm_eval.simple_evaluate`` does, so a score equals what the
``lm_eval`` CLI reports for the same weights. Bootstrap stderr and sample logging are off.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import random
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from evomerge.config import Fitness as FitnessSpec
from evomerge.errors import ConfigError
from evomerge.fitness import Score
from evomerge.racing import RaceResult, RaceSpec, item_order, race

if TYPE_CHECKING:
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

LM_EVAL_SEED = 0  # python `random` (lm-eval's DEFAULT_RANDOM_SEED)
LM_EVAL_OTHER_SEED = 1234  # numpy, torch and few-shot sampling (lm-eval's DEFAULT_OTHER_SEED)


def lm_eval_verbose() -> bool:
    """Whether lm-eval's own logs and bars should show: ``LMEVAL_LOG_LEVEL`` (lm-eval's own switch)
    is DEBUG or INFO. ``evomerge -v`` sets it; Ray workers inherit it."""
    return os.environ.get("LMEVAL_LOG_LEVEL", "").upper() in ("DEBUG", "INFO")


def quiet_lm_eval() -> None:
    """Silence lm-eval's and transformers' progress bars and info logs (unless :func:`lm_eval_verbose`)."""
    if lm_eval_verbose():
        return
    os.environ.setdefault("TQDM_DISABLE", "1")
    for name in ("lm_eval", "lm-eval", "transformers", "datasets", "evaluate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - datasets missing or old
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


# ------------------------------------------------------------------ loading tasks
def task_manager(names: Sequence[str], include_paths: Sequence[str], *, where: str = "fitness",
                 registry: bool = True) -> TaskManager:
    """lm-eval's TaskManager for ``names``: the include paths alone when they hold every name, else
    with lm-eval's built-in registry too (indexing its ~10k task files takes ~30 s; ``registry=False``:
    never)."""
    quiet_lm_eval()
    from lm_eval.tasks import TaskManager

    for p in include_paths:
        if not os.path.isdir(p):
            raise ConfigError(f"{where}.include_path: {p} is not a folder")
    manager = TaskManager(include_path=list(include_paths) or None, include_defaults=False)
    if registry and (not include_paths or any(n not in manager.all_tasks for n in names)):
        manager = TaskManager(include_path=list(include_paths) or None)
    return manager


def load_tasks(names: Sequence[str], include_paths: Sequence[str], *, where: str = "fitness",
               key: str = "tasks") -> dict[str, Any]:
    """Build the lm-eval tasks ``names``, each from a YAML file in the include paths (local
    folders) or from lm-eval's registry. Returns lm-eval's task dict (``["tasks"]``: name -> Task),
    as ``lm_eval.evaluator.evaluate`` takes it. Every problem is one ConfigError line naming
    ``{where}.{key}`` (or ``{where}.include_path``)."""
    manager = task_manager(names, include_paths, where=where)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        found = f" in {', '.join(include_paths)} or" if include_paths else ""
        raise ConfigError(f"{where}.{key}: unknown task {unknown[0]!r} (not found{found} among lm-eval's tasks)")
    try:
        with _quiet():
            loaded = manager.load(list(names))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}.{key}: {_first_line(e)}") from None
    for n in names:
        if n not in loaded["tasks"]:
            raise ConfigError(f"{where}.{key}: {n!r} is a group or tag; list its tasks one by one")
    return loaded


PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")  # `datasets` builders over data files


def local_tasks(names: Sequence[str], include_paths: Sequence[str]) -> dict[str, Path]:
    """The tasks of ``names`` defined in the include paths whose data is on this machine, so that
    building them downloads nothing: a ``custom_dataset`` function, a packaged builder
    (``dataset_path: json``, ...) over local files, or a local dataset folder. Task -> its YAML
    file. Reads the YAML index only (no task is built)."""
    if not include_paths:
        return {}
    manager = task_manager(names, include_paths, registry=False)
    out = {}
    for name in names:
        entry = manager.task_index.get(name)
        cfg = getattr(entry, "cfg", None) or {}
        if entry is None or entry.yaml_path is None or "task" not in cfg:
            continue
        path = cfg.get("dataset_path")
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            files = list(files.values())
        files = [f for f in (files if isinstance(files, list) else [files]) if f is not None]
        on_disk = all(isinstance(f, str) and "://" not in f for f in files)
        if cfg.get("custom_dataset") or (path in PACKAGED_BUILDERS and files and on_disk) or (
                isinstance(path, str) and Path(path).is_dir()):
            out[name] = Path(entry.yaml_path)
    return out


def select_split(task: Task, split: str | None, where: str) -> None:
    """Point the task's evaluated split (``eval_docs``) at ``split``: None or ``test``: the task's
    own choice; ``validation``: its ``validation_split``; any other name: that split of its data."""
    if split in (None, "test"):
        if split == "test" and task.get_config("test_split") is None:
            raise ConfigError(f"{where}: the task has no test split")
        return
    if split == "validation":
        target = task.get_config("validation_split")
        if target is None:
            raise ConfigError(f"{where}: the task has no validation_split; use split: test or name a split of its dataset")
    else:
        target = split
    available = list(getattr(task, "dataset", {}) or {})
    if available and target not in available:
        raise ConfigError(f"{where}: {target!r} is not a split of the task's data (has {', '.join(available)})")
    task.set_config(key="test_split", value=target)


# ------------------------------------------------------------------ the fitness
class LmEvalFitness:
    """Scores a model on the configured tasks (built once, reused across trials)."""

    def __init__(self, fitness: FitnessSpec, include_paths: list[str], *, key: str = "tasks",
                 fewshot_seed: int = LM_EVAL_OTHER_SEED):
        """``key``: the field named in errors (``fitness.tasks``, or ``fitness.heldout``);
        ``fewshot_seed``: seeds the draw of the few-shot examples (lm-eval's ``fewshot_random_seed``)."""
        self.fitness = fitness
        self.fewshot_seed = fewshot_seed
        names = list(dict.fromkeys(t.task for t in fitness.tasks))
        loaded = load_tasks(names, include_paths, key=key)
        self.tasks: dict[str, Task] = loaded["tasks"]
        self.task_dict = loaded
        for spec in fitness.tasks:
            select_split(self.tasks[spec.task], spec.split, f"fitness.{key}.{spec.task}.split")
            task = self.tasks[spec.task]
            check_metric(spec.task, spec.metric, list(task.aggregation()), key=key)
            if fitness.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=fitness.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=fewshot_seed)
        self._lm = None
        self._lm_model_id: int | None = None

    def lm(self, model: PreTrainedModel, tokenizer: Any) -> Any:
        if self._lm is None or self._lm_model_id != id(model):
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.fitness.batch_size)
            self._lm_model_id = id(model)
        return self._lm

    def score(self, model: PreTrainedModel, tokenizer: Any) -> Score:
        results = self._run(model, tokenizer)
        objectives = [metric_value(results["results"], spec.task, spec.metric) for spec in self.fitness.tasks]
        values = dict(zip(self.labels, objectives))
        fitness = sum(spec.weight * v for spec, v in zip(self.fitness.tasks, objectives))
        return Score(values, float(fitness), objectives)

    # ------------------------------------------------------------ item level (racing)
    def pool_size(self, name: str) -> int:
        """The task's items a trial is scored on: its evaluated split, cut to ``fitness.limit``
        (a count, or a fraction rounded up, as lm-eval does)."""
        size = len(self.tasks[name].eval_docs)
        limit = self.fitness.limit
        if limit is None:
            return size
        return min(size, int(limit) if limit >= 1 else math.ceil(size * limit))

    def item_orders(self, seed: int) -> dict[str, Any]:
        """Task -> the study's order of its items (see :func:`evomerge.racing.item_order`)."""
        return {name: item_order(seed, name, self.pool_size(name)) for name in self.tasks}

    def check_items(self) -> None:
        """Racing needs each fitness entry to be a mean over items (acc, exact_match, ...)."""
        from lm_eval.api.metrics import mean

        for spec in self.fitness.tasks:
            aggregation = self.tasks[spec.task].aggregation().get(spec.metric.split(",")[0])
            if aggregation is not mean:
                raise ConfigError(f"fitness.racing: {spec.task}'s metric {spec.metric} is not a mean over items; "
                                  "set racing: {enabled: false}")

    def score_items(self, model: PreTrainedModel, tokenizer: Any, wanted: dict[str, Sequence[int]]) -> dict[str, Any]:
        """Each fitness entry's per-item values on ``wanted`` (task -> item indices of its split),
        in that order, from lm-eval's per-sample output."""
        import numpy as np

        # lm-eval walks the selected items in index order but labels them by position in the list
        # it was given: give it sorted indices, so each logged doc_id is the item's own
        results = self._run(model, tokenizer, samples={k: sorted(int(i) for i in v) for k, v in wanted.items()},
                            log_samples=True)
        out = {}
        for spec, label in zip(self.fitness.tasks, self.labels):
            if spec.task not in wanted:
                continue
            by_doc = sample_values(results.get("samples", {}).get(spec.task, []), spec.task, spec.metric)
            missing = [int(i) for i in wanted[spec.task] if int(i) not in by_doc]
            if missing:
                raise ConfigError(f"fitness.tasks.{spec.task}: lm-eval logged no {spec.metric} for item {missing[0]}")
            out[label] = np.array([by_doc[int(i)] for i in wanted[spec.task]], dtype=np.float64)
        return out

    def race(self, model: PreTrainedModel, tokenizer: Any, spec: RaceSpec) -> RaceResult:
        """Score the model rung by rung on the study's item order (all items when ``spec`` has
        no reference); see :func:`evomerge.racing.race`."""
        labels = dict(zip(self.labels, (t.task for t in self.fitness.tasks)))
        return race(lambda wanted: self.score_items(model, tokenizer, wanted), self.item_orders(spec.seed),
                    labels, self.weights, spec)

    @property
    def weights(self) -> dict[str, float]:
        return self.fitness.weights

    def _run(self, model: PreTrainedModel, tokenizer: Any, *, samples: dict[str, list[int]] | None = None,
             log_samples: bool = False) -> dict[str, Any]:
        """lm-eval's ``evaluate`` on the tasks, reseeded as ``simple_evaluate`` does."""
        import numpy as np
        import torch
        from lm_eval.evaluator import evaluate

        random.seed(LM_EVAL_SEED)
        np.random.seed(LM_EVAL_OTHER_SEED)
        torch.manual_seed(LM_EVAL_OTHER_SEED)
        for task in self.tasks.values():
            task.set_fewshot_seed(seed=self.fewshot_seed)
        limit = self.fitness.limit if samples is None else None
        task_dict = self.task_dict
        if samples is not None:
            task_dict = {**self.task_dict, "tasks": {k: v for k, v in self.tasks.items() if k in samples}}
        with _quiet():
            return evaluate(
                lm=self.lm(model, tokenizer),
                task_dict=task_dict,
                limit=int(limit) if limit is not None and limit >= 1 else limit,
                samples=samples,
                bootstrap_iters=0,
                log_samples=log_samples,
                apply_chat_template=self.fitness.apply_chat_template,
                fewshot_as_multiturn=self.fitness.apply_chat_template,
                verbosity="ERROR",
            )

    @property
    def labels(self) -> list[str]:
        """One name per fitness entry: the task, or ``task.metric`` when a task is listed twice."""
        return self.fitness.labels


def sample_values(samples: list[dict[str, Any]], task: str, metric: str) -> dict[int, float]:
    """doc_id -> the metric's value, from lm-eval's logged samples of one task. ``metric`` is
    ``acc`` (filter ``none``, else the only filter the task has) or ``acc,flexible-extract``."""
    name, _, wanted = metric.partition(",")
    filters = sorted({s.get("filter", "none") for s in samples})
    if not wanted:
        wanted = "none" if "none" in filters or len(filters) != 1 else filters[0]
    out = {}
    for s in samples:
        if s.get("filter", "none") == wanted and isinstance(s.get(name), (int, float, bool)):
            out[int(s["doc_id"])] = float(s[name])
    if samples and not out:
        raise ConfigError(f"fitness.tasks.{task}.metric: lm-eval logged no per-item {metric!r} "
                          f"(filters: {', '.join(filters)})")
    return out


def check_metric(task: str, metric: str, available: list[str], *, key: str = "tasks") -> None:
    """``metric`` (``acc``, or ``acc,flexible-extract`` with a filter) is one of the task's metrics."""
    if available and metric.split(",")[0] not in available:
        raise ConfigError(f"fitness.{key}.{task}.metric: {metric!r} is not a metric of the task; "
                          f"available: {', '.join(available)}")


def check_local_task_metrics(fitness: FitnessSpec, include_paths: list[str]) -> None:
    """Each task found in ``fitness.include_path`` reports its metric, read from the task's YAML
    config (its ``metric_list``, else lm-eval's default metrics for its ``output_type``) without
    loading its data or running it (the dry run's check). lm-eval's built-in tasks (indexing them
    takes ~30 s) and tasks defined in Python are checked when the search builds them, which is
    also before its study exists."""
    quiet_lm_eval()
    from lm_eval.api.registry import DEFAULT_METRIC_REGISTRY
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    for p in include_paths:
        if not os.path.isdir(p):
            raise ConfigError(f"fitness.include_path: {p} is not a folder")
    if not include_paths:
        return
    manager = TaskManager(include_path=include_paths, include_defaults=False)
    for spec in fitness.tasks:
        entry = manager.task_index.get(spec.task)
        if entry is None or entry.yaml_path is None:
            continue
        try:
            cfg = load_yaml(entry.yaml_path, resolve_func=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"fitness.tasks.{spec.task}: cannot read {entry.yaml_path}: {_first_line(e)}") from None
        if "task" not in cfg:
            raise ConfigError(f"fitness.tasks: {spec.task!r} is a group or tag; list its tasks one by one")
        listed = cfg.get("metric_list")
        if listed:
            available = [m["metric"] for m in listed if isinstance(m, dict) and isinstance(m.get("metric"), str)]
        else:
            available = list(DEFAULT_METRIC_REGISTRY.get(cfg.get("output_type", "generate_until"), []))
        check_metric(spec.task, spec.metric, available)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """lm-eval draws tqdm bars and prints warnings on stderr whatever its log level: swallow
    them while it runs (our own progress bar stays on the terminal); not under -v."""
    if lm_eval_verbose():
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def metric_value(results: dict[str, dict[str, Any]], task: str, metric: str) -> float:
    """``results[task]["acc,none"]`` for ``metric="acc"``, or ``metric="acc,flexible-extract"``."""
    row = results.get(task)
    if row is None:
        raise ConfigError(f"fitness.tasks.{task}: lm-eval returned no results for this task")
    keys = [metric] if "," in metric else [f"{metric},none"] + [k for k in row if k.startswith(metric + ",")]
    for key in keys:
        if key in row and isinstance(row[key], (int, float)):
            return float(row[key])
    available = sorted({k.split(",")[0] for k in row if "," in k and "stderr" not in k})
    raise ConfigError(f"fitness.tasks.{task}.metric: {metric!r} not reported; available: {', '.join(available)}")


def _first_line(e: BaseException) -> str:
    text = str(e.args[0] if e.args else e).strip()
    return text.splitlines()[0] if text else type(e).__name__
