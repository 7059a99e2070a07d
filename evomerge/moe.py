"""A mixture of experts from dense fine-tunes (mergekit-moe's ``moe``): each expert model's MLPs
become the experts of a Mixtral, Qwen2-MoE or Qwen3-MoE model; attention, norms and embeddings
come from the base; the routers are set from prompts (:mod:`evomerge.moe_gates`).

The MoE is built as a live transformers model (``assemble``), so a search can score it in memory
and rewrite its routers per trial; ``write_moe`` saves it with ``save_pretrained``.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

from evomerge.checkpoint import Checkpoint
from evomerge.engine import iter_merged, open_sources, plan_merge
from evomerge.errors import CheckpointError, ConfigError
from evomerge.moe_config import STUDY_PREFIX, ExpertConfig, MoEConfig
from evomerge.moe_gates import PROMPT_MODES, degenerate_layers, gate_vectors, prepare_tokenizer
from evomerge.recipe import Recipe

__all__ = ["OUTPUTS", "MemorySource", "MoEBuild", "OutputKind", "Source", "assemble", "gates_for", "open_source",
           "prepare", "recipe_source", "save_moe", "select_output", "write_moe"]

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_MLP = ("gate_proj", "up_proj", "down_proj")  # a dense layer's MLP: model.layers.N.mlp.<name>.weight


@dataclass(frozen=True)
class OutputKind:
    """An MoE architecture the experts can be written as."""

    name: str  # what `architecture:` matches by prefix (as mergekit-moe's names do)
    model_type: str  # transformers model type of the output
    inputs: tuple[str, ...]  # model types the base and experts may have
    shared_experts: int  # shared experts it needs (Qwen2-MoE: exactly one; the others none)
    experts_key: str  # config key of the expert count


OUTPUTS = (  # in preference order (mergekit-moe prefers Mixtral when several fit)
    OutputKind("mixtral", "mixtral", ("llama", "mistral"), 0, "num_local_experts"),
    OutputKind("qwen", "qwen2_moe", ("llama", "mistral", "qwen2"), 1, "num_experts"),
    OutputKind("qwen3", "qwen3_moe", ("qwen3",), 0, "num_experts"),
)


class Source(Protocol):
    """A dense model: ``ref``, ``config`` (config.json as a dict), ``path`` (its folder, for the
    tokenizer) and ``get(name)``. :class:`~evomerge.checkpoint.Checkpoint` is one."""

    ref: str
    path: Path
    config: dict[str, Any]

    def get(self, name: str) -> torch.Tensor: ...


@dataclass
class MemorySource:
    """A model built in memory (a study trial's merge)."""

    ref: str
    path: Path
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]

    def get(self, name: str) -> torch.Tensor:
        if name in self.tensors:
            return self.tensors[name]
        if name == "lm_head.weight" and "model.embed_tokens.weight" in self.tensors:
            return self.tensors["model.embed_tokens.weight"]
        raise CheckpointError(f"{self.ref}: tensor {name!r} not in the merged model")

    def close(self) -> None:
        self.tensors.clear()


@dataclass
class MoEBuild:
    """Everything ``assemble`` needs, opened and checked; nothing written yet."""

    config: MoEConfig
    kind: OutputKind
    base: Source
    experts: list[Source]
    shared: list[Source]

    def close(self) -> None:
        for s in {id(s): s for s in (self.base, *self.experts, *self.shared)}.values():
            s.close()


# --------------------------------------------------------------------------- sources
StudyRecipes = Callable[[str], "Recipe"]
"""Turns a ``study:NAME[#N]`` reference into that trial's recipe (see :mod:`evomerge.moe_studies`)."""


def open_source(ref: str, cfg: MoEConfig, cache: dict[str, Source], study_recipe: StudyRecipes | None = None) -> Source:
    """A model folder, or a ``study:NAME[#N]`` trial built in memory from its recipe."""
    if ref in cache:
        return cache[ref]
    if ref.startswith(STUDY_PREFIX):
        if study_recipe is None:
            raise ConfigError(f"source_model {ref!r}: study experts are not available here")
        source: Source = recipe_source(study_recipe(ref), ref, cfg.root)
    else:
        path = Path(ref).expanduser()
        local = path if path.is_absolute() else (cfg.root / path)
        source = Checkpoint.open(str(local) if local.exists() else ref)
    cache[ref] = source
    return source


def recipe_source(recipe: Recipe, ref: str, root: Path | None = None) -> MemorySource:
    """The model of a merge ``recipe``, built in memory."""
    sources = open_sources(recipe, root)
    try:
        plan = plan_merge(recipe, sources)
        tensors = {n: t.cpu() for n, t in iter_merged(plan, sources)}
        path = sources[plan.tokenizer_source].path
    finally:
        for ck in sources.values():
            ck.close()
    logger.info("%s: built in memory", ref)
    return MemorySource(ref, Path(path), dict(plan.config), tensors)


def select_output(cfg: MoEConfig, model_types: dict[str, str]) -> OutputKind:
    """The output architecture for these models (``model_types``: reference -> model type)."""
    types = set(model_types.values())
    if len(types) != 1:
        listed = ", ".join(f"{r} ({t})" for r, t in model_types.items())
        raise ConfigError(f"experts: the base and every expert must have one architecture, got {listed}")
    (model_type,) = types
    candidates = [k for k in OUTPUTS if not cfg.architecture or k.name.startswith(cfg.architecture.lower())]
    if not candidates:
        raise ConfigError(f"architecture: {cfg.architecture!r} is not one of {', '.join(k.name for k in OUTPUTS)}")
    n_shared = len(cfg.shared_experts or [])
    for kind in candidates:
        if model_type in kind.inputs and n_shared == kind.shared_experts:
            return kind
    fits = "; ".join(f"{k.name}: {'/'.join(k.inputs)} models, {k.shared_experts} shared expert(s)" for k in candidates)
    raise ConfigError(f"base_model: no MoE output takes {model_type} models with {n_shared} shared expert(s) ({fits})")


def prepare(cfg: MoEConfig, study_recipe: StudyRecipes | None = None,
            sources: dict[str, Source] | None = None) -> MoEBuild:
    """Open the base and experts (``sources`` holds any already open, by reference) and check
    they fit one output architecture."""
    cache: dict[str, Source] = dict(sources or {})
    try:
        base = open_source(cfg.base_model, cfg, cache, study_recipe)
        experts = [open_source(e.source_model, cfg, cache, study_recipe) for e in cfg.experts]
        shared = [open_source(e.source_model, cfg, cache, study_recipe) for e in cfg.shared_experts or []]
        types = {s.ref: str(s.config.get("model_type")) for s in (base, *experts, *shared)}
        kind = select_output(cfg, types)
        if len({e.source_model for e in cfg.experts}) == 1 and len(cfg.experts) > 1:
            logger.warning("every expert is the same model: the MoE computes what that model computes, at more cost")
    except BaseException:
        for s in cache.values():
            s.close()
        raise
    return MoEBuild(cfg, kind, base, experts, shared)


# --------------------------------------------------------------------------- config and gates
def _pretrained_config(config: dict[str, Any]):
    from transformers import AutoConfig

    data = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **data)


def output_dtype(cfg: MoEConfig, base_config: dict[str, Any]) -> torch.dtype:
    """``dtype`` of the config, else the base's, else float32."""
    name = cfg.dtype or base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    return _DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def output_config(kind: OutputKind, base_config: dict[str, Any], num_experts: int, experts_per_token: int):
    """The output model's transformers config: the base's settings in the MoE's config class."""
    from transformers import AutoConfig, MistralConfig

    base = _pretrained_config(base_config)
    if kind.model_type == "mixtral" and base.model_type != "mistral":
        mistral = MistralConfig(**base.to_dict())
        mistral.sliding_window = None
        mistral.max_position_embeddings = base.max_position_embeddings
        base = mistral
    data = {k: v for k, v in base.to_dict().items() if k != "model_type"}
    out = AutoConfig.for_model(kind.model_type, **data)
    out.architectures = [type(out).__name__.replace("Config", "ForCausalLM")]
    setattr(out, kind.experts_key, num_experts)
    out.num_experts_per_tok = experts_per_token
    if kind.model_type == "mixtral":
        out.sliding_window = None
    else:
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.moe_intermediate_size = out.intermediate_size
    if kind.model_type == "qwen2_moe":
        out.sliding_window = None
        out.use_sliding_window = False
        out.shared_expert_intermediate_size = out.intermediate_size
    return out


def dense_model(source: Source, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    if isinstance(source, MemorySource):
        model = AutoModelForCausalLM.from_config(_pretrained_config(source.config), dtype=dtype)
        state = {k: v.to(dtype) for k, v in source.tensors.items()}
        model.load_state_dict(state, strict=False)
        return model.eval()
    return AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype).eval()


def load_tokenizer(source: Source):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(source.path))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{source.path}: no usable tokenizer for the router prompts ({exc})") from exc


def gates_for(build: MoEBuild, tokenizer, *, base_model: torch.nn.Module | None = None) -> torch.Tensor:
    """(num_layers, routed + shared experts, hidden) gate vectors for ``build``'s prompts. Hidden
    modes run the base in bfloat16 (as mergekit-moe does) unless ``base_model`` is given."""
    cfg = build.config
    base_cfg = _pretrained_config(build.base.config)
    prompts = [e.prompts() for e in cfg.all_experts()]
    common = dict(num_layers=base_cfg.num_hidden_layers, hidden_size=base_cfg.hidden_size, tokenizer=tokenizer)
    if cfg.gate_mode == "cheap_embed":
        return gate_vectors(cfg.gate_mode, prompts, embed=build.base.get("model.embed_tokens.weight"), **common)
    if cfg.gate_mode in PROMPT_MODES:
        model = base_model if base_model is not None else dense_model(build.base, torch.bfloat16)
        return gate_vectors(cfg.gate_mode, prompts, model=model, **common)
    return gate_vectors(cfg.gate_mode, prompts, generator=torch.Generator().manual_seed(cfg.seed), **common)


# --------------------------------------------------------------------------- assembling
def _expert_mlp(source: Source, expert: ExpertConfig, layer: int,
                generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for name in _MLP:
        t = source.get(f"model.layers.{layer}.mlp.{name}.weight")
        if expert.noise_scale is not None:
            t = t + torch.randn(t.shape, generator=generator, dtype=t.dtype) * expert.noise_scale
        if name == "down_proj" and expert.residual_scale is not None:
            t = t * expert.residual_scale
        out[name] = t
    return out


@torch.no_grad()
def assemble(build: MoEBuild, gates: torch.Tensor) -> torch.nn.Module:
    """The MoE as a live transformers model: the base's non-MLP tensors, each expert's MLPs, and
    ``gates`` (num_layers, routed + shared experts, hidden) as the routers."""
    from transformers import AutoModelForCausalLM

    cfg = build.config
    dtype = output_dtype(cfg, build.base.config)
    out_cfg = output_config(build.kind, build.base.config, len(cfg.experts), cfg.experts_per_token)
    out_cfg.dtype = dtype
    model = AutoModelForCausalLM.from_config(out_cfg, dtype=dtype)
    n = len(cfg.experts)
    generator = torch.Generator().manual_seed(cfg.seed)
    layers: dict[int, list[dict[str, torch.Tensor]]] = {}

    def experts_of(layer: int) -> list[dict[str, torch.Tensor]]:
        if layer not in layers:
            layers.clear()
            pairs = [*zip(build.experts, cfg.experts), *zip(build.shared, cfg.shared_experts or [])]
            layers[layer] = [_expert_mlp(s, e, layer, generator) for s, e in pairs]
        return layers[layer]

    for name, param in model.state_dict().items():
        param.copy_(_tensor_for(name, param, build, experts_of, gates, n).to(param.dtype))
    return model.eval()


def _tensor_for(name: str, param: torch.Tensor, build: MoEBuild, experts_of, gates: torch.Tensor,
                n: int) -> torch.Tensor:
    parts = name.split(".")
    if len(parts) > 4 and parts[:2] == ["model", "layers"] and parts[3] == "mlp":
        layer, rest = int(parts[2]), ".".join(parts[4:])
        mlps = experts_of(layer)
        if rest == "gate.weight":
            return gates[layer, :n]  # (num_experts, hidden)
        if rest == "experts.gate_up_proj":  # (num_experts, 2 * intermediate, hidden)
            return torch.stack([torch.cat([m["gate_proj"], m["up_proj"]], dim=0) for m in mlps[:n]])
        if rest == "experts.down_proj":  # (num_experts, hidden, intermediate)
            return torch.stack([m["down_proj"] for m in mlps[:n]])
        if rest == "shared_expert_gate.weight":
            return gates[layer, n:]  # (1, hidden)
        if rest.startswith("shared_expert."):
            return mlps[n][rest.split(".")[1]]
        raise CheckpointError(f"{build.kind.model_type}: unexpected MoE tensor {name!r}")
    try:
        return build.base.get(name)
    except CheckpointError:
        if name.endswith("_proj.bias") and ".self_attn." in name:
            return torch.zeros_like(param)  # Qwen2-MoE has attention biases a Llama base lacks
        raise


def write_moe(cfg: MoEConfig, out_dir: str | Path, *, overwrite: bool = False,
              study_recipe: StudyRecipes | None = None) -> Path:
    """Build the MoE of ``cfg`` and save it (config, safetensors, tokenizer) to ``out_dir``
    atomically. Every check runs before anything is written."""
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not overwrite)):
        raise CheckpointError(f"{out}: output folder exists and is not empty (pass --overwrite to replace it)")
    build = prepare(cfg, study_recipe)
    try:
        tokenizer = prepare_tokenizer(load_tokenizer(build.base))
        gates = gates_for(build, tokenizer)
        bad = degenerate_layers(gates)
        if bad:
            logger.warning("layers %s have nearly dependent gate vectors: the prompts may be too similar", bad)
        model = assemble(build, gates)
    finally:
        build.close()
    save_moe(model, tokenizer, out, cfg)
    logger.debug("wrote %s (%s, %d experts, %d per token)", out, build.kind.model_type, len(cfg.experts),
                 cfg.experts_per_token)
    return out


def save_moe(model: torch.nn.Module, tokenizer, out: Path, cfg: MoEConfig | None = None) -> Path:
    """``save_pretrained`` the model and tokenizer into ``out`` via a sibling temp folder."""
    out = Path(out).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if cfg is not None:
            (tmp / "evomerge_moe.yml").write_text(_config_yaml(cfg))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _config_yaml(cfg: MoEConfig) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json", exclude={"root"}, exclude_none=True), sort_keys=False)
