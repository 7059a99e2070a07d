"""The data-flow search space (Sakana's DFS): which source layer runs at each hop, with what
input scale. Pure: names, bounds and ``decode(params) -> list[Hop]``; no torch.

With M source layers (every layer of each dfs model, in order) and ``repeats`` r, there are
T = M·r *slots*; slot k stands for source layer ``k mod M`` in repeat ``k // M``. Slot k is on
the path iff its indicator ``r<repeat>.<model>.L<layer>.use`` is > 0 (a float, thresholded here,
never categorical, so CMA-ES can move it), and its hidden-state input is multiplied by
``...scale``. Constraints: ``max_layers`` keeps the first hops (a parameter budget becomes a
``max_layers`` through :func:`layers_within`); ``keep_first``/``keep_last`` put the host's
first/last layer at the ends of the path when the slots didn't.
"""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.layerpath import Hop, SourceLayer


X0_USE = 0.8  # |indicator| of the starting point (see DfsSpace.x0)


@dataclass(frozen=True)
class Slot:
    name: str  # "r1.math.L03"
    layer: int  # index into the source layers


@dataclass(frozen=True)
class DfsSpace:
    sources: tuple[SourceLayer, ...]
    host: str
    repeats: int = 3
    scales: bool = True
    scale_range: tuple[float, float] = (0.5, 1.5)
    max_layers: int | None = None
    keep_first: bool = True
    keep_last: bool = True

    @property
    def slots(self) -> list[Slot]:
        width = max(2, len(str(max(s.index for s in self.sources))))
        out = []
        for r in range(self.repeats):
            for i, src in enumerate(self.sources):
                out.append(Slot(f"r{r}.{src.model}.L{src.index:0{width}d}", i))
        return out

    def bounds(self) -> dict[str, tuple[float, float]]:
        out: dict[str, tuple[float, float]] = {}
        for slot in self.slots:
            out[f"{slot.name}.use"] = (-1.0, 1.0)
            if self.scales:
                out[f"{slot.name}.scale"] = tuple(self.scale_range)  # type: ignore[assignment]
        return out

    @property
    def host_layers(self) -> list[int]:
        return [i for i, s in enumerate(self.sources) if s.model == self.host]

    def x0(self) -> dict[str, float]:
        """The host's own model: its layers on in the first repeat, everything else off, scale 1.

        Indicators start at +-X0_USE, not near 0: with CMA-ES's default step (0.25 of the range,
        i.e. 0.5 here) a slot flips with probability P(N(0,1) > 1.6) ~ 5%, so the first candidates
        are the host's path with one or two layers added or dropped. Starting at +-0.5 flipped
        16% of the slots, and on the demo world 80 of 95 candidates filled the whole
        ``max_layers`` budget with arbitrary layers."""
        host = set(self.host_layers)
        x = {}
        for k, slot in enumerate(self.slots):
            on = k < len(self.sources) and slot.layer in host
            x[f"{slot.name}.use"] = X0_USE if on else -X0_USE
            if self.scales:
                lo, hi = self.scale_range
                x[f"{slot.name}.scale"] = min(max(1.0, lo), hi)
        return x

    def decode(self, params: dict[str, float]) -> list[Hop]:
        hops = []
        for slot in self.slots:
            if params[f"{slot.name}.use"] > 0:
                scale = float(params[f"{slot.name}.scale"]) if self.scales else 1.0
                hops.append(Hop(slot.layer, scale))
        first, last = self.host_layers[0], self.host_layers[-1]
        if self.keep_first and (not hops or hops[0].layer != first):
            hops.insert(0, Hop(first))
        if self.keep_last and (not hops or hops[-1].layer != last):
            hops.append(Hop(last))
        if self.max_layers is not None and len(hops) > self.max_layers:
            # keep the first hops, and the closing hop when the path must end with the last layer
            end = hops[-1:] if self.keep_last else []
            hops = hops[: self.max_layers - len(end)] + end
        if not hops:
            hops = [Hop(first)]
        return hops

    def host_path(self) -> list[Hop]:
        return [Hop(i) for i in self.host_layers]


def layers_within(max_params: float, layer_params: int, other_params: int) -> int:
    """The most hops a path model can have within ``max_params`` parameters: the host's tensors
    outside the layers (embeddings, final norm, head) plus one source layer's tensors per hop.
    Hops of a repeated layer count again: the exported checkpoint materialises every hop."""
    if layer_params <= 0:
        raise ValueError("layer_params must be positive")
    return max(0, int((max_params - other_params) // layer_params))
