"""A workspace per worker: one live model whose parameters are overwritten in place for each
candidate recipe, at (close to) the cost of one pass over the inputs.

What is kept between candidates (placed by :mod:`evomerge.planner` on the device, in pinned host
memory, or left on disk / recomputed when memory is short):

- every source tensor, in its stored dtype on a GPU (lossless: the kernels upcast in registers
  exactly as the engine does, and a task vector ``x - base`` is formed on the fly from ``x`` and
  ``base`` in float32, bit-identical to the engine's), upcast to the compute dtype on a CPU (one
  conversion less per element; also exact);
- everything that does not depend on a candidate's parameters, computed once:
  magnitude ranks of each task vector (TIES, breadcrumbs: a density becomes one comparison
  ``rank < k``, no topk/sort per candidate), DELLA's per-row ranks, SCE's variance ranks and
  non-zero counts, the L1 norms of the task vectors (DARE/DELLA rescale), slerp's cosine, nuslerp's
  angles, model_stock's ratio, SCE's energies at ``select_topk = 1``;
- Bernoulli thresholds for the seeded masks (DARE, DELLA): for the engine's per-tensor generator
  (same seed, same shape, same device) ``torch.bernoulli(p) == (p >= p*)`` for *every* probability
  tensor ``p``, so a candidate's random mask is one comparison and identical to the engine's.

Planning a candidate reuses the plan of the previous candidate with the same recipe structure
(only the per-tensor parameters are resolved again). A candidate then costs one pass (CPU: in
cache-sized chunks spread over worker threads, so intermediates stay in cache; CUDA: one fused
Triton kernel per tensor, see :mod:`evomerge.kernels`), plus a second pass only where
the engine's semantics need a reduction over the *masked* tensor (L1 rescale of DARE/DELLA, SCE's
energies below ``select_topk = 1``). Results equal ``evomerge merge`` for the same recipe:
deterministic methods exactly, seeded ones identically on the same device.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass, replace
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
    all_finite,
    plan_merge,
    resolve_device,
    tensor_seed,
)
from evomerge.errors import CheckpointError, MergeError
from evomerge.methods import Method
from evomerge.methods.interpolate import (
    linear_normalizer,
    nuslerp_angles,
    nuslerp_combine,
    nuslerp_unview,
    nuslerp_view,
    slerp_coefficients,
    slerp_dot,
)
from evomerge.methods.model_stock import model_stock_combine, model_stock_ratio
from evomerge.methods.sce import sce_combine, sce_energy, sce_variance, sce_variance_mask, sce_weights_from_energy
from evomerge.methods.task_arithmetic import (
    bernoulli_mask,
    breadcrumbs_counts,
    breadcrumbs_mask,
    della_keep_probs,
    della_probs_from_ranks,
    della_row_ranks,
    descending_ranks,
    l1_scale,
    linear_total,
    magnitude_mask,
    mix_task_vectors,
)
from evomerge.planner import Item, MemoryPlan, make_plan
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)

GTA_KINDS: dict[str, tuple[str | None, str | None]] = {  # method -> (sparsifier, consensus)
    "task_arithmetic": (None, None),
    "ties": ("magnitude", "sum"),
    "dare_ties": ("random", "sum"),
    "dare_linear": ("random", None),
    "breadcrumbs": ("magnitude_outliers", None),
    "breadcrumbs_ties": ("magnitude_outliers", "sum"),
    "della": ("della_magprune", "sum"),
    "della_linear": ("della_magprune", None),
}

_F32_ONE_BITS = 0x3F800000  # the bit pattern of 1.0f


def bernoulli_thresholds(seed: int, shape: Sequence[int], device: torch.device, *,
                         verify: bool = True, force_search: bool = False) -> Tensor:
    """``p*`` (float32, ``shape``) such that, for a generator ``torch.Generator(device).manual_seed(seed)``,
    ``torch.bernoulli(p, generator=g) == (p >= p*)`` for every float32 probability tensor ``p`` of
    this shape on ``device``.

    ``torch.bernoulli`` draws one uniform per entry, independent of ``p``, and keeps the entry when
    the uniform is below ``p`` (``<`` on CPU, ``<=`` on CUDA); the smallest float ``p`` that keeps
    it is ``p*``. On CPU ``torch.rand`` draws the same uniforms (checked against one Bernoulli draw
    unless ``verify`` is off); elsewhere, or if that check fails, ``p*`` is found by a bisection over
    the float32 bit patterns of ``[0, 1]`` (31 Bernoulli draws).
    """
    shape = tuple(shape)

    def gen() -> torch.Generator:
        return torch.Generator(device=device).manual_seed(seed)

    if device.type == "cpu" and not force_search:
        u = torch.rand(shape, generator=gen(), device=device)
        cand = torch.nextafter(u, torch.full((), float("inf")))
        if not verify:
            return cand
        probe = torch.rand(shape, generator=torch.Generator(device=device).manual_seed(seed ^ 0x5EED), device=device)
        if torch.equal(torch.bernoulli(probe, generator=gen()).bool(), probe >= cand):
            return cand
        log.warning("torch.rand and torch.bernoulli draw differently here; searching Bernoulli thresholds")
    lo = torch.zeros(shape, dtype=torch.int32, device=device)
    hi = torch.full(shape, _F32_ONE_BITS, dtype=torch.int32, device=device)
    for _ in range(32):
        if not bool((hi - lo > 1).any()):
            break
        mid = (lo + hi) >> 1
        hit = torch.bernoulli(mid.view(torch.float32), generator=gen()).bool()
        hi = torch.where(hit, mid, hi)
        lo = torch.where(hit, lo, mid)
    return hi.view(torch.float32)


def _checkpoint_targets(model: Any, arch: Any, num_layers: int) -> dict[str, Tensor]:
    """Checkpoint tensor name -> the live tensor (or view of one) that holds it. Names agree
    except where the architecture file says otherwise (``live``: experts fused by transformers)."""
    targets = dict(model.named_parameters())
    targets.update({k: v for k, v in model.named_buffers() if k not in targets})
    for spec in arch.all_weights(num_layers):
        if spec.live is not None and spec.live.name in targets:
            targets[spec.name] = spec.live.view(targets[spec.live.name])
    return targets


def _rank_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 32767 else torch.int32 if n <= 2**31 - 1 else torch.int64


class Workspace:
    def __init__(self, refs: list[str], *, template: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype = torch.float32, memory_limit: int | None = None,
                 host_memory_limit: int | None = None, chunk_elems: int | None = None,
                 fused: bool | None = None, verbose: bool = False, model: Any = None):
        """``refs``: every model a candidate may read; ``template``: the model whose config,
        architecture and tokenizer the live instance takes.

        ``memory_limit``: bytes the workspace may keep on the device besides the live model (default:
        what is free); ``host_memory_limit``: pinned host bytes for sources streamed to a GPU.
        ``chunk_elems``: elements per chunk of the per-candidate pass (CPU default 256k, so the
        intermediates stay in cache). ``fused``: use the fused CUDA kernels (default: on CUDA when
        Triton is importable). ``verbose``: print the memory plan when it changes.
        ``model``: an already built live model to use instead of loading the template's weights.
        """
        self.device = resolve_device(device)
        self.dtype = dtype
        self.compute_dtype = compute_dtype
        self.sources = {ref: _CachedCheckpoint(Checkpoint.open(ref)) for ref in dict.fromkeys([template, *refs])}
        arches = {ck.arch.name for ck in self.sources.values()}
        if len(arches) > 1:
            raise CheckpointError(f"models have different architectures: {', '.join(sorted(arches))}")
        tpl = self.sources[template]
        if model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(tpl.path, dtype=dtype)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self._template_path = tpl.path
        self._tokenizer: Any = None
        self.num_layers = tpl.num_layers
        self.arch = tpl.arch
        self.params = _checkpoint_targets(self.model, tpl.arch, self.num_layers)
        self.chunk_elems = chunk_elems or (1 << 18 if self.device.type == "cpu" else 1 << 26)
        self.verbose = verbose
        self._memory_limit = memory_limit
        self._host_memory_limit = host_memory_limit
        self.memory: MemoryPlan | None = None
        self._store: dict[Any, Any] = {}  # resident sources and caches, by key
        self._small: dict[Any, Any] = {}  # per-tensor scalars and per-row vectors (not planned)
        self._verified_numels: set[int] = set()
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
                               "fused_kernels": self.kernels is not None, "kernel_error": self.kernel_error}
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
        if len(mem.items) != before:
            log.info("%s", mem.table())
            if self.verbose:
                print(mem.table(), file=sys.stderr)

    def _want_derived(self, task: TensorTask, method: Method, seed: int, rows: int | None, numel: int,
                      want: Callable[..., None]) -> None:
        name = method.name
        p = task.params
        base = task.base
        if name in GTA_KINDS:
            sparsifier, _ = GTA_KINDS[name]
            if sparsifier is None:
                return
            for i, ref in enumerate(task.inputs):  # densities change between candidates: cache for all
                if sparsifier in ("magnitude", "magnitude_outliers"):
                    dt = _rank_dtype(numel)
                    want("magnitude ranks", ("magrank", base, ref, rows), numel * dt.itemsize, ref[0],
                         lambda ref=ref: self._build_magrank(base, ref, rows))
                if sparsifier == "della_magprune":
                    shape = self._shape(task, rows)
                    ncols = shape[1] if len(shape) >= 2 else shape[0]
                    if ncols >= 2:
                        dt = _rank_dtype(ncols)
                        want("row ranks", ("rowrank", base, ref, rows), numel * dt.itemsize, ref[0],
                             lambda ref=ref: self._build_rowrank(base, ref, rows))
                if sparsifier in ("random", "della_magprune") and self.compute_dtype == torch.float32:
                    s = tensor_seed(seed, task.out_name, i)
                    shape = self._shape(task, rows)
                    want("bernoulli thresholds", ("pstar", s, shape), numel * 4, ref[0],
                         lambda s=s, shape=shape: self._build_pstar(s, shape))
        elif name == "sce":
            dt = _rank_dtype(numel)
            want("variance ranks", ("varrank", base, task.inputs, rows), numel * dt.itemsize, "all models",
                 lambda: self._build_varrank(base, task.inputs, rows))

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

    def _build_magrank(self, base: TensorRef, ref: TensorRef, rows: int | None) -> Tensor:
        d = self._delta(base, ref, rows)
        return descending_ranks(d.abs()).to(_rank_dtype(d.numel()))

    def _build_rowrank(self, base: TensorRef, ref: TensorRef, rows: int | None) -> Tensor:
        d = self._delta(base, ref, rows)
        ncols = d.shape[1] if d.dim() >= 2 else d.shape[0]
        return della_row_ranks(d).to(_rank_dtype(ncols))

    def _build_varrank(self, base: TensorRef, inputs: Sequence[TensorRef], rows: int | None) -> Tensor:
        var = sce_variance(torch.stack([self._delta(base, r, rows) for r in inputs], dim=0))
        self._small[("nnz", base, tuple(inputs), rows)] = int(torch.count_nonzero(var))
        return descending_ranks(var).to(_rank_dtype(var.numel()))

    def _build_pstar(self, seed: int, shape: tuple[int, ...]) -> Tensor:
        numel = 1
        for s in shape:
            numel *= s
        verify = numel not in self._verified_numels
        out = bernoulli_thresholds(seed, shape, self.device, verify=verify)
        self._verified_numels.add(numel)
        return out

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
        """Write one merged tensor into ``target``. Returns a 0-dim bool "all finite" tensor, or
        None when a fused kernel ran (it counts non-finite values into ``flag``)."""
        rows = self._rows(task)
        shape = self._shape(task, rows)
        if tuple(target.shape) != shape:
            raise MergeError(f"{task.out_name}: merged shape {shape} != model's {tuple(target.shape)}")
        name = method.name
        if self.kernels is not None:
            try:
                if self.kernels.run(self, task, method, seed, target, rows, flag):
                    return None
            except Exception as e:  # noqa: BLE001 - a kernel that does not compile here: the eager path is exact too
                log.warning("fused kernel failed for %s (%s: %s); using the eager path from now on",
                            task.out_name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.kernels = None
                self.kernel_error = f"{type(e).__name__}: {e}"
        if name in GTA_KINDS:
            return self._gta(task, method, seed, target, rows)
        if name == "sce":
            return self._sce(task, target, rows)
        if name == "model_stock":
            return self._model_stock(task, target, rows)
        if name == "nuslerp":
            return self._nuslerp(task, target, rows)
        p = task.params
        # linear, passthrough and slerp: the pure functions' operations in the same order (so the
        # same rounding), written into per-thread scratch buffers instead of fresh temporaries
        if name == "linear":
            xs = [self._src(r, rows).view(-1) for r in task.inputs]
            return self._flat(target, lambda sl: self._weighted_sum(
                [x[sl] for x in xs], [float(w) for w in p["weight"]], linear_normalizer(p["weight"], p["normalize"])))
        if name == "passthrough":
            x, scale = self._src(task.inputs[0], rows).view(-1), p["scale"][0]
            if scale is None or scale == 1:
                return self._flat(target, lambda sl: self._cv(x[sl]))
            return self._flat(target, lambda sl: self._weighted_sum([x[sl]], [scale], None))
        if name == "slerp":
            base, other = task.base, task.inputs[0]
            dot = self._small_cache(("slerp", base, other, rows), lambda: slerp_dot(
                self._cv(self._src(base, rows)), self._cv(self._src(other, rows))))
            c0, c1 = slerp_coefficients(dot, p["t"])
            b, x = self._src(base, rows).view(-1), self._src(other, rows).view(-1)
            return self._flat(target, lambda sl: self._weighted_sum([b[sl], x[sl]], [c0, c1], None))
        if name == "nearswap":
            b, x = self._src(task.base, rows).view(-1), self._src(task.inputs[0], rows).view(-1)
            return self._flat(target, lambda sl: self._nearswap(self._cv(b[sl]), self._cv(x[sl]), float(p["t"])))
        raise MergeError(f"{name}: no workspace implementation")  # pragma: no cover - registry is covered by tests

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

    def _weighted_sum(self, xs: Sequence[Tensor], weights: Sequence[float], factor: float | None) -> Tensor:
        """``(x0*w0 + x1*w1 + ...) * factor`` as :func:`linear` computes it (each product rounded,
        then added in order), in scratch buffers; ``xs`` are in their stored dtype."""
        out, tmp = self._scratch(xs[0].numel(), 2)
        torch.mul(self._cv(xs[0]), float(weights[0]), out=out)
        for x, w in zip(xs[1:], weights[1:]):
            out.add_(torch.mul(self._cv(x), float(w), out=tmp))
        return out if factor is None else out.mul_(factor)

    def _nearswap(self, b: Tensor, x: Tensor, t: float) -> Tensor:
        """:func:`nearswap` step by step in scratch buffers (each operation rounds as there)."""
        w, out, tmp = self._scratch(b.numel(), 3)
        torch.sub(b, x, out=w).abs_().clamp_(min=1e-6).reciprocal_().mul_(t).clamp_(0, 1)  # weight of x
        torch.mul(w, x, out=out)
        torch.mul(w, -1.0, out=tmp).add_(1.0).mul_(b)  # (1 - w) * b
        return out.add_(tmp)

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

    # GTA: task arithmetic, TIES, DARE, breadcrumbs, DELLA
    def _gta(self, task: TensorTask, method: Method, seed: int, target: Tensor, rows: int | None) -> Tensor:
        sparsifier, consensus = GTA_KINDS[method.name]
        p = task.params
        if sparsifier is None and consensus is None:
            return self._task_arithmetic(task, target, rows)
        specs = gta_model_specs(self, task, method, seed, rows)
        assert specs is not None
        b = self._src(task.base, rows).view(-1)
        xs = [self._src(r, rows).view(-1) for r in task.inputs]
        numel = b.numel()
        cv = self._cv
        # phase 1: L1 rescale factors need the sum over the whole masked task vector
        for i, sp in enumerate(specs):
            if sp.sm == SM_SCALE_PTR and sp.scale is None:
                buf = torch.empty(numel, dtype=self.compute_dtype, device=self.device)
                self._map_chunks(numel, lambda sl, sp=sp, x=xs[i], buf=buf: torch.abs(
                    sp.masked(cv(x[sl]) - cv(b[sl]), sl), out=buf[sl]))
                sp.scale = sp.l1_scale(buf)
                del buf

        def chunk(sl: slice) -> Tensor:
            bb = cv(b[sl])
            sparse = [sp.sparse(cv(x[sl]) - bb, sl) for sp, x in zip(specs, xs)]
            return mix_task_vectors(bb, sparse, p["weight"], consensus=consensus, normalize=p["normalize"],
                                    lambda_=p["lambda"])

        return self._flat(target, chunk)

    def _task_arithmetic(self, task: TensorTask, target: Tensor, rows: int | None) -> Tensor:
        """:func:`mix_task_vectors` without sparsifier or consensus, step by step in scratch
        buffers: ``base + lambda * (sum_i (x_i - base) * w_i) [/ sum w]``, same order, same rounding."""
        p = task.params
        b = self._src(task.base, rows).view(-1)
        xs = [self._src(r, rows).view(-1) for r in task.inputs]
        weights = [float(w) for w in p["weight"]]
        total = linear_total(weights) if p["normalize"] else 1.0
        lam = float(p["lambda"])

        def chunk(sl: slice) -> Tensor:
            bb = self._cv(b[sl])
            acc, tmp = self._scratch(bb.numel(), 2)
            torch.sub(self._cv(xs[0][sl]), bb, out=acc).mul_(weights[0])
            for x, w in zip(xs[1:], weights[1:]):
                acc.add_(torch.sub(self._cv(x[sl]), bb, out=tmp).mul_(w))
            if total != 1.0:
                acc.mul_(1.0 / total)
            if lam != 1:
                acc.mul_(lam)
            return acc.add_(bb)

        return self._flat(target, chunk)

    def _sce(self, task: TensorTask, target: Tensor, rows: int | None) -> Tensor:
        ds, weights, from_x = sce_prepare(self, task, rows)
        b = self._src(task.base, rows).view(-1)
        cv = self._cv
        if from_x:
            return self._flat(target, lambda sl: sce_combine(cv(b[sl]), [cv(x[sl]) - cv(b[sl]) for x in ds], weights))
        return self._flat(target, lambda sl: sce_combine(cv(b[sl]), [d[sl] for d in ds], weights))

    def _model_stock(self, task: TensorTask, target: Tensor, rows: int | None) -> Tensor:
        fw = task.params["filter_wise"]
        base_ref, inputs = task.base, task.inputs
        t = self._small_cache(("mstock", base_ref, inputs, rows, fw), lambda: model_stock_ratio(
            self._cv(self._src(base_ref, rows)), [self._cv(self._src(r, rows)) for r in inputs], filter_wise=fw))
        base = self._src(base_ref, rows)
        xs = [self._src(r, rows) for r in inputs]
        cv = self._cv
        if not fw:
            b, fx = base.view(-1), [x.view(-1) for x in xs]
            return self._flat(target, lambda sl: model_stock_combine(t, cv(b[sl]), [cv(x[sl]) for x in fx]))
        if base.dim() != 2:
            w0 = base.unsqueeze(0) if base.dim() == 1 else base
            ws = [x.unsqueeze(0) if x.dim() == 1 else x for x in xs]
            out = model_stock_combine(t, cv(w0), [cv(w) for w in ws]).reshape(target.shape)
            target.copy_(self._round(out, target))
            return all_finite(out)
        ncols = base.shape[1]
        per = max(1, self.chunk_elems // max(1, ncols))
        oks = []
        for r0 in range(0, base.shape[0], per):
            sl = slice(r0, min(r0 + per, base.shape[0]))
            out = model_stock_combine(t[sl], cv(base[sl]), [cv(x[sl]) for x in xs])
            oks.append(all_finite(out))
            target[sl].copy_(self._round(out, target))
        return torch.stack(oks).all()

    def _nuslerp(self, task: TensorTask, target: Tensor, rows: int | None) -> Tensor:
        p = task.params
        w = p["weight"]
        total = float(w[0]) + float(w[1])
        t = 0.5 if abs(total) < 1e-6 else float(w[1]) / total
        row_wise, flatten = p["nuslerp_row_wise"], p["nuslerp_flatten"]
        dim = 0 if row_wise else -1
        base_ref = task.base
        r0, r1 = task.inputs
        key = ("nuslerp", base_ref, r0, r1, rows, dim, flatten)

        def angles() -> tuple[Tensor, Tensor, Tensor]:
            v0, v1 = self._delta(base_ref, r0, rows), self._delta(base_ref, r1, rows)
            return nuslerp_angles(nuslerp_view(v0, dim, flatten), nuslerp_view(v1, dim, flatten))

        theta, safe_sin, colinear = self._small_cache(key, angles)
        cv = self._cv
        if flatten:
            x0, x1 = self._src(r0, rows).view(-1), self._src(r1, rows).view(-1)
            if base_ref is None:
                return self._flat(target, lambda sl: nuslerp_combine(t, cv(x0[sl]), cv(x1[sl]), theta, safe_sin, colinear))
            b = self._src(base_ref, rows).view(-1)

            def chunk(sl: slice) -> Tensor:
                bb = cv(b[sl])
                return bb + nuslerp_combine(t, cv(x0[sl]) - bb, cv(x1[sl]) - bb, theta, safe_sin, colinear)

            return self._flat(target, chunk)
        v0, v1 = self._delta(base_ref, r0, rows), self._delta(base_ref, r1, rows)
        shape = v0.shape
        out = nuslerp_unview(nuslerp_combine(t, nuslerp_view(v0, dim, False), nuslerp_view(v1, dim, False),
                                             theta, safe_sin, colinear), shape, dim, False)
        if base_ref is not None:
            out = self._cv(self._src(base_ref, rows)) + out
        target.copy_(self._round(out, target))
        return all_finite(out)


# --------------------------------------------------------------------------- shared by the eager path and the kernels
MM_NONE, MM_RANK, MM_MASK, MM_PSTAR_P, MM_PSTAR_ROWRANK, MM_PSTAR_PROBS, MM_MASK_PROBS = range(7)
SM_NONE, SM_SCALE_PTR, SM_MUL, SM_DIV_PROBS = range(4)


@dataclass
class ModelSpec:
    """How one model's task vector is sparsified in a candidate (flat views of whole tensors).

    ``mm`` (mask): none; ``rank`` window ``lo <= a < hi``; full bool mask ``a``; Bernoulli
    thresholds ``a <= f1``; thresholds vs DELLA probabilities ``b * f1 + f2`` (row ranks ``b``);
    thresholds vs full probabilities ``b``; full mask ``a`` with full probabilities ``b``.
    ``sm`` (rescale): none; times ``scale`` (L1, 0-dim); times ``f3``; divided by the probabilities.
    """

    mm: int
    sm: int
    w: float
    shape: tuple[int, ...]
    a: Tensor | None = None
    b: Tensor | None = None
    lo: int = 0
    hi: int = 0
    f1: float = 0.0
    f2: float = 0.0
    f3: float = 0.0
    before: Tensor | None = None
    scale: Tensor | None = None

    def probs(self, sl: slice) -> Tensor:
        if self.mm == MM_PSTAR_ROWRANK:
            return self.b[sl].to(torch.float32) * self.f1 + self.f2  # = della_probs_from_ranks
        return self.b[sl]

    def keep(self, sl: slice) -> Tensor:
        mm = self.mm
        if mm == MM_RANK:
            r = self.a[sl]
            return (r >= self.lo) & (r < self.hi)
        if mm in (MM_MASK, MM_MASK_PROBS):
            return self.a[sl]
        if mm == MM_PSTAR_P:
            return self.a[sl] <= self.f1
        return self.probs(sl) >= self.a[sl]

    def masked(self, d: Tensor, sl: slice) -> Tensor:
        return d if self.mm == MM_NONE else d * self.keep(sl)

    def sparse(self, d: Tensor, sl: slice) -> Tensor:
        x = self.masked(d, sl)
        if self.sm == SM_SCALE_PTR:
            return x * self.scale
        if self.sm == SM_MUL:
            return x * self.f3
        if self.sm == SM_DIV_PROBS:
            return x / self.probs(sl)
        return x

    def l1_scale(self, abs_masked: Tensor) -> Tensor:
        """The engine's ``l1_scale(delta.abs().sum(), masked.abs().sum())``."""
        return l1_scale(self.before, abs_masked.view(self.shape).sum())


def gta_model_specs(ws: Workspace, task: TensorTask, method: Method, seed: int, rows: int | None) -> list[ModelSpec] | None:
    """Per model: the cached (or, where the planner found no room, recomputed) pieces of its mask."""
    sparsifier, _ = GTA_KINDS[method.name]
    p = task.params
    base_ref = task.base
    shape = ws._shape(task, rows)
    numel = 1
    for s in shape:
        numel *= s
    specs = []
    for i, ref in enumerate(task.inputs):
        w = float(p["weight"][i])
        density = p["density"][i] if sparsifier else 1.0
        if sparsifier is None or density >= 1:
            specs.append(ModelSpec(MM_NONE, SM_NONE, w, shape))
            continue
        sp = ModelSpec(MM_MASK, SM_NONE, w, shape)

        def gen(i: int = i) -> torch.Generator:
            return torch.Generator(device=ws.device).manual_seed(tensor_seed(seed, task.out_name, i))

        probs_float = False
        if sparsifier in ("magnitude", "magnitude_outliers"):
            rank = ws._cached(("magrank", base_ref, ref, rows))
            if sparsifier == "magnitude":
                lo, hi = 0, int(density * numel)
            else:
                n_top, n_bot = breadcrumbs_counts(numel, density, p["gamma"][i])
                lo, hi = n_top, numel - n_bot
            if rank is not None:
                sp.mm, sp.a, sp.lo, sp.hi = MM_RANK, rank.view(-1), lo, hi
            else:
                d = ws._delta(base_ref, ref, rows)
                full = magnitude_mask(d, density) if sparsifier == "magnitude" else breadcrumbs_mask(d, density, p["gamma"][i])
                sp.a = full.view(-1).bool()
        elif sparsifier == "random":
            pstar = ws._cached(("pstar", tensor_seed(seed, task.out_name, i), shape))
            probs_float = True
            if pstar is not None:
                sp.mm, sp.a, sp.f1 = MM_PSTAR_P, pstar.view(-1), float(density)
            else:
                sp.a = bernoulli_mask(ws._delta(base_ref, ref, rows), density, gen()).view(-1).bool()
        else:  # della_magprune
            eps = p["epsilon"][i]
            ncols = shape[1] if len(shape) >= 2 else shape[0]
            rank = ws._cached(("rowrank", base_ref, ref, rows))
            pstar = ws._cached(("pstar", tensor_seed(seed, task.out_name, i), shape))
            if ncols >= 2 and rank is not None and ws.compute_dtype == torch.float32:
                probs_mode = MM_PSTAR_ROWRANK
                sp.b, sp.f1, sp.f2 = rank.view(-1), 2 * eps / (ncols - 1), density - eps
            else:
                probs_mode = MM_PSTAR_PROBS
                if ncols < 2:
                    sp.b = torch.full((numel,), density, dtype=ws.compute_dtype, device=ws.device)
                else:
                    sp.b = della_keep_probs(ws._delta(base_ref, ref, rows), density, eps).view(-1)
            if pstar is not None:
                sp.mm, sp.a = probs_mode, pstar.view(-1)
            else:
                probs = sp.probs(slice(0, numel))
                sp.mm, sp.b = MM_MASK_PROBS, probs
                sp.a = torch.bernoulli(probs.view(shape), generator=gen()).view(-1).bool()
        if p["rescale"]:
            if p["rescale_mode"] == "l1" or sparsifier in ("magnitude", "magnitude_outliers"):
                sp.sm = SM_SCALE_PTR
                sp.before = ws._small_cache(("l1", base_ref, ref, rows),
                                            lambda ref=ref: ws._delta(base_ref, ref, rows).abs().sum())
            elif probs_float:
                sp.sm, sp.f3 = SM_MUL, 1.0 / density
            else:
                sp.sm = SM_DIV_PROBS
        specs.append(sp)
    return specs


def sce_prepare(ws: Workspace, task: TensorTask, rows: int | None) -> tuple[list[Tensor], Tensor, bool]:
    """SCE's inputs for the combine step: ``(task vectors or sources, weights, from_sources)``.
    Below ``select_topk = 1`` the masked task vectors are materialized (float32), because the
    weights are their energies, a reduction over the whole tensor."""
    topk = task.params["select_topk"]
    base_ref, inputs = task.base, task.inputs
    base = ws._src(base_ref, rows)
    shape, numel = tuple(base.shape), base.numel()
    b = base.view(-1)
    xs = [ws._src(r, rows).view(-1) for r in inputs]
    cv = ws._cv
    if topk >= 1:
        energy = ws._small_cache(("sce_energy", base_ref, inputs, rows), lambda: torch.stack(
            [sce_energy(ws._delta(base_ref, r, rows)) for r in inputs]))
        return xs, sce_weights_from_energy(energy), True
    rank = ws._cached(("varrank", base_ref, inputs, rows))
    if rank is not None:
        k = int(ws._small[("nnz", base_ref, tuple(inputs), rows)] * topk)
        r = rank.view(-1)
        mask = lambda sl: r[sl] < k  # noqa: E731
    else:
        full = sce_variance_mask(torch.stack([ws._delta(base_ref, x, rows) for x in inputs]), topk).view(-1)
        mask = lambda sl: full[sl]  # noqa: E731
    bufs = [torch.empty(numel, dtype=ws.compute_dtype, device=ws.device) for _ in inputs]
    def one(sl: slice) -> None:
        m = mask(sl)
        bb = cv(b[sl])
        for i in range(len(inputs)):
            torch.mul(cv(xs[i][sl]) - bb, m, out=bufs[i][sl])

    ws._map_chunks(numel, one)
    weights = sce_weights_from_energy(torch.stack([sce_energy(buf.view(shape)) for buf in bufs]))
    return bufs, weights, False


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
