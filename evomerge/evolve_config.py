"""mergekit-evolve configs (``genome:`` + ``tasks:``) read as evomerge search configs.

mergekit-evolve (mergekit 0.1.5, ``mergekit/evo/config.py`` and ``genome.py``) searches one value
of each method parameter per model and per *block* of ``layer_granularity`` layers (0: one block
for the whole model), optionally one set per tensor-name filter plus one for the rest, with CMA-ES.
evomerge's search space says the same with ``merge.layer_groups`` (the number of blocks),
``merge.split_attn_mlp`` (the ``self_attn`` filter) and ``sampler: cmaes``. :func:`to_native`
maps one to the other and says, one line each, how every field was read; a field with no
evomerge equivalent is refused with one line naming it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import yaml

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.files import read_yaml

log = logging.getLogger(__name__)

GENOME_KEYS = {"models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
               "allow_negative_weights", "filters", "smooth"}
TOP_KEYS = {"genome", "tasks", "limit", "num_fewshot", "shuffle", "random_init", "apply_chat_template",
            "fewshot_as_multiturn"}
# the parameters mergekit-evolve searches per method (its genome's parameter map)
SEARCHED = {"linear": ["weight"], "task_arithmetic": ["weight"], "ties": ["weight", "density"],
            "dare_ties": ["weight", "density"], "slerp": ["t"]}
NORMALIZED_BY_DEFAULT = {"linear", "ties", "dare_ties"}  # mergekit-evolve's normalize when unset
MAX_FEVALS = 100  # mergekit-evolve's --max-fevals default: the trial budget


def is_evolve_config(data: Any) -> bool:
    """A mergekit-evolve config: ``genome:`` and ``tasks:`` at the top, no evomerge ``study:``."""
    return isinstance(data, dict) and "genome" in data and "tasks" in data and "study" not in data


def _num_layers(ref: str, root: Path) -> int:
    """The layer count of a genome model, from its config.json (a folder relative to the current
    folder, as mergekit reads it, or to the config's folder; or a Hub id in the local cache)."""
    candidates = [Path(ref).expanduser(), root / ref]
    path = next((p / "config.json" for p in candidates if (p / "config.json").is_file()), None)
    if path is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref, "config.json")
            path = Path(cached) if isinstance(cached, str) else None
        except Exception:  # noqa: BLE001 - not a hub id
            path = None
    if path is None:
        raise ConfigError(f"genome.models: cannot read the layer count of {ref!r} (no config.json in a local folder "
                          "or the Hugging Face cache), needed to turn layer_granularity into layer_groups")
    cfg = json.loads(path.read_text())
    cfg = cfg.get("text_config", cfg) if "num_hidden_layers" not in cfg else cfg
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(cfg.get(key), int):
            return cfg[key]
    raise ConfigError(f"{path}: no num_hidden_layers; cannot turn layer_granularity into layer_groups")


def _model_names(refs: list[str]) -> dict[str, str]:
    """Short unique names for the genome's models: the last path component, numbered on a clash."""
    names: dict[str, str] = {}
    for ref in refs:
        stem = Path(ref.rstrip("/")).name or "model"
        name, k = stem, 2
        while name in names:
            name, k = f"{stem}_{k}", k + 1
        names[name] = ref
    return names


def _ref(value: Any, where: str) -> str:
    """A model reference: a string, or mergekit's ``{model: ...}`` form without a LoRA."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("model"), str) and set(value) <= {"model"}:
        return value["model"]
    raise ConfigError(f"{where}: expected a model path or Hub id, got {value!r}")


def to_native(data: dict[str, Any], *, study: str, root: Path = Path(".")) -> tuple[dict[str, Any], list[str]]:
    """The evomerge search config meaning the same as the mergekit-evolve config ``data``, and one
    line per field saying how it was mapped."""
    unknown = sorted(set(data) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: not a mergekit-evolve config key (expected {', '.join(sorted(TOP_KEYS))})")
    genome = data["genome"]
    if not isinstance(genome, dict):
        raise ConfigError("genome: expected a mapping (models, merge_method, ...)")
    unknown = sorted(set(genome) - GENOME_KEYS)
    if unknown:
        raise ConfigError(f"genome.{unknown[0]}: not a mergekit-evolve genome key")
    lines: list[str] = []
    method = genome.get("merge_method")
    if method not in SEARCHED:
        raise ConfigError(f"genome.merge_method: expected one of {', '.join(SEARCHED)} (mergekit-evolve's), got {method!r}")
    refs = [_ref(m, f"genome.models.{i}") for i, m in enumerate(genome.get("models") or [])]
    if not refs:
        raise ConfigError("genome.models: expected a list of models")
    base = _ref(genome["base_model"], "genome.base_model") if genome.get("base_model") is not None else None
    if method == "linear" and base is not None:  # linear merges every listed model, base or not
        lines.append(f"genome.base_model: {base} is not used by linear (as in mergekit); dropped")
        base = None
    if base is not None and base in refs:
        refs.remove(base)  # its task vector is zero: it is the base here, not one more searched model
        lines.append(f"genome.models: {base} is the base_model; the searched models are the others")
    models = _model_names(refs)
    lines.append("genome.models -> models: " + ", ".join(f"{n}: {r}" for n, r in models.items()))
    native: dict[str, Any] = {"study": study}
    if base is not None:
        native["base_model"] = base
        lines.append(f"genome.base_model -> base_model: {base}")
    native["models"] = models

    if genome.get("tokenizer_source") is not None:
        raise ConfigError("genome.tokenizer_source: not supported in a search config (the search uses the base "
                          "model's tokenizer, or the first model's); remove it")
    if genome.get("smooth"):
        raise ConfigError("genome.smooth: interpolating parameters across layers is not supported; remove it "
                          "(layer_groups gives one value per block)")
    merge: dict[str, Any] = {"method": method}
    negative = bool(genome.get("allow_negative_weights", False))
    search: dict[str, Any] = {}
    for knob in SEARCHED[method]:
        search[knob] = [-1.0, 1.0] if knob == "weight" and negative else None
    merge["search"] = search
    lines.append(f"genome.merge_method -> merge.method: {method}, searching {', '.join(search)}"
                 + (" (weights in [-1, 1]: allow_negative_weights)" if negative
                    else " (in each knob's default range; mergekit-evolve folds negative values to positive)"))
    normalize = genome.get("normalize")
    if normalize is None:
        normalize = method in NORMALIZED_BY_DEFAULT
    if normalize and method not in {"linear", "ties", "dare_ties", "task_arithmetic"}:
        raise ConfigError(f"genome.normalize: {method} has no normalize parameter")
    if method != "slerp":
        merge["fixed"] = {"normalize": bool(normalize)}
        lines.append(f"genome.normalize -> merge.fixed.normalize: {bool(normalize)}"
                     + (" (mergekit-evolve's default for this method)" if genome.get("normalize") is None else ""))

    granularity = genome.get("layer_granularity", 0) or 0
    if not isinstance(granularity, int) or granularity < 0:
        raise ConfigError(f"genome.layer_granularity: expected a whole number of layers >= 0, got {granularity!r}")
    if granularity == 0:
        merge["layer_groups"] = 1
        lines.append("genome.layer_granularity: 0 (one block for all layers) -> merge.layer_groups: 1")
    else:
        n = _num_layers(base or refs[0], root)
        if n % granularity:
            raise ConfigError(f"genome.layer_granularity: {granularity} does not divide the {n} layers of "
                              f"{base or refs[0]} (mergekit-evolve refuses it too)")
        merge["layer_groups"] = n // granularity
        lines.append(f"genome.layer_granularity: {granularity} layers per block -> merge.layer_groups: "
                     f"{n // granularity} blocks ({n} layers)")
    filters = genome.get("filters") or []
    if filters:
        if method == "slerp":
            raise ConfigError("genome.filters: mergekit-evolve does not filter slerp either; remove it")
        if list(filters) != ["self_attn"]:
            raise ConfigError(f"genome.filters: only [self_attn] has an evomerge equivalent (merge.split_attn_mlp: "
                              f"one value for attention, one for the rest), got {list(filters)}")
        merge["split_attn_mlp"] = True
        lines.append("genome.filters: [self_attn] -> merge.split_attn_mlp: true")
    native["merge"] = merge

    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError("tasks: expected a list of lm-eval task names or {name, weight, metric}")
    fit_tasks = []
    for i, t in enumerate(tasks):
        t = {"name": t} if isinstance(t, str) else t
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or set(t) - {"name", "weight", "metric"}:
            raise ConfigError(f"tasks.{i}: expected a task name or {{name, weight, metric}}, got {t!r}")
        metric = str(t.get("metric", "acc,none")).removesuffix(",none")
        fit_tasks.append({"task": t["name"], "metric": metric, "weight": float(t.get("weight", 1.0)), "split": None})
    fitness: dict[str, Any] = {"tasks": fit_tasks}
    lines.append("tasks -> fitness.tasks: " + ", ".join(f"{t['task']} ({t['metric']}, weight {t['weight']:g})"
                                                        for t in fit_tasks) + "; each on lm-eval's own split, "
                 "as mergekit-evolve runs them")
    chat = bool(data.get("apply_chat_template", True))
    if bool(data.get("fewshot_as_multiturn", True)) != chat:
        raise ConfigError("fewshot_as_multiturn: evomerge sets it to apply_chat_template; give both the same value")
    fitness["apply_chat_template"] = chat
    lines.append(f"apply_chat_template -> fitness.apply_chat_template: {chat}"
                 + (" (mergekit-evolve's default)" if "apply_chat_template" not in data else ""))
    for key in ("limit", "num_fewshot"):
        if data.get(key) is not None:
            fitness[key] = data[key]
            lines.append(f"{key} -> fitness.{key}: {data[key]}")
    if data.get("shuffle"):
        raise ConfigError("shuffle: not supported (evomerge scores the first `limit` examples of each task); remove it")
    native["fitness"] = fitness
    native["sampler"] = {"name": "cmaes"}
    native["budget"] = {"trials": MAX_FEVALS}
    native["dtype"] = "bfloat16"
    lines.append(f"sampler: cmaes, budget.trials: {MAX_FEVALS}, dtype: bfloat16 (mergekit-evolve's CMA-ES, "
                 "--max-fevals default and merge dtype; --trials overrides the budget)")
    if data.get("random_init"):
        lines.append("random_init: the first candidates are the sources and their uniform merge "
                     "(sampler.baselines), then CMA-ES from the middle of the space")
    return native, lines


def load_native(path: str | Path, data: Any | None = None) -> tuple[dict[str, Any], list[str]]:
    """Read a mergekit-evolve config file and map it (see :func:`to_native`); the study is named
    after the file."""
    path = Path(path)
    if data is None:
        data = read_yaml(path, "config")
    if not is_evolve_config(data):
        raise ConfigError(f"{path}: not a mergekit-evolve config (expected genome: and tasks: at the top)")
    return to_native(data, study=path.stem, root=path.resolve().parent)


def load_search_config(path: str | Path, **overrides: Any) -> SearchConfig:
    """A search config file, native or mergekit-evolve (mapped, the mapping logged once at info)."""
    path = Path(path)
    data = read_yaml(path, "config")
    if is_evolve_config(data):
        data, lines = load_native(path, data)
        log.info("%s is a mergekit-evolve config; read as (`evomerge convert` writes it out):\n  %s",
                 path, "\n  ".join(lines))
    return SearchConfig.from_dict(data, root=path.resolve().parent, source=str(path), **overrides)


def native_yaml(native: dict[str, Any], lines: list[str], source: str | Path) -> str:
    """The native config as YAML, preceded by comments saying how it was mapped from ``source``."""
    head = [f"# converted by `evomerge convert` from the mergekit-evolve config {source}"]
    head += [f"#   {line}" for line in lines]
    return "\n".join(head) + "\n" + yaml.safe_dump(native, sort_keys=False, default_flow_style=None)
