"""A workspace per worker: one live model whose parameters are overwritten in place for each
candidate recipe. Source tensors are read from disk once and kept on the device in the compute
dtype; a candidate costs one pass of merge math, no re-instantiation and no disk.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoint import Checkpoint
from evomerge.engine import TensorRef, execute_task, plan_merge, resolve_device
from evomerge.errors import CheckpointError, MergeError
from evomerge.recipe import Recipe

log = logging.getLogger(__name__)


class Workspace:
    def __init__(self, refs: list[str], *, template: str, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype = torch.float32):
        """``refs``: every model a candidate may read; ``template``: the model whose config,
        architecture and tokenizer the live instance takes."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = resolve_device(device)
        self.dtype = dtype
        self.compute_dtype = compute_dtype
        self.sources = {ref: Checkpoint.open(ref) for ref in dict.fromkeys([template, *refs])}
        arches = {ck.arch.name for ck in self.sources.values()}
        if len(arches) > 1:
            raise CheckpointError(f"models have different architectures: {', '.join(sorted(arches))}")
        tpl = self.sources[template]
        self.model = AutoModelForCausalLM.from_pretrained(tpl.path, dtype=dtype).to(self.device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(tpl.path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.num_layers = tpl.num_layers
        self.params = dict(self.model.named_parameters())
        self.params.update({k: v for k, v in self.model.named_buffers() if k not in self.params})
        self._cache: dict[TensorRef, torch.Tensor] = {}
        self.recipe: Recipe | None = None

    def fetch(self, ref: TensorRef) -> torch.Tensor:
        tensor = self._cache.get(ref)
        if tensor is None:
            tensor = self.sources[ref[0]].get(ref[1], dtype=self.compute_dtype, device=self.device)
            self._cache[ref] = tensor
        return tensor

    @torch.no_grad()
    def load(self, recipe: Recipe) -> None:
        """Write the recipe's merged weights into the live model."""
        plan = plan_merge(recipe, self.sources)
        if plan.num_layers != self.num_layers:
            raise MergeError(f"the recipe has {plan.num_layers} layers; this workspace holds {self.num_layers}")
        for task in plan.tasks:
            target = self.params.get(task.out_name)
            if target is None:
                raise MergeError(f"{task.out_name}: the model has no such parameter")
            out = execute_task(task, plan.method, self.fetch, seed=recipe.seed, device=self.device,
                               compute_dtype=self.compute_dtype)
            if out.shape != target.shape:
                raise MergeError(f"{task.out_name}: merged shape {tuple(out.shape)} != model's {tuple(target.shape)}")
            target.copy_(out)
        self.recipe = recipe

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def close(self) -> None:
        for ck in self.sources.values():
            ck.close()
        self._cache.clear()

    @property
    def template_path(self) -> Path:
        return next(iter(self.sources.values())).path

    def describe(self) -> dict[str, Any]:
        n = sum(p.numel() for p in self.model.parameters())
        return {"device": str(self.device), "parameters": n, "sources": len(self.sources)}
