"""The configs of ``evomerge search`` and ``evomerge sweep``: the only YAML reader for them. Frozen
pydantic models, unknown keys refused, every error one line naming the field.

Paths (models, ``fitness.include_path``, ``storage`` SQLite files, prompt files, a sweep's recipe)
are relative to the config file's folder; a model that is not a local folder is taken as a Hugging
Face hub id.

The prompt and generation blocks are shared: a sweep's ``prompts``/``generation`` and a search's
``fitness.consistency`` (the label-free fitness) read the same schema.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from evomerge.calibration import Calibration
from evomerge.configfile import IDENTIFIER, YamlConfig, check_file_name
from evomerge.errors import ConfigError
from evomerge.files import resolve_ref
from evomerge.methods import METHODS, get_method
from evomerge.recipe import DTYPES, Recipe

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


# ------------------------------------------------------------------ prompts and generation
# how two responses to one prompt are compared, and how a point's neighbours are combined (see
# evomerge.disagreement)
Metric = Literal["exact", "embedding"]
Aggregate = Literal["all", "mean"]


def _listify(v: Any) -> Any:
    return [v] if isinstance(v, str) else v


class PromptSource(_Strict):
    """Unlabelled prompts: a JSONL file (one object a line, the prompt under ``field``) or the
    inputs (``doc_to_text``) of an lm-eval task, its labels ignored. ``limit: N`` takes a seeded
    sample of N of them (kept in their order; evomerge.prompts.sample_indices)."""

    jsonl: str | None = None
    field: str = "prompt"
    task: str | None = None
    include_path: list[str] = Field(default_factory=list)
    split: str = "validation"  # validation / test / train (the task's own), or a split name of its data
    limit: int | None = Field(None, ge=1)  # a sample of N prompts (None: all of them)
    seed: int = 0  # which sample: the same seed picks the same prompts on every machine

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


class ConsistencySpec(_Strict):
    """``fitness.consistency`` of a search config (the label-free fitness, evomerge.consistency)."""

    prompts: PromptSource
    generation: GenerationSettings = Field(default_factory=lambda: GenerationSettings(max_new_tokens=16))
    delta: float = Field(0.1, gt=0, le=0.5)  # step, as a fraction of each knob's search range
    pairs: int = Field(1, ge=1, le=4)  # +- pairs of neighbours: the contrast direction, then random signs
    metric: Metric = "exact"
    aggregate: Aggregate = "all"
    empty_disagrees: bool = True


# ------------------------------------------------------------------ search
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
    # mergekit's tokenizer_source for every candidate: base, union or a name from models. Sources
    # with different vocabularies are merged in the output vocabulary, built once per worker.
    tokenizer_source: str | None = None

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
            specs = [s for s in (get_method(m).param(knob) for m in methods) if s is not None]
            if not specs:
                raise ValueError(f"fixed.{knob}: not a parameter of {', '.join(methods)}")
            value = self.fixed[knob]
            if isinstance(value, dict) and any(s.scope != "model" for s in specs):
                raise ValueError(f"fixed.{knob}: a global parameter takes one value, not one per model")
            for where, v in (value.items() if isinstance(value, dict) else [(None, value)]):
                for item in (v if isinstance(v, list) else [v]):
                    problem = next((p for p in (s.check(item) for s in specs) if p), None)
                    if problem:
                        field = f"fixed.{knob}" + (f".{where}" if where is not None else "")
                        raise ValueError(f"{field}: {item!r} is invalid ({problem})")
        if isinstance(self.layer_groups, int) and self.layer_groups < 1:
            raise ValueError("layer_groups: expected a positive integer or 'full'")
        return self


class FitnessTask(_Strict):
    task: str
    metric: str = "acc"
    weight: float = 1.0
    split: str | None = "validation"  # which split the search scores on (None: the task's own choice)


class Racing(_Strict):
    """Racing (see :mod:`evomerge.racing`): a candidate is scored on growing prefixes of the
    study's item order (the rungs) and stops once a paired bound says it cannot beat the
    reference: the incumbent, or (``against: generation``, CMA-ES only) the best fully scored
    trial of its own generation so far. Scores of completed trials are unchanged (they saw every
    item)."""

    enabled: bool | None = None  # None: on for a single-objective lm_eval fitness (see Fitness.races)
    rungs: list[float] = Field(default_factory=lambda: [0.125, 0.25, 0.5])  # fractions of the items before all of them
    # 1 - the chance of stopping a candidate that would have won on all items. 0.8 by measurement
    # (scripts/bench_racing.py, README): it never did worse than 0.95 at an equal budget, and on a
    # 228-item dev split it beat full evaluation where 0.95 did not
    confidence: float = Field(0.8, gt=0.5, lt=1)
    # the reference a candidate must be able to beat: the study's best trial, or the best of its
    # CMA-ES generation so far (the incumbent while the generation has none); CMA-ES ranks within
    # a generation only, so a candidate that cannot reach its generation's top matters little
    against: Literal["incumbent", "generation"] = "incumbent"

    @field_validator("rungs")
    @classmethod
    def _check_rungs(cls, v: list[float]) -> list[float]:
        if any(not 0 < f < 1 for f in v) or v != sorted(set(v)):
            raise ValueError("expected increasing fractions between 0 and 1 (all items is the last rung, implied)")
        return v


class Fitness(_Strict):
    # lm_eval: scored on lm-eval tasks; consistency: label-free, agreement of the candidate's
    # generations with those of small perturbations of its recipe (see evomerge.consistency)
    kind: Literal["lm_eval", "consistency"] = "lm_eval"
    tasks: list[FitnessTask] = Field(default_factory=list)  # required for kind lm_eval
    include_path: list[str] = Field(default_factory=list)
    objective: Literal["sum", "multi"] = "sum"
    limit: float | None = Field(None, gt=0)  # examples per task (>= 1), or a fraction of each task (< 1)
    num_fewshot: int | None = None
    apply_chat_template: bool = False
    batch_size: int = 32
    consistency: ConsistencySpec | None = None  # kind consistency: prompts, generation, delta, ...
    racing: Racing = Field(default_factory=Racing)  # kind lm_eval, objective sum
    elites: int = Field(3, ge=0)  # after the search, the top trials re-scored on every item (0: none)
    heldout: list[FitnessTask] = Field(default_factory=list)  # scored on the elites only, never to choose
    # the elites are also scored with the few-shot examples drawn by this seed (lm-eval's
    # fewshot_random_seed; the search's is 1234) and ranked by the mean of the two (num_fewshot > 0)
    elite_fewshot_seed: int | None = None

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
            if self.racing.enabled and self.objective == "multi":
                raise ValueError("racing: races one objective; leave racing.enabled unset or false with objective: multi")
            if self.elite_fewshot_seed is not None and not self.num_fewshot:
                raise ValueError("elite_fewshot_seed: reseeds the few-shot examples, so it needs num_fewshot > 0 "
                                 f"(got num_fewshot: {self.num_fewshot})")
        else:
            if self.consistency is None:
                raise ValueError("consistency: kind consistency needs this block (prompts, ...)")
            if self.tasks:
                raise ValueError("tasks: not used by kind consistency (it needs no labels)")
            if self.heldout:
                raise ValueError("heldout: scored on the elites of an lm_eval fitness; not used by kind consistency")
            if self.elite_fewshot_seed is not None:
                raise ValueError("elite_fewshot_seed: reseeds an lm_eval fitness's few-shot examples; not used by "
                                 "kind consistency")
            if self.objective != "sum":
                raise ValueError("objective: kind consistency has one objective (sum)")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler: Any) -> Any:
        data = handler(self)
        if isinstance(data, dict) and data.get("consistency", 0) is None:
            del data["consistency"]  # lm_eval configs dump (and fingerprint) as before
        return data

    @property
    def labels(self) -> list[str]:
        """One name per task entry: the task, or ``task.metric`` when a task is listed twice."""
        names = [t.task for t in self.tasks]
        return [t.task if names.count(t.task) == 1 else f"{t.task}.{t.metric}" for t in self.tasks]

    @property
    def weights(self) -> dict[str, float]:
        """Label -> weight in the fitness (a weighted sum of the task entries)."""
        return {label: t.weight for label, t in zip(self.labels, self.tasks)}

    @property
    def races(self) -> bool:
        """Whether candidates are raced: ``racing.enabled``, by default for one lm_eval objective."""
        default = self.kind == "lm_eval" and self.objective == "sum"
        return default if self.racing.enabled is None else self.racing.enabled

    def comparable(self) -> dict[str, Any]:
        """What makes trials comparable: not the batch size, and not racing, the elites (their
        few-shot seed) or the held-out tasks (a completed trial's score is the same with or
        without them)."""
        return self.model_dump(mode="json", exclude={"batch_size", "racing", "elites", "heldout", "elite_fewshot_seed"})


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
    # item evaluations (one item of one task scored once): no trial starts once the study's
    # trials have used this many (racing stops candidates early, so more trials fit)
    items: int | None = Field(None, ge=1)


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


class MoeSearch(_Strict):
    """Stage ``moe``: a mixture of experts of the candidates (see :mod:`evomerge.moe_stage`). Each
    expert slot routes tokens like its prompts; the search picks which candidate fills each slot
    and a gate scale and bias per layer and slot."""

    prompts: dict[str, list[str]] = Field(default_factory=dict)  # slot name -> prompts it receives
    candidates: Literal["parents", "top_ps"] = "parents"  # the source models, or the best ps trials
    top_k: int = Field(4, ge=1)  # top_ps: how many ps trials (best first) are candidates
    gate_mode: Literal["hidden", "hidden_avg", "cheap_embed"] = "hidden"
    experts_per_token: int = Field(2, ge=1)
    scale_range: tuple[float, float] = (0.25, 4.0)
    bias_range: tuple[float, float] = (-1.0, 1.0)
    sampler: "Sampler" = Field(default_factory=lambda: Sampler())
    budget: "Budget" = Field(default_factory=lambda: Budget())

    @model_validator(mode="after")
    def _check(self) -> "MoeSearch":
        lo, hi = self.scale_range
        if not (0 < lo <= 1 <= hi):
            raise ValueError(f"scale_range: expected [low, high] with 0 < low <= 1 <= high, got [{lo}, {hi}]")
        lo, hi = self.bias_range
        if not (lo <= 0 <= hi):
            raise ValueError(f"bias_range: expected [low, high] with low <= 0 <= high, got [{lo}, {hi}]")
        for slot, prompts in self.prompts.items():
            if not IDENTIFIER.match(slot) or not prompts:
                raise ValueError(f"prompts.{slot}: expected a name (letters, digits, _) and at least one prompt")
        if self.prompts and self.experts_per_token > len(self.prompts):
            raise ValueError(f"experts_per_token: {self.experts_per_token} is more than the "
                             f"{len(self.prompts)} expert slots (prompts)")
        if self.sampler.name == "nsga2":
            raise ValueError("sampler.name: the moe stage is single-objective; use cmaes, tpe, random or qmc")
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
    stages: list[Literal["ps", "dfs", "moe"]] = Field(default_factory=lambda: ["ps"], min_length=1)
    dfs: DfsSpace = Field(default_factory=DfsSpace)
    moe: MoeSearch = Field(default_factory=MoeSearch)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Parallel trials (evomerge.parallel). Neither changes the fingerprint: a study may be resumed
    # with more or fewer workers, on one machine or a cluster.
    workers: int | None = Field(None, ge=1)  # None: one per visible GPU (device cuda), else 1
    ray_address: str | None = None  # join a running Ray cluster (`ray start --head`); None: local
    # data for data-aware methods (fisher, regmean; an evomerge extension), paths relative to this file
    calibration: Calibration | None = None
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
            if method.needs and self.calibration is None:
                raise ValueError(f"calibration: merge method {name} needs calibration data; add "
                                 "calibration: {data: FILE.txt|FILE.jsonl|TASK.yaml|lm-eval task, n: 64}")
            for p in method.params:
                if p.required and p.name not in self.merge.search and p.name not in self.merge.fixed:
                    raise ValueError(f"merge.search: {name} needs '{p.name}'; search it or set it under merge.fixed")
        for knob, value in self.merge.fixed.items():
            if isinstance(value, dict) and set(value) != set(self.models):
                missing = [m for m in self.models if m not in value]
                unknown = [m for m in value if m not in self.models]
                raise ValueError(f"merge.fixed.{knob}: " + (
                    f"no value for model(s) {', '.join(missing)}; give one per model or one value for all"
                    if missing else f"{', '.join(map(str, unknown))} is not one of models ({', '.join(self.models)})"))
        if self.fitness.objective == "multi" and self.sampler.name not in MULTI_OBJECTIVE_SAMPLERS:
            raise ValueError(f"sampler.name: {self.sampler.name} is single-objective; use one of "
                             f"{', '.join(MULTI_OBJECTIVE_SAMPLERS)} with objective: multi")
        order = ["ps", "dfs", "moe"]
        if len(set(self.stages)) != len(self.stages) or self.stages != sorted(self.stages, key=order.index):
            raise ValueError("stages: expected [ps], [dfs], [moe], or several in the order ps, dfs, moe")
        if "moe" in self.stages:
            if len(self.moe.prompts) < 2:
                raise ValueError("moe.prompts: the moe stage needs prompts for at least 2 expert slots")
            if self.moe.candidates == "top_ps" and "ps" not in self.stages:
                raise ValueError("moe.candidates: top_ps needs the ps stage before moe (stages: [ps, moe])")
            if self.fitness.objective == "multi" or self.fitness.kind == "consistency":
                raise ValueError("stages: the moe stage needs lm_eval tasks and a single objective (objective: sum)")
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
        tok = self.merge.tokenizer_source
        if tok is not None and tok not in ("base", "union") and tok not in self.models:
            raise ValueError(f"merge.tokenizer_source: {tok!r} is not base, union or one of models "
                             f"({', '.join(self.models)})")
        if self.fitness.kind == "consistency" and "dfs" in self.stages:
            raise ValueError("stages: the consistency fitness scores merge recipes (stage ps); "
                             "the dfs stage needs lm_eval tasks")
        if self.fitness.racing.against == "generation":
            samplers = {"ps": ("sampler", self.sampler), "dfs": ("dfs.sampler", self.dfs.sampler),
                        "moe": ("moe.sampler", self.moe.sampler)}
            for stage in self.stages:
                key, sampler = samplers[stage]
                if sampler.name != "cmaes":
                    raise ValueError(f"fitness.racing.against: generation races against the top of a CMA-ES "
                                     f"generation, but {key}.name is {sampler.name}; use against: incumbent "
                                     f"or {key}.name: cmaes")
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
        """Stage ps keeps the study name; stages dfs and moe get ``<study>.dfs`` and ``<study>.moe``."""
        return self.study if stage == "ps" else f"{self.study}.{stage}"

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

    @property
    def tokenizer_ref(self) -> str | None:
        """``merge.tokenizer_source`` as a recipe writes it: base, union or the model's reference."""
        tok = self.merge.tokenizer_source
        return self.source_refs[tok] if tok in self.models else tok

    @property
    def calibration_ref(self) -> Calibration | None:
        """``calibration`` with its paths relative to the config's folder made absolute."""
        return None if self.calibration is None else self.calibration.resolved(self.root)

    def search_relevant(self) -> dict[str, Any]:
        """The parts whose change makes an existing study's trials incomparable."""
        return {
            "base_model": self.base_ref,
            "models": self.source_refs,
            # a study made before tokenizer_source existed keeps its fingerprint
            "merge": self.merge.model_dump(mode="json", exclude={"tokenizer_source"} if self.tokenizer_ref is None else None),
            "fitness": {**self.fitness.comparable(), "include_path": self.include_paths},
            "sampler": self.sampler.model_dump(mode="json"),
            "seed": self.seed,
            "dtype": self.dtype,
            # only when set: studies without calibration keep their fingerprints
            **({"calibration": self.calibration_ref.model_dump(mode="json")} if self.calibration else {}),
        }

    def dfs_relevant(self) -> dict[str, Any]:
        """What makes a dfs study's trials incomparable (the PS winner is recorded in the study)."""
        return {
            "models": {n: self.source_refs[n] for n in self.dfs_models if n != "ps"},
            "dfs": self.dfs.model_dump(mode="json", exclude={"budget"}),
            "dfs_models": self.dfs_models,
            "host": self.dfs_host,
            "fitness": {**self.fitness.comparable(), "include_path": self.include_paths},
            "seed": self.seed,
            "dtype": self.dtype,
        }

    def moe_relevant(self) -> dict[str, Any]:
        """What makes a moe study's trials incomparable (top_ps candidates are recorded in the study)."""
        return {
            "base_model": self.base_ref,
            "models": self.source_refs,
            "moe": self.moe.model_dump(mode="json", exclude={"budget"}),
            "fitness": {**self.fitness.model_dump(mode="json", exclude={"batch_size"}), "include_path": self.include_paths},
            "seed": self.seed,
            "dtype": self.dtype,
        }

    def relevant(self, stage: str) -> dict[str, Any]:
        """The stage's fingerprinted config parts."""
        return {"ps": self.search_relevant, "dfs": self.dfs_relevant, "moe": self.moe_relevant}[stage]()

    def fingerprint(self, stage: str = "ps") -> str:
        blob = json.dumps(self.relevant(stage), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ------------------------------------------------------------------ sweep
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


# ------------------------------------------------------------------ a sweep's recipes
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
