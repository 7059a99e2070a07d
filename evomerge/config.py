"""The search config: the only YAML reader for `evomerge search`. Frozen pydantic models, unknown
keys refused, every error one line naming the field.

Paths (models, ``fitness.include_path``, ``storage`` SQLite files) are relative to the config
file's folder; a model that is not a local folder is taken as a Hugging Face hub id.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from evomerge.consistency import ConsistencySpec
from evomerge.configfile import IDENTIFIER, YamlConfig, check_file_name
from evomerge.files import resolve_ref
from evomerge.methods import METHODS, get_method
from evomerge.recipe import DTYPES

SAMPLERS = ("cmaes", "tpe", "random", "qmc", "nsga2")
MULTI_OBJECTIVE_SAMPLERS = ("nsga2", "tpe", "random", "qmc")


_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbgt]?)\s*$", re.IGNORECASE)
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str) -> float:
    """``"10B"`` -> 1e10, ``"350M"`` -> 3.5e8, ``"1.5e9"`` -> 1.5e9 (K, M, B or G, T; any case)."""
    match = _COUNT.match(text)
    if not match:
        raise ValueError(f"expected a number such as 10B, 350M or 1.5e9, got {text!r}")
    return float(match.group(1)) * _SUFFIX[match.group(2).lower()]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MergeSpace(_Strict):
    """What to search: the method(s), which knobs and in which ranges, at which granularity."""

    method: Union[str, list[str]] = "task_arithmetic"
    # knob -> [low, high] (or null for the method's default search range)
    search: dict[str, Union[tuple[float, float], None]] = Field(default_factory=lambda: {"weight": None})
    # knob -> value for all models, or {model name: value}
    fixed: dict[str, Any] = Field(default_factory=dict)
    layer_groups: Union[int, Literal["full"]] = 1
    split_attn_mlp: bool = False
    random_seed: int = 0

    @property
    def methods(self) -> list[str]:
        return [self.method] if isinstance(self.method, str) else list(self.method)

    @model_validator(mode="after")
    def _check(self) -> "MergeSpace":
        methods = self.methods
        if not methods:
            raise ValueError("method: give a method name or a non-empty list of them")
        for name in methods:
            if name not in METHODS:
                raise ValueError(f"method: unknown method {name!r}; expected one of {', '.join(sorted(METHODS))}")
            if name == "passthrough":
                raise ValueError("method: passthrough has nothing to search in parameter space (frankenmerge search is a separate stage)")
        for knob, rng in self.search.items():
            specs = [get_method(m).param(knob) for m in methods]
            if all(s is None for s in specs):
                raise ValueError(f"search.{knob}: not a parameter of {', '.join(methods)}")
            spec = next(s for s in specs if s is not None)
            if spec.kind not in (float, int):
                raise ValueError(f"search.{knob}: only numeric knobs are searched; set it under 'fixed'")
            if spec.kind is int and self.layer_groups != 1:
                raise ValueError(f"search.{knob}: an integer knob is searched for the whole model (layer_groups: 1); "
                                 "a per-layer gradient of integers interpolates to fractions")
            if rng is not None:
                lo, hi = rng
                if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
                    raise ValueError(f"search.{knob}: expected [low, high] with low < high, got [{lo}, {hi}]")
                for v in (lo, hi):
                    problem = spec.check(v)
                    if problem:
                        raise ValueError(f"search.{knob}: range end {v:g} is invalid ({problem})")
            elif spec.search is None:
                raise ValueError(f"search.{knob}: has no default range; give [low, high]")
        for knob in self.fixed:
            if knob in self.search:
                raise ValueError(f"fixed.{knob}: is also searched; keep it in one place")
            if all(get_method(m).param(knob) is None for m in methods):
                raise ValueError(f"fixed.{knob}: not a parameter of {', '.join(methods)}")
        if isinstance(self.layer_groups, int) and self.layer_groups < 1:
            raise ValueError("layer_groups: expected a positive integer or 'full'")
        return self


class FitnessTask(_Strict):
    task: str
    metric: str = "acc"
    weight: float = 1.0
    split: str | None = "validation"  # which split the search scores on (None: the task's own choice)


class Fitness(_Strict):
    # lm_eval: scored on lm-eval tasks; consistency: label-free, agreement of the candidate's
    # generations with those of small perturbations of its recipe (see evomerge.consistency)
    kind: Literal["lm_eval", "consistency"] = "lm_eval"
    tasks: list[FitnessTask] = Field(default_factory=list)  # required for kind lm_eval
    include_path: list[str] = Field(default_factory=list)
    objective: Literal["sum", "multi"] = "sum"
    limit: float | None = None
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    batch_size: int = 32
    consistency: ConsistencySpec | None = None  # kind consistency: prompts, generation, delta, ...

    @field_validator("include_path", mode="before")
    @classmethod
    def _listify(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _check_kind(self) -> "Fitness":
        if self.kind == "lm_eval":
            if not self.tasks:
                raise ValueError("tasks: give at least one lm-eval task (or kind: consistency for a label-free search)")
            if self.consistency is not None:
                raise ValueError("consistency: only for kind: consistency")
        else:
            if self.consistency is None:
                raise ValueError("consistency: kind consistency needs this block (prompts, ...)")
            if self.tasks:
                raise ValueError("tasks: not used by kind consistency (it needs no labels)")
            if self.objective != "sum":
                raise ValueError("objective: kind consistency has one objective (sum)")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("consistency", 0) is None:
            del data["consistency"]  # lm_eval configs dump (and fingerprint) as before
        return data


class Sampler(_Strict):
    name: Literal["cmaes", "tpe", "random", "qmc", "nsga2"] = "cmaes"
    sigma0: float = Field(0.25, gt=0, le=1)
    popsize: int | None = Field(None, ge=2)
    baselines: bool = True  # enqueue each source alone and the uniform merge first


class Budget(_Strict):
    trials: int = Field(50, ge=1)
    # per trial, in seconds: a slower trial fails ("timed out after Ns", recorded), its worker is
    # restarted and the search goes on. Needs a worker process that can be killed, so a search
    # with a timeout runs its trials in Ray actors even with one worker (see evomerge.parallel).
    timeout_s: float | None = Field(None, gt=0)


class DfsSpace(_Strict):
    """Stage ``dfs``: a path through the layers of the source models (and the PS winner)."""

    models: list[str] | None = None  # default: "ps" (when stage ps runs first) and every source model
    host: str | None = None  # embeddings, final norm, head, tokenizer (default: the first of models)
    repeats: int = Field(3, ge=1, le=16)
    scales: bool = True  # one input scale per slot (EvoLLM-JP-10B's input_scales)
    scale_range: tuple[float, float] = (0.5, 1.5)
    max_layers: int | None = Field(None, ge=1)  # longest path allowed
    max_params: float | None = Field(None, gt=0)  # parameter budget of the path model: 10B, 350M, 1.5e9
    keep_first: bool = True  # the path starts with the host's first layer
    keep_last: bool = True  # the path ends with the host's last layer
    sampler: "Sampler" = Field(default_factory=lambda: Sampler())
    budget: "Budget" = Field(default_factory=lambda: Budget())

    @field_validator("max_params", mode="before")
    @classmethod
    def _parse_count(cls, value: Any) -> Any:
        return parse_count(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check(self) -> "DfsSpace":
        lo, hi = self.scale_range
        if not (0 < lo < hi):
            raise ValueError(f"scale_range: expected [low, high] with 0 < low < high, got [{lo}, {hi}]")
        if self.max_layers is not None and self.keep_first and self.keep_last and self.max_layers < 2:
            raise ValueError("max_layers: keep_first and keep_last need at least 2 layers")
        if self.sampler.name == "nsga2":
            raise ValueError("sampler.name: the dfs stage is single-objective; use cmaes, tpe, random or qmc")
        return self


class SearchConfig(_Strict, YamlConfig):
    study: str
    storage: str | None = None
    seed: int = 0
    base_model: str | None = None
    models: dict[str, str] = Field(min_length=1)
    merge: MergeSpace = Field(default_factory=MergeSpace)
    fitness: Fitness
    sampler: Sampler = Field(default_factory=Sampler)
    budget: Budget = Field(default_factory=Budget)
    stages: list[Literal["ps", "dfs"]] = Field(default_factory=lambda: ["ps"], min_length=1)
    dfs: DfsSpace = Field(default_factory=DfsSpace)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Parallel trials (evomerge.parallel). Neither changes the fingerprint: a study may be resumed
    # with more or fewer workers, on one machine or a cluster.
    workers: int | None = Field(None, ge=1)  # None: one per visible GPU (device cuda), else 1
    ray_address: str | None = None  # join a running Ray cluster (`ray start --head`); None: local
    root: Path = Field(default=Path("."), exclude=True)  # the config file's folder

    @field_validator("study")
    @classmethod
    def _study_name(cls, v: str) -> str:
        return check_file_name(v)

    @field_validator("models")
    @classmethod
    def _model_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not IDENTIFIER.match(name):
                raise ValueError(f"model name {name!r}: expected a short identifier (letters, digits, _)")
        return v

    @field_validator("ray_address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("expected host:port of a Ray cluster's head (or 'auto')")
        return v

    @model_validator(mode="after")
    def _check(self) -> "SearchConfig":
        for name in self.merge.methods:
            method = METHODS[name]
            if method.base == "required" and not self.base_model:
                raise ValueError(f"base_model: merge method {name} needs a base model")
            n = len(self.models)
            if n < method.min_models or (method.max_models is not None and n > method.max_models):
                raise ValueError(f"models: {name} takes {method.min_models}"
                                 f"{'' if method.max_models == method.min_models else '+' if method.max_models is None else f'-{method.max_models}'}"
                                 f" model(s) besides the base, got {n}")
            for p in method.params:
                if p.required and p.name not in self.merge.search and p.name not in self.merge.fixed:
                    raise ValueError(f"merge.search: {name} needs '{p.name}'; search it or set it under merge.fixed")
        if self.fitness.objective == "multi" and self.sampler.name not in MULTI_OBJECTIVE_SAMPLERS:
            raise ValueError(f"sampler.name: {self.sampler.name} is single-objective; use one of "
                             f"{', '.join(MULTI_OBJECTIVE_SAMPLERS)} with objective: multi")
        if len(set(self.stages)) != len(self.stages) or (self.stages == ["dfs", "ps"]):
            raise ValueError("stages: expected [ps], [dfs] or [ps, dfs]")
        if "dfs" in self.stages:
            names = self.dfs_models
            for name in names:
                if name != "ps" and name not in self.models:
                    raise ValueError(f"dfs.models: {name!r} is not one of models ({', '.join(self.models)})")
                if name == "ps" and "ps" not in self.stages:
                    raise ValueError("dfs.models: 'ps' needs the ps stage before dfs (stages: [ps, dfs])")
            if self.dfs.host is not None and self.dfs.host not in names:
                raise ValueError(f"dfs.host: {self.dfs.host!r} is not one of dfs.models ({', '.join(names)})")
            if self.fitness.objective == "multi":
                raise ValueError("fitness.objective: the dfs stage needs a single objective (objective: sum)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}")
        if self.fitness.kind == "consistency" and "dfs" in self.stages:
            raise ValueError("stages: the consistency fitness scores merge recipes (stage ps); "
                             "the dfs stage needs lm_eval tasks")
        return self

    # ----------------------------------------------------------------- derived
    def resolve(self, ref: str) -> str:
        """A model/path reference relative to the config's folder (hub ids unchanged)."""
        return resolve_ref(ref, self.root)

    @property
    def dfs_models(self) -> list[str]:
        if self.dfs.models is not None:
            return list(self.dfs.models)
        return (["ps"] if "ps" in self.stages else []) + list(self.models)

    @property
    def dfs_host(self) -> str:
        return self.dfs.host or self.dfs_models[0]

    def stage_study(self, stage: str) -> str:
        """Stage ps keeps the study name; stage dfs gets ``<study>.dfs``."""
        return self.study if stage == "ps" else f"{self.study}.dfs"

    @property
    def artifacts_dir(self) -> Path:
        """Where stages leave files for each other (the PS winner for the dfs stage)."""
        return (self.root / "runs" / self.study).resolve()

    @property
    def storage_url(self) -> str:
        if self.storage is None:
            return f"sqlite:///{(self.root / 'runs' / f'{self.study}.db').resolve()}"
        if self.storage.startswith("sqlite:///") and not self.storage.startswith("sqlite:////"):
            rel = self.storage.removeprefix("sqlite:///")
            return f"sqlite:///{(self.root / rel).resolve()}"
        return self.storage

    @property
    def include_paths(self) -> list[str]:
        return [str((self.root / p).resolve()) for p in self.fitness.include_path]

    @property
    def source_refs(self) -> dict[str, str]:
        return {name: self.resolve(ref) for name, ref in self.models.items()}

    @property
    def base_ref(self) -> str | None:
        return self.resolve(self.base_model) if self.base_model else None

    def search_relevant(self) -> dict[str, Any]:
        """The parts whose change makes an existing study's trials incomparable."""
        return {
            "base_model": self.base_ref,
            "models": self.source_refs,
            "merge": self.merge.model_dump(mode="json"),
            "fitness": {**self.fitness.model_dump(mode="json", exclude={"batch_size"}), "include_path": self.include_paths},
            "sampler": self.sampler.model_dump(mode="json"),
            "seed": self.seed,
            "dtype": self.dtype,
        }

    def dfs_relevant(self) -> dict[str, Any]:
        """What makes a dfs study's trials incomparable (the PS winner is recorded in the study)."""
        return {
            "models": {n: self.source_refs[n] for n in self.dfs_models if n != "ps"},
            "dfs": self.dfs.model_dump(mode="json", exclude={"budget"}),
            "dfs_models": self.dfs_models,
            "host": self.dfs_host,
            "fitness": {**self.fitness.model_dump(mode="json", exclude={"batch_size"}), "include_path": self.include_paths},
            "seed": self.seed,
            "dtype": self.dtype,
        }

    def fingerprint(self, stage: str = "ps") -> str:
        blob = json.dumps(self.search_relevant() if stage == "ps" else self.dfs_relevant(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
