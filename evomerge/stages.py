"""The search's stages (see :class:`evomerge.trials.Stage`): ``ps`` (a merge recipe per trial,
written in place into one live model) and ``dfs`` (a path through source layers per trial).

Records stored on trials name models portably (:mod:`evomerge.identity`): relative to the
config's folder where they lie inside it; a worker resolves them against its own config's folder.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

import optuna

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.identity import local_ref, map_refs, portable_ref
from evomerge.methods import get_method
from evomerge.study import (ATTR_DFS_HOST, ATTR_DFS_REFS, ATTR_DFS_SOURCES, ATTR_PATH, ATTR_PS_TRIAL, ATTR_RECIPE,
                            ATTR_SPACE, storage_for, trial_fitness)

log = logging.getLogger(__name__)


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
        check_sources(config)
        with Checkpoint.open(self.template) as ck:
            num_layers = ck.num_layers
        self.space = build_space(config, num_layers)
        try:  # the recipe schema's own checks, once, on the centre of the space
            self.space.decode(self.space.center())
        except ConfigError as e:
            raise ConfigError(f"merge: the search space makes invalid recipes: {e}") from None
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
        uses_base = any(get_method(m).base != "unused" for m in self.config.merge.methods)
        self.workspace = Workspace(refs, template=self.template, device=self.config.device,
                                   dtype=TORCH_DTYPES[self.config.dtype], tokenizer_source=self.config.tokenizer_ref,
                                   base=self.config.base_ref if uses_base else None)
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
        return {ATTR_RECIPE: map_refs(recipe.to_dict(), lambda ref: portable_ref(ref, self.config.root))}

    def load(self, record: dict[str, Any]) -> tuple[Any, Any]:
        from evomerge.recipe import Recipe

        data = map_refs(record[ATTR_RECIPE], lambda ref: local_ref(ref, self.config.root))
        self.workspace.load(Recipe.from_dict(data))
        return self.workspace.model, self.workspace.tokenizer

    def summarize(self, params: dict[str, float]) -> str:
        return summarize(self.space, params)

    def close(self) -> None:
        if self.workspace is not None:
            self.workspace.close()


def check_sources(config: SearchConfig) -> None:
    """Every local source of a merge (the models and the base) has the template's layer count and
    the template's shape for each tensor they share: one line naming the model otherwise. Reads
    headers only; hub models not on this machine are checked when they load."""
    from pathlib import Path

    from evomerge.checkpoint import Checkpoint

    refs = {**({"base_model": config.base_ref} if config.base_ref else {}),
            **{f"models.{n}": r for n, r in config.source_refs.items()}}
    local = {field: ref for field, ref in refs.items() if Path(ref).is_dir()}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    layers: dict[str, int] = {}
    vocab_tensors: set[str] = set()
    for field, ref in local.items():
        with Checkpoint.open(ref) as ck:
            shapes[field] = {t: tuple(ck.shape(t)) for t in ck.tensor_names()}
            layers[field] = ck.num_layers
            vocab_tensors |= {s.name for s in (*ck.arch.pre_weights, *ck.arch.post_weights) if s.is_embed}
    if not shapes:
        return
    first = next(iter(shapes))
    for field in shapes:
        if layers[field] != layers[first]:
            raise ConfigError(f"{field}: {local[field]} has {layers[field]} layers but {first} has "
                              f"{layers[first]}; the merge's models need the same layers")
        for tensor, shape in shapes[field].items():
            other = shapes[first].get(tensor)
            if config.merge.tokenizer_source is not None and tensor in vocab_tensors:
                continue  # rows are moved into the output vocabulary; checked when it is built
            if other is not None and other != shape:
                raise ConfigError(f"{field}: {local[field]} has {tensor} of shape {list(shape)} but {first} has "
                                  f"{list(other)}; the merge's models need the same shapes")


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
        self.workspace: Any = None  # a layer path binds nothing to the fitness

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
        study.set_user_attr(ATTR_DFS_REFS, {n: portable_ref(r, self.config.root) for n, r in self.refs.items()})
        study.set_user_attr(ATTR_DFS_HOST, self.config.dfs_host)
        if self.ps_trial is not None:
            study.set_user_attr(ATTR_PS_TRIAL, self.ps_trial)

    def candidate(self, params: dict[str, float], baseline: str | None) -> dict[str, Any]:
        from evomerge.layerpath import passthrough_recipe

        hops = self.space.host_path() if baseline else self.space.decode(params)
        recipe, _ = passthrough_recipe(hops, self.space.sources, self.refs, dtype=self.config.dtype,
                                       host=self.config.dfs_host)
        return {ATTR_PATH: [[h.layer, h.scale] for h in hops],
                ATTR_RECIPE: map_refs(recipe.to_dict(), lambda ref: portable_ref(ref, self.config.root))}

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



def dfs_stage(config: SearchConfig, ps_study: str) -> DfsStage:
    """The dfs stage, with the PS winner (recorded in an existing dfs study, else the best ps
    trial) materialised as a model folder."""
    refs = {n: config.source_refs[n] for n in config.dfs_models if n != "ps"}
    ps_trial = None
    if "ps" in config.dfs_models:
        from evomerge.engine import merge_to_dir
        from evomerge.export import trial_recipe
        from evomerge.recipe import Recipe

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
            local = Recipe.from_dict(map_refs(recipe.to_dict(), lambda ref: local_ref(ref, config.root)))
            merge_to_dir(local, folder, device=config.device, overwrite=True)
        refs = {"ps": str(folder), **refs}
    return DfsStage(config, refs, ps_trial)



def moe_candidates(config: SearchConfig, ps_study: str) -> dict[str, Any]:
    """The moe stage's candidates: the source models (name -> folder), or the ``moe.top_k`` best
    distinct ps trials ("ps<N>" -> recipe); an existing moe study keeps the candidates it recorded."""
    if config.moe.candidates == "parents":
        return dict(config.source_refs)
    from evomerge.moe_stage import ATTR_MOE_CANDIDATES
    from evomerge.recipe import Recipe

    def recipe(data: dict[str, Any], where: str) -> Recipe:
        return Recipe.from_dict(map_refs(data, lambda ref: local_ref(ref, config.root)), where)

    storage = storage_for(config.storage_url)
    names = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    recorded = names.get(f"{ps_study}.moe")
    if recorded is not None and ATTR_MOE_CANDIDATES in recorded.user_attrs:
        return {n: local_ref(v, config.root) if isinstance(v, str) else recipe(v, f"moe candidate {n}")
                for n, v in recorded.user_attrs[ATTR_MOE_CANDIDATES].items()}
    if ps_study not in names:
        raise ConfigError(f"stage moe: no ps study {ps_study!r} yet; run the ps stage first")
    study = optuna.load_study(study_name=ps_study, storage=storage)
    done = [t for t in study.get_trials(deepcopy=False) if trial_fitness(t) is not None and ATTR_RECIPE in t.user_attrs]
    done.sort(key=lambda t: (-trial_fitness(t), t.number))
    out: dict[str, Any] = {}
    seen: set[str] = set()
    for t in done:
        key = json.dumps(t.user_attrs[ATTR_RECIPE], sort_keys=True)
        if key not in seen and len(out) < config.moe.top_k:
            seen.add(key)
            out[f"ps{t.number}"] = recipe(t.user_attrs[ATTR_RECIPE], f"ps trial {t.number}")
    if not out:
        raise ConfigError(f"stage moe: ps study {ps_study!r} has no completed trial")
    return out
