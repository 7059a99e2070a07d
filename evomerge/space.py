"""The search space: a fixed, stably named set of float dimensions built from the config and
the methods' parameter specs, and a pure ``decode(params) -> Recipe`` (no torch, no I/O).

Dimension names read ``<group>[.<part>].<model>.<knob>`` for per-model knobs and
``<group>[.<part>].<knob>`` for global ones:

- ``<group>`` is ``all`` (``layer_groups: 1``), ``L00-03`` (a group of layers) or ``L07``
  (``layer_groups: full``);
- ``<part>`` is ``attn`` or ``mlp`` with ``split_attn_mlp``: ``attn`` covers the ``self_attn``
  tensors, ``mlp`` everything else in the layer (MLP and norms);
- embeddings, the final norm and the head take the first group's (``mlp``) values: mergekit reads
  per-layer gradients at t = 0 for them.

An integer knob (karcher's ``max_iter``) is a float dimension rounded to the nearest integer in
``decode``, searched for the whole model only (a gradient of integers interpolates to fractions).

With several methods, one more dimension, ``method``, in ``[0, n_methods)``, picks one by
flooring; knobs the chosen method lacks are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from evomerge.config import SearchConfig
from evomerge.methods import METHODS, Method
from evomerge.recipe import Recipe


@dataclass(frozen=True)
class Dimension:
    name: str
    low: float
    high: float
    knob: str
    model: str | None  # None for global knobs
    group: int  # index into Space.groups
    part: str | None  # "attn" / "mlp" / None


@dataclass(frozen=True)
class Space:
    config: SearchConfig
    num_layers: int
    groups: tuple[tuple[int, ...], ...]  # layers of each group
    dims: tuple[Dimension, ...]

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.dims]

    @property
    def methods(self) -> list[str]:
        return self.config.merge.methods

    def method_of(self, params: dict[str, float]) -> Method:
        methods = self.methods
        if len(methods) == 1:
            return METHODS[methods[0]]
        i = min(max(int(params["method"]), 0), len(methods) - 1)
        return METHODS[methods[i]]

    def bounds(self) -> dict[str, tuple[float, float]]:
        out = {d.name: (d.low, d.high) for d in self.dims}
        if len(self.methods) > 1:
            out["method"] = (0.0, float(len(self.methods)))
        return out

    def center(self) -> dict[str, float]:
        return {k: (lo + hi) / 2 for k, (lo, hi) in self.bounds().items()}

    # ----------------------------------------------------------------- decode
    def decode(self, params: dict[str, float]) -> Recipe:
        """The recipe these parameter values stand for (mergekit schema, per-layer gradients)."""
        missing = [k for k in self.bounds() if k not in params]
        if missing:
            raise KeyError(f"missing dimensions: {', '.join(missing[:5])}")
        cfg = self.config
        method = self.method_of(params)
        model_params: dict[str, dict[str, Any]] = {name: {} for name in cfg.models}
        global_params: dict[str, Any] = {}

        for knob in cfg.merge.search:
            spec = method.param(knob)
            if spec is None:
                continue
            targets = list(cfg.models) if spec.scope == "model" else [None]
            for model in targets:
                value = self._value(params, knob, model, whole=spec.kind is int)
                (model_params[model] if model else global_params)[knob] = value
        for knob, value in cfg.merge.fixed.items():
            spec = method.param(knob)
            if spec is None:
                continue
            if spec.scope == "model":
                for model in cfg.models:
                    model_params[model][knob] = value[model] if isinstance(value, dict) else value
            else:
                global_params[knob] = value

        refs = cfg.source_refs
        models = [{"model": refs[name], **({"parameters": p} if p else {})} for name, p in model_params.items()]
        data: dict[str, Any] = {"merge_method": method.name, "models": models, "dtype": cfg.dtype}
        if cfg.base_ref and method.base != "unused":
            data["base_model"] = cfg.base_ref
        if global_params:
            data["parameters"] = global_params
        if method.stochastic:
            data["random_seed"] = cfg.merge.random_seed
        if cfg.tokenizer_ref is not None:
            data["tokenizer_source"] = cfg.tokenizer_ref
        if method.needs:
            data["calibration"] = cfg.calibration_ref.model_dump(mode="json", exclude_defaults=True)
        return Recipe.from_dict(data, "decoded recipe")

    def _value(self, params: dict[str, float], knob: str, model: str | None, whole: bool = False) -> Any:
        """Scalar for one group; otherwise a per-layer gradient, split by filter if asked.
        ``whole``: an integer knob, rounded to the nearest integer."""
        def per_layer(part: str | None) -> list[Any]:
            values: list[Any] = [0.0] * self.num_layers
            for g, layers in enumerate(self.groups):
                v: Any = float(params[dim_name(self._group_name(g), part, model, knob)])
                v = round(v) if whole else v
                for layer in layers:
                    values[layer] = v
            return values

        if not self.config.merge.split_attn_mlp:
            values = per_layer(None)
            return values[0] if len(self.groups) == 1 else values
        attn, mlp = per_layer("attn"), per_layer("mlp")
        if len(self.groups) == 1:
            attn, mlp = attn[0], mlp[0]
        return [{"filter": "self_attn", "value": attn}, {"value": mlp}]

    def _group_name(self, g: int) -> str:
        return group_name(self.groups[g], self.num_layers, len(self.groups))

    # ----------------------------------------------------------------- baselines
    def uniform_recipe(self) -> Recipe:
        """The uniform merge: an equal-weight average of the source models."""
        refs = self.config.source_refs
        return Recipe.from_dict({
            "merge_method": "linear",
            "models": [{"model": r, "parameters": {"weight": 1.0}} for r in refs.values()],
            "dtype": self.config.dtype,
            **self._tokenizer(),
        }, "uniform recipe")

    def parent_recipe(self, name: str) -> Recipe:
        """One source model as it is."""
        ref = self.config.source_refs[name]
        return Recipe.from_dict({"merge_method": "linear", "models": [{"model": ref, "parameters": {"weight": 1.0}}],
                                 "dtype": self.config.dtype, **self._tokenizer(name)}, "parent recipe")

    def _tokenizer(self, parent: str | None = None) -> dict[str, str]:
        """The baselines' tokenizer_source: the config's; a parent whose recipe does not hold the
        config's tokenizer model uses ``union`` (its own vocabulary)."""
        tok = self.config.tokenizer_ref
        if tok is None:
            return {}
        if parent is not None and tok not in ("base", "union") and tok != self.config.source_refs[parent]:
            return {"tokenizer_source": "union"}
        return {"tokenizer_source": tok}


def group_name(layers: tuple[int, ...], num_layers: int, n_groups: int) -> str:
    width = max(2, len(str(num_layers - 1)))
    if n_groups == 1:
        return "all"
    if len(layers) == 1:
        return f"L{layers[0]:0{width}d}"
    return f"L{layers[0]:0{width}d}-{layers[-1]:0{width}d}"


def dim_name(group: str, part: str | None, model: str | None, knob: str) -> str:
    return ".".join(x for x in (group, part, model, knob) if x)


def layer_groups(num_layers: int, spec: int | str) -> tuple[tuple[int, ...], ...]:
    """Contiguous groups of layers, sizes as equal as possible (earlier groups larger)."""
    n = num_layers if spec == "full" else min(int(spec), num_layers)
    size, extra = divmod(num_layers, n)
    groups, start = [], 0
    for g in range(n):
        width = size + (1 if g < extra else 0)
        groups.append(tuple(range(start, start + width)))
        start += width
    return tuple(groups)


def build_space(config: SearchConfig, num_layers: int) -> Space:
    """Every dimension the config asks for, in a fixed order: group, part, model, knob."""
    groups = layer_groups(num_layers, config.merge.layer_groups)
    parts: list[str | None] = ["attn", "mlp"] if config.merge.split_attn_mlp else [None]
    methods = [METHODS[m] for m in config.merge.methods]
    dims: list[Dimension] = []
    for g, layers in enumerate(groups):
        gname = group_name(layers, num_layers, len(groups))
        for part in parts:
            for knob, rng in config.merge.search.items():
                spec = next(m.param(knob) for m in methods if m.param(knob) is not None)
                lo, hi = rng if rng is not None else spec.search
                owners = list(config.models) if spec.scope == "model" else [None]
                for model in owners:
                    dims.append(Dimension(dim_name(gname, part, model, knob), float(lo), float(hi), knob, model, g, part))
    return Space(config, num_layers, groups, tuple(dims))
