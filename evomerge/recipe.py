"""A concrete merge recipe in mergekit's YAML schema, validated once at the boundary.

Supported keys: ``merge_method``, ``models`` (each ``model`` + ``parameters``), ``base_model``,
``parameters`` (global), ``slices`` (``sources`` with ``model``/``layer_range``/``parameters``,
optional per-slice ``base_model``/``parameters``), ``dtype``, ``out_dtype``, ``tokenizer_source``
(``base``, ``union`` or a model) or the ``tokenizer`` block (see :class:`TokenizerBlock`),
``chat_template`` (``auto``, a built-in name or a Jinja template: see :mod:`evomerge.chat_template`),
evomerge's ``random_seed`` (seeds DARE/DELLA masks; mergekit ignores it) and evomerge's
``calibration`` (the data of data-aware methods, Fisher and RegMean: see :mod:`evomerge.calibration`;
mergekit has neither the key nor the methods, so ``mergekit-yaml`` refuses such a recipe). A model
is written as mergekit writes it: ``model[@revision][+lora]`` (see :mod:`evomerge.sources`).

A parameter value is a scalar, a *gradient* (a list of numbers interpolated across the layers of
a slice, as mergekit does), or a list of ``{filter, value}`` entries: the first entry whose
``filter`` is a substring of the tensor name (or is absent / ``"*"``) applies.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Annotated, Any, Iterator, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from evomerge.calibration import Calibration
from evomerge.chat_template import chat_template_problem
from evomerge.errors import ConfigError
from evomerge.files import read_yaml
from evomerge.methods import METHODS, Method, get_method

log = logging.getLogger(__name__)

DEFAULT_RANDOM_SEED = 0
DTYPES = ("float32", "float16", "bfloat16", "float64")
Scalar = Union[bool, int, float, str]


class Conditional(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    filter: str | None = None
    value: Union[list[float], Scalar]


ParamValue = Union[Scalar, list[float], list[Conditional], Conditional]
Params = dict[str, ParamValue]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    model: str
    parameters: Params | None = None


class SliceSource(_Strict):
    model: str
    layer_range: tuple[int, int]
    parameters: Params | None = None

    @model_validator(mode="after")
    def _range(self) -> "SliceSource":
        lo, hi = self.layer_range
        if lo < 0 or hi <= lo:
            raise ValueError(f"layer_range [{lo}, {hi}] must satisfy 0 <= start < end")
        return self


class OutputSlice(_Strict):
    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    parameters: Params | None = None


class ZeroToken(_Strict):
    kind: Literal["zero"]


class ModelToken(_Strict):
    """The row of one token (``token``, or ``token_id``) of one model's own vocabulary."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _one(self) -> "ModelToken":
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of token or token_id")
        return self


class TokenSource(_Strict):
    """Where one output token's embedding and head rows come from (mergekit's semantics)."""

    # a model (its row of the same token), {kind: zero} or {kind: model_token, model, token | token_id}
    source: Union[Annotated[Union[ZeroToken, ModelToken], Field(discriminator="kind")], str, None] = None
    force: bool = False  # use ``source`` even for models that have the token

    def model(self) -> str | None:
        return self.source.model if isinstance(self.source, ModelToken) else (
            self.source if isinstance(self.source, str) else None)


class TokenizerBlock(_Strict):
    source: str = "union"  # base, union or a model
    tokens: dict[str, TokenSource] | None = None
    pad_to_multiple_of: int | None = Field(None, ge=1)


class Recipe(_Strict):
    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    base_model: str | None = None
    parameters: Params | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerBlock | None = None
    chat_template: str | None = None  # set on the output tokenizer: auto, a built-in name or a Jinja template
    random_seed: int | None = None
    calibration: Calibration | None = None  # evomerge extension: data for methods with ``needs``

    # ----------------------------------------------------------------- validation
    @model_validator(mode="after")
    def _check(self) -> "Recipe":
        method = get_method(self.merge_method)
        if bool(self.models) == bool(self.slices):
            raise ValueError("exactly one of 'models' or 'slices' must be given")
        for key in ("dtype", "out_dtype"):
            value = getattr(self, key)
            if value is not None and value not in DTYPES:
                raise ValueError(f"{key}: expected one of {', '.join(DTYPES)}, got {value!r}")
        self._check_tokenizer()
        problem = chat_template_problem(self.chat_template) if self.chat_template else None
        if problem:
            raise ValueError(f"chat_template: {problem}")
        if method.base == "required":
            if self.models and not self.base_model:
                raise ValueError(f"base_model: merge_method {method.name} needs a base model")
            for i, s in enumerate(self.slices or []):
                base = s.base_model or self.base_model
                if not base:
                    raise ValueError(f"slices.{i}.base_model: merge_method {method.name} needs a base model")
                if base not in [src.model for src in s.sources]:
                    raise ValueError(f"slices.{i}: base model {base!r} must be one of the slice's sources")
        if method.needs and self.calibration is None:
            raise ValueError(f"calibration: merge_method {method.name} needs calibration data (an evomerge "
                             "extension): add calibration: {data: FILE.txt|FILE.jsonl|TASK.yaml|lm-eval task, n: 64}")
        if self.calibration is not None and not method.needs:
            log.warning("calibration: not used by merge_method %s; ignored", method.name)
        for where, params in self._param_blocks():
            _check_params(method, where, params)
        self._check_counts(method)
        return self

    def _check_tokenizer(self) -> None:
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("tokenizer: give either tokenizer_source or a tokenizer block, not both")
        refs = self.referenced_models()
        src, where = ((self.tokenizer.source, "tokenizer.source") if self.tokenizer
                      else (self.tokenizer_source, "tokenizer_source"))
        if src not in (None, "base", "union") and src not in refs:
            raise ValueError(f"{where}: {src!r} is not one of the recipe's models (expected base, union or one "
                             f"of: {', '.join(refs)})")
        for token, spec in ((self.tokenizer.tokens or {}) if self.tokenizer else {}).items():
            model = spec.model()
            if model is not None and model not in refs:
                raise ValueError(f"tokenizer.tokens.{token}.source: {model!r} is not one of the recipe's models "
                                 f"(expected one of: {', '.join(refs)})")

    @property
    def vocabulary_source(self) -> str | None:
        """``base``, ``union`` or a model when the recipe builds its vocabulary (mergekit's
        ``tokenizer_source``/``tokenizer``); None when it copies the base's tokenizer as is."""
        return self.tokenizer.source if self.tokenizer is not None else self.tokenizer_source

    def _param_blocks(self) -> Iterator[tuple[str, Params]]:
        if self.parameters:
            yield "parameters", self.parameters
        for i, m in enumerate(self.models or []):
            if m.parameters:
                yield f"models.{i}.parameters", m.parameters
        for i, s in enumerate(self.slices or []):
            if s.parameters:
                yield f"slices.{i}.parameters", s.parameters
            for j, src in enumerate(s.sources):
                if src.parameters:
                    yield f"slices.{i}.sources.{j}.parameters", src.parameters

    def _check_counts(self, method: Method) -> None:
        groups: list[tuple[str, list[str], str | None]] = []
        if self.models:
            groups.append(("models", [m.model for m in self.models], self.base_model))
        for i, s in enumerate(self.slices or []):
            groups.append((f"slices.{i}.sources", [x.model for x in s.sources], s.base_model or self.base_model))
        for where, refs, base in groups:
            others = [r for r in refs if r != base] if method.base in ("required", "optional") else refs
            n = len(others)
            if n < method.min_models or (method.max_models is not None and n > method.max_models):
                want = (str(method.min_models) if method.max_models == method.min_models
                        else f"at least {method.min_models}" if method.max_models is None
                        else f"{method.min_models} to {method.max_models}")
                extra = " besides the base model" if method.base in ("required", "optional") else ""
                raise ValueError(f"{where}: {method.name} takes {want} model(s){extra}, got {n}")

    # ----------------------------------------------------------------- helpers
    @property
    def method(self) -> Method:
        return METHODS[self.merge_method]

    def referenced_models(self) -> list[str]:
        """Every model the recipe reads, in first-mention order."""
        refs: list[str] = []
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            refs.extend(src.model for src in s.sources)
            if s.base_model:
                refs.append(s.base_model)
        if self.base_model:
            refs.append(self.base_model)
        return list(dict.fromkeys(refs))

    @property
    def seed(self) -> int:
        return DEFAULT_RANDOM_SEED if self.random_seed is None else self.random_seed

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)

    def to_yaml(self) -> str:
        return yaml.dump(self.to_dict(), Dumper=_FlowListDumper, sort_keys=False).rstrip() + "\n"

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of recipe keys, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(f"{source}: {format_validation_error(e)}") from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Recipe":
        path = Path(path)
        data = read_yaml(path, "recipe")
        return cls.from_dict(data, str(path))


class _FlowListDumper(yaml.SafeDumper):
    """Lists of numbers (gradients, layer ranges) in flow style, as mergekit writes them; text of
    several lines (a Jinja chat template) as a literal block where YAML allows one."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flow = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flow)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|" if "\n" in data else None)


_FlowListDumper.add_representer(list, _represent_list)
_FlowListDumper.add_representer(str, _represent_str)
_FlowListDumper.add_representer(tuple, _represent_list)


def format_validation_error(e: ValidationError) -> str:
    """The first pydantic error as one line: ``field.path: message``."""
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key missing"
    if loc and re.match(r"^[A-Za-z_][\w.]*: ", msg):  # a model validator naming a field inside loc
        return f"{loc}.{msg}"
    return f"{loc}: {msg}" if loc else msg


def _is_union_tag(p: Any) -> bool:
    return isinstance(p, str) and (p in ("bool", "int", "float", "str", "Conditional")
                                   or p.startswith("list[") or p.startswith("function-"))


# --------------------------------------------------------------------------- parameter values
def _leaves(value: ParamValue) -> Iterator[Scalar]:
    if isinstance(value, Conditional):
        yield from _leaves(value.value)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v) if isinstance(v, Conditional) else [v]
    else:
        yield value


def _known_elsewhere(name: str) -> bool:
    return any(m.param(name) for m in METHODS.values())


def _check_params(method: Method, where: str, params: Params) -> None:
    for name, value in params.items():
        spec = method.param(name)
        if spec is None:
            if _known_elsewhere(name):
                log.warning("%s.%s: not a parameter of %s; ignored", where, name, method.name)
                continue
            valid = ", ".join(p.name for p in method.params)
            raise ValueError(f"{where}.{name}: not a parameter of {method.name} (expected one of: {valid})")
        for leaf in _leaves(value):
            problem = spec.check(leaf)
            if problem:
                raise ValueError(f"{where}.{name}: {problem}, got {leaf!r}")


def evaluate(value: ParamValue | None, tensor_name: str, t: float) -> Any:
    """Resolve a parameter value for one tensor at relative depth ``t`` in its slice (mergekit's
    rule). Returns None when no filter matches."""
    if value is None:
        return None
    if isinstance(value, Conditional):
        value = [value]
    if isinstance(value, list):
        if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            scaled = t * (len(value) - 1)
            i0 = int(scaled)
            i1 = min(len(value) - 1, i0 + 1)
            frac = scaled - i0
            return (1 - frac) * value[i0] + frac * value[i1]
        for cond in value:
            if isinstance(cond, Conditional):
                if cond.filter in (None, "*") or cond.filter in tensor_name:
                    return evaluate(cond.value, tensor_name, t)
            else:  # a list of non-numeric scalars: a step function over depth
                return value[int(t * (len(value) - 1))]
        return None
    return value
