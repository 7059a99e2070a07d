"""Layer-path models: Sakana's "data-flow space" frankenmerges, evaluated without copying weights.

Given M *source layers* (all decoder layers of model 1, then of model 2, ...; a source may be a
folder or a model already in memory, such as the merge found by a parameter-space search), a
*path* is a sequence of :class:`Hop` s. Hop ``p`` runs source layer ``hop.layer`` on the hidden
state coming out of hop ``p - 1``, multiplied first by ``hop.scale`` (one scalar per hop, the
``input_layers`` / ``input_scales`` of the released EvoLLM-JP-10B).

:class:`LayerPathModel` turns one model (the *host*) into the path model: its embeddings, final
norm, lm_head, config and tokenizer are kept, and ``host.model.layers`` is replaced by one
*shell* per hop. A shell is a new module tree of the source layer's classes whose parameter
dicts hold the source's own ``Parameter`` objects (nothing is copied), with its own attention
``layer_idx`` (= the hop position, so a layer used twice gets two KV-cache slots) and, when the
scale is not 1, a forward pre-hook multiplying the incoming hidden state. ``set_path`` only builds
these shells, so a search can call it once per trial; memory does not grow with the path length.

Exporting (:meth:`LayerPathModel.export`) materialises the layers in path order into a normal
Hugging Face folder (``model.layers.{hop}.*``, ``num_hidden_layers = len(path)``):

* every scale 1: a plain model of the host's class that loads anywhere;
* otherwise the folder also holds ``modeling_evopath.py``, a self-contained file (it imports only
  ``transformers``) defining ``EvoPath<HostClass>``, and config.json gets ``"input_scales"`` and an
  ``"auto_map"``, so ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``
  applies the scales. **Loaded without** ``trust_remote_code`` (or by tools that ignore
  ``auto_map``) transformers silently builds the plain host class and the scales are lost;
  ``"architectures"`` names the custom class so that tools matching on it fail loudly.

mergekit cannot express input scales: its ``passthrough`` ``scale`` parameter multiplies
*weights*, not the hidden state entering a layer. :func:`passthrough_recipe` therefore writes the
layer order only and returns one warning per scaled hop (and one when the path's first or last
hop is not from the host: a passthrough merge takes embeddings from the first slice's model and
the final norm / lm_head from the last one's). Use the export for the exact model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import numbers
import operator
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from evomerge.architectures import architecture_for
from evomerge.checkpoint import CheckpointWriter
from evomerge.errors import CheckpointError, ConfigError
from evomerge.recipe import Recipe

__all__ = [
    "Hop",
    "SourceLayer",
    "LayerPathModel",
    "passthrough_recipe",
    "annotated_yaml",
    "MODELING_FILE",
]

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_evopath.py"
"""The name of the modeling file written next to a scaled export."""

_HOOKS_FLAG = "_output_capturing_hooks_installed"  # transformers' per-model "hooks installed" flag

# Hook dicts a shell starts without: forward/backward hooks are per module instance (the output
# capturing hooks transformers installs, accelerate's device hooks) and must not run twice.
_RESET_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


@dataclass(frozen=True)
class Hop:
    """One step of a path: source layer ``layer`` (index into the M source layers), run on the
    incoming hidden state multiplied by ``scale``."""

    layer: int
    scale: float = 1.0

    def __post_init__(self) -> None:
        try:
            layer = operator.index(self.layer)  # ints, numpy integers
        except TypeError:
            layer = -1
        if isinstance(self.layer, bool) or layer < 0:
            raise ConfigError(f"hop layer must be a non-negative integer, got {self.layer!r}")
        scale = self.scale
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
            raise ConfigError(f"hop scale must be a finite number, got {scale!r}")
        object.__setattr__(self, "layer", int(layer))
        object.__setattr__(self, "scale", float(scale))


@dataclass(frozen=True)
class SourceLayer:
    """Layer ``index`` of the model named ``model``."""

    model: str
    index: int


def _as_hop(h: Hop | int | tuple[int, float]) -> Hop:
    if isinstance(h, Hop):
        return h
    if isinstance(h, (tuple, list)) and len(h) == 2:
        return Hop(h[0], h[1])
    return Hop(h)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- shells
def _decoder(model: nn.Module) -> nn.Module:
    """The module holding ``layers`` (``model.model`` for *ForCausalLM)."""
    inner = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    if isinstance(inner, nn.Module) and isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return inner
    if isinstance(getattr(model, "layers", None), nn.ModuleList):
        return model
    raise ConfigError(f"{type(model).__name__}: no decoder layer list (expected <model>.{{model}}.layers)")


def _layers_prefix(model: nn.Module) -> str:
    inner = _decoder(model)
    for name, mod in model.named_modules():
        if mod is inner:
            return f"{name}.layers." if name else "layers."
    raise ConfigError(f"{type(model).__name__}: decoder not found among its modules")  # pragma: no cover


def _shell(module: nn.Module, *, config: Any, layer_idx: int, config_cls: type) -> nn.Module:
    """A new module tree of ``module``'s classes sharing its Parameter and buffer objects, with
    ``layer_idx`` attributes set to ``layer_idx``, ``config`` attributes (``config_cls``
    instances) set to ``config``, and no forward/backward hooks."""
    if "forward" in module.__dict__ or "_hf_hook" in module.__dict__:
        raise ConfigError(
            f"{type(module).__name__}: source layers with accelerate hooks (device_map / offloading) cannot be "
            "shared; load the sources onto one device"
        )
    clone = module.__class__.__new__(module.__class__)
    state = dict(module.__dict__)
    state["_parameters"] = type(module._parameters)(module._parameters)
    state["_buffers"] = type(module._buffers)(module._buffers)
    state["_non_persistent_buffers_set"] = set(module._non_persistent_buffers_set)
    state["_modules"] = type(module._modules)(
        (k, None if v is None else _shell(v, config=config, layer_idx=layer_idx, config_cls=config_cls))
        for k, v in module._modules.items()
    )
    for key in _RESET_HOOKS:
        if key in state:
            state[key] = OrderedDict()
    for key, value in module.__dict__.items():  # other hook registries: own copies
        if key.endswith("_hooks") and key not in _RESET_HOOKS and isinstance(value, dict):
            state[key] = type(value)(value)
    if isinstance(state.get("layer_idx"), int) and not isinstance(state.get("layer_idx"), bool):
        state["layer_idx"] = layer_idx
    if isinstance(state.get("config"), config_cls):
        state["config"] = config
    clone.__dict__.update(state)
    return clone


def _scale_hook(scale: float):
    """A forward pre-hook multiplying the layer's hidden-state input by ``scale``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] * scale
        return args, kwargs

    return hook


def _same_device(actual: torch.device, wanted: torch.device) -> bool:
    """``cuda`` (no index) means the current CUDA device."""
    if actual.type != wanted.type:
        return False
    if wanted.index is None:
        return actual.index in (None, torch.cuda.current_device() if wanted.type == "cuda" else actual.index)
    return actual.index == wanted.index


def _layer_attributes(config: Any) -> tuple[str, ...]:
    """The per-layer config entries of ``config``'s architecture (none for a model no
    architecture file describes)."""
    try:
        return architecture_for(config.to_dict()).layer_attributes
    except CheckpointError:
        return ()


def _layer_signature(layer: nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    return [(n, tuple(t.shape), type(layer).__name__) for n, t in layer.state_dict().items()]


# --------------------------------------------------------------------------- the model
class LayerPathModel:
    """A live HF causal LM whose decoder layers are a path through source layers (no weight copies).

    ``models`` maps a name to an already-loaded ``*ForCausalLM`` (used as is; moved in place if its
    device/dtype differ from ``device``/``dtype``) or to a model folder (loaded with
    ``AutoModelForCausalLM``). ``host`` names the model whose embeddings, final norm, lm_head,
    config and tokenizer the path model uses; that model instance is modified in place (its layer
    list is replaced; :meth:`restore` puts the original back). Until :meth:`set_path` is called
    the path is the host's own layers in order.

    Attributes: ``sources`` (every layer of every model, in the given order), ``model`` (the host
    instance, run ``forward``/``generate`` on it), ``tokenizer`` (``tokenizer`` if given, else
    loaded from the host folder, else None), ``host``, ``names``.
    """

    def __init__(
        self,
        models: Mapping[str, nn.Module | str | Path],
        *,
        host: str,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer: Any = None,
        tokenizer_source: str | Path | None = None,
        attn_implementation: str | None = None,
    ):
        if not models:
            raise ConfigError("models: at least one model is needed")
        if host not in models:
            raise ConfigError(f"host: {host!r} is not one of the models ({', '.join(models)})")
        self.device = torch.device(device)
        self.dtype = dtype
        self.host = host
        self.names = list(models)
        self.folders: dict[str, Path] = {}
        self.instances: dict[str, nn.Module] = {}
        for name, value in models.items():
            self.instances[name] = self._load(name, value, attn_implementation)
        self.model = self.instances[host]
        self._decoder = _decoder(self.model)
        self._prefix = _layers_prefix(self.model)
        self.sources: list[SourceLayer] = []
        self._layers: list[nn.Module] = []
        # config entries with one value per layer (the architecture file's layer_attributes, such as
        # layer_types: which layers use sliding-window attention) travel with their layers
        self._attr_names = [k for k in _layer_attributes(self.model.config)
                            if getattr(self.model.config, k, None) is not None]
        self._layer_attrs: dict[str, list[Any]] = {k: [] for k in self._attr_names}
        for name in self.names:
            inst = self.instances[name]
            layers = list(_decoder(inst).layers)[: inst.config.num_hidden_layers]
            for key in self._attr_names:
                values = getattr(inst.config, key, None)
                if not isinstance(values, (list, tuple)) or len(values) < len(layers):
                    raise ConfigError(f"models.{name}: config '{key}' must list one value per layer "
                                      f"({len(layers)}), got {values!r}")
                self._layer_attrs[key] += list(values[: len(layers)])
            for i, layer in enumerate(layers):
                self.sources.append(SourceLayer(name, i))
                self._layers.append(layer)
        if SourceLayer(host, 0) not in self.sources:
            raise ConfigError(f"host: model {host!r} has no decoder layers")
        self._check_compatible()
        cfg = self.model.config
        self._original = (self._decoder.layers, cfg.num_hidden_layers,
                          {k: copy.copy(getattr(cfg, k)) for k in self._attr_names})
        self._original_flags = [m.__dict__.get(_HOOKS_FLAG) for m in (self.model, self._decoder)]
        host_start = self.sources.index(SourceLayer(host, 0))
        n_host = sum(1 for s in self.sources if s.model == host)
        self._path: list[Hop] = [Hop(host_start + i) for i in range(n_host)]

        self.tokenizer = tokenizer
        self.tokenizer_source = Path(tokenizer_source) if tokenizer_source is not None else self.folders.get(host)
        if self.tokenizer is None and self.tokenizer_source is not None:
            try:
                from transformers import AutoTokenizer

                self.tokenizer = AutoTokenizer.from_pretrained(str(self.tokenizer_source))
            except Exception as exc:  # noqa: BLE001 - a model without a usable tokenizer is still usable
                log.info("%s: no tokenizer loaded (%s)", self.tokenizer_source, exc)
        self.set_path(self._path)

    # ------------------------------------------------------------------ loading
    def _load(self, name: str, value: nn.Module | str | Path, attn_implementation: str | None) -> nn.Module:
        if isinstance(value, nn.Module):
            first = next(value.parameters(), None)
            if first is not None and (not _same_device(first.device, self.device) or first.dtype != self.dtype):
                log.info("moving in-memory model %s to %s/%s", name, self.device, self.dtype)
                value.to(device=self.device, dtype=self.dtype)
            return value
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"models.{name}: expected a model instance or a folder, got {type(value).__name__}")
        folder = Path(value).expanduser()
        if not (folder / "config.json").is_file():
            raise CheckpointError(f"{folder}: not a model folder (no config.json)")
        from transformers import AutoModelForCausalLM

        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if attn_implementation is not None:
            kwargs["attn_implementation"] = attn_implementation
        model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        model.to(self.device)
        model.eval()
        self.folders[name] = folder
        return model

    def _check_compatible(self) -> None:
        host_cfg = self.model.config
        ref_sig = _layer_signature(self._layers[self.sources.index(SourceLayer(self.host, 0))])
        for name in self.names:
            cfg = self.instances[name].config
            if cfg.model_type != host_cfg.model_type:
                raise ConfigError(f"models.{name}: model_type {cfg.model_type!r} differs from the host's "
                                  f"{host_cfg.model_type!r}")
        for src, layer in zip(self.sources, self._layers):
            if _layer_signature(layer) != ref_sig:
                raise ConfigError(f"models.{src.model}: layer {src.index} has different tensors or shapes "
                                  f"than the host's layers")
            for p in layer.parameters():
                if not _same_device(p.device, self.device):
                    raise ConfigError(f"models.{src.model}: layer {src.index} is on {p.device}, expected {self.device}")

    # ------------------------------------------------------------------ paths
    def set_path(self, hops: Iterable[Hop | int | tuple[int, float]]) -> None:
        """Make the host run ``hops``: one shell per hop (shared parameters, own KV-cache slot)."""
        hops = [_as_hop(h) for h in hops]
        if not hops:
            raise ConfigError("path: at least one hop is needed")
        for i, h in enumerate(hops):
            if h.layer >= len(self.sources):
                raise ConfigError(f"path[{i}]: layer {h.layer} is out of range (there are {len(self.sources)} "
                                  "source layers)")
        from transformers import PretrainedConfig

        cfg = self.model.config
        shells = []
        for pos, h in enumerate(hops):
            shell = _shell(self._layers[h.layer], config=cfg, layer_idx=pos, config_cls=PretrainedConfig)
            if h.scale != 1.0:
                shell.register_forward_pre_hook(_scale_hook(h.scale), with_kwargs=True)
            shells.append(shell)
        self._decoder.layers = nn.ModuleList(shells)
        cfg.num_hidden_layers = len(hops)
        self._set_layer_attributes({k: [v[h.layer] for h in hops] for k, v in self._layer_attrs.items()})
        self._reset_capturing_hooks()
        self._path = hops

    def _set_layer_attributes(self, values: Mapping[str, list[Any]]) -> None:
        for key, per_layer in values.items():
            setattr(self.model.config, key, per_layer)
        types = values.get("layer_types")
        if types is not None and isinstance(getattr(self._decoder, "has_sliding_layers", None), bool):
            self._decoder.has_sliding_layers = "sliding_attention" in types  # transformers caches this

    def _reset_capturing_hooks(self) -> None:
        """transformers installs its output-capturing hooks (``output_hidden_states``) once per model,
        flagging the model that did; the new shells need them again."""
        for module in (self.model, self._decoder):
            module.__dict__.pop(_HOOKS_FLAG, None)

    def path(self) -> list[Hop]:
        """The current path (a copy)."""
        return list(self._path)

    def restore(self) -> None:
        """Give the host back its own layers and config (the LayerPathModel is unusable afterwards)."""
        layers, n, attrs = self._original
        self._decoder.layers = layers
        self.model.config.num_hidden_layers = n
        self._set_layer_attributes(attrs)
        for module, flag in zip((self.model, self._decoder), self._original_flags):
            module.__dict__.pop(_HOOKS_FLAG, None)
            if flag is not None:  # the original layers still carry the hooks installed back then
                module.__dict__[_HOOKS_FLAG] = flag

    def describe(self) -> str:
        """The path as text: ``a:0 a:1 b:1x0.9 ...``."""
        parts = []
        for h in self._path:
            s = self.sources[h.layer]
            parts.append(f"{s.model}:{s.index}" + ("" if h.scale == 1.0 else f"x{h.scale:g}"))
        return " ".join(parts)

    # ------------------------------------------------------------------ materialising
    def _iter_materialized(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) in file order; tensors are the live ones (not copies)."""
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        host_state = self.model.state_dict()
        embed = self.model.get_input_embeddings().weight
        layers_done = False
        for name, tensor in host_state.items():
            if name.startswith(self._prefix):
                if not layers_done:
                    yield from self._iter_layers()
                    layers_done = True
                continue
            if tied and name == "lm_head.weight" and tensor.data_ptr() == embed.data_ptr():
                continue
            yield name, tensor
        if not layers_done:  # pragma: no cover - a model always has layers
            yield from self._iter_layers()

    def _iter_layers(self) -> Iterator[tuple[str, torch.Tensor]]:
        for pos, h in enumerate(self._path):
            for sub, tensor in self._layers[h.layer].state_dict().items():
                yield f"{self._prefix}{pos}.{sub}", tensor

    def state_dict_materialized(self) -> dict[str, torch.Tensor]:
        """The path model's weights as a plain checkpoint: layers copied in path order and named
        ``model.layers.{hop}.*``, plus the host's embeddings, final norm and lm_head."""
        return {name: t.detach().clone() for name, t in self._iter_materialized()}

    def export_config(self) -> dict[str, Any]:
        """config.json of the exported model (``input_scales``/``auto_map`` only for a scaled path)."""
        cfg = self.model.config.to_dict()
        cfg["num_hidden_layers"] = len(self._path)
        for key in self._attr_names:
            cfg[key] = list(getattr(self.model.config, key))
        for key in ("input_scales", "auto_map", "_name_or_path", "transformers_version"):
            cfg.pop(key, None)
        cls = type(self.model).__name__
        cfg["architectures"] = [cls]
        if any(h.scale != 1.0 for h in self._path):
            cfg["architectures"] = [f"EvoPath{cls}"]
            cfg["input_scales"] = [h.scale for h in self._path]
            cfg["auto_map"] = {"AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.EvoPath{cls}"}
        return cfg

    def model_card(self) -> str:
        rows = "\n".join(
            f"| {p} | {self.sources[h.layer].model} | {self.sources[h.layer].index} | {h.scale:g} |"
            for p, h in enumerate(self._path)
        )
        scaled = any(h.scale != 1.0 for h in self._path)
        note = (
            "\n**Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`**: the input "
            f"scales are applied by `{MODELING_FILE}`; without it transformers builds the plain "
            f"`{type(self.model).__name__}` and silently ignores them.\n" if scaled else ""
        )
        return (
            "---\nlibrary_name: transformers\ntags:\n- merge\n- evomerge\n- frankenmerge\n---\n"
            f"# Layer-path merge\n\nMade with evomerge: {len(self._path)} layers taken in this order from "
            f"the source models (embeddings, final norm and lm_head from `{self.host}`). The scale multiplies "
            f"the hidden state entering the layer.\n{note}\n"
            f"| hop | model | layer | scale |\n|---|---|---|---|\n{rows}\n"
        )

    def export(self, out_dir: str | Path, *, overwrite: bool = False, model_card: str | None = None,
               recipe_yaml: str | None = None) -> Path:
        """Write the path model as a Hugging Face folder (atomically); see the module docstring.
        ``recipe_yaml``: its passthrough recipe, written as ``mergekit_config.yml``."""
        cfg = self.export_config()
        scaled = "input_scales" in cfg
        modeling = _modeling_source(self.model, self._decoder) if scaled else None
        card = self.model_card() if model_card is None else model_card
        with tempfile.TemporaryDirectory(prefix="evopath-tok-") as tmp:
            tok_source = self._tokenizer_folder(Path(tmp))
            with CheckpointWriter(out_dir, config=cfg, tokenizer_source=tok_source, model_card=card,
                                  overwrite=overwrite, recipe_yaml=recipe_yaml) as writer:
                for name, tensor in self._iter_materialized():
                    writer.add(name, tensor)
                if modeling is not None:
                    (writer.tmp_dir / MODELING_FILE).write_text(modeling, encoding="utf-8")
                out = writer.close()
        return Path(out)

    def _tokenizer_folder(self, tmp: Path) -> Path | None:
        """The folder whose tokenizer / generation config files are copied into an export."""
        if self.tokenizer_source is not None and self.tokenizer_source.is_dir():
            return self.tokenizer_source
        wrote = False
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(tmp))
            wrote = True
        gen = getattr(self.model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(tmp))
            wrote = True
        return tmp if wrote else None

    def passthrough_recipe(self, refs: Mapping[str, str], *, dtype: str = "float32") -> tuple[Recipe, list[str]]:
        """:func:`passthrough_recipe` of the current path (host = this model's host)."""
        return passthrough_recipe(self._path, self.sources, refs, dtype=dtype, host=self.host)


# --------------------------------------------------------------------------- modeling file
_MODELING_TEMPLATE = '''"""{cls} whose decoder layers scale their input hidden state (written by evomerge).

config.input_scales[i] multiplies the hidden state entering decoder layer i (1.0 = unchanged),
as in Sakana AI's data-flow-space merges (EvoLLM-JP-10B's input_scales). This file imports only
transformers. Load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).
"""

from transformers import {cls}


def _scale_hook(scale):
    def hook(module, args, kwargs):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"] * scale
        return args, kwargs

    return hook


class EvoPath{cls}({cls}):
    def __init__(self, config):
        super().__init__(config)
        layers = self.{decoder}.layers
        scales = getattr(config, "input_scales", None)
        if scales is None:
            scales = [1.0] * len(layers)
        if len(scales) != len(layers):
            raise ValueError(f"config.input_scales has {{len(scales)}} entries for {{len(layers)}} layers")
        for layer, scale in zip(layers, scales):
            if float(scale) != 1.0:
                layer.register_forward_pre_hook(_scale_hook(float(scale)), with_kwargs=True)
'''


def _modeling_source(model: nn.Module, decoder: nn.Module) -> str:
    import transformers

    cls = type(model)
    if getattr(transformers, cls.__name__, None) is not cls:
        raise ConfigError(f"{cls.__name__}: a scaled path can only be exported for hosts whose class is part of "
                          "transformers")
    attr = next((n for n, m in model.named_children() if m is decoder), None)
    if attr is None:
        raise ConfigError(f"{cls.__name__}: decoder is not a direct child of the model")
    return _MODELING_TEMPLATE.format(cls=cls.__name__, decoder=attr)


# --------------------------------------------------------------------------- mergekit recipe
def passthrough_recipe(
    hops: Sequence[Hop | int | tuple[int, float]],
    sources: Sequence[SourceLayer],
    refs: Mapping[str, str],
    *,
    dtype: str = "float32",
    host: str | None = None,
) -> tuple[Recipe, list[str]]:
    """The path as a mergekit ``passthrough`` recipe, and warnings about what it cannot express.

    Consecutive hops through consecutive layers of one model become one slice
    (``layer_range: [a, b)``). ``refs`` maps model names to the references written in the recipe
    (folders or hub ids; an in-memory model must be saved first). Not expressible, hence warned:
    input scales != 1 (mergekit's passthrough ``scale`` multiplies weights, not the hidden state),
    and, when ``host`` is given, embeddings / final norm / lm_head from the host while the first /
    last hop comes from another model. :func:`annotated_yaml` writes the warnings as comments.
    """
    hops = [_as_hop(h) for h in hops]
    if not hops:
        raise ConfigError("path: at least one hop is needed")
    runs: list[list[Any]] = []  # [model, start, end]
    warnings: list[str] = []
    for i, h in enumerate(hops):
        if h.layer >= len(sources):
            raise ConfigError(f"path[{i}]: layer {h.layer} is out of range (there are {len(sources)} source layers)")
        src = sources[h.layer]
        if src.model not in refs:
            raise ConfigError(f"refs: no reference (folder or hub id) for model {src.model!r}")
        if h.scale != 1.0:
            warnings.append(
                f"hop {i} ({src.model} layer {src.index}): input scale {h.scale:g} is not in the recipe "
                "(mergekit's passthrough scale multiplies weights, not the hidden state); export the "
                "LayerPathModel for the exact model"
            )
        if runs and runs[-1][0] == src.model and runs[-1][2] == src.index:
            runs[-1][2] += 1
        else:
            runs.append([src.model, src.index, src.index + 1])
    if host is not None:
        first, last = sources[hops[0].layer].model, sources[hops[-1].layer].model
        if first != host:
            warnings.append(f"embeddings: the recipe takes them from {first!r} (first slice), the path model "
                            f"from the host {host!r}")
        if last != host:
            warnings.append(f"final norm and lm_head: the recipe takes them from {last!r} (last slice), the "
                            f"path model from the host {host!r}")
    data: dict[str, Any] = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": refs[m], "layer_range": [a, b]}]} for m, a, b in runs],
        "dtype": dtype,
    }
    if host is not None and host in refs and any(m == host for m, _, _ in runs):
        data["tokenizer_source"] = refs[host]
    return Recipe.from_dict(data, "passthrough recipe"), warnings


def annotated_yaml(recipe: Recipe, warnings: Sequence[str] = (), hops: Sequence[Hop] | None = None) -> str:
    """``recipe.to_yaml()`` preceded by the warnings (and the path's input scales) as comments."""
    lines = [f"# WARNING: {w}" for w in warnings]
    if hops is not None and any(h.scale != 1.0 for h in hops):
        lines.append(f"# input_scales (not applied by this recipe): {json.dumps([h.scale for h in hops])}")
    return "\n".join(lines) + ("\n" if lines else "") + recipe.to_yaml()
