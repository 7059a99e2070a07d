"""``evomerge search CONFIG --dry-run``: check a config without weights. Reads each model's
``config.json`` (local folder, the hub cache, or the hub when reachable; otherwise a small bundled
table of base models, or "same as base_model" for a fine-tune), then prints per stage the search
space (dimension count and example names), the memory plan and a per-trial time estimate whose
formula and assumptions are printed with it, and the cost of the elites' re-evaluation at its end;
before the stages, whether trials are raced (and so how many item evaluations one takes). Every
fact says whether it was read or assumed.

A fitness task defined in ``fitness.include_path`` whose data is on this machine is built (its data
read, nothing downloaded) and its evaluated split counted, after ``fitness.limit``; its output type
and number of choices are read too. Other tasks (lm-eval's registry, hub data) get typical sizes,
marked as assumed.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from evomerge.architectures import architecture_for
from evomerge.config import FitnessTask, PromptSource, SearchConfig
from evomerge.errors import CheckpointError, ConfigError
from evomerge.evaluate import load_tasks, local_tasks, select_split
from evomerge.moe_stage import MoeSpace
from evomerge.methods import get_method
from evomerge.planner import GiB, Item, MemoryPlan, fmt_bytes, make_plan
from evomerge.racing import rung_sizes

if TYPE_CHECKING:
    from lm_eval.api.task import Task

    from evomerge.dfs import DfsSpace
    from evomerge.space import Space

# config.json facts of base models, checked against their published config.json files
# (Mistral-7B-v0.1 = transformers' MistralConfig defaults; Llama-2 7B/13B as released).
KNOWN_MODELS: dict[str, dict[str, Any]] = {
    "mistralai/Mistral-7B-v0.1": {
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 32,
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 32000, "tie_word_embeddings": False},
    "meta-llama/Llama-2-7b-hf": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32,
        "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
        "vocab_size": 32000, "tie_word_embeddings": False},
    "meta-llama/Llama-2-13b-hf": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 40,
        "hidden_size": 5120, "intermediate_size": 13824, "num_attention_heads": 40, "num_key_value_heads": 40,
        "vocab_size": 32000, "tie_word_embeddings": False},
}

# ------------------------------------------------------------------ assumptions of the estimates
ASSUMED_GPU_BYTES = 80 * GiB  # a CUDA device that is not on this machine: an 80 GB card
BYTES_PER_S = {  # effective bandwidth of a pass over a merge input, by where it lives
    ("cuda", "device"): 1.0e12, ("cuda", "host"): 2.0e10, ("cuda", "disk"): 1.0e9,
    ("cpu", "device"): 1.0e10, ("cpu", "disk"): 1.0e9,
}
RECOMPUTE_PASSES = 4  # a cache built per candidate (topk/sort/Bernoulli): this many passes over it
MERGE_PASSES = 8  # the merge arithmetic (deltas, masks, sign election, sums): passes over float32 inputs
TOKENS_PER_S_7B = {"cuda": (2.0e4, 1.0e3), "cpu": (50.0, 5.0)}  # (prompt, generated) tokens/s, batched, 7B
STORED_BYTES_ASSUMED = 2  # bytes per parameter of a checkpoint whose config was not read (16-bit)
# statistics of data-aware methods (evomerge.statistics): sustained float32 / float64 FLOP/s
STATS_FLOPS = {"cuda": (5.0e13, 3.0e13), "cpu": (1.0e11, 2.0e10)}
FISHER_BATCH_EFFICIENCY = 0.3  # one example per backward pass: small matmuls use the device poorly


@dataclass(frozen=True)
class TaskCost:
    examples: int
    prompt_tokens: int
    generated_tokens: int  # 0: scored by log-likelihood
    choices: int = 1


# typical sizes per example (assumed, rounded); examples = the split's size
KNOWN_TASKS: dict[str, TaskCost] = {
    "mgsm_ja_fitness": TaskCost(150, 200, 300),
    "mgsm_ja_heldout": TaskCost(100, 200, 300),
    "mgsm_ja": TaskCost(250, 200, 300),
    "gsm8k": TaskCost(7473, 900, 200),  # 5-shot; train split
    "mbpp": TaskCost(90, 700, 150),  # 3-shot; validation split
    "ifeval": TaskCost(541, 100, 400),
}
DEFAULT_TASK = TaskCost(500, 200, 256)
PROMPT_TOKENS_ASSUMED = 200  # per example of a task whose data is read (its texts are not tokenized)
GENERATED_TOKENS_DEFAULT = 256  # lm-eval's max_gen_toks when a generate_until task sets none
CHOICES_SAMPLED = 100  # docs whose choices are counted (the mean is used)
CONSISTENCY_PROMPTS_ASSUMED = 32  # prompts of a consistency fitness whose prompts are not read


# ------------------------------------------------------------------ model facts
def fmt_params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


@dataclass(frozen=True)
class ModelFacts:
    """The shape of one model, from its config.json (or assumed), and where that came from."""

    ref: str
    config: dict[str, Any]
    source: str
    assumed: bool

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def stored_bytes(self) -> int:
        """Bytes per stored parameter (config.json's torch_dtype or dtype; 16-bit assumed without it)."""
        dtype = self.config.get("torch_dtype") or self.config.get("dtype")
        return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, STORED_BYTES_ASSUMED)

    def tensors(self) -> list[tuple[str, int]]:
        """(name, element count) of every tensor of a Llama-style decoder."""
        c = self.config
        h, inter, heads = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_attention_heads"])
        kv = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or h // heads)
        vocab = int(c["vocab_size"])
        layer = [("self_attn.q_proj", heads * head_dim * h), ("self_attn.k_proj", kv * head_dim * h),
                 ("self_attn.v_proj", kv * head_dim * h), ("self_attn.o_proj", h * heads * head_dim),
                 ("mlp.gate_proj", inter * h), ("mlp.up_proj", inter * h), ("mlp.down_proj", h * inter),
                 ("input_layernorm", h), ("post_attention_layernorm", h)]
        out = [("embed_tokens", vocab * h)]
        out += [(f"layers.{i}.{name}", n) for i in range(self.num_layers) for name, n in layer]
        out.append(("norm", h))
        if not c.get("tie_word_embeddings", False):
            out.append(("lm_head", vocab * h))
        return out

    @property
    def params(self) -> int:
        return sum(n for _, n in self.tensors())

    def describe(self) -> str:
        c = self.config
        return (f"{c['num_hidden_layers']} layers, hidden {c['hidden_size']}, intermediate {c['intermediate_size']}, "
                f"{c['num_attention_heads']} heads ({c.get('num_key_value_heads') or c['num_attention_heads']} kv), "
                f"vocab {c['vocab_size']}, {fmt_params(self.params)} params")


class ModelReader:
    """config.json of local folders and hub ids; tries the hub at most once when it is unreachable."""

    def __init__(self) -> None:
        self.hub_ok = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("1", "true", "yes")
        self.hub_note = "" if self.hub_ok else "HF_HUB_OFFLINE is set"

    def read(self, ref: str, fallback: ModelFacts | None = None, what: str = "model") -> ModelFacts:
        path = Path(ref)
        if path.is_dir():
            return self._facts(ref, path / "config.json", f"read {path / 'config.json'}")
        found = self._from_hub(ref)
        if found is not None:
            return self._facts(ref, Path(found[0]), found[1])
        if ref in KNOWN_MODELS:
            return self._checked(ref, dict(KNOWN_MODELS[ref]), "assumed: evomerge's bundled table", True)
        if fallback is not None:
            return ModelFacts(ref, fallback.config, f"assumed: same architecture as {fallback.ref}", True)
        if path.is_absolute():
            raise CheckpointError(f"{what} {ref}: model folder does not exist")
        raise ConfigError(f"{what} {ref}: no local folder, no cached or reachable config.json on the hub"
                          f"{' (' + self.hub_note + ')' if self.hub_note else ''}, and not in the bundled table "
                          f"({', '.join(KNOWN_MODELS)}); give base_model one of those or a local folder")

    def _from_hub(self, ref: str) -> tuple[str, str] | None:
        if ref.startswith((".", "/")) or ref.count("/") != 1:
            return None
        try:
            from huggingface_hub import hf_hub_download
        except ImportError:  # pragma: no cover
            return None
        try:
            return hf_hub_download(ref, "config.json", local_files_only=True), "read from the local hub cache"
        except Exception:  # noqa: BLE001 - not cached
            pass
        if not self.hub_ok:
            return None
        try:
            return hf_hub_download(ref, "config.json", etag_timeout=5), "read from the hub"
        except Exception as e:  # noqa: BLE001 - unreachable, gated, missing: say so once, go on offline
            self.hub_ok = False
            self.hub_note = f"hub not reachable: {type(e).__name__}"
            return None

    def _facts(self, ref: str, config_path: Path, source: str) -> ModelFacts:
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{config_path}: cannot read config.json ({e})") from None
        return self._checked(ref, config, source, False)

    @staticmethod
    def _checked(ref: str, config: dict[str, Any], source: str, assumed: bool) -> ModelFacts:
        architecture_for(config, source=f"{ref} config.json")  # an unsupported model: one line
        missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                               "vocab_size") if k not in config]
        if missing:
            raise CheckpointError(f"{ref} config.json: missing {', '.join(missing)}")
        return ModelFacts(ref, config, source, assumed)


def read_models(cfg: SearchConfig, reader: ModelReader | None = None) -> dict[str, ModelFacts]:
    """Facts of ``base`` (when set) and every model, by config name; fine-tunes whose config.json
    cannot be read are assumed to share the base model's architecture."""
    reader = reader or ModelReader()
    out: dict[str, ModelFacts] = {}
    if cfg.base_ref:
        out["base"] = reader.read(cfg.base_ref, what="base_model")
    for name, ref in cfg.source_refs.items():
        out[name] = reader.read(ref, out.get("base") or next(iter(out.values()), None), what=f"models.{name}")
    return out


# ------------------------------------------------------------------ stages
@dataclass
class StagePlan:
    name: str
    study: str
    dimensions: int
    examples: list[str]
    trials: int
    memory: list[str] = field(default_factory=list)
    seconds: float = 0.0
    time_lines: list[str] = field(default_factory=list)
    elite_seconds: float = 0.0  # the elites' re-evaluation at the end of the stage
    elite_lines: list[str] = field(default_factory=list)


def ps_space(cfg: SearchConfig, template: ModelFacts) -> Space:
    from evomerge.space import build_space

    return build_space(cfg, template.num_layers)


def dfs_space(cfg: SearchConfig, facts: dict[str, ModelFacts], template: ModelFacts) -> DfsSpace:
    from evomerge.dfs import DfsSpace
    from evomerge.layerpath import SourceLayer

    layers = {name: (template if name == "ps" else facts[name]).num_layers for name in cfg.dfs_models}
    sources = tuple(SourceLayer(name, i) for name in cfg.dfs_models for i in range(layers[name]))
    d = cfg.dfs
    return DfsSpace(sources, cfg.dfs_host, d.repeats, d.scales, tuple(d.scale_range), d.max_layers,
                    d.keep_first, d.keep_last)


def _examples(names: list[str], k: int = 4) -> list[str]:
    return names[:k] + (["...", names[-1]] if len(names) > k else [])


def ps_memory(cfg: SearchConfig, facts: dict[str, ModelFacts], device_free: int | None) -> MemoryPlan:
    """The workspace planner's placement of every source tensor and derived cache (sizes from the
    config.json facts), for the config's device."""
    from evomerge.methods import METHODS
    from evomerge.methods.steps import ShapeOnly

    device = torch.device(cfg.device)
    sources = {n: f for n, f in facts.items() if n == "base" or n in cfg.models}
    largest = max(n for f in sources.values() for _, n in f.tensors())
    plan = make_plan(device, scratch=largest * 4 * (len(sources) + 6), device_free=device_free)
    items = [Item("source", (name, t), n * f.stored_bytes, name) for name, f in sources.items() for t, n in f.tensors()]
    models = list(cfg.models)
    for method in cfg.merge.methods:
        entry = METHODS[method]
        defaults = {p.name: p.default if p.scope == "global" else [p.default] * len(models) for p in entry.params}
        for t, n in facts[models[0]].tensors():
            for cache in entry.caches(ShapeOnly((n,), len(models)), defaults):
                who = cache.reads if cache.seeded is None else (cache.seeded,)
                label = models[who[0]] if len(who) == 1 else "all models"
                items.append(Item(cache.label, (cache.tag, label, t), cache.nbytes, label))
    plan.place_all(items)
    return plan


def statistics_estimate(kind: str, facts: ModelFacts, n_models: int, examples: int, max_length: int,
                        device: str) -> tuple[float, float, list[str]]:
    """Statistics of ``kind`` (``gram``/``fisher``) for ``n_models`` models like ``facts``: (peak
    memory bytes, seconds for all models, lines saying how), plus for ``gram`` RegMean's per-trial
    solves. An estimate from FLOP counts at the assumed rates, not a measurement."""
    c = facts.config
    h, inter, heads = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or h // heads)
    layers, params = facts.num_layers, facts.params
    kind_dev = "cuda" if device.startswith("cuda") else "cpu"
    f32, f64 = STATS_FLOPS[kind_dev]
    tokens = examples * max_length
    model_bytes = params * 4  # statistics load the model in float32
    forward = 2 * params * tokens
    inputs = [h, heads * head_dim, h, inter]  # distinct linear inputs per layer: q/k/v, o, gate/up, down
    per_layer_gram = sum(d * d for d in inputs) * 4
    lines = []
    if kind == "gram":
        hidden_bytes = 2 * tokens * h * 4  # the examples' hidden states, in and out of one layer
        peak = model_bytes + per_layer_gram + hidden_bytes
        flops = forward + layers * 2 * tokens * sum(d * d for d in inputs)
        seconds = n_models * flops / f32
        disk = n_models * layers * per_layer_gram
        solves = layers * (3 * 2 / 3 * h ** 3 + (2 / 3) * (heads * head_dim) ** 3 + 2 * 2 / 3 * h ** 3
                           + 2 / 3 * inter ** 3)  # one float64 LU per linear weight (7 per layer)
        lines.append(f"statistics gram (estimate): {examples} examples x {max_length} tokens per model; peak "
                     f"{fmt_bytes(peak)} (float32 model {fmt_bytes(model_bytes)} + one layer's Grams "
                     f"{fmt_bytes(per_layer_gram)} + hidden states {fmt_bytes(hidden_bytes)}); cache on disk "
                     f"{fmt_bytes(disk)}; {seconds:.0f} s for {n_models} model(s) at {f32 / 1e12:g} TFLOP/s float32")
        lines.append(f"regmean per trial (estimate): {solves:.2g} float64 FLOP of solves = {solves / f64:.1f} s "
                     f"at {f64 / 1e12:g} TFLOP/s, plus reading {fmt_bytes(n_models * layers * per_layer_gram)} of "
                     "Grams where the memory plan keeps none")
    else:
        # activations kept for one example's backward, float32 (Korthikanti et al. 2022's per-layer
        # count s*h*(34 + 5*a*s/h) bytes at 16 bits, doubled), plus the logits and their gradient
        acts = 2 * layers * max_length * h * (34 + 5 * heads * max_length / h) + 3 * max_length * int(c["vocab_size"]) * 4
        peak = int(2 * model_bytes + acts)
        flops = 3 * forward
        seconds = n_models * flops / (f32 * FISHER_BATCH_EFFICIENCY)
        lines.append(f"statistics fisher (estimate): {examples} examples x {max_length} tokens, one backward each; "
                     f"peak about {fmt_bytes(peak)} (float32 model and float32 accumulator, {fmt_bytes(model_bytes)} "
                     f"each, + one example's activations {fmt_bytes(int(acts))}); cache on disk {fmt_bytes(n_models * model_bytes)}; {seconds:.0f} s for "
                     f"{n_models} model(s) at {f32 * FISHER_BATCH_EFFICIENCY / 1e12:g} TFLOP/s effective")
    lines.append("  computed once per study (cached on disk), before the first trial; not part of a trial's time")
    return peak, seconds, lines


def merge_seconds(plan: MemoryPlan, out_bytes: int) -> tuple[float, str]:
    """One pass over every merge input from where it lives, recomputed caches RECOMPUTE_PASSES
    times, the arithmetic MERGE_PASSES times over the sources in float32, plus writing the merged
    model, at the assumed bandwidths."""
    kind = plan.device.type
    source_numel = sum(it.nbytes // 2 for it in plan.items.values() if it.kind == "source")  # ~16-bit sources
    total = (out_bytes + MERGE_PASSES * 4 * source_numel) / BYTES_PER_S[(kind, "device")]
    for it in plan.items.values():
        where = it.where or "device"
        if where == "recompute":
            total += RECOMPUTE_PASSES * it.nbytes / BYTES_PER_S[(kind, "device")]
        else:
            total += it.nbytes / BYTES_PER_S[(kind, "host" if where == "host" else "disk" if where == "disk" else "device")]
    rates = ", ".join(f"{w} {BYTES_PER_S[(kind, w)] / 1e9:g} GB/s" for w in ("device", "host", "disk")
                      if (kind, w) in BYTES_PER_S)
    return total, (f"merge: bytes read from where each input lives + {MERGE_PASSES} float32 passes of merge "
                   f"arithmetic + the merged model written, at {rates} (recomputed caches: {RECOMPUTE_PASSES} passes)")


def task_costs(cfg: SearchConfig) -> list[tuple[str, TaskCost, str]]:
    """(task, cost, where its figures come from) for each fitness task. A task in the include
    paths whose data is on this machine is built and read (:func:`read_task_cost`); any other gets
    the typical sizes of :data:`KNOWN_TASKS` (or :data:`DEFAULT_TASK`), assumed; ``fitness.limit``
    caps the examples."""
    names = list(dict.fromkeys(spec.task for spec in cfg.fitness.tasks))
    local = local_tasks(names, cfg.include_paths)
    loaded = load_tasks(list(local), cfg.include_paths)["tasks"] if local else {}
    out = []
    for spec in cfg.fitness.tasks:
        if spec.task in loaded:
            cost, note = read_task_cost(loaded[spec.task], spec, cfg.fitness.limit)
            out.append((spec.task, cost, f"read: {note}"))
            continue
        cost = KNOWN_TASKS.get(spec.task, DEFAULT_TASK)
        limit = cfg.fitness.limit
        if limit is not None:
            n = int(limit) if limit >= 1 else max(1, math.ceil(limit * cost.examples))
            cost = TaskCost(min(n, cost.examples) if spec.task in KNOWN_TASKS else n, cost.prompt_tokens,
                            cost.generated_tokens, cost.choices)
        out.append((spec.task, cost, "typical sizes, assumed" if spec.task in KNOWN_TASKS
                    else "data not read: sizes assumed"))
    return out


def read_task_cost(task: Task, spec: FitnessTask, limit: float | None) -> tuple[TaskCost, str]:
    """The examples the fitness scores (the evaluated split's docs, after ``limit`` as lm-eval
    applies it), the task's output type and its mean number of choices; prompt tokens assumed."""
    from lm_eval.evaluator_utils import get_sample_size

    select_split(task, spec.split, f"fitness.tasks.{spec.task}.split")
    docs = task.eval_docs
    total = len(docs)
    n = total if limit is None else min(total, get_sample_size(task, limit))
    split = task.config.test_split if task.has_test_docs() else task.config.validation_split
    kind = task.OUTPUT_TYPE
    choices, generated = 1, 0
    if kind == "multiple_choice" and n:
        counts = [len(task.doc_to_choice(docs[i])) for i in range(min(n, CHOICES_SAMPLED))]
        choices = max(1, round(sum(counts) / len(counts)))
    elif kind == "generate_until":
        generated = int((task.config.generation_kwargs or {}).get("max_gen_toks", GENERATED_TOKENS_DEFAULT))
    capped = f", fitness.limit {limit:g}" if limit is not None and n < total else ""
    note = (f"{n} of the {total} docs of its {split} split{capped}; {kind}"
            + (f", {choices} choices" if kind == "multiple_choice" else "")
            + (f", up to {generated} generated tokens" if kind == "generate_until" else "")
            + "; prompt tokens assumed")
    return TaskCost(n, PROMPT_TOKENS_ASSUMED, generated, choices), note


def consistency_prompts(cfg: SearchConfig) -> tuple[int, str]:
    """How many prompts the consistency fitness generates on, and whether that was read: a JSONL
    file or a local task is read (after ``limit``); otherwise ``limit`` (or 32) is assumed."""
    from evomerge.prompts import load_prompts

    src: PromptSource = cfg.fitness.consistency.prompts
    include = [str((cfg.root / p).resolve()) for p in src.include_path]
    if src.jsonl is not None or local_tasks([src.task], include):
        return len(load_prompts(src, cfg.root, "fitness.consistency.prompts")), "read"
    return src.limit or CONSISTENCY_PROMPTS_ASSUMED, "assumed"


def eval_seconds(cfg: SearchConfig, params: int, layer_ratio: float = 1.0) -> tuple[float, list[str]]:
    """examples x (prompt + generated tokens) at the assumed tokens/s of a 7B model on the device,
    scaled by 7e9/params (and by path length / host layers for a dfs path)."""
    kind = "cuda" if cfg.device.startswith("cuda") else "cpu"
    prompt_rate, gen_rate = TOKENS_PER_S_7B[kind]
    scale = 7e9 / params / layer_ratio
    lines = [f"evaluation: tokens / throughput, at {prompt_rate:g} prompt and {gen_rate:g} generated tokens/s "
             f"for a 7B model on {kind} (batched), scaled by 7B/{fmt_params(params)}"
             + (f" and x{layer_ratio:.2f} for the path length" if layer_ratio != 1.0 else "")]
    total = 0.0
    if cfg.fitness.kind == "consistency":
        spec = cfg.fitness.consistency
        n, how = consistency_prompts(cfg)
        gens = 1 + 2 * spec.pairs
        t = gens * n * (200 / (prompt_rate * scale) + spec.generation.max_new_tokens / (gen_rate * scale))
        lines.append(f"  consistency: {gens} generations x {n} prompts ({how}) x (200 assumed prompt + "
                     f"{spec.generation.max_new_tokens} generated tokens) = {t:.0f} s; "
                     f"plus {2 * spec.pairs} neighbour merges")
        return t, lines
    for task, cost, note in task_costs(cfg):
        prompt = cost.examples * cost.prompt_tokens * cost.choices
        gen = cost.examples * cost.generated_tokens
        t = prompt / (prompt_rate * scale) + gen / (gen_rate * scale)
        total += t
        choices = f" x {cost.choices} choices" if cost.choices > 1 else ""
        lines.append(f"  {task}: {cost.examples} examples x ({cost.prompt_tokens} prompt{choices} + "
                     f"{cost.generated_tokens} generated tokens) ({note}) = {t:.0f} s")
    return total, lines


def racing_lines(cfg: SearchConfig) -> list[str]:
    """Whether trials are raced (lm_eval fitness), how, and the item evaluations one trial takes:
    the first rung's (a candidate stopped there) to every item's."""
    spec = cfg.fitness
    costs = [c.examples for _, c, _ in task_costs(cfg)]
    if not spec.races:
        return [f"racing: off; every trial is scored on all {sum(costs)} items"]
    r = spec.racing
    first = sum(rung_sizes(r.rungs, n)[0] for n in costs)
    against = ("the incumbent" if r.against == "incumbent"
               else "the best of its CMA-ES generation so far (the incumbent while the generation has none)")
    return [f"racing: on; rungs {', '.join(f'{f:g}' for f in r.rungs)} of each task's items, then all; "
            f"confidence {r.confidence:g}; against {against}",
            f"  item evaluations per trial: {first} (stopped after the first rung) to {sum(costs)} (all items; "
            "the first trial and the baselines see all)"]


def elite_cost(cfg: SearchConfig, params: int, layer_ratio: float = 1.0) -> tuple[float, list[str]]:
    """The elites' re-evaluation at the end of a stage (:mod:`evomerge.elites`): every item of the
    fitness split when the trials saw fewer (``fitness.limit``), again with
    ``fitness.elite_fewshot_seed``, and the held-out tasks, for each of the top ``fitness.elites``."""
    spec = cfg.fitness
    if spec.kind != "lm_eval" or spec.objective == "multi" or not spec.elites:
        return 0.0, []
    passes: list[tuple[str, SearchConfig]] = []
    whole = cfg.model_copy(update={"fitness": spec.model_copy(update={"limit": None})})
    if spec.limit is not None:
        passes.append(("every item of the fitness split", whole))
    if spec.elite_fewshot_seed is not None:
        passes.append((f"{'again ' if passes else 'every item '}with few-shot seed {spec.elite_fewshot_seed}", whole))
    if spec.heldout:
        held = spec.model_copy(update={"tasks": spec.heldout, "limit": None})
        passes.append((f"the held-out tasks {', '.join(t.task for t in spec.heldout)}",
                       cfg.model_copy(update={"fitness": held})))
    if not passes:
        return 0.0, [f"elites: the top {spec.elites} trials' intervals come from their stored items (no model rebuilt)"]
    items, seconds, parts = 0, 0.0, []
    for what, c in passes:
        n = sum(cost.examples for _, cost, _ in task_costs(c))
        items, seconds = items + n, seconds + eval_seconds(c, params, layer_ratio)[0]
        parts.append(f"{what} ({n})")
    k = spec.elites
    return k * seconds, [f"elites at the end: the top {k} trials re-scored on {' + '.join(parts)}: "
                         f"{k} x {items} = {k * items} item evaluations, about {_fmt_seconds(k * seconds)}"]


def plan_stages(cfg: SearchConfig, facts: dict[str, ModelFacts], device_free: int | None,
                stages: list[str] | None = None) -> list[StagePlan]:
    template = facts.get("base") or facts[next(iter(cfg.models))]
    out_bytes = template.params * torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    plans = []
    for stage in stages or cfg.stages:
        if stage == "ps":
            space = ps_space(cfg, template)
            names = list(space.bounds())
            sp = StagePlan("ps", cfg.stage_study("ps"), len(names), _examples(names), cfg.budget.trials)
            plan = ps_memory(cfg, facts, device_free)
            sp.memory = plan.table().splitlines() + [f"live model ({cfg.dtype}, not in the table): {fmt_bytes(out_bytes)}"]
            merge_t, merge_line = merge_seconds(plan, out_bytes)
            n_merges = 1 + (2 * cfg.fitness.consistency.pairs if cfg.fitness.consistency else 0)
            eval_t, eval_lines = eval_seconds(cfg, template.params)
            sp.seconds = n_merges * merge_t + eval_t
            sp.time_lines = [f"{merge_line}: {merge_t:.1f} s x {n_merges} merge(s)", *eval_lines]
            sp.elite_seconds, sp.elite_lines = elite_cost(cfg, template.params)
            for kind in dict.fromkeys(m.needs for m in map(get_method, cfg.merge.methods) if m.needs):
                cal = cfg.calibration
                _, _, stat_lines = statistics_estimate(kind, template, len(cfg.models), cal.n, cal.max_length, cfg.device)
                sp.time_lines += stat_lines
        elif stage == "moe":
            n_cand = len(cfg.models) if cfg.moe.candidates == "parents" else cfg.moe.top_k
            names = list(MoeSpace(tuple(cfg.moe.prompts), tuple(f"c{i}" for i in range(n_cand)),
                                  template.num_layers).bounds())
            sp = StagePlan("moe", cfg.stage_study("moe"), len(names), _examples(names), cfg.moe.budget.trials)
            n_slots = len(cfg.moe.prompts)
            sp.memory = [f"{n_cand} candidates' MLPs resident, and a live MoE of {n_slots} experts "
                         f"(about {1 + n_slots}x the base's MLPs) in {cfg.dtype}"]
            # each extra expert per token adds an MLP (about 2/3 of a layer's compute)
            ratio = 1 + (cfg.moe.experts_per_token - 1) * 2 / 3
            eval_t, eval_lines = eval_seconds(cfg, template.params, ratio)
            sp.elite_seconds, sp.elite_lines = elite_cost(cfg, template.params, ratio)
            sp.seconds = eval_t
            sp.time_lines = [f"no merge: experts copied and routers rewritten in place; "
                             f"{cfg.moe.experts_per_token} experts per token", *eval_lines]
        else:
            space = dfs_space(cfg, facts, template)
            names = list(space.bounds())
            sp = StagePlan("dfs", cfg.stage_study("dfs"), len(names), _examples(names), cfg.dfs.budget.trials)
            resident = sum((template if n == "ps" else facts[n]).params for n in cfg.dfs_models)
            itemsize = out_bytes // template.params
            longest = cfg.dfs.max_layers or len(space.slots)
            sp.memory = [f"{len(cfg.dfs_models)} models' layers resident ({', '.join(cfg.dfs_models)}) in {cfg.dtype}: "
                         f"{fmt_bytes(resident * itemsize)} (+ activations and KV cache of a path of up to "
                         f"{longest} layers)"]
            ratio = longest / template.num_layers
            eval_t, eval_lines = eval_seconds(cfg, template.params, ratio)
            sp.elite_seconds, sp.elite_lines = elite_cost(cfg, template.params, ratio)
            sp.seconds = eval_t
            sp.time_lines = [f"no merge: the path is rewired in place; evaluation of the longest path "
                             f"({longest} layers, {ratio:.2f}x the host's {template.num_layers})", *eval_lines]
        plans.append(sp)
    return plans


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


def dry_run(cfg: SearchConfig, reader: ModelReader | None = None,
            stages: list[str] | None = None) -> tuple[list[str], list[StagePlan]]:
    """The dry-run's lines (and the stage plans, for tests) for ``stages`` (default: the config's).
    No weights are read."""
    reader = reader or ModelReader()
    facts = read_models(cfg, reader)
    device_free = None
    gpu_note = ""
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        template = facts.get("base") or facts[next(iter(cfg.models))]
        live = template.params * torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
        device_free = ASSUMED_GPU_BYTES - live  # the live model is loaded before the plan is made
        gpu_note = (f"; no CUDA device here: assumed a {fmt_bytes(ASSUMED_GPU_BYTES)} one, "
                    f"{fmt_bytes(device_free)} free after the live model; pinned host budget from this machine's RAM")
    lines = [f"dry run of study {cfg.study}: stages {', '.join(stages or cfg.stages)}; device {cfg.device}, dtype {cfg.dtype}"
             f"{gpu_note}", "models (no weights read):"]
    for name, f in facts.items():
        lines.append(f"  {name:<8} {f.ref}: {f.describe()} [{f.source}]")
    if reader.hub_note:
        lines.append(f"  hub: {reader.hub_note}")
    if any(f.assumed for f in facts.values()):
        lines.append("  facts marked 'assumed' were not read from a config.json; run with the hub reachable to check them")
    if cfg.fitness.kind == "lm_eval":
        lines.append("fitness: " + ", ".join(f"{t.task}.{t.metric} ({t.split or 'default'} split)" for t in cfg.fitness.tasks)
                     + f"; objective {cfg.fitness.objective}")
        lines += racing_lines(cfg)
    else:
        lines.append("fitness: label-free consistency")
    plans = plan_stages(cfg, facts, device_free, stages)
    total = 0.0
    for sp in plans:
        lines.append(f"stage {sp.name} (study {sp.study}): {sp.dimensions} dimensions, {sp.trials} trials")
        lines.append("  dimensions: " + ", ".join(sp.examples))
        lines += ["  memory: " + sp.memory[0]] + [f"    {m}" for m in sp.memory[1:]]
        lines.append(f"  time per trial: about {_fmt_seconds(sp.seconds)} (order of magnitude; assumptions below)")
        lines += [f"    {t}" for t in sp.time_lines]
        lines += [f"  {t}" for t in sp.elite_lines]
        total += sp.seconds * sp.trials + sp.elite_seconds
    raced = " (trials on every item; racing stops some sooner)" if cfg.fitness.races else ""
    lines.append(f"total: about {_fmt_seconds(total)} for every stage's budget{raced}")
    lines.append("dry run only: nothing downloaded, no study created")
    return lines, plans
