"""A workspace per worker: one live model whose parameters are overwritten in place for each
candidate recipe, at (close to) the cost of one pass over the inputs.

The workspace knows no method: it runs each registry entry's two steps
(:mod:`evomerge.methods.steps`). What is kept between candidates (placed by
:mod:`evomerge.planner` on the device, in pinned host memory, or left on disk / recomputed when
memory is short):

- every source tensor, in its stored dtype on a GPU (lossless: the kernels upcast in registers
  exactly as the engine does, and a task vector ``x - base`` is formed on the fly from ``x`` and
  ``base`` in float32, bit-identical to the engine's), upcast to the compute dtype on a CPU (one
  conversion less per element; also exact);
- the arrays a method's ``caches`` declares (magnitude, row and variance ranks, Bernoulli
  thresholds of the seeded masks: see the method files in :mod:`evomerge.methods`), keyed by the
  sources they are computed from, and the small values its ``prepare`` memoizes (norms, angles,
  ratios, energies). Where the plan has no room for an array, ``prepare`` computes the candidate's
  mask directly instead.

Planning a candidate reuses the plan of the previous candidate with the same recipe structure
(only the per-tensor parameters are resolved again). A candidate then costs one pass (CPU:
``combine`` in cache-sized chunks spread over worker threads, so intermediates stay in cache; CUDA:
the method's fused Triton kernel, see :mod:`evomerge.kernels`), plus the prepared value's
``reduce`` where the engine's semantics need a reduction over the *masked* tensor (the L1 rescale
of random masks), and whatever a ``prepare`` materializes for the candidate. A method without chunked steps
runs whole-tensor. Results equal ``evomerge merge`` for the same recipe: deterministic methods
exactly, seeded ones identically on the same device.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from evomerge.checkpoint import Checkpoint
from evomerge.engine import (
    MergePlan,
    TensorRef,
    TensorTask,
    _as_slices,
    _resolve_params,
    aligned_sources,
    all_finite,
    plan_merge,
    resolve_device,
    tensor_seed,
    vocabulary_rows,
)
from evomerge.errors import CheckpointError, MergeError
from evomerge.methods import Method
from evomerge.methods.steps import Cache
from evomerge.planner import Item, MemoryPlan, make_plan
from evomerge.calibration import Calibration
from evomerge.recipe import Recipe
from evomerge.sources import open_model
from evomerge.tokenizer import Vocabulary, build_vocabulary
from evomerge.statistics import Statistics, statistics_for

log = logging.getLogger(__name__)

def _checkpoint_targets(model: Any, arch: Any, num_layers: int) -> dict[str, Tensor]:
    """Checkpoint tensor name -> the live tensor (or view of one) that holds it. Names agree
    except where the architecture file says otherwise (``live``: experts fused by transformers)."""
    targets = dict(model.named_parameters())
    targets.update({k: v for k, v in model.named_buffers() if k not in targets})
    for spec in arch.all_weights(num_layers):
        if spec.live is not None and spec.live.name in targets:
            targets[spec.name] = spec.live.view(targets[spec.live.name])
    return targets


class Workspace:
    def __init__(self, refs: list[str], *, template: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype = torch.float32, memory_limit: int | None = None,
                 host_memory_limit: int | None = None, chunk_elems: int | None = None,
                 fused: bool | None = None, verbose: bool = False, model: Any = None,
                 tokenizer_source: str | None = None, base: str | None = None):
        """``refs``: every model a candidate may read; ``template``: the model whose config,
        architecture and tokenizer the live instance takes.

        ``memory_limit``: bytes the workspace may keep on the device besides the live model (default:
        what is free); ``host_memory_limit``: pinned host bytes for sources streamed to a GPU.
        ``chunk_elems``: elements per chunk of the per-candidate pass (CPU default 256k, so the
        intermediates stay in cache). ``fused``: use the fused CUDA kernels (default: on CUDA when
        Triton is importable). ``verbose``: log the memory plan at info each time it changes
        (else: the first plan at info, its changes at debug).
        ``model``: an already built live model to use instead of loading the template's weights.
        ``tokenizer_source``: ``base``, ``union`` or one of ``refs`` (mergekit's): the output
        vocabulary is built once, here, from ``refs`` in order, every source's vocabulary rows are
        moved into it (the defaults for missing tokens from all sources, ``base`` preferred) and the
        live model and tokenizer take it; candidates must then name the same ``tokenizer_source``.
        """
        self.device = resolve_device(device)
        self.dtype = dtype
        self.compute_dtype = compute_dtype
        opened = {ref: open_model(ref) for ref in dict.fromkeys([template, *refs])}
        arches = {ck.arch.name for ck in opened.values()}
        if len(arches) > 1:
            raise CheckpointError(f"models have different architectures: {', '.join(sorted(arches))}")
        self.vocabulary: Vocabulary | None = None
        if tokenizer_source is not None:
            order = list(dict.fromkeys([*refs, template]))
            self.vocabulary = build_vocabulary(tokenizer_source, base or order[0], order,
                                               {r: opened[r].path for r in order},
                                               {r: vocabulary_rows(opened[r]) for r in order})
            opened = aligned_sources(opened, self.vocabulary, groups=lambda name: order, base=base)
        self.sources = {ref: _CachedCheckpoint(ck) for ref, ck in opened.items()}
        tpl = self.sources[template]
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(tpl.path, dtype=dtype)
        if self.vocabulary is not None:
            model.resize_token_embeddings(self.vocabulary.size, mean_resizing=False)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self._template_path = tpl.path
        self._tokenizer: Any = self.vocabulary.tokenizer if self.vocabulary is not None else None
        if self._tokenizer is not None and self._tokenizer.pad_token is None:
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self.num_layers = tpl.num_layers
        self.arch = tpl.arch
        self.params = _checkpoint_targets(self.model, tpl.arch, self.num_layers)
        self.chunk_elems = chunk_elems or (1 << 18 if self.device.type == "cpu" else 1 << 26)
        self.verbose = verbose
        self._plan_shown = False
        self._memory_limit = memory_limit
        self._host_memory_limit = host_memory_limit
        self.memory: MemoryPlan | None = None
        self._store: dict[Any, Any] = {}  # resident sources and caches, by key
        self._small: dict[Any, Any] = {}  # per-tensor scalars and per-row vectors (not planned)
        self._pool: Any = None
        self._tls = threading.local()  # per-thread scratch buffers (see _scratch)
        self._workers = torch.get_num_threads() if self.device.type == "cpu" else 1
        if self._workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="evomerge-ws")
        self._plans: dict[str, Any] = {}
        self._prepared: set[Any] = set()
        self.recipe: Recipe | None = None
        self._out_dtype = dtype
        self.last_load_seconds: float | None = None
        self._stats: dict[str, Statistics] = {}  # by kind: what methods with ``needs`` read
        self._stats_cal: dict[str, str] = {}  # by kind: the calibration they were computed on
        self.stats_seconds = 0.0  # spent computing statistics (not part of any load's seconds)
        self.kernels = None
        self.kernel_error: str | None = None
        if fused is None:
            fused = self.device.type == "cuda" and compute_dtype == torch.float32
        if fused:
            try:
                from evomerge import kernels

                self.kernels = kernels.FusedKernels(self.device)
            except Exception as e:  # noqa: BLE001 - no Triton: the eager path gives the same result
                self.kernel_error = f"{type(e).__name__}: {e}"
                log.warning("fused kernels unavailable (%s: %s); using the eager path", type(e).__name__, e)

    # ----------------------------------------------------------------- public API
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self._template_path)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self._tokenizer = value

    @torch.no_grad()
    def load(self, recipe: Recipe) -> None:
        """Write the recipe's merged weights into the live model."""
        if self._pool is None:
            return self._load(recipe)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # parallel over chunks instead (see _map_chunks)
        try:
            return self._load(recipe)
        finally:
            torch.set_num_threads(threads)

    def _load(self, recipe: Recipe) -> None:
        if recipe.method.needs and recipe.calibration is not None:
            self.ensure_statistics(recipe.method.needs, recipe.calibration, recipe.referenced_models())
        start = time.perf_counter()
        plan, structure = self._plan(recipe)
        if plan.num_layers != self.num_layers:
            raise MergeError(f"the recipe has {plan.num_layers} layers; this workspace holds {self.num_layers}")
        head = self.arch.tied_head()
        for task in plan.tasks:
            target = self.params.get(task.out_name)
            if target is None and head is not None and task.out_name == head.name:
                target = self._untie_head(head.name)
            if target is None:
                raise MergeError(f"{task.out_name}: the model has no such parameter")
        self.recipe = None
        self._out_dtype = plan.out_dtype
        prepared = (structure, recipe.seed if plan.method.stochastic else None)
        if prepared not in self._prepared:
            self._prepare(plan, recipe.seed)
            self._prepared.add(prepared)
        flags = torch.zeros(len(plan.tasks), dtype=torch.int32, device=self.device)  # fused kernels count here
        oks: list[Tensor] = []
        eager: list[int] = []
        for i, task in enumerate(plan.tasks):
            ok = self._run_task(task, plan.method, recipe.seed, self.params[task.out_name], flags[i:i + 1])
            if ok is not None:
                oks.append(ok)
                eager.append(i)
        if oks:
            bad_eager = torch.zeros_like(flags)
            bad_eager[torch.tensor(eager, device=self.device)] = (~torch.stack(oks)).to(torch.int32)
            flags = flags + bad_eager
        if head is not None and head.name in self.params and not any(t.out_name == head.name for t in plan.tasks):
            for tied in head.tied_names:  # a separate live head, but the recipe's head is the embeddings
                if tied in self.params and self.params[tied].data_ptr() != self.params[head.name].data_ptr():
                    self.params[head.name].copy_(self.params[tied])
                    break
        bad = flags.cpu()  # the one host sync of a candidate
        if bool(bad.any()):
            name = plan.tasks[int(bad.nonzero()[0, 0])].out_name
            raise MergeError(f"{name}: the merge produced non-finite values (NaN or inf)")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.recipe = recipe
        self.last_load_seconds = time.perf_counter() - start

    def ensure_statistics(self, kind: str, calibration: Calibration, refs: Sequence[str] | None = None) -> float:
        """Hold statistics of ``kind`` (a method's ``needs``) on ``calibration`` for the sources
        ``refs`` (default: all): read from the statistics cache or computed, once per worker (the
        disk cache makes it once per study). Returns the seconds spent computing; they also add up
        in ``stats_seconds``, never in a load's seconds. Called by ``load`` for a recipe whose
        method needs them, or ahead of the first candidate."""
        key = calibration.model_dump_json()
        if kind in self._stats_cal and self._stats_cal[kind] != key:
            raise MergeError("calibration: changed between candidates of one workspace; use one calibration per study")
        held = self._stats.get(kind)
        missing = {ref: self.sources[ref].path for ref in (refs if refs is not None else self.sources)
                   if held is None or ref not in held.folders}
        if not missing:
            return 0.0
        got = statistics_for(kind, missing, calibration.resolved(None), device=self.device)
        if held is None:
            self._stats[kind] = got
        else:
            held.folders.update(got.folders)
        self._stats_cal[kind] = key
        self.stats_seconds += got.seconds
        return got.seconds

    def _stat(self, kind: str | None, ref: TensorRef) -> Tensor | None:
        stats = self._stats.get(kind) if kind else None
        return None if stats is None else stats.get(*ref)

    def _untie_head(self, name: str) -> Tensor | None:
        """Give the live model a head of its own (a merge of tied and untied sources writes one);
        None if the model has no parameter ``name`` at all."""
        shared = dict(self.model.named_parameters(remove_duplicate=False)).get(name)
        if shared is None:
            return None
        owner, _, leaf = name.rpartition(".")
        own = torch.nn.Parameter(shared.detach().clone(), requires_grad=False)
        setattr(self.model.get_submodule(owner), leaf, own)
        self.model.config.tie_word_embeddings = False
        self.params[name] = own
        log.info("%s: the live model's head is no longer tied to its embeddings", name)
        return own

    def state_dict(self) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        for ck in self.sources.values():
            ck.close()
        self._store.clear()
        self._small.clear()

    @property
    def template_path(self) -> Path:
        return self._template_path

    def describe(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self.model.parameters())
        out: dict[str, Any] = {"device": str(self.device), "parameters": n, "sources": len(self.sources),
                               "fused_kernels": self.kernels is not None, "kernel_error": self.kernel_error,
                               "statistics_seconds": round(self.stats_seconds, 2)}
        if self.memory is not None:
            out["memory_plan"] = self.memory.summary()
            out["placements"] = self.memory.counts()
        return out

    def memory_table(self) -> str:
        return self.memory.table() if self.memory is not None else "memory plan: nothing loaded yet"

    # ----------------------------------------------------------------- planning and caches
    def _plan(self, recipe: Recipe) -> tuple[MergePlan, str]:
        """``plan_merge``, with the plan's structure (tasks, shapes, checks) cached per recipe
        structure: a search's candidates differ only in numbers, so only the per-tensor
        parameters are resolved again."""
        key = structure_key(recipe)
        cached = self._plans.get(key)
        if cached is None:
            plan = plan_merge(recipe, self.sources)
            self._plans[key] = (plan, _task_contexts(recipe, plan, self.sources))
            return plan, key
        skeleton, contexts = cached
        method = skeleton.method
        slices = _as_slices(recipe, self.sources)
        mps = [{src.model: src.parameters for src in sl.sources} for sl in slices]
        tasks = []
        for task, (si, t) in zip(skeleton.tasks, contexts):
            sl = slices[si]
            params = _resolve_params(method, recipe, sl, task.out_name, t, [r[0] for r in task.inputs], mps[si],
                                     sl.base_model or recipe.base_model)
            tasks.append(replace(task, params=params))
        return MergePlan(recipe, method, tasks, skeleton.num_layers, skeleton.config, skeleton.tokenizer_source,
                         skeleton.out_dtype), key

    def _ensure_memory(self, plan: Any) -> MemoryPlan:
        if self.memory is None:
            largest = max(self._numel(t) for t in plan.tasks)
            n_in = max(len(t.inputs) + (1 if t.base else 0) for t in plan.tasks)
            item = torch.empty((), dtype=self.compute_dtype).element_size()
            scratch = largest * item * (n_in + 6)
            self.memory = make_plan(self.device, scratch=scratch, memory_limit=self._memory_limit,
                                    host_memory_limit=self._host_memory_limit)
        return self.memory

    def _numel(self, task: TensorTask) -> int:
        ref = task.base or task.inputs[0]
        n = 1
        for s in self.sources[ref[0]].shape(ref[1]):
            n *= s
        return n

    def _rows(self, task: TensorTask) -> int | None:
        """Rows kept of an embedding whose vocabularies differ (None: the full tensors)."""
        if not task.is_embed:
            return None
        refs = ([task.base] if task.base else []) + list(task.inputs)
        rows = {self.sources[m].shape(t)[0] for m, t in refs}
        if len(rows) == 1:
            return None
        log.warning("%s: vocabulary sizes differ; keeping the first %d rows", task.out_name, min(rows))
        return min(rows)

    def _prepare(self, plan: Any, seed: int) -> None:
        """Place (and load) every source and derived cache this plan needs."""
        mem = self._ensure_memory(plan)
        before = len(mem.items)
        items: list[Item] = []
        builders: dict[Any, Callable[[], Any]] = {}

        def want(kind: str, key: Any, nbytes: int, label: str, build: Callable[[], Any]) -> None:
            if key in mem.items:
                return
            items.append(Item(kind, key, nbytes, label))
            builders[key] = build

        method = plan.method
        for task in plan.tasks:
            rows = self._rows(task)
            refs = ([task.base] if task.base else []) + list(task.inputs)
            for ref in refs:
                ck = self.sources[ref[0]]
                numel = 1
                for s in ck.shape(ref[1]):
                    numel *= s
                nbytes = numel * self._stored_itemsize(ck.dtype(ref[1]))
                want("source", ("src", ref), nbytes, ref[0], lambda ref=ref: self._load_source(ref))
            numel = 1
            for s in self._shape(task, rows):
                numel *= s
            self._want_derived(task, method, seed, rows, numel, want)
        mem.place_all(items)
        for it in items:
            if it.where in ("device", "host"):
                self._store[it.key] = builders[it.key]()
        if len(mem.items) != before:  # the first plan at info; how it grows at debug (every change: verbose)
            log.log(logging.INFO if self.verbose or not self._plan_shown else logging.DEBUG, "%s", mem.table())
            self._plan_shown = True

    def _want_derived(self, task: TensorTask, method: Method, seed: int, rows: int | None, numel: int,
                      want: Callable[..., None]) -> None:
        """The method's trial-invariant arrays for this task (the planner decides where each lives)."""
        inputs = _TaskInputs(self, task, method, seed, rows)
        for cache in method.caches(inputs, task.params):
            who = cache.reads if cache.seeded is None else (cache.seeded,)
            label = task.inputs[who[0]][0] if len(who) == 1 else "all models"
            want(cache.label, inputs.cache_key(cache), cache.nbytes, label, cache.build)

    def _shape(self, task: TensorTask, rows: int | None) -> tuple[int, ...]:
        ref = task.base or task.inputs[0]
        shape = tuple(self.sources[ref[0]].shape(ref[1]))
        return shape if rows is None else (rows, *shape[1:])

    def _upcast_on_device(self, dtype: torch.dtype) -> bool:
        """CPU workspaces keep narrow sources upcast to the compute dtype (exact, and one
        conversion less per element and candidate); a GPU reads the narrow dtype in its kernels."""
        return (self.device.type == "cpu" and dtype.is_floating_point
                and dtype.itemsize < self.compute_dtype.itemsize)

    def _stored_itemsize(self, dtype: torch.dtype) -> int:
        return self.compute_dtype.itemsize if self._upcast_on_device(dtype) else dtype.itemsize

    def _load_source(self, ref: TensorRef) -> Tensor:
        t = self.sources[ref[0]].get(ref[1])
        where = self.memory.items[("src", ref)].where  # type: ignore[union-attr]
        if where == "device":
            return t.to(self.device, self.compute_dtype if self._upcast_on_device(t.dtype) else t.dtype)
        return t.pin_memory() if self.device.type == "cuda" else t

    def _src(self, ref: TensorRef, rows: int | None) -> Tensor:
        """A source tensor on the device, in its stored dtype."""
        t = self._store.get(("src", ref))
        if t is None:
            t = self.sources[ref[0]].get(ref[1])
        if t.device != self.device:
            t = t.to(self.device, non_blocking=True)
        return t if rows is None else t[:rows]

    def _cv(self, t: Tensor) -> Tensor:
        return t.to(self.compute_dtype)

    def _delta(self, base: TensorRef | None, ref: TensorRef, rows: int | None) -> Tensor:
        x = self._cv(self._src(ref, rows))
        return x if base is None else x - self._cv(self._src(base, rows))

    def _cached(self, key: Any) -> Tensor | None:
        return self._store.get(key)

    def _small_cache(self, key: Any, build: Callable[[], Any]) -> Any:
        value = self._small.get(key)
        if value is None:
            value = build()
            self._small[key] = value
        return value

    # ----------------------------------------------------------------- per-candidate work
    def _chunks(self, numel: int) -> list[slice]:
        step = max(1, self.chunk_elems)
        return [slice(a, min(a + step, numel)) for a in range(0, numel, step)]

    def _map_chunks(self, numel: int, fn: Callable[[slice], Any]) -> list[Any]:
        """``fn`` over the chunks; on CPU spread over worker threads (each running torch ops
        single-threaded), so no op waits at an intra-op barrier for a descheduled thread."""
        chunks = self._chunks(numel)
        if self._pool is None or len(chunks) == 1:
            return [fn(sl) for sl in chunks]

        def run(sl: slice) -> Any:
            with torch.no_grad():  # grad mode is per thread
                return fn(sl)

        return list(self._pool.map(run, chunks))

    def _run_task(self, task: TensorTask, method: Method, seed: int, target: Tensor, flag: Tensor) -> Tensor | None:
        """Write one merged tensor into ``target``: the method's ``prepare`` (from the caches),
        then its fused kernel, or else ``reduce`` and ``combine`` chunk by chunk (whole when the
        prepared value is not chunked). Returns a 0-dim bool "all finite" tensor, or None when a
        fused kernel ran (it counts non-finite values into ``flag``)."""
        rows = self._rows(task)
        shape = self._shape(task, rows)
        if tuple(target.shape) != shape:
            raise MergeError(f"{task.out_name}: merged shape {shape} != model's {tuple(target.shape)}")
        inputs = _TaskInputs(self, task, method, seed, rows)
        try:
            prep = method.prepare(inputs, task.params)
        except ValueError as e:  # as the engine
            raise MergeError(f"{task.out_name}: {e}") from None
        kernel = method.kernel_for(prep)
        if self.kernels is not None and kernel is not None:
            try:
                if self.kernels.run(kernel, prep, inputs, target, self._out_dtype, flag):
                    return None
            except Exception as e:  # noqa: BLE001 - a kernel that does not compile here: the eager path is exact too
                log.warning("fused kernel failed for %s (%s: %s); using the eager path from now on",
                            task.out_name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.kernels = None
                self.kernel_error = f"{type(e).__name__}: {e}"
        prep.reduce(inputs)
        if not prep.chunked:
            out = method.combine(prep, inputs, None)
            target.copy_(self._round(out.reshape(target.shape), target))
            return all_finite(out)
        return self._flat(target, lambda sl: method.combine(prep, inputs, sl))

    def _scratch(self, n: int, k: int) -> list[Tensor]:
        """``k`` compute-dtype buffers of ``n`` elements for the calling thread. On CPU they are
        kept per worker thread: a fresh temporary per chunk and operation cost about as much as
        the arithmetic (page faults). CUDA's caching allocator makes fresh ones cheap."""
        if self.device.type != "cpu":
            return [torch.empty(n, dtype=self.compute_dtype, device=self.device) for _ in range(k)]
        bufs = getattr(self._tls, "bufs", None)
        if bufs is None or len(bufs) < k or bufs[0].numel() < n:
            size = max(n, min(self.chunk_elems, 1 << 22))
            bufs = self._tls.bufs = [torch.empty(size, dtype=self.compute_dtype) for _ in range(max(k, 3))]
        return [b[:n] for b in bufs[:k]]

    def _round(self, out: Tensor, target: Tensor) -> Tensor:
        """The engine writes ``out.to(plan.out_dtype)``; round through that dtype when the live
        model's differs."""
        od = self._out_dtype
        return out.to(od) if od != out.dtype and od != target.dtype else out

    def _flat(self, target: Tensor, chunk: Callable[[slice], Tensor]) -> Tensor:
        """Compute the output chunk by chunk (elementwise methods) straight into ``target``."""
        flat = target.view(-1)

        def one(sl: slice) -> Tensor:
            out = chunk(sl)
            flat[sl].copy_(self._round(out, target))
            return all_finite(out)

        oks = self._map_chunks(flat.numel(), one)
        return torch.stack(oks).all() if len(oks) > 1 else oks[0]


class _TaskInputs:
    """One task's inputs as the workspace holds them (:class:`evomerge.methods.steps.Inputs`):
    sources where the memory plan put them, caches under keys of the task's sources, small
    values memoized for the workspace's life, the engine's generators."""

    def __init__(self, ws: Workspace, task: TensorTask, method: Method, seed: int, rows: int | None):
        self.ws, self.task, self.rows = ws, task, rows
        self._stochastic, self._seed = method.stochastic, seed
        self._needs = method.needs
        self.shape = ws._shape(task, rows)
        self.numel = 1
        for s in self.shape:
            self.numel *= s
        self.n = len(task.inputs)
        self.has_base = task.base is not None
        self.dtype = ws.compute_dtype
        self.device = ws.device
        self._flats: dict[int, Tensor] = {}

    def _ref(self, i: int) -> TensorRef:
        return self.task.base if i < 0 else self.task.inputs[i]  # type: ignore[return-value]

    def _flat(self, i: int) -> Tensor:
        t = self._flats.get(i)
        if t is None:
            t = self._flats[i] = self.ws._src(self._ref(i), self.rows).view(-1)
        return t

    def base(self) -> Tensor:
        return self.ws._cv(self._flat(-1)).view(self.shape)

    def x(self, i: int) -> Tensor:
        return self.ws._cv(self._flat(i)).view(self.shape)

    def delta(self, i: int) -> Tensor:
        return self.ws._delta(self.task.base, self.task.inputs[i], self.rows)

    def base_flat(self) -> Tensor:
        return self._flat(-1)

    def x_flat(self, i: int) -> Tensor:
        return self._flat(i)

    def cv(self, t: Tensor) -> Tensor:
        return self.ws._cv(t)

    def scratch(self, n: int, k: int) -> list[Tensor]:
        return self.ws._scratch(n, k)

    def _reads(self, reads: Sequence[int]) -> tuple:
        return (self.task.base, tuple(self.task.inputs[j] for j in reads), self.rows)

    def cache_key(self, cache: Cache) -> tuple:
        seed = None if cache.seeded is None else self.seed(cache.seeded)
        return (cache.tag, self._reads(cache.reads) if cache.reads else None, seed, self.shape)

    def cached(self, cache: Cache) -> Tensor | None:
        return self.ws._cached(self.cache_key(cache))

    def memo(self, key: tuple, reads: Sequence[int], build: Callable[[], Any]) -> Any:
        return self.ws._small_cache((key, self._reads(reads)), build)

    def seed(self, i: int) -> int:
        return tensor_seed(self._seed, self.task.out_name, i)

    def generator(self, i: int) -> torch.Generator | None:
        if not self._stochastic:
            return None  # as the engine
        return torch.Generator(device=self.device).manual_seed(self.seed(i))

    def map_chunks(self, fn: Callable[[slice], Any]) -> list[Any]:
        return self.ws._map_chunks(self.numel, fn)

    def stat(self, i: int) -> Tensor | None:
        t = self.ws._stat(self._needs, self._ref(i))
        return None if t is None else t.to(self.device)


# --------------------------------------------------------------------------- plan structure
class _CachedCheckpoint:
    """A :class:`Checkpoint` whose shape/dtype/has answers are memoized (planning asks often)."""

    def __init__(self, ck: Checkpoint):
        self._ck = ck
        self._memo: dict[tuple[str, str], Any] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ck, name)

    def _ask(self, what: str, name: str) -> Any:
        key = (what, name)
        if key not in self._memo:
            self._memo[key] = getattr(self._ck, what)(name)
        return self._memo[key]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._ask("shape", name)

    def dtype(self, name: str) -> torch.dtype:
        return self._ask("dtype", name)

    def has(self, name: str) -> bool:
        return self._ask("has", name)

    def close(self) -> None:
        self._ck.close()


def structure_key(recipe: Recipe) -> str:
    """The recipe with every number that is a parameter value blanked (layer ranges kept):
    recipes with equal keys have plans of the same tasks in the same order."""
    import json

    def strip(x: Any, key: str = "") -> Any:
        if isinstance(x, dict):
            return {k: strip(v, k) for k, v in x.items() if k != "random_seed"}
        if isinstance(x, list):
            return x if key == "layer_range" else [strip(v, key) for v in x]
        if isinstance(x, (int, float)) and not isinstance(x, bool):
            return "#"
        return x

    return json.dumps(strip(recipe.to_dict()), sort_keys=True)


def _task_contexts(recipe: Recipe, plan: MergePlan, sources: Any) -> list[tuple[int, float]]:
    """For every task of ``plan``: (index of its output slice, relative depth t), as plan_merge
    resolved its parameters (embeddings at the first slice, norm/head at the last, t = 0)."""
    slices = _as_slices(recipe, sources)
    bounds = []  # (first output layer, number of layers) per slice
    start = 0
    for sl in slices:
        n = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        bounds.append((start, n))
        start += n
    out = []
    seen_layer = False
    for task in plan.tasks:
        if task.layer is None:
            out.append((len(slices) - 1 if seen_layer else 0, 0.0))
            continue
        seen_layer = True
        for i, (first, n) in enumerate(bounds):
            if first <= task.layer < first + n:
                k = task.layer - first
                out.append((i, k / (n - 1) if n > 1 else 1.0))
                break
    return out
