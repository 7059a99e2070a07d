"""The merge-method registry: one explicit dict, variants as data.

Every method is a :class:`Method`: its parameters (with defaults, valid ranges and a default
search range), whether it needs a base model, how many other models it takes, and its two steps
(see :mod:`evomerge.methods.steps`): ``prepare`` (everything not elementwise; its trial-invariant
parts declared by ``caches`` or memoized) and ``combine`` (elementwise, whole or in chunks), plus
``kernel``, the id of a fused accelerator that consumes the prepared value (optional; a function
of the prepared value where a method prepares one of two kinds). The engine,
the workspace, the kernels and the search space read only this registry, so a method added here is
mergeable and searchable everywhere: a method with only a whole-tensor function gets both steps
from :func:`~evomerge.methods.steps.whole_tensor`.

``base`` says how a recipe's ``base_model`` is used: ``required``/``optional`` (the base role),
``unused`` (dropped), ``input`` (one more input, mergekit's "ignored" base: karcher).

Parameter names and defaults are mergekit's. Extensions (documented in the README):
``rescale_mode`` (``l1`` = mergekit, ``keep_prob`` = the DARE/DELLA papers).
``int8_mask`` is accepted for compatibility and ignored (it only saves memory in mergekit).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Literal, Mapping, Sequence

import torch
from torch import Tensor

from evomerge.errors import ConfigError
from evomerge.methods.arcee_fusion import fusion_caches, fusion_combine, fusion_prepare
from evomerge.methods.interpolate import (
    DistanceBlend,
    SphericalBlend,
    WeightedSum,
    linear_prepare,
    nearswap_combine,
    nearswap_prepare,
    nuslerp_combine_step,
    nuslerp_prepare,
    passthrough_prepare,
    slerp_prepare,
    weighted_sum_combine,
)
from evomerge.methods.fisher import (FISHER_FLOOR, fisher_caches, fisher_combine, fisher_prepare,
                                     positive_weights)
from evomerge.methods.karcher import KARCHER_MAX_ITER, KARCHER_TOL, karcher_prepare_step
from evomerge.methods.model_stock import MeanTowardBase, model_stock_combine_step, model_stock_prepare
from evomerge.methods.multislerp import (
    MULTISLERP_EPS,
    multislerp_combine_step,
    multislerp_kernel,
    multislerp_prepare_step,
)
from evomerge.methods.ram import RAM_EPSILON, RAMPLUS_ALPHA, RAMPLUS_R, ram_combine_step, ram_prepare, ramplus_prepare
from evomerge.methods.regmean import regmean_caches, regmean_combine, regmean_prepare
from evomerge.methods.sce import ElectedMix, sce_caches, sce_combine_step, sce_prepare
from evomerge.methods.steps import Cache, Inputs, WholeInputs, no_caches
from evomerge.methods.task_arithmetic import SM_SCALE_PTR, TaskVectorMix, gta_caches, gta_combine, gta_prepare

# re-exported: the prepared values the fused kernels (evomerge.kernels) consume
__all__ = ["METHODS", "Method", "Param", "get_method", "run_method", "WeightedSum", "DistanceBlend",
           "TaskVectorMix", "SM_SCALE_PTR", "SphericalBlend", "MeanTowardBase", "ElectedMix"]

Scope = Literal["global", "model"]
BaseUse = Literal["required", "optional", "unused", "input"]


@dataclass(frozen=True)
class Param:
    """One method parameter. ``kind``: float, int (whole numbers; searched as integers), bool or
    str. ``low``/``high`` bound valid values (``None`` = unbounded); ``search`` is the default
    range the search space uses for it."""

    name: str
    scope: Scope
    kind: type = float
    default: Any = None
    required: bool = False
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    search: tuple[float, float] | None = None
    choices: tuple[str, ...] = ()
    doc: str = ""

    def check(self, value: Any) -> str | None:
        """Return why ``value`` is invalid, or None."""
        if self.kind is bool:
            return None if isinstance(value, bool) else "expected true or false"
        if self.kind is str:
            return None if value in self.choices else f"expected one of {', '.join(self.choices)}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "expected an integer" if self.kind is int else "expected a number"
        if not math.isfinite(value):
            return "expected a finite number"
        if self.kind is int and not float(value).is_integer():
            return "expected an integer"
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            return f"expected {self.interval()}"
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            return f"expected {self.interval()}"
        return None

    def interval(self) -> str:
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"a value in {'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable[[Inputs, Mapping[str, Any]], Any]  # (inputs, params) -> prepared
    combine: Callable[[Any, Inputs, slice | None], Tensor]  # (prepared, inputs, flat slice or None) -> tensor
    params: tuple[Param, ...]
    base: BaseUse
    min_models: int  # number of models besides the base
    max_models: int | None
    stochastic: bool = False
    reference: str = ""
    summary: str = ""
    extra_checks: tuple[Callable[[Mapping[str, Any]], str | None], ...] = field(default=())
    caches: Callable[[Inputs, Mapping[str, Any]], list[Cache]] = no_caches  # trial-invariant arrays
    # a fused kernel that consumes the prepared value (evomerge.kernels), or a function of the prepared value
    kernel: str | Callable[[Any], str | None] | None = None
    # statistics of this kind the backends must hold (evomerge.statistics; read by inputs.stat);
    # a method with ``needs`` reads calibration data named by the recipe's ``calibration`` block
    needs: str | None = None

    def kernel_for(self, prepared: Any) -> str | None:
        """The fused kernel for this prepared value (None: none)."""
        return self.kernel(prepared) if callable(self.kernel) else self.kernel

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "global")

    @property
    def model_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "model")


# --------------------------------------------------------------------------- parameters
def _weight(required: bool = True) -> Param:
    return Param("weight", "model", required=required, search=(0.0, 1.0),
                 doc="relative (normalize) or absolute weight of the model")


DENSITY = Param("density", "model", default=1.0, low=0.0, high=1.0, low_open=True,
                search=(0.1, 1.0), doc="fraction of the task vector kept")
GAMMA = Param("gamma", "model", default=0.01, low=0.0, high=1.0, high_open=True,
              search=(0.0, 0.1), doc="fraction of largest-magnitude outliers dropped")
EPSILON = Param("epsilon", "model", default=0.15, low=0.0, high=0.5, high_open=True,
                search=(0.01, 0.2), doc="spread of keep probabilities around density")
LAMBDA = Param("lambda", "global", default=1.0, search=(0.5, 1.5),
               doc="scale of the merged task vector")
INT8_MASK = Param("int8_mask", "global", kind=bool, default=False,
                  doc="accepted for mergekit compatibility; no effect")
RESCALE_MODE = Param("rescale_mode", "global", kind=str, default="l1", choices=("l1", "keep_prob"),
                     doc="l1: keep the delta's L1 norm (mergekit); keep_prob: divide by keep probability (papers)")


def _normalize(default: bool) -> Param:
    return Param("normalize", "global", kind=bool, default=default,
                 doc="divide by the sum of the weights")


def _rescale(default: bool) -> Param:
    return Param("rescale", "global", kind=bool, default=default,
                 doc="rescale sparsified task vectors (see rescale_mode)")


def _ram_epsilon() -> Param:
    # linear: 1 bf16 ulp of weights of magnitude 1e-3..2e-2 is 8e-6..1.2e-4, so [1e-6, 1e-4] spans
    # "any stored change counts" to "only changes of about an ulp and more count"
    return Param("epsilon", "global", default=RAM_EPSILON, low=0.0, search=(1e-6, 1e-4),
                 doc="a task-vector entry counts as an update when its magnitude is above this")


def _della_bounds(params: Mapping[str, Any]) -> str | None:
    for i, (d, e) in enumerate(zip(params["density"], params["epsilon"])):
        if d < 1 and not (0 < d - e and d + e < 1):
            return (f"epsilon={e:g} with density={d:g} (model {i + 1}) gives keep probabilities "
                    f"outside (0, 1); need 0 < density - epsilon and density + epsilon < 1")
    return None


# --------------------------------------------------------------------------- entries
def _gta(name, *, sparsifier, consensus, normalize, rescale, reference, summary) -> Method:
    model_params = [_weight()] + ([DENSITY] if sparsifier else [])
    if sparsifier == "magnitude_outliers":
        model_params.append(GAMMA)
    if sparsifier == "della_magprune":
        model_params.append(EPSILON)
    return Method(
        name=name,
        prepare=partial(gta_prepare, sparsifier=sparsifier, consensus=consensus),
        combine=gta_combine,
        caches=partial(gta_caches, sparsifier=sparsifier),
        kernel="task_vector_mix",
        params=(*model_params, _normalize(normalize), _rescale(rescale), LAMBDA, RESCALE_MODE, INT8_MASK),
        base="required",
        min_models=1,
        max_models=None,
        stochastic=sparsifier in ("random", "della_magprune"),
        reference=reference,
        summary=summary,
        extra_checks=(_della_bounds,) if sparsifier == "della_magprune" else (),
    )


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            name="linear",
            prepare=linear_prepare, combine=weighted_sum_combine, kernel="weighted_sum",
            params=(_weight(), _normalize(True)),
            base="unused", min_models=1, max_models=None,
            reference="https://arxiv.org/abs/2203.05482", summary="weighted average (model soup)",
        ),
        Method(
            name="slerp",
            prepare=slerp_prepare, combine=weighted_sum_combine, kernel="weighted_sum",
            params=(Param("t", "global", required=True, low=0.0, high=1.0, search=(0.0, 1.0),
                          doc="0 = base model, 1 = the other model"),),
            base="required", min_models=1, max_models=1,
            reference="https://en.wikipedia.org/wiki/Slerp", summary="spherical interpolation of two models",
        ),
        Method(
            name="nuslerp",
            prepare=nuslerp_prepare, combine=nuslerp_combine_step, kernel="spherical_blend",
            params=(_weight(),
                    Param("nuslerp_row_wise", "global", kind=bool, default=False, doc="slerp rows, not columns"),
                    Param("nuslerp_flatten", "global", kind=bool, default=True, doc="slerp whole tensors")),
            base="optional", min_models=2, max_models=2,
            summary="slerp of two models (or their task vectors) with t = w2 / (w1 + w2)",
        ),
        Method(
            name="nearswap",
            prepare=nearswap_prepare, combine=nearswap_combine, kernel="distance_blend",
            params=(Param("t", "global", required=True, low=0.0, search=(0.0, 0.01),
                          doc="distance below which the other model's value is taken"),),
            base="required", min_models=1, max_models=1,
            reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
            summary="take the other model where it is close to the base",
        ),
        _gta("task_arithmetic", sparsifier=None, consensus=None, normalize=False, rescale=False,
             reference="https://arxiv.org/abs/2212.04089", summary="base + weighted sum of task vectors"),
        _gta("ties", sparsifier="magnitude", consensus="sum", normalize=True, rescale=False,
             reference="https://arxiv.org/abs/2306.01708", summary="trim by magnitude, elect signs, disjoint mean"),
        _gta("dare_ties", sparsifier="random", consensus="sum", normalize=False, rescale=True,
             reference="https://arxiv.org/abs/2311.03099", summary="random drop and rescale, then TIES sign election"),
        _gta("dare_linear", sparsifier="random", consensus=None, normalize=False, rescale=True,
             reference="https://arxiv.org/abs/2311.03099", summary="random drop and rescale, then task arithmetic"),
        _gta("breadcrumbs", sparsifier="magnitude_outliers", consensus=None, normalize=False, rescale=False,
             reference="https://arxiv.org/abs/2312.06795", summary="drop smallest entries and largest outliers"),
        _gta("breadcrumbs_ties", sparsifier="magnitude_outliers", consensus="sum", normalize=False, rescale=False,
             reference="https://arxiv.org/abs/2312.06795", summary="breadcrumbs with TIES sign election"),
        _gta("della", sparsifier="della_magprune", consensus="sum", normalize=True, rescale=True,
             reference="https://arxiv.org/abs/2406.11617", summary="magnitude-ranked random drop, sign election"),
        _gta("della_linear", sparsifier="della_magprune", consensus=None, normalize=False, rescale=True,
             reference="https://arxiv.org/abs/2406.11617", summary="magnitude-ranked random drop, task arithmetic"),
        Method(
            name="model_stock",
            prepare=model_stock_prepare, combine=model_stock_combine_step, kernel="mean_toward_base",
            params=(Param("filter_wise", "global", kind=bool, default=False, doc="one angle per row"),),
            base="required", min_models=2, max_models=None,
            reference="https://arxiv.org/abs/2403.19522", summary="average pulled to the base by the task-vector angle",
        ),
        Method(
            name="sce",
            prepare=sce_prepare, combine=sce_combine_step, caches=sce_caches, kernel="elected_mix",
            params=(Param("select_topk", "global", default=1.0, low=0.0, high=1.0, low_open=True,
                          search=(0.1, 1.0), doc="fraction of highest-variance positions kept"),
                    INT8_MASK),
            base="required", min_models=1, max_models=None,
            reference="https://arxiv.org/abs/2408.07990", summary="select by variance, weight by energy, erase sign conflicts",
        ),
        # data-aware: statistics from calibration text (evomerge extension; mergekit has neither)
        Method(
            name="fisher",
            prepare=fisher_prepare, combine=fisher_combine, caches=fisher_caches, needs="fisher",
            params=(Param("weight", "model", default=1.0, low=0.0, search=(0.0, 1.0),
                          doc="the model's share (the paper's lambda)"),
                    Param("fisher_floor", "global", default=FISHER_FLOOR, low=0.0, low_open=True,
                          search=(1e-8, 1e-4), doc="lower bound of every Fisher value (no 0 / 0)")),
            base="unused", min_models=1, max_models=None, extra_checks=(positive_weights,),
            reference="https://arxiv.org/abs/2111.09832",
            summary="per-parameter average weighted by each model's diagonal Fisher",
        ),
        Method(
            name="regmean",
            prepare=regmean_prepare, combine=regmean_combine, caches=regmean_caches, needs="gram",
            params=(Param("weight", "model", default=1.0, low=0.0, search=(0.0, 1.0),
                          doc="scales the model's Gram (evomerge extension; 1 = the paper)"),
                    Param("alpha", "global", default=0.9, low=0.0, high=1.0, search=(0.0, 1.0),
                          doc="off-diagonal multiplier of the Grams (1 = plain least squares)")),
            base="unused", min_models=1, max_models=None, extra_checks=(positive_weights,),
            reference="https://arxiv.org/abs/2212.09849",
            summary="least-squares merge of linear layers from input Grams; other tensors averaged",
        ),
        Method(
            name="multislerp",
            prepare=multislerp_prepare_step, combine=multislerp_combine_step, kernel=multislerp_kernel,
            params=(_weight(),
                    Param("normalize_weights", "global", kind=bool, default=True, doc="divide the weights by their sum"),
                    # a numerical guard, not a quality knob (searched only if a config names it)
                    Param("eps", "global", default=MULTISLERP_EPS, low=0.0, high=1e-2, search=(1e-9, 1e-6),
                          doc="added to each norm; a mean direction shorter than it counts as none")),
            base="optional", min_models=1, max_models=None,
            reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            summary="weighted mean direction on the hypersphere, scaled by the weighted mean norm",
        ),
        Method(
            name="karcher",
            prepare=karcher_prepare_step, combine=weighted_sum_combine, kernel="weighted_sum",
            # convergence controls: from "one step" (an approximate mean) to converged
            params=(Param("max_iter", "global", kind=int, default=KARCHER_MAX_ITER, low=0, high=10_000,
                          search=(0, 20), doc="most Riemannian gradient steps"),
                    Param("tol", "global", default=KARCHER_TOL, low=0.0, high=1.0, low_open=True,
                          search=(1e-7, 1e-3), doc="stop when the step is shorter; shorter tensors are left out")),
            base="input", min_models=1, max_models=None,
            reference="https://arxiv.org/abs/2603.04972",
            summary="Riemannian (Karcher) mean of the directions, scaled by the mean norm",
        ),
        Method(
            name="arcee_fusion",
            prepare=fusion_prepare, combine=fusion_combine, caches=fusion_caches,
            params=(),
            base="required", min_models=1, max_models=1,
            reference="https://arcee.ai",
            summary="take the model's value where |delta| x row KL is above median + 1.5 IQR",
        ),
        Method(
            name="ram",
            prepare=ram_prepare, combine=ram_combine_step,
            params=(_ram_epsilon(),),
            base="required", min_models=1, max_models=None,
            reference="https://arxiv.org/abs/2601.13572",
            summary="average each update over only the models that made it",
        ),
        Method(
            name="ramplus_tl",
            prepare=ramplus_prepare, combine=ram_combine_step,
            # lambda <= 1 + r * alpha: r, alpha in [0, 1] boost unique updates up to doubled
            params=(Param("r", "global", default=RAMPLUS_R, low=0.0, search=(0.0, 1.0),
                          doc="strength of the boost of unique updates"),
                    Param("alpha", "global", default=RAMPLUS_ALPHA, low=0.0, search=(0.0, 1.0),
                          doc="cap on the shared/unique ratio"),
                    _ram_epsilon()),
            base="required", min_models=1, max_models=None,
            reference="https://arxiv.org/abs/2601.13572",
            summary="RAM, each model's unique updates boosted by its shared/unique ratio (per tensor)",
        ),
        Method(
            name="passthrough",
            prepare=passthrough_prepare, combine=weighted_sum_combine, kernel="weighted_sum",
            params=(Param("scale", "model", default=None, search=(0.5, 1.5), doc="multiply the tensor"),),
            base="unused", min_models=1, max_models=1,
            summary="copy tensors unchanged (frankenmerge slices)",
        ),
    ]
}


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(
            f"merge_method: unknown method {name!r}; expected one of {', '.join(sorted(METHODS))}"
        ) from None


def run_method(
    method: Method,
    base: Tensor | None,
    tensors: Sequence[Tensor],
    params: Mapping[str, Any],
    generators: Sequence[torch.Generator | None] | None = None,
    stats: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Apply ``method`` with fully resolved params (globals as scalars, per-model as lists) to
    whole tensors: ``prepare``, its ``reduce``, then one ``combine``. ``generators[i]`` drives
    model i's random draws; ``stats[i]`` is model i's statistic (methods with ``needs``)."""
    inputs = WholeInputs(base, tensors, generators, stats)
    prep = method.prepare(inputs, dict(params))
    prep.reduce(inputs)
    return method.combine(prep, inputs, None)
