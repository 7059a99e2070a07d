"""Label-free coefficient tuning by generation consistency (AdaMMS, arXiv 2503.23733): the driver.

``evomerge sweep CONFIG`` merges at every value of one coefficient (or every point of a grid over
two or three), generates greedily on a small set of unlabelled prompts, and picks the value whose
responses agree most with those of its neighbours. The idea: where the merge sits in a stable
region of function space, nudging the coefficient changes few answers; near a transition (one
parent taking over, or the merge breaking) answers flip.

The parts: the config (``config.SweepConfig``), the prompts (``prompts``, a seeded sample with
``limit``), greedy generation (``generation``), the scores and the choice (``disagreement``:
neighbours are adjacent grid values; endpoints are never chosen), and the files written
(``sweep_report``).

Generations are cached on disk, one JSON file per grid point, named by a hash of the merge recipe
(with the model files' sizes and mtimes), the prompts, the generation settings and the dtype (not
the batch size nor the device), so a sweep resumes where it stopped and can be re-scored with
another metric or smoothing without generating again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from evomerge.config import (Aggregate, Fitness, FitnessTask, GenerationSettings, LabelSource, Metric, PromptSource,
                             SweepConfig)
from evomerge.disagreement import choose, grid_neighbours, minilm_embedder, score_table, smooth
from evomerge.engine import TORCH_DTYPES
from evomerge.errors import ConfigError
from evomerge.evaluate import LmEvalFitness, quiet_lm_eval
from evomerge.files import write_atomic
from evomerge.generation import generate_responses
from evomerge.prompts import load_prompts
from evomerge.recipe import Recipe
from evomerge.sweep_report import PointResult, SweepResult, write_outputs
from evomerge.workspace import Workspace

log = logging.getLogger(__name__)

CACHE_VERSION = 1


# --------------------------------------------------------------------------- the cache
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def model_fingerprint(ref: str) -> list[Any]:
    """Sizes and mtimes of a local model folder's weight and config files (a hub id: itself)."""
    p = Path(ref)
    if not p.is_dir():
        return [ref]
    files = sorted([*p.glob("*.safetensors"), *p.glob("*.bin"), *p.glob("config.json")])
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def generation_key(recipe: Recipe, prompts: Sequence[str], settings: GenerationSettings, dtype: str) -> str:
    return _sha({
        "version": CACHE_VERSION,
        "recipe": recipe.to_dict(),
        "models": {r: model_fingerprint(r) for r in recipe.referenced_models()},
        "prompts": _sha(list(prompts)),
        "generation": settings.cache_relevant(),
        "dtype": dtype,
    })[:24]


def labels_key(recipe: Recipe, labels: LabelSource, include_paths: Sequence[str], dtype: str) -> str:
    return _sha({
        "version": CACHE_VERSION,
        "recipe": recipe.to_dict(),
        "models": {r: model_fingerprint(r) for r in recipe.referenced_models()},
        "labels": labels.model_dump(mode="json", exclude={"batch_size", "include_path"}),
        "include_path": list(include_paths),
        "dtype": dtype,
    })[:24]


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --------------------------------------------------------------------------- the sweep
def run_sweep(cfg: SweepConfig, *, out: str | Path | None = None, metric: Metric | None = None,
              smoothing: int | None = None, aggregate: Aggregate | None = None,
              on_point: Callable[[PointResult], None] | None = None, plot: bool = True) -> SweepResult:
    """Generate (or read from the cache) every grid point's responses, score, choose, write files."""
    quiet_lm_eval()
    metric = metric or cfg.metric
    aggregate = aggregate or cfg.aggregate
    smoothing = cfg.smoothing if smoothing is None else smoothing
    if smoothing < 0:
        raise ConfigError("smoothing: expected a non-negative window half-width")
    out = Path(out).resolve() if out is not None else cfg.default_out()
    cache = cfg.cache_dir(out)
    prompts = load_prompts(cfg.prompts, cfg.root)
    label_fitness: LmEvalFitness | None = None
    label_include = [str((cfg.root / p).resolve()) for p in cfg.labels.include_path] if cfg.labels else []
    embed = minilm_embedder() if metric == "embedding" else None  # a missing package fails before any generation

    points = cfg.points()
    neighbours = grid_neighbours(cfg.shape)
    results: list[PointResult] = []
    workspace: Workspace | None = None
    generated = 0
    try:
        for point in points:
            recipe = cfg.recipe_at(point)
            gkey = generation_key(recipe, prompts, cfg.generation, cfg.dtype)
            gfile = cache / f"gen-{gkey}.json"
            cached = _read_json(gfile)
            responses = cached.get("responses") if isinstance(cached, dict) and cached.get("key") == gkey else None
            if responses is not None and len(responses) != len(prompts):
                responses = None
            acc = None
            lfile = None
            if cfg.labels is not None:
                lkey = labels_key(recipe, cfg.labels, label_include, cfg.dtype)
                lfile = cache / f"acc-{lkey}.json"
                got = _read_json(lfile)
                acc = got.get("accuracy") if isinstance(got, dict) and got.get("key") == lkey else None
            result = PointResult(point, cfg.values_at(point), recipe, responses or [], point in neighbours,
                                 accuracy=acc, cached=responses is not None)
            start = time.perf_counter()
            if responses is None or (cfg.labels is not None and acc is None):
                if workspace is None:
                    workspace = _open_workspace(recipe, cfg.device, TORCH_DTYPES[cfg.dtype])
                workspace.load(recipe)
                if responses is None:
                    result.responses = generate_responses(workspace.model, workspace.tokenizer, prompts, cfg.generation)
                    write_atomic(gfile, json.dumps({"key": gkey, "values": result.values, "recipe": recipe.to_dict(),
                                                    "generation": cfg.generation.cache_relevant(),
                                                    "responses": result.responses}, indent=1))
                    generated += 1
                if cfg.labels is not None and acc is None:
                    if label_fitness is None:
                        label_fitness = _label_fitness(cfg.labels, label_include)
                    result.accuracy = float(label_fitness.score(workspace.model, workspace.tokenizer).fitness)
                    write_atomic(lfile, json.dumps({"key": lkey, "values": result.values, "task": cfg.labels.task,
                                                    "metric": cfg.labels.metric, "accuracy": result.accuracy}))
            result.seconds = time.perf_counter() - start
            results.append(result)
            if on_point:
                on_point(result)
    finally:
        if workspace is not None:
            workspace.close()
            del workspace
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    by_point = {r.index: r for r in results}
    raw = score_table({r.index: r.responses for r in results}, neighbours, metric, aggregate=aggregate,
                      empty_disagrees=cfg.empty_disagrees, embed=embed)
    smoothed = smooth(raw, smoothing)
    for p, v in raw.items():
        by_point[p].disagreement = v
        by_point[p].smoothed = smoothed[p]
    chosen, ties = choose(smoothed, raw)
    label_best = None
    if cfg.labels is not None:
        label_best = max(results, key=lambda r: (r.accuracy if r.accuracy is not None else -math.inf))
    res = SweepResult(cfg.sweep, out, metric, aggregate, smoothing,
                      [{"name": c.name, "param": c.param, "model": c.model, "values": c.grid} for c in cfg.coefficients],
                      len(prompts), results, by_point[chosen], [by_point[t] for t in ties], generated, label_best,
                      prompt_sample=prompt_sample(cfg.prompts))
    write_outputs(res, plot=plot)
    return res


def _open_workspace(recipe: Recipe, device: str, dtype: torch.dtype) -> Workspace:
    refs = recipe.referenced_models()
    template = recipe.base_model or refs[0]
    return Workspace(refs, template=template, device=device, dtype=dtype)


def _label_fitness(labels: LabelSource, include: list[str]) -> LmEvalFitness:
    spec = Fitness(tasks=[FitnessTask(task=labels.task, metric=labels.metric, split=labels.split)],
                   include_path=include, limit=labels.limit, batch_size=labels.batch_size)
    try:
        return LmEvalFitness(spec, include)
    except ConfigError as e:
        raise ConfigError(str(e).replace("fitness.tasks", "labels").replace("fitness.", "labels.")) from None


def prompt_sample(src: PromptSource) -> dict[str, int] | None:
    """How the prompts were sampled (recorded in sweep.json): None when every prompt is used."""
    return None if src.limit is None else {"limit": src.limit, "seed": src.seed}
