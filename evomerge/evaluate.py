"""Fitness: lm-eval tasks scored on the live merged model.

Tasks are built once per process (``TaskManager`` + ``load``) and reused for every trial; the
model is wrapped in one ``HFLM`` whose weights the workspace overwrites in place. Each call
reseeds Python/NumPy/torch exactly as ``lm_eval.simple_evaluate`` does, so a score equals what
the ``lm_eval`` CLI reports for the same weights. Bootstrap stderr and sample logging are off.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

from evomerge.config import Fitness
from evomerge.errors import ConfigError

log = logging.getLogger(__name__)

LM_EVAL_SEED = 0  # python `random` (lm-eval's DEFAULT_RANDOM_SEED)
LM_EVAL_OTHER_SEED = 1234  # numpy, torch and few-shot sampling (lm-eval's DEFAULT_OTHER_SEED)


def quiet_lm_eval() -> None:
    """Silence lm-eval's and transformers' progress bars and info logs."""
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


@dataclass(frozen=True)
class Score:
    values: dict[str, float]  # task name -> metric value
    fitness: float  # weighted sum
    objectives: list[float]  # one per task (multi-objective studies)


class LmEvalFitness:
    """Scores a model on the configured tasks (built once, reused across trials)."""

    def __init__(self, fitness: Fitness, include_paths: list[str]):
        self.fitness = fitness
        names = [t.task for t in fitness.tasks]
        self.manager = task_manager(names, include_paths)
        try:
            with _quiet():
                loaded = self.manager.load(names)
        except (KeyError, ValueError, FileNotFoundError) as e:
            raise ConfigError(f"fitness.tasks: {_first_line(e)}") from None
        self.tasks: dict[str, Any] = loaded["tasks"]
        self.task_dict = loaded
        for spec in fitness.tasks:
            if spec.task not in self.tasks:
                raise ConfigError(f"fitness.tasks: {spec.task!r} is a group or tag; list its tasks one by one")
            self._select_split(spec.task, spec.split)
            task = self.tasks[spec.task]
            check_metric(spec.task, spec.metric, list(task.aggregation()))
            if fitness.num_fewshot is not None and task.get_config("num_fewshot") != 0:
                task.set_config(key="num_fewshot", value=fitness.num_fewshot)
            elif task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=0)
            task.set_fewshot_seed(seed=LM_EVAL_OTHER_SEED)
        self._lm = None
        self._lm_model_id: int | None = None

    def _select_split(self, name: str, split: str | None) -> None:
        task = self.tasks[name]
        if split in (None, "test"):
            if split == "test" and task.get_config("test_split") is None:
                raise ConfigError(f"fitness.tasks.{name}.split: the task has no test split")
            return
        if split == "validation":
            target = task.get_config("validation_split")
            if target is None:
                raise ConfigError(f"fitness.tasks.{name}.split: the task has no validation_split; "
                                  "use split: test or name a split of its dataset")
        else:
            target = split
        available = list(getattr(task, "dataset", {}) or {})
        if available and target not in available:
            raise ConfigError(f"fitness.tasks.{name}.split: {target!r} is not a split of the task's data "
                              f"(has {', '.join(available)})")
        task.set_config(key="test_split", value=target)

    def bind(self, workspace: Any) -> None:
        """lm-eval scores the live model as it is: nothing to bind (see ``trials.Fitness``)."""

    def lm(self, model: Any, tokenizer: Any) -> Any:
        if self._lm is None or self._lm_model_id != id(model):
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.fitness.batch_size)
            self._lm_model_id = id(model)
        return self._lm

    def score(self, model: Any, tokenizer: Any) -> Score:
        import numpy as np
        import torch
        from lm_eval.evaluator import evaluate

        random.seed(LM_EVAL_SEED)
        np.random.seed(LM_EVAL_OTHER_SEED)
        torch.manual_seed(LM_EVAL_OTHER_SEED)
        for task in self.tasks.values():
            task.set_fewshot_seed(seed=LM_EVAL_OTHER_SEED)
        limit = self.fitness.limit
        with _quiet():
            results = evaluate(
                lm=self.lm(model, tokenizer),
                task_dict=self.task_dict,
                limit=int(limit) if limit is not None and limit >= 1 else limit,
                bootstrap_iters=0,
                log_samples=False,
                apply_chat_template=self.fitness.apply_chat_template,
                fewshot_as_multiturn=self.fitness.apply_chat_template,
                verbosity="ERROR",
            )
        objectives = [metric_value(results["results"], spec.task, spec.metric) for spec in self.fitness.tasks]
        values = dict(zip(self.labels, objectives))
        fitness = sum(spec.weight * v for spec, v in zip(self.fitness.tasks, objectives))
        return Score(values, float(fitness), objectives)

    @property
    def labels(self) -> list[str]:
        """One name per fitness entry: the task, or ``task.metric`` when a task is listed twice."""
        names = [t.task for t in self.fitness.tasks]
        return [t.task if names.count(t.task) == 1 else f"{t.task}.{t.metric}" for t in self.fitness.tasks]


def task_manager(names: list[str], include_paths: list[str]) -> Any:
    """An lm-eval TaskManager that knows every task in ``names``; one line for a missing folder
    or an unknown task. Indexing lm-eval's ~10k built-in task files takes ~30 s: only done when
    a task is not in the include paths."""
    quiet_lm_eval()
    from lm_eval.tasks import TaskManager

    for p in include_paths:
        if not os.path.isdir(p):
            raise ConfigError(f"fitness.include_path: {p} is not a folder")
    manager = TaskManager(include_path=include_paths or None, include_defaults=False)
    if not include_paths or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=include_paths or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        where = f" in {', '.join(include_paths)} or" if include_paths else ""
        raise ConfigError(f"fitness.tasks: unknown task {unknown[0]!r} (not found{where} among lm-eval's tasks)")
    return manager


def check_metric(task: str, metric: str, available: list[str]) -> None:
    """``metric`` (``acc``, or ``acc,flexible-extract`` with a filter) is one of the task's metrics."""
    if available and metric.split(",")[0] not in available:
        raise ConfigError(f"fitness.tasks.{task}.metric: {metric!r} is not a metric of the task; "
                          f"available: {', '.join(available)}")


def check_local_task_metrics(fitness: Fitness, include_paths: list[str]) -> None:
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
    them while it runs (our own progress bar stays on the terminal)."""
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
