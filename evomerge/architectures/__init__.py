"""Model architectures as data: which tensors a checkpoint holds and how layers are named.

Each supported architecture is described by a JSON file next to this module::

    {
      "name": "llama",
      "model_types": ["llama"],                 # config.json "model_type" values
      "architectures": ["LlamaForCausalLM"],    # config.json "architectures" values
      "num_layers_key": "num_hidden_layers",    # config.json key holding the layer count
      "num_experts_key": ["num_local_experts"], # optional (MoE): config.json keys for the expert count (first found)
      "layer_attributes": ["layer_types"],      # optional: config.json lists with one entry per layer
      "pre_weights":   [WEIGHT, ...],           # before the first layer (embeddings)
      "layer_weights": [WEIGHT, ...],           # templates containing "${layer_index}"
      "post_weights":  [WEIGHT, ...]            # after the last layer (final norm, lm_head)
    }

where ``WEIGHT`` is either a tensor name (a string) or an object with ``name`` and the
optional keys ``optional``, ``is_embed``, ``tied_names`` and ``live`` (see :class:`WeightSpec`).

MoE expert tensors are layer templates that also contain ``${expert_index}``; a checkpoint's
config gives the expert count (``num_experts_key``) and :meth:`Architecture.for_config` writes one
entry per expert. ``live`` says where a checkpoint tensor lives in the model transformers builds
when the two differ (transformers 5 fuses the experts of a layer into one 3-D parameter)::

    "live": {"name": "model.layers.${layer_index}.mlp.experts.gate_up_proj",
             "expert": true,        # take index [expert] of the live parameter's first dimension
             "chunk": [0, 2]}       # then part 0 of 2 equal parts of the first remaining dimension

``layer_attributes`` name config entries that describe each layer (``layer_types``: which layers
use sliding-window attention); a layer path carries them with its layers.

Setting ``EVOMERGE_INFER_ARCHITECTURE=1`` lets :func:`architecture_for` accept a model none of
these files describe, reading the layout from its weight names (``...layers.N...``), with a
warning (see :func:`infer_architecture`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Callable

from evomerge.errors import CheckpointError

__all__ = [
    "EXPERT_INDEX",
    "INFER_ENV",
    "LAYER_INDEX",
    "Architecture",
    "LiveSpec",
    "WeightSpec",
    "architecture_for",
    "infer_architecture",
    "load_architectures",
]

logger = logging.getLogger(__name__)

LAYER_INDEX = "${layer_index}"
"""Placeholder for the layer number in layer weight templates."""

EXPERT_INDEX = "${expert_index}"
"""Placeholder for the expert number in MoE layer weight templates."""

INFER_ENV = "EVOMERGE_INFER_ARCHITECTURE"
"""Environment variable: ``1`` infers an unknown model's layout from its weight names."""

_WEIGHT_KEYS = {"name", "optional", "is_embed", "tied_names", "live"}
_LIVE_KEYS = {"name", "expert", "chunk"}
_ARCH_KEYS = {
    "name",
    "model_types",
    "architectures",
    "num_layers_key",
    "pre_weights",
    "layer_weights",
    "post_weights",
}
_OPTIONAL_ARCH_KEYS = {"num_experts_key", "layer_attributes"}


@dataclass(frozen=True)
class LiveSpec:
    """Where a checkpoint tensor lives in the model transformers builds: the parameter ``name``,
    then (``expert``) index ``[expert]`` of its first dimension, then part ``chunk[0]`` of
    ``chunk[1]`` equal parts of the next one. After :meth:`Architecture.for_config` ``expert``
    holds the expert number (``-1`` before)."""

    name: str
    expert: int | None = None
    chunk: tuple[int, int] | None = None

    def view(self, param: Any) -> Any:
        """The part of the live tensor ``param`` that holds this checkpoint tensor (a view)."""
        out = param if self.expert is None else param[self.expert]
        if self.chunk is not None:
            out = out.chunk(self.chunk[1], dim=0)[self.chunk[0]]
        return out


@dataclass(frozen=True)
class WeightSpec:
    """One tensor of an architecture.

    ``name`` may contain ``${layer_index}`` (layer templates). ``optional`` tensors may be
    absent from a checkpoint (``lm_head.weight`` when embeddings are tied); ``tied_names``
    lists tensors that hold the same values when this one is absent.
    """

    name: str
    optional: bool = False
    is_embed: bool = False
    tied_names: tuple[str, ...] = ()
    live: LiveSpec | None = None

    def for_layer(self, index: int) -> str:
        """The tensor name with ``${layer_index}`` replaced by ``index``."""
        return self.name.replace(LAYER_INDEX, str(index))

    def live_for_layer(self, index: int) -> LiveSpec | None:
        """``live`` with ``${layer_index}`` replaced by ``index`` (None when the names agree)."""
        if self.live is None:
            return None
        return LiveSpec(self.live.name.replace(LAYER_INDEX, str(index)), self.live.expert, self.live.chunk)

    def for_expert(self, expert: int) -> WeightSpec:
        """This spec with ``${expert_index}`` replaced by ``expert`` (in ``live`` too)."""
        live = self.live
        if live is not None and live.expert is not None:
            live = LiveSpec(live.name, expert, live.chunk)
        return WeightSpec(self.name.replace(EXPERT_INDEX, str(expert)), self.optional, self.is_embed,
                          self.tied_names, live)


@dataclass(frozen=True)
class Architecture:
    """A decoder-only transformer family: its tensors and how its layers are named."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    num_layers_key: str
    pre_weights: tuple[WeightSpec, ...]
    layer_weights: tuple[WeightSpec, ...]
    post_weights: tuple[WeightSpec, ...]
    num_experts_key: tuple[str, ...] = ()
    layer_attributes: tuple[str, ...] = ()

    def for_config(self, config: dict[str, Any], source: str = "config.json") -> Architecture:
        """This architecture with one layer weight per expert of ``config`` (MoE); else itself."""
        if not self.num_experts_key:
            return self
        key = next((k for k in self.num_experts_key if k in config), self.num_experts_key[0])
        n = config.get(key)
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise CheckpointError(f"{source}: field '{key}' must be a non-negative integer, got {n!r}")
        layer = []
        for spec in self.layer_weights:
            layer += [spec.for_expert(e) for e in range(n)] if EXPERT_INDEX in spec.name else [spec]
        return replace(self, layer_weights=tuple(layer))

    def tied_head(self) -> WeightSpec | None:
        """The output head that a checkpoint may leave out when it shares the embeddings, if any."""
        return next((s for s in self.post_weights if s.tied_names), None)

    def num_layers(self, config: dict[str, Any], source: str = "config.json") -> int:
        """The number of layers ``config`` declares (``CheckpointError`` if missing/invalid)."""
        value = config.get(self.num_layers_key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise CheckpointError(
                f"{source}: field '{self.num_layers_key}' must be a non-negative integer, got {value!r}"
            )
        return value

    def layer_weight_names(self, index: int) -> list[str]:
        """The tensor names of layer ``index``, in template order."""
        return [spec.for_layer(index) for spec in self.layer_weights]

    def all_weights(self, num_layers: int) -> list[WeightSpec]:
        """Every weight of a ``num_layers``-layer model (layer templates filled), in order."""
        layers = [
            WeightSpec(s.for_layer(i), s.optional, s.is_embed, s.tied_names, s.live_for_layer(i))
            for i in range(num_layers)
            for s in self.layer_weights
        ]
        return [*self.pre_weights, *layers, *self.post_weights]

    def find_spec(self, tensor_name: str) -> WeightSpec | None:
        """The spec a concrete tensor name belongs to (layer templates matched), or None."""
        for spec in (*self.pre_weights, *self.post_weights):
            if spec.name == tensor_name:
                return spec
        index = self.layer_index(tensor_name)
        if index is not None:
            for spec in self.layer_weights:
                if spec.for_layer(index) == tensor_name:
                    return spec
        return None

    @functools.cached_property
    def _layer_re(self) -> re.Pattern[str]:
        prefixes = sorted({s.name.split(LAYER_INDEX, 1)[0] for s in self.layer_weights}, key=len)
        alternatives = "|".join(re.escape(p) for p in reversed(prefixes))
        return re.compile(rf"^({alternatives})(\d+)(?=\.|$)")

    def layer_index(self, tensor_name: str) -> int | None:
        """The layer number in ``tensor_name`` ("model.layers.7.mlp..." -> 7), else None."""
        if not self.layer_weights:
            return None
        match = self._layer_re.match(tensor_name)
        return int(match.group(2)) if match else None

    def with_layer_index(self, tensor_name: str, index: int) -> str:
        """``tensor_name`` renamed to layer ``index`` (ValueError if it is not a layer tensor)."""
        if self.layer_index(tensor_name) is None:
            raise ValueError(f"{tensor_name!r} is not a layer tensor of architecture {self.name!r}")
        return self._layer_re.sub(lambda m: f"{m.group(1)}{index}", tensor_name, count=1)


def _parse_weight(raw: Any, where: str) -> WeightSpec:
    if isinstance(raw, str):
        return WeightSpec(raw)
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise CheckpointError(f"{where}: expected a tensor name or an object with a 'name' string")
    unknown = set(raw) - _WEIGHT_KEYS
    if unknown:
        raise CheckpointError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(_WEIGHT_KEYS)})")
    tied = raw.get("tied_names", [])
    if not isinstance(tied, list) or not all(isinstance(t, str) for t in tied):
        raise CheckpointError(f"{where}: 'tied_names' must be a list of tensor names")
    for key in ("optional", "is_embed"):
        if not isinstance(raw.get(key, False), bool):
            raise CheckpointError(f"{where}: '{key}' must be true or false")
    return WeightSpec(
        name=raw["name"],
        optional=raw.get("optional", False),
        is_embed=raw.get("is_embed", False),
        tied_names=tuple(tied),
        live=_parse_live(raw["live"], f"{where}.live") if "live" in raw else None,
    )


def _parse_live(raw: Any, where: str) -> LiveSpec:
    if not isinstance(raw, dict) or not isinstance(raw.get("name"), str):
        raise CheckpointError(f"{where}: expected an object with a 'name' string")
    unknown = set(raw) - _LIVE_KEYS
    if unknown:
        raise CheckpointError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(_LIVE_KEYS)})")
    if not isinstance(raw.get("expert", False), bool):
        raise CheckpointError(f"{where}: 'expert' must be true or false")
    chunk = raw.get("chunk")
    if chunk is not None and not (isinstance(chunk, list) and len(chunk) == 2
                                  and all(isinstance(c, int) and not isinstance(c, bool) for c in chunk)
                                  and 0 <= chunk[0] < chunk[1]):
        raise CheckpointError(f"{where}: 'chunk' must be [part, parts] with 0 <= part < parts")
    return LiveSpec(raw["name"], -1 if raw.get("expert") else None, tuple(chunk) if chunk else None)


def parse_architecture(data: Any, source: str) -> Architecture:
    """Build an :class:`Architecture` from its JSON form (``CheckpointError`` naming ``source``)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    missing = _ARCH_KEYS - set(data)
    unknown = set(data) - _ARCH_KEYS - _OPTIONAL_ARCH_KEYS
    if missing or unknown:
        raise CheckpointError(f"{source}: missing keys {sorted(missing)}, unknown keys {sorted(unknown)}")

    def str_list(key: str) -> tuple[str, ...]:
        value = data[key]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise CheckpointError(f"{source}: '{key}' must be a list of strings")
        return tuple(value)

    def weights(key: str, templated: bool) -> tuple[WeightSpec, ...]:
        if not isinstance(data[key], list):
            raise CheckpointError(f"{source}: '{key}' must be a list")
        specs = tuple(_parse_weight(w, f"{source}: {key}[{i}]") for i, w in enumerate(data[key]))
        for spec in specs:
            if (LAYER_INDEX in spec.name) != templated:
                need = "must" if templated else "must not"
                raise CheckpointError(f"{source}: {key} entry {spec.name!r} {need} contain {LAYER_INDEX}")
        return specs

    layer = weights("layer_weights", True)
    experts = str_list("num_experts_key") if "num_experts_key" in data else ()
    for spec in (*weights("pre_weights", False), *layer, *weights("post_weights", False)):
        if EXPERT_INDEX in spec.name and (not experts or LAYER_INDEX not in spec.name):
            raise CheckpointError(f"{source}: {spec.name!r} uses {EXPERT_INDEX}; only layer_weights may, "
                                  "and only with 'num_experts_key'")
        if spec.live is not None and (spec.live.expert is not None) != (EXPERT_INDEX in spec.name):
            raise CheckpointError(f"{source}: {spec.name!r}: live.expert must be true exactly when the name "
                                  f"uses {EXPERT_INDEX}")
    return Architecture(
        name=str(data["name"]),
        model_types=str_list("model_types"),
        architectures=str_list("architectures"),
        num_layers_key=str(data["num_layers_key"]),
        pre_weights=weights("pre_weights", False),
        layer_weights=layer,
        post_weights=weights("post_weights", False),
        num_experts_key=experts,
        layer_attributes=str_list("layer_attributes") if "layer_attributes" in data else (),
    )


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[Architecture, ...]:
    archs = []
    for entry in sorted(resources.files(__name__).iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            source = f"evomerge/architectures/{entry.name}"
            try:
                data = json.loads(entry.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{source}: invalid JSON ({exc})") from exc
            archs.append(parse_architecture(data, source))
    logger.debug("loaded architectures: %s", [a.name for a in archs])
    return tuple(archs)


def load_architectures() -> dict[str, Architecture]:
    """All bundled architectures by name (read from the package's JSON files)."""
    return {arch.name: arch for arch in _load_all()}


def architecture_for(config: dict[str, Any], source: str = "config.json",
                     tensor_names: Callable[[], list[str]] | None = None) -> Architecture:
    """The architecture of a model ``config``: by ``architectures[0]``, then by ``model_type``.

    An unknown model is refused in one line naming it and the supported list, unless
    ``EVOMERGE_INFER_ARCHITECTURE=1`` and ``tensor_names`` (a function listing the checkpoint's
    tensors, called only then) is given: then the layout is inferred from them, with a warning
    (see :func:`infer_architecture`)."""
    archs = _load_all()
    names = config.get("architectures")
    first = names[0] if isinstance(names, list) and names else None
    model_type = config.get("model_type")
    for arch in archs:
        if first is not None and first in arch.architectures:
            return arch
    for arch in archs:
        if model_type is not None and model_type in arch.model_types:
            return arch
    if os.environ.get(INFER_ENV) == "1" and tensor_names is not None:
        return infer_architecture(config, tensor_names(), source)
    supported = ", ".join(a for arch in archs for a in arch.architectures)
    raise CheckpointError(
        f"{source}: unsupported model (architectures[0]={first!r}, model_type={model_type!r}); "
        f"supported: {supported} (or set {INFER_ENV}=1 to infer the layout from the weight names)"
    )


_LAYER_NAME = re.compile(r"^(.*?\blayers\.)(\d+)(\..+)$")


def infer_architecture(config: dict[str, Any], tensor_names: list[str], source: str = "config.json") -> Architecture:
    """A layout read from weight names: tensors named ``<prefix>layers.<N>.<rest>`` are layer
    tensors (a template absent from some layer is optional), tensors whose name contains ``embed``
    come before the layers, every other tensor after them; ``lm_head.weight`` may be tied to the
    embeddings. Nothing checks that the layers are interchangeable as a named architecture
    guarantees, hence the warning."""
    per_layer: dict[str, set[int]] = {}
    outside: list[str] = []
    for name in sorted(tensor_names):
        match = _LAYER_NAME.match(name)
        if match:
            per_layer.setdefault(f"{match.group(1)}{LAYER_INDEX}{match.group(3)}", set()).add(int(match.group(2)))
        else:
            outside.append(name)
    key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if k in config), None)
    if not per_layer or key is None:
        raise CheckpointError(f"{source}: cannot infer the layout: no '<prefix>layers.<N>.' weights or no "
                              "num_hidden_layers in config.json")
    n_layers = len(set().union(*per_layer.values()))
    layer = tuple(WeightSpec(t, optional=len(idx) < n_layers) for t, idx in per_layer.items())
    embeds = [n for n in outside if "embed" in n]
    pre = tuple(WeightSpec(n, is_embed=True) for n in embeds)
    post = [WeightSpec(n, is_embed=n == "lm_head.weight") for n in outside if n not in embeds]
    if "lm_head.weight" not in outside and embeds:
        post.append(WeightSpec("lm_head.weight", optional=True, is_embed=True, tied_names=(embeds[0],)))
    arch = Architecture(name=f"inferred:{config.get('model_type', '?')}", model_types=(), architectures=(),
                        num_layers_key=key, pre_weights=pre, layer_weights=layer, post_weights=tuple(post))
    logger.warning("%s: unknown model type %r; layout inferred from its weight names (%d layer tensors, "
                   "%d others) because %s=1: check the output", source, config.get("model_type"), len(layer),
                   len(pre) + len(post), INFER_ENV)
    return arch
