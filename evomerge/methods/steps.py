"""The two steps every merge method is made of, and the inputs they read.

A method is run as ``combine(prepare(inputs, params), inputs, slice)``:

- ``prepare(inputs, params)``: everything that is not elementwise. Its trial-invariant parts
  (magnitude ranks, variance order, angles, statistics) are asked for through ``inputs.cached``
  (large arrays, declared by the method's ``caches`` so a backend can plan memory for them) and
  ``inputs.memo`` (small values); the rest depends on the trial's parameters. A prepared value may
  define ``reduce(inputs)``: a per-trial reduction over the whole tensors (L1 norms of masked task
  vectors) that runs after ``prepare`` and before ``combine``.
- ``combine(prepared, inputs, sl)``: the output's flat elements ``sl`` (a ``slice``), or the whole
  tensor, shaped, when ``sl`` is None. A prepared value with ``chunked = False`` is combined whole.

Backends are ways of running these steps, never a second copy of a method:

- the engine (:class:`WholeInputs`): no caches kept, whole tensors, one ``combine(..., None)``;
- the workspace: caches kept per worker (where its memory plan has room), ``combine`` over
  cache-sized chunks;
- the fused Triton kernels: a method's registry entry names a ``kernel`` that consumes its
  prepared value; a backend without it (or a kernel that declines) runs ``combine``.

Data-aware methods (Fisher, RegMean) declare ``needs`` in the registry (a kind of statistics:
``"fisher"``, ``"gram"``); the backend then holds statistics of that kind (computed once from
calibration text by :mod:`evomerge.statistics`) and ``inputs.stat(i)`` returns model ``i``'s
statistic for the output tensor (a Fisher shaped like the tensor, a linear layer's input Gram),
or None where the statistics hold none. Neither backend knows what the statistics mean.

A method that only has a whole-tensor function gets both steps from :func:`whole_tensor`:
``Method(name=..., **whole_tensor(fn), params=..., ...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import Tensor


@dataclass(frozen=True)
class Cache:
    """A trial-invariant array a backend may keep between candidates.

    ``tag`` names what it is (shared by every method that computes the same thing); ``reads``: the
    indices of the models it is computed from (besides the base); ``seeded``: the model index
    whose seeded generator it depends on (Bernoulli thresholds), else None. ``label`` is what the
    memory plan shows; ``build`` computes it from the inputs."""

    tag: str
    label: str
    nbytes: int
    build: Callable[[], Tensor]
    reads: tuple[int, ...] = ()
    seeded: int | None = None


class Prepared:
    """Base of prepared values: combined in chunks unless ``chunked`` is False."""

    chunked: bool = True

    def reduce(self, inputs: "Inputs") -> None:
        """A per-trial pass over the whole tensors before ``combine`` (none by default)."""


class Inputs(Protocol):
    """One output tensor's inputs as a backend holds them."""

    shape: tuple[int, ...]
    numel: int
    n: int  # models besides the base
    has_base: bool
    dtype: torch.dtype  # the compute dtype
    device: torch.device

    def base(self) -> Tensor: ...  # whole, shaped, compute dtype
    def x(self, i: int) -> Tensor: ...
    def delta(self, i: int) -> Tensor: ...  # x_i - base (x_i when there is no base)
    def base_flat(self) -> Tensor: ...  # flat, as stored: read a chunk, then ``cv`` it
    def x_flat(self, i: int) -> Tensor: ...
    def cv(self, t: Tensor) -> Tensor: ...  # to the compute dtype
    def scratch(self, n: int, k: int) -> list[Tensor]: ...  # k compute-dtype buffers of n elements
    def cached(self, cache: Cache) -> Tensor | None: ...  # the array if this backend kept it
    def memo(self, key: tuple, reads: Sequence[int], build: Callable[[], Any]) -> Any: ...
    def generator(self, i: int) -> torch.Generator | None: ...
    def seed(self, i: int) -> int | None: ...  # the seed of model i's generator, if known
    def map_chunks(self, fn: Callable[[slice], Any]) -> list[Any]: ...
    def stat(self, i: int) -> Tensor | None: ...  # model i's statistic for this tensor (see below)


def rank_dtype(n: int) -> torch.dtype:
    """The narrowest integer dtype that holds ranks 0..n-1."""
    return torch.int16 if n <= 32767 else torch.int32 if n <= 2**31 - 1 else torch.int64


def no_caches(inputs: Inputs, params: Mapping[str, Any]) -> list[Cache]:
    return []


class WholeInputs:
    """The engine's inputs: whole tensors in memory, nothing cached between calls."""

    def __init__(self, base: Tensor | None, xs: Sequence[Tensor],
                 generators: Sequence[torch.Generator | None] | None = None,
                 stats: Sequence[Tensor | None] | None = None):
        self._base = base
        self._stats = list(stats) if stats is not None else None
        self._xs = list(xs)
        ref = base if base is not None else self._xs[0]
        self.shape = tuple(ref.shape)
        self.numel = ref.numel()
        self.n = len(self._xs)
        self.has_base = base is not None
        self.dtype = ref.dtype
        self.device = ref.device
        self._generators = list(generators) if generators is not None else [None] * self.n

    def base(self) -> Tensor:
        assert self._base is not None
        return self._base

    def x(self, i: int) -> Tensor:
        return self._xs[i]

    def delta(self, i: int) -> Tensor:
        return self._xs[i] if self._base is None else self._xs[i] - self._base

    def base_flat(self) -> Tensor:
        return self.base().reshape(-1)

    def x_flat(self, i: int) -> Tensor:
        return self._xs[i].reshape(-1)

    def cv(self, t: Tensor) -> Tensor:
        return t

    def scratch(self, n: int, k: int) -> list[Tensor]:
        return [torch.empty(n, dtype=self.dtype, device=self.device) for _ in range(k)]

    def cached(self, cache: Cache) -> Tensor | None:
        return None

    def memo(self, key: tuple, reads: Sequence[int], build: Callable[[], Any]) -> Any:
        return build()

    def generator(self, i: int) -> torch.Generator | None:
        return self._generators[i]

    def seed(self, i: int) -> int | None:
        return None

    def map_chunks(self, fn: Callable[[slice], Any]) -> list[Any]:
        return [fn(slice(0, self.numel))]

    def stat(self, i: int) -> Tensor | None:
        return None if self._stats is None else self._stats[i]


class ShapeOnly(WholeInputs):
    """Inputs known by shape only (memory estimates: ``caches`` reads nothing but shapes)."""

    def __init__(self, shape: Sequence[int], n: int, *, dtype: torch.dtype = torch.float32,
                 device: torch.device = torch.device("cpu"), has_base: bool = True):
        self.shape = tuple(shape)
        self.numel = 1
        for s in self.shape:
            self.numel *= s
        self.n, self.has_base, self.dtype, self.device = n, has_base, dtype, device
        self._generators = [None] * n
        self._stats = None

    def seed(self, i: int) -> int | None:
        return i


# --------------------------------------------------------------------------- the generic fallback
@dataclass
class _Whole(Prepared):
    params: Mapping[str, Any]
    chunked = False


def whole_tensor(fn: Callable[..., Tensor]) -> dict[str, Callable]:
    """``prepare`` and ``combine`` (a dict, for ``Method(..., **whole_tensor(fn))``) of a method
    given as one whole-tensor function ``fn(base, tensors, params, generators)``: every backend
    runs it on whole tensors (the workspace with its sources, the engine's generators)."""

    def prepare(inputs: Inputs, params: Mapping[str, Any]) -> _Whole:
        return _Whole(dict(params))

    def combine(prep: _Whole, inputs: Inputs, sl: slice | None) -> Tensor:
        base = inputs.base() if inputs.has_base else None
        xs = [inputs.x(i) for i in range(inputs.n)]
        return fn(base, xs, prep.params, [inputs.generator(i) for i in range(inputs.n)])

    return {"prepare": prepare, "combine": combine}
