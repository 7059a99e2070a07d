"""Stage ``moe``: search a mixture of experts of the candidates (the parents, or the best ps trials).

Each expert *slot* has prompts (``moe.prompts``); its gate vector per layer is computed once from
them as ``evomerge moe`` computes it. A trial chooses which candidate's MLPs fill each slot and,
per layer and slot, a gate scale ``s`` and bias ``b``; the router row becomes ``s * g + b * mu``,
where ``g`` is the slot's unit gate vector and ``mu`` the unit mean of the layer's gate vectors.
Mixtral and Qwen3-MoE routers have no bias term, so the bias moves the row along the direction
the prompts share: the slot's logit rises by ``b * <mu, x>``, a bias for tokens like the prompts,
and the candidate stays a plain checkpoint.

The candidates' MLPs stay resident; a trial copies the chosen ones into the live MoE's expert
tensors and rewrites its routers. Dimension names: ``slot.<slot>.expert`` (a float in
``[0, candidates)``, floored, never categorical), ``L<layer>.<slot>.scale``, ``L<layer>.<slot>.bias``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from evomerge.checkpoint import Checkpoint
from evomerge.config import SearchConfig
from evomerge.identity import map_refs, portable_ref
from evomerge.moe import Source, assemble, dense_model, gates_for, load_tokenizer, prepare, recipe_source
from evomerge.moe_config import ExpertConfig, MoEConfig
from evomerge.moe_gates import prepare_tokenizer
from evomerge.recipe import Recipe

__all__ = ["ATTR_MOE", "ATTR_MOE_CANDIDATES", "MoeChoice", "MoeSpace", "MoeStage"]

logger = logging.getLogger(__name__)

ATTR_MOE = "evomerge:moe"  # moe trials: MoeChoice.to_dict()
ATTR_MOE_CANDIDATES = "evomerge:moe_candidates"  # moe studies: {candidate: folder, or ps trial recipe}


@dataclass(frozen=True)
class MoeChoice:
    """One candidate MoE: the candidate in each slot and the per-layer gate scales and biases."""

    experts: tuple[str, ...]
    scale: tuple[tuple[float, ...], ...]  # (num_layers, num_slots)
    bias: tuple[tuple[float, ...], ...]  # (num_layers, num_slots)

    def to_dict(self) -> dict[str, Any]:
        return {"experts": list(self.experts), "scale": [list(r) for r in self.scale],
                "bias": [list(r) for r in self.bias]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoeChoice:
        return cls(tuple(data["experts"]), tuple(tuple(map(float, r)) for r in data["scale"]),
                   tuple(tuple(map(float, r)) for r in data["bias"]))


@dataclass(frozen=True)
class MoeSpace:
    """The moe stage's dimensions; pure (no torch)."""

    slots: tuple[str, ...]
    candidates: tuple[str, ...]
    num_layers: int
    scale_range: tuple[float, float] = (0.25, 4.0)
    bias_range: tuple[float, float] = (-1.0, 1.0)

    def _layer(self, i: int) -> str:
        return f"L{i:0{max(2, len(str(self.num_layers - 1)))}d}"

    def bounds(self) -> dict[str, tuple[float, float]]:
        out = {f"slot.{s}.expert": (0.0, float(len(self.candidates))) for s in self.slots}
        for i in range(self.num_layers):
            for s in self.slots:
                out[f"{self._layer(i)}.{s}.scale"] = tuple(self.scale_range)  # type: ignore[assignment]
                out[f"{self._layer(i)}.{s}.bias"] = tuple(self.bias_range)  # type: ignore[assignment]
        return out

    def default_experts(self) -> tuple[str, ...]:
        """The candidate named like each slot, else the candidates in order."""
        return tuple(s if s in self.candidates else self.candidates[k % len(self.candidates)]
                     for k, s in enumerate(self.slots))

    def x0(self) -> dict[str, float]:
        """The plain MoE: default experts, scale 1, bias 0."""
        x = {f"slot.{s}.expert": self.candidates.index(c) + 0.5 for s, c in zip(self.slots, self.default_experts())}
        for i in range(self.num_layers):
            for s in self.slots:
                x[f"{self._layer(i)}.{s}.scale"] = 1.0
                x[f"{self._layer(i)}.{s}.bias"] = 0.0
        return x

    def decode(self, params: dict[str, float]) -> MoeChoice:
        n = len(self.candidates)
        experts = tuple(self.candidates[min(n - 1, max(0, math.floor(params[f"slot.{s}.expert"])))]
                        for s in self.slots)
        scale = tuple(tuple(float(params[f"{self._layer(i)}.{s}.scale"]) for s in self.slots)
                      for i in range(self.num_layers))
        bias = tuple(tuple(float(params[f"{self._layer(i)}.{s}.bias"]) for s in self.slots)
                     for i in range(self.num_layers))
        return MoeChoice(experts, scale, bias)


class MoeStage:
    """Mixture-of-experts space: the candidates' MLPs resident, routers rewritten per trial."""

    name = "moe"

    def __init__(self, config: SearchConfig, candidates: dict[str, str | Recipe]):
        """``candidates``: name -> model folder, or a ps trial's recipe (built in memory on open)."""
        self.config = config
        self.candidates = candidates
        self.base_ref = config.base_ref or next(iter(config.source_refs.values()))
        with Checkpoint.open(self.base_ref) as ck:
            num_layers = ck.num_layers
        m = config.moe
        self.space = MoeSpace(tuple(m.prompts), tuple(candidates), num_layers, tuple(m.scale_range),
                              tuple(m.bias_range))
        self.sampler_config = m.sampler
        self.budget = m.budget.trials
        self.workspace: Any = None  # no merge workspace (the fitness binds to none)
        self.model: Any = None

    # -- the stage protocol (see evomerge.search)
    def bounds(self) -> dict[str, tuple[float, float]]:
        return self.space.bounds()

    def x0(self) -> dict[str, float]:
        return self.space.x0()

    def baselines(self) -> list[str]:
        return ["moe"]

    def prepare_study(self, study: Any) -> None:
        def portable(ref: str) -> str:
            return portable_ref(ref, self.config.root)

        study.set_user_attr(ATTR_MOE_CANDIDATES, {n: portable(c) if isinstance(c, str) else map_refs(c.to_dict(), portable)
                                                  for n, c in self.candidates.items()})

    def candidate(self, params: dict[str, float], baseline: str | None) -> dict[str, Any]:
        choice = self.space.decode(self.space.x0() if baseline else params)
        return {ATTR_MOE: choice.to_dict()}

    def moe_config(self, experts: tuple[str, ...]) -> MoEConfig:
        m = self.config.moe
        return MoEConfig(base_model=self.base_ref, gate_mode=m.gate_mode, dtype=self.config.dtype,
                         experts_per_token=m.experts_per_token, root=self.config.root,
                         experts=[ExpertConfig(source_model=c, positive_prompts=m.prompts[s])
                                  for s, c in zip(self.space.slots, experts)])

    def open(self) -> None:
        dtype = getattr(torch, self.config.dtype)
        sources: dict[str, Source] = {}
        for name, c in self.candidates.items():
            sources[name] = Checkpoint.open(c) if isinstance(c, str) else recipe_source(c, name, self.config.root)
        cfg = self.moe_config(self.space.default_experts())
        cfg.after_validate()
        build = prepare(cfg, sources=sources)
        try:
            base = dense_model(build.base, dtype)
            gates = gates_for(build, prepare_tokenizer(load_tokenizer(build.base)), base_model=base)
            del base
            self.gates = gates.to(self.config.device, dtype)  # (num_layers, num_slots, hidden)
            mean = self.gates.sum(dim=1)  # (num_layers, hidden)
            self.mu = mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-8)
            self.mlps = {name: self._resident(src, dtype) for name, src in sources.items()}
            self.model = assemble(build, gates).to(self.config.device)
            self.tokenizer = load_tokenizer(build.base)
            if self.tokenizer.pad_token is None:
                self.tokenizer.pad_token = self.tokenizer.eos_token
        finally:
            build.close()
            for src in sources.values():
                src.close()
        self.params = dict(self.model.named_parameters())

    def _resident(self, source: Source, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for i in range(self.space.num_layers):
            p = f"model.layers.{i}.mlp"
            gate_up = torch.cat([source.get(f"{p}.gate_proj.weight"), source.get(f"{p}.up_proj.weight")])
            down = source.get(f"{p}.down_proj.weight")
            out.append((gate_up.to(self.config.device, dtype), down.to(self.config.device, dtype)))
        return out

    @torch.no_grad()
    def load(self, record: dict[str, Any]) -> tuple[Any, Any]:
        choice = MoeChoice.from_dict(record[ATTR_MOE])
        for i in range(self.space.num_layers):
            p = f"model.layers.{i}.mlp"
            for e, name in enumerate(choice.experts):
                gate_up, down = self.mlps[name][i]
                self.params[f"{p}.experts.gate_up_proj"][e].copy_(gate_up)  # (2 * intermediate, hidden)
                self.params[f"{p}.experts.down_proj"][e].copy_(down)  # (hidden, intermediate)
                row = choice.scale[i][e] * self.gates[i, e] + choice.bias[i][e] * self.mu[i]  # (hidden,)
                self.params[f"{p}.gate.weight"][e].copy_(row)
        return self.model, self.tokenizer

    def summarize(self, params: dict[str, float]) -> str:
        if not params:
            return ""
        c = self.space.decode(params)
        scales = [v for row in c.scale for v in row]
        biases = [v for row in c.bias for v in row]
        return (f"experts {','.join(c.experts)} scale {sum(scales) / len(scales):.2f} "
                f"bias {sum(biases) / len(biases):+.2f}")

    def close(self) -> None:
        self.model = None
        self.mlps = {}
