"""Model architectures as data: which tensors a checkpoint holds and how layers are named.

Each supported architecture is described by a JSON file next to this module::

    {
      "name": "llama",
      "model_types": ["llama"],                 # config.json "model_type" values
      "architectures": ["LlamaForCausalLM"],    # config.json "architectures" values
      "num_layers_key": "num_hidden_layers",    # config.json key holding the layer count
      "pre_weights":   [WEIGHT, ...],           # before the first layer (embeddings)
      "layer_weights": [WEIGHT, ...],           # templates containing "${layer_index}"
      "post_weights":  [WEIGHT, ...]            # after the last layer (final norm, lm_head)
    }

where ``WEIGHT`` is either a tensor name (a string) or an object with ``name`` and the
optional keys ``optional``, ``is_embed`` and ``tied_names`` (see :class:`WeightSpec`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

from evomerge.errors import CheckpointError

__all__ = ["LAYER_INDEX", "Architecture", "WeightSpec", "architecture_for", "load_architectures"]

logger = logging.getLogger(__name__)

LAYER_INDEX = "${layer_index}"
"""Placeholder for the layer number in layer weight templates."""

_WEIGHT_KEYS = {"name", "optional", "is_embed", "tied_names"}
_ARCH_KEYS = {
    "name",
    "model_types",
    "architectures",
    "num_layers_key",
    "pre_weights",
    "layer_weights",
    "post_weights",
}


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

    def for_layer(self, index: int) -> str:
        """The tensor name with ``${layer_index}`` replaced by ``index``."""
        return self.name.replace(LAYER_INDEX, str(index))


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
            WeightSpec(s.for_layer(i), s.optional, s.is_embed, s.tied_names)
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
    return WeightSpec(
        name=raw["name"],
        optional=bool(raw.get("optional", False)),
        is_embed=bool(raw.get("is_embed", False)),
        tied_names=tuple(tied),
    )


def parse_architecture(data: Any, source: str) -> Architecture:
    """Build an :class:`Architecture` from its JSON form (``CheckpointError`` naming ``source``)."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{source}: expected a JSON object")
    missing = _ARCH_KEYS - set(data)
    unknown = set(data) - _ARCH_KEYS
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

    return Architecture(
        name=str(data["name"]),
        model_types=str_list("model_types"),
        architectures=str_list("architectures"),
        num_layers_key=str(data["num_layers_key"]),
        pre_weights=weights("pre_weights", False),
        layer_weights=weights("layer_weights", True),
        post_weights=weights("post_weights", False),
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


def architecture_for(config: dict[str, Any], source: str = "config.json") -> Architecture:
    """The architecture of a model ``config``: by ``architectures[0]``, then by ``model_type``."""
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
    supported = ", ".join(a for arch in archs for a in arch.architectures)
    raise CheckpointError(
        f"{source}: unsupported model (architectures[0]={first!r}, model_type={model_type!r}); "
        f"supported: {supported}"
    )
