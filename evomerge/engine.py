"""The merge engine: a recipe becomes a plan (one task per output tensor, parameters resolved),
and the plan is executed tensor by tensor, on CPU or CUDA, in float32 by default.

Planning reads only shapes and configs, so every error in a recipe (missing parameter, layer
range out of bounds, mismatched shapes or architectures, bad epsilon) is raised before any
tensor is loaded or anything is written.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
import yaml
from torch import Tensor

from evomerge.chat_template import tokenizer_with_template
from evomerge.checkpoint import DEFAULT_SHARD_BYTES, Checkpoint, CheckpointWriter
from evomerge.errors import CheckpointError, ConfigError, MergeError
from evomerge.methods import Method, run_method
from evomerge.recipe import OutputSlice, Params, Recipe, SliceSource, TokenSource, evaluate
from evomerge.sources import open_model, parse_reference
from evomerge.tokenizer import Vocabulary, build_vocabulary
from evomerge.vocabulary import AlignedCheckpoint, Aligner
from evomerge.statistics import Statistics, statistics_for

log = logging.getLogger(__name__)

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

TensorRef = tuple[str, str]  # (model reference, tensor name in that model)


@dataclass(frozen=True)
class TensorTask:
    """How one output tensor is made."""

    out_name: str
    base: TensorRef | None  # the base model's tensor, for methods that use one
    inputs: tuple[TensorRef, ...]  # the other models' tensors (all sources when the base is unused)
    params: dict[str, Any]  # globals as scalars, per-model parameters as lists aligned with inputs
    is_embed: bool = False
    layer: int | None = None  # output layer index, None for embeddings/norm/head


@dataclass
class MergePlan:
    recipe: Recipe
    method: Method
    tasks: list[TensorTask]
    num_layers: int
    config: dict[str, Any]  # config.json of the output model
    tokenizer_source: str  # model reference whose tokenizer is copied
    out_dtype: torch.dtype


# --------------------------------------------------------------------------- sources
def open_sources(recipe: Recipe, relative_to: Path | None = None, *,
                 allow_crimes: bool = False) -> dict[str, Checkpoint]:
    """Open every model the recipe references (lazily: configs and tensor indexes only; a
    ``model+lora`` reference is built in memory). References are parsed first, so a malformed one
    fails before any model is read. ``allow_crimes`` (mergekit-yaml's ``--allow-crimes``): merge
    models of different architectures by the first model's weight names (shapes must still agree)."""
    refs = recipe.referenced_models()
    for ref in refs:
        parse_reference(ref, relative_to)
    sources: dict[str, Checkpoint] = {}
    try:
        for ref in refs:
            sources[ref] = open_model(ref, relative_to)
    except BaseException:
        for ck in sources.values():
            ck.close()
        raise
    arches = {ck.arch.name for ck in sources.values()}
    if len(arches) > 1:
        desc = ", ".join(f"{ref} ({ck.arch.name})" for ref, ck in sources.items())
        if not allow_crimes:
            raise CheckpointError(f"models have different architectures: {desc} (`evomerge merge --allow-crimes` merges them anyway)")
        log.warning("merging models of different architectures (--allow-crimes): %s", desc)
    return sources


# --------------------------------------------------------------------------- vocabularies
def vocabulary_rows(ck: Checkpoint) -> int:
    """How many tokens a model has rows for: config.json's vocab_size, else its embedding rows."""
    for cfg in (ck.config, ck.config.get("text_config") or {}):
        n = cfg.get("vocab_size") if isinstance(cfg, dict) else None
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n
    embed = next((s for s in ck.arch.pre_weights if s.is_embed), None)
    if embed is None:
        raise CheckpointError(f"{ck.path}: no vocab_size in config.json and no embedding tensor")
    return ck.shape(embed.name)[0]


def recipe_vocabulary(recipe: Recipe, sources: Mapping[str, Checkpoint]) -> Vocabulary | None:
    """The output tokenizer the recipe asks for (``tokenizer_source`` or ``tokenizer``), with every
    model's row mapping; None when the recipe just copies the base's tokenizer."""
    source = recipe.vocabulary_source
    if source is None:
        return None
    models = recipe.referenced_models()
    block = recipe.tokenizer
    return build_vocabulary(source, recipe.base_model or models[0], models,
                            {m: sources[m].path for m in models}, {m: vocabulary_rows(sources[m]) for m in models},
                            add_tokens=list((block.tokens or {}) if block else ()),
                            pad_to_multiple_of=block.pad_to_multiple_of if block else None)


def aligned_sources(sources: Mapping[str, Any], vocab: Vocabulary, *, groups: Callable[[str], list[str]],
                    base: str | None, tokens: Mapping[str, TokenSource] | None = None,
                    dtype: str | None = None) -> dict[str, Any]:
    """``sources`` with their vocabulary tensors moved into ``vocab`` (see :mod:`evomerge.vocabulary`):
    ``groups(name)`` gives the models merged into tensor ``name``, whose rows set the defaults;
    ``base`` the base model, ``tokens`` the recipe's ``tokenizer.tokens``, ``dtype`` the recipe's."""
    first = next(iter(sources.values()))
    names = [s.name for s in (*first.arch.pre_weights, *first.arch.post_weights) if s.is_embed]
    aligner = Aligner(vocab, sources, names=names, group=groups, base=base, tokens=tokens,
                      dtype=TORCH_DTYPES[dtype] if dtype else None)
    return {ref: AlignedCheckpoint(ck, ref, aligner) for ref, ck in sources.items()}


def task_groups(plan: MergePlan) -> dict[str, list[str]]:
    """The models merged into each vocabulary tensor of ``plan``."""
    return {t.out_name: [r[0] for r in ([t.base] if t.base else []) + list(t.inputs)]
            for t in plan.tasks if t.is_embed}


def prepare(recipe: Recipe, relative_to: Path | None = None, *,
            allow_crimes: bool = False) -> tuple[MergePlan, dict[str, Any], Vocabulary | None]:
    """Open the sources, plan the merge and, when the recipe builds a vocabulary, move every
    model's vocabulary rows into it. The caller closes the returned sources."""
    sources = open_sources(recipe, relative_to, allow_crimes=allow_crimes)
    try:
        plan = plan_merge(recipe, sources)
        vocab = recipe_vocabulary(recipe, sources)
        if vocab is None:
            return plan, dict(sources), None
        groups = task_groups(plan)
        plan.config["vocab_size"] = vocab.size
        aligned = aligned_sources(sources, vocab, groups=lambda name: groups.get(name, list(sources)),
                                  base=recipe.base_model, tokens=recipe.tokenizer.tokens if recipe.tokenizer else None,
                                  dtype=recipe.dtype)
        return plan, aligned, vocab
    except BaseException:
        for ck in sources.values():
            ck.close()
        raise


# --------------------------------------------------------------------------- planning
def _as_slices(recipe: Recipe, sources: Mapping[str, Checkpoint]) -> list[OutputSlice]:
    if recipe.slices:
        return list(recipe.slices)
    srcs = [SliceSource(model=m.model, layer_range=(0, sources[m.model].num_layers), parameters=m.parameters)
            for m in recipe.models or []]
    if recipe.base_model and recipe.method.base != "unused" and recipe.base_model not in [s.model for s in srcs]:
        srcs.append(SliceSource(model=recipe.base_model, layer_range=(0, sources[recipe.base_model].num_layers)))
    return [OutputSlice(sources=srcs)]


def _lookup(name: str, model: str | None, tensor: str, t: float, recipe: Recipe,
            out_slice: OutputSlice, model_params: Mapping[str, Params | None]) -> Any:
    """mergekit's precedence: the model's own parameters, then the slice's, then the global ones."""
    blocks: list[Params | None] = []
    if model is not None:
        blocks.append(model_params.get(model))
    blocks += [out_slice.parameters, recipe.parameters]
    for block in blocks:
        if block and name in block:
            value = evaluate(block[name], tensor, t)
            if value is not None:
                return value
    return None


def _whole(p: Any, value: Any, tensor: str) -> Any:
    """An integer parameter's value as an int; a gradient that interpolates to a fraction is an
    error, as in mergekit."""
    if p.kind is not int or value is None:
        return value
    if not float(value).is_integer():
        raise ConfigError(f"parameters.{p.name}: expected an integer, got {value:g} for {tensor} "
                          f"(a gradient between different integers gives fractions)")
    return int(value)


def _resolve_params(method: Method, recipe: Recipe, out_slice: OutputSlice, tensor: str, t: float,
                    models: list[str], model_params: Mapping[str, Params | None], base: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for p in method.global_params:
        value = _lookup(p.name, None, tensor, t, recipe, out_slice, model_params)
        if value is None:
            if p.required:
                raise ConfigError(f"parameters.{p.name}: required by {method.name} (missing for {tensor})")
            value = p.default
        params[p.name] = _whole(p, value, tensor)
    for p in method.model_params:
        values = []
        for m in models:
            value = _lookup(p.name, m, tensor, t, recipe, out_slice, model_params)
            if value is None:
                if p.required and m != base:
                    raise ConfigError(f"{p.name}: required by {method.name} for model {m} (missing for {tensor})")
                value = p.default
            values.append(_whole(p, value, tensor))
        params[p.name] = values
    for check in method.extra_checks:
        problem = check(params)
        if problem:
            raise MergeError(f"{tensor}: {problem}")
    return params


def plan_merge(recipe: Recipe, sources: Mapping[str, Checkpoint]) -> MergePlan:
    """Resolve every output tensor's sources and parameters; check shapes and layer ranges."""
    method = recipe.method
    slices = _as_slices(recipe, sources)
    first = sources[slices[0].sources[0].model]
    arch = first.arch
    tasks: list[TensorTask] = []

    def add(out_name: str, refs: list[TensorRef], out_slice: OutputSlice, t: float,
            model_params: Mapping[str, Params | None], layer: int | None, is_embed: bool = False) -> None:
        base_ref = out_slice.base_model or recipe.base_model
        if method.base in ("unused", "input"):
            base, inputs = None, refs
        else:
            base = next((r for r in refs if r[0] == base_ref), None)
            inputs = [r for r in refs if r[0] != base_ref]
            if method.base == "required" and base is None:
                raise ConfigError(f"base_model: {base_ref!r} is not among the sources of {out_name}")
        params = _resolve_params(method, recipe, out_slice, out_name, t, [r[0] for r in inputs],
                                 model_params, base_ref)
        _check_shapes(out_name, ([base] if base else []) + list(inputs), sources, is_embed)
        tasks.append(TensorTask(out_name, base, tuple(inputs), params, is_embed, layer))

    def present(spec, refs: list[TensorRef]) -> bool:
        if not spec.optional:
            return True
        return any(sources[m].has(name) for m, name in refs)

    # embeddings and other tensors before the first layer: sources of the first slice, t = 0
    s0 = slices[0]
    mp0 = {s.model: s.parameters for s in s0.sources}
    for spec in arch.pre_weights:
        refs = [(s.model, spec.name) for s in s0.sources]
        if present(spec, refs):
            add(spec.name, refs, s0, 0.0, mp0, None, spec.is_embed)

    out_layer = 0
    for i, out_slice in enumerate(slices):
        lengths = {s.layer_range[1] - s.layer_range[0] for s in out_slice.sources}
        if len(lengths) != 1:
            raise ConfigError(f"slices.{i}.sources: every source must span the same number of layers")
        for j, src in enumerate(out_slice.sources):
            n = sources[src.model].num_layers
            if src.layer_range[1] > n:
                raise ConfigError(
                    f"slices.{i}.sources.{j}.layer_range: [{src.layer_range[0]}, {src.layer_range[1]}] is out of "
                    f"bounds for {src.model}, which has {n} layers (expected end <= {n})")
        n_layers = lengths.pop()
        mp = {s.model: s.parameters for s in out_slice.sources}
        for k in range(n_layers):
            t = k / (n_layers - 1) if n_layers > 1 else 1.0
            out_names = arch.layer_weight_names(out_layer)
            in_names = {s.model: arch.layer_weight_names(s.layer_range[0] + k) for s in out_slice.sources}
            for idx, spec in enumerate(arch.layer_weights):
                refs = [(s.model, in_names[s.model][idx]) for s in out_slice.sources]
                if present(spec, refs):
                    add(out_names[idx], refs, out_slice, t, mp, out_layer)
            out_layer += 1

    # final norm and head: sources of the last slice, t = 0 (as mergekit)
    sl = slices[-1]
    mpl = {s.model: s.parameters for s in sl.sources}
    for spec in arch.post_weights:
        refs = [(s.model, spec.name) for s in sl.sources]
        if present(spec, refs):
            add(spec.name, refs, sl, 0.0, mpl, None, spec.is_embed)

    config_source = recipe.base_model or s0.sources[0].model
    config = dict(sources[config_source].config)
    config[arch.num_layers_key] = out_layer
    head = arch.tied_head()
    if head is not None:  # say what the tensors are: a separate head is written, or the embeddings serve
        config["tie_word_embeddings"] = not any(task.out_name == head.name for task in tasks)
    out_dtype_name = recipe.out_dtype or recipe.dtype
    if out_dtype_name:
        out_dtype = TORCH_DTYPES[out_dtype_name]
    else:  # keep the stored dtype of the models
        ref = tasks[0].base or tasks[0].inputs[0]
        out_dtype = sources[ref[0]].dtype(ref[1])
    tok = recipe.vocabulary_source
    if tok in (None, "base", "union"):
        tok = recipe.base_model or recipe.referenced_models()[0]
    elif tok not in sources:
        raise ConfigError(f"tokenizer_source: {tok!r} is not one of the recipe's models")
    return MergePlan(recipe, method, tasks, out_layer, config, tok, out_dtype)


def _check_shapes(name: str, refs: list[TensorRef], sources: Mapping[str, Checkpoint], is_embed: bool) -> None:
    shapes = {m: sources[m].shape(t) for m, t in refs}
    distinct = set(shapes.values())
    if len(distinct) <= 1:
        return
    if is_embed and len({s[1:] for s in distinct}) == 1:
        return  # vocabularies of different sizes: rows are truncated to the smallest (mergekit does too)
    desc = ", ".join(f"{m}: {list(s)}" for m, s in shapes.items())
    raise MergeError(f"{name}: tensor shapes differ between models ({desc})")


# --------------------------------------------------------------------------- execution
def tensor_seed(recipe_seed: int, tensor_name: str, model_index: int) -> int:
    """A stable 63-bit seed per (recipe seed, output tensor, model): masks never depend on the
    order tensors are merged in, on global RNG state, or on the process."""
    digest = hashlib.sha256(f"{recipe_seed}:{tensor_name}:{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generators_for(task: TensorTask, method: Method, seed: int, device: torch.device) -> list[torch.Generator] | None:
    if not method.stochastic:
        return None
    return [torch.Generator(device=device).manual_seed(tensor_seed(seed, task.out_name, i))
            for i in range(len(task.inputs))]


def all_finite(t: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: no NaN or inf in ``t``. One reduction (``aminmax`` propagates NaN) instead
    of ``isfinite(t).all()``, whose boolean temporary made it cost as much as a whole linear merge
    on CPU (297 ms vs 21 ms per 99M float32 elements, 2-core machine)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


def execute_task(task: TensorTask, method: Method, fetch: Callable[[TensorRef], Tensor], *, seed: int,
                 device: torch.device, compute_dtype: torch.dtype = torch.float32,
                 stats: Statistics | None = None) -> Tensor:
    """Merge one tensor; returns it in ``compute_dtype`` on ``device``. ``stats``: the
    statistics a method with ``needs`` reads (see :func:`load_statistics`)."""
    base = fetch(task.base).to(device=device, dtype=compute_dtype) if task.base else None
    xs = [fetch(r).to(device=device, dtype=compute_dtype) for r in task.inputs]
    if task.is_embed:
        rows = min(x.shape[0] for x in ([base] if base is not None else []) + xs)
        if (base is not None and base.shape[0] != rows) or any(x.shape[0] != rows for x in xs):
            log.warning("%s: vocabulary sizes differ; keeping the first %d rows", task.out_name, rows)
            base = base[:rows] if base is not None else None
            xs = [x[:rows] for x in xs]
    per_model = None
    if method.needs:
        if stats is None:
            raise MergeError(f"{task.out_name}: merge_method {method.name} needs {method.needs} statistics")
        per_model = [stats.get(m, name) for m, name in task.inputs]
    try:
        out = run_method(method, base, xs, task.params, generators_for(task, method, seed, device), per_model)
    except ValueError as e:  # a method's own error about these tensors (e.g. cancelling directions)
        raise MergeError(f"{task.out_name}: {e}") from None
    if not all_finite(out):
        raise MergeError(f"{task.out_name}: the merge produced non-finite values (NaN or inf)")
    return out


def load_statistics(recipe: Recipe, sources: Mapping[str, Checkpoint], *, device: str | torch.device = "cpu",
                    relative_to: Path | None = None) -> Statistics | None:
    """The statistics the recipe's method ``needs`` (None if none), from the recipe's
    ``calibration`` data: read from the statistics cache, or computed and cached."""
    need = recipe.method.needs
    if need is None:
        return None
    if recipe.calibration is None:  # Recipe validation refuses this; kept for hand-built recipes
        raise ConfigError(f"calibration: merge_method {recipe.merge_method} needs calibration data")
    cal = recipe.calibration.resolved(relative_to)
    return statistics_for(need, {ref: ck.path for ref, ck in sources.items()}, cal, device=device)


def iter_merged(plan: MergePlan, sources: Mapping[str, Checkpoint], *, device: str | torch.device = "cpu",
                compute_dtype: torch.dtype = torch.float32, seed: int | None = None,
                stats: Statistics | None = None) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(name, tensor)`` for every output tensor, in ``plan.out_dtype`` on ``device``."""
    device = torch.device(device)
    seed = plan.recipe.seed if seed is None else seed

    def fetch(ref: TensorRef) -> Tensor:
        return sources[ref[0]].get(ref[1], device=device)

    for task in plan.tasks:
        out = execute_task(task, plan.method, fetch, seed=seed, device=device, compute_dtype=compute_dtype,
                           stats=stats)
        yield task.out_name, out.to(plan.out_dtype)


def resolve_device(device: str) -> torch.device:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device: expected cpu, cuda or cuda:N, got {device!r}") from None


def model_card(recipe: Recipe, recipe_yaml: str | None = None) -> str:
    """README.md of a merged model: Hub front matter (``base_model:`` the recipe's models, tags),
    the models and the recipe (``recipe_yaml``, the text as written, else the recipe dumped)."""
    refs = recipe.referenced_models()
    front = yaml.safe_dump({"base_model": refs, "library_name": "transformers",
                            "tags": ["merge", "mergekit", "evomerge"]}, sort_keys=False)
    models = "\n".join(f"- `{m}`" for m in refs)
    base = f" with `{recipe.base_model}` as the base" if recipe.base_model else ""
    text = recipe_yaml if recipe_yaml is not None else recipe.to_yaml()
    return (
        f"---\n{front}---\n"
        f"# Merged model\n\nMade with evomerge using `{recipe.merge_method}`{base}. The recipe is also in "
        f"`mergekit_config.yml`: rebuild with `evomerge merge mergekit_config.yml OUT` or `mergekit-yaml`.\n\n"
        f"## Models\n\n{models}\n\n## Recipe\n\n```yaml\n{text.rstrip()}\n```\n"
    )


def merge_to_dir(recipe: Recipe, out_dir: str | Path, *, device: str = "cpu", seed: int | None = None,
                 relative_to: Path | None = None, overwrite: bool = False,
                 progress: Callable[[int, int, str], None] | None = None, recipe_yaml: str | None = None,
                 copy_tokenizer: bool = True, write_card: bool = True,
                 max_shard_bytes: int = DEFAULT_SHARD_BYTES, allow_crimes: bool = False,
                 stats: Statistics | None = None) -> Path:
    """Build the recipe's model and write it (sharded safetensors, config, tokenizer, card, the
    recipe as ``mergekit_config.yml``) to ``out_dir`` atomically. Every check runs before anything
    is written. ``recipe_yaml``: the recipe's text as the user wrote it (default: dumped).
    ``stats``: statistics already loaded (:func:`load_statistics`); default: loaded here when the
    method needs them."""
    dev = resolve_device(device)
    if seed is not None:
        recipe = recipe.model_copy(update={"random_seed": seed})
        recipe_yaml = None  # the file's text no longer says what was built
    text = recipe_yaml if recipe_yaml is not None else recipe.to_yaml()
    plan, sources, vocab = prepare(recipe, relative_to, allow_crimes=allow_crimes)
    try:
        if stats is None:
            stats = load_statistics(recipe, sources, device=dev, relative_to=relative_to)
        t0 = time.perf_counter()
        tok_path = sources[plan.tokenizer_source].path if copy_tokenizer else None
        tokenizer = vocab.tokenizer if vocab is not None and copy_tokenizer else None
        if recipe.chat_template and tok_path is not None:
            refs = list(dict.fromkeys([*([recipe.base_model] if recipe.base_model else []),
                                       *recipe.referenced_models()]))
            tokenizer = tokenizer_with_template(recipe.chat_template, [(m, sources[m].path) for m in refs],
                                                tok_path, tokenizer)
        elif recipe.chat_template:
            log.warning("chat_template: not written (--no-copy-tokenizer writes no tokenizer)")
        with CheckpointWriter(out_dir, config=plan.config, tokenizer_source=tok_path,
                              model_card=model_card(recipe, text) if write_card else None, overwrite=overwrite,
                              recipe_yaml=text, max_shard_bytes=max_shard_bytes, tokenizer=tokenizer) as writer:
            for i, (name, tensor) in enumerate(iter_merged(plan, sources, device=dev, stats=stats)):
                writer.add(name, tensor.cpu())
                if progress:
                    progress(i + 1, len(plan.tasks), name)
        if stats is not None:
            log.info("statistics %.1f s (0 = from the cache), merge %.1f s", stats.seconds, time.perf_counter() - t0)
        return Path(out_dir)
    finally:
        for ck in sources.values():
            ck.close()


def merge_in_memory(recipe: Recipe, *, device: str = "cpu", relative_to: Path | None = None) -> dict[str, Tensor]:
    """The merged state dict (tests, small models)."""
    plan, sources, _ = prepare(recipe, relative_to)
    try:
        dev = resolve_device(device)
        stats = load_statistics(recipe, sources, device=dev, relative_to=relative_to)
        return dict(iter_merged(plan, sources, device=dev, stats=stats))
    finally:
        for ck in sources.values():
            ck.close()
