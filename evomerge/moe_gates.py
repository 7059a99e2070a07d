"""Router weights of a mixture of experts, set from prompts (mergekit-moe's gate modes).

Each expert has positive (and optionally negative) prompts. A gate vector per (layer, expert)
is a unit vector pointing where that expert's prompts lie, so the router sends similar tokens
to it:

- ``hidden``/``hidden_last``: the base model's hidden state entering each layer at the last
  prompt token, averaged over the prompts (``hidden_avg`` averages over the tokens instead);
  computed with the base in bfloat16, as mergekit-moe does;
- ``cheap_embed``: the sum of the prompts' token embeddings, the same vector for every layer;
- ``random`` / ``uniform_random``: seeded normal / ``nn.Linear``-style uniform draws.

Negative prompts' vectors are subtracted before normalising. Everything here is torch and a
tokenizer; models and configs come from the caller.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch

__all__ = ["GATE_MODES", "PROMPT_MODES", "cheap_embedding", "degenerate_layers", "gate_vectors", "hidden_states",
           "prepare_tokenizer", "tokenize_prompts"]

logger = logging.getLogger(__name__)

PROMPT_MODES = ("hidden", "hidden_avg", "hidden_last", "cheap_embed")
"""Gate modes that need prompts."""
GATE_MODES = (*PROMPT_MODES, "random", "uniform_random")


def prepare_tokenizer(tokenizer):
    """Left padding with the BOS token as padding (EOS when there is no BOS), as mergekit-moe sets it."""
    tokenizer.padding_side = "left"
    tokenizer.pad_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenize_prompts(prompts: Sequence[str], tokenizer) -> dict[str, torch.Tensor]:
    """A padded batch of the prompts, each prefixed with the BOS text and no other special tokens."""
    bos = tokenizer.bos_token or ""
    batch = tokenizer([bos + p for p in prompts], return_tensors="pt", padding=True, add_special_tokens=False)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def hidden_states(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, average: bool) -> torch.Tensor:
    """(num_layers, hidden): the state entering each layer, at the last token (or averaged over
    the sequence, padding included, when ``average``), averaged over the prompts. In the model's dtype."""
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])  # (num_layers, batch, seq, hidden)
    if average:
        per_prompt = states.sum(dim=2) / states.shape[2]  # (num_layers, batch, hidden)
    else:
        per_prompt = states[:, :, -1, :]  # (num_layers, batch, hidden)
    return per_prompt.sum(dim=1) / per_prompt.shape[1]  # (num_layers, hidden)


def cheap_embedding(embed: torch.Tensor, batch: dict[str, torch.Tensor], num_layers: int) -> torch.Tensor:
    """(num_layers, hidden): the unit-norm sum of the prompts' (unpadded) token embeddings, per layer."""
    tokens = embed.float()[batch["input_ids"]]  # (batch, seq, hidden)
    masked = tokens * batch["attention_mask"].unsqueeze(-1)
    total = masked.sum(dim=1).sum(dim=0, keepdim=True)  # (1, hidden)
    unit = total / total.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    return unit.repeat(num_layers, 1)  # (num_layers, hidden)


def gate_vectors(mode: str, prompts: Sequence[tuple[Sequence[str], Sequence[str]]], *, num_layers: int,
                 hidden_size: int, tokenizer=None, model: torch.nn.Module | None = None,
                 embed: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """(num_layers, num_experts, hidden): one gate vector per layer and expert.

    ``prompts`` holds ``(positive, negative)`` per expert. ``hidden*`` modes need ``model`` (the
    base as a causal LM), ``cheap_embed`` needs ``embed`` (its input embeddings); both need the
    ``tokenizer`` (see :func:`prepare_tokenizer`). Random modes draw from ``generator``."""
    n = len(prompts)
    if mode == "random":
        return torch.randn((num_layers, n, hidden_size), generator=generator)
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / hidden_size)
        return torch.rand((num_layers, n, hidden_size), generator=generator) * 2 * scale - scale
    if mode == "cheap_embed":
        def vector(batch): return cheap_embedding(embed, batch, num_layers)
    elif mode in ("hidden", "hidden_last", "hidden_avg"):
        def vector(batch): return hidden_states(model, batch, average=mode == "hidden_avg")
    else:
        raise ValueError(f"unknown gate mode {mode!r}")
    vecs = [_expert_vector(vector, tokenizer, pos, neg) for pos, neg in prompts]
    return torch.stack(vecs, dim=0).permute(1, 0, 2)  # (num_layers, num_experts, hidden)


def _expert_vector(vector: Callable[[dict], torch.Tensor], tokenizer, positive: Sequence[str],
                   negative: Sequence[str]) -> torch.Tensor:
    v = vector(tokenize_prompts(positive, tokenizer))  # (num_layers, hidden)
    if negative:
        v = v - vector(tokenize_prompts(negative, tokenizer))
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> list[int]:
    """Layers whose gate vectors are nearly dependent (condition number above ``threshold``)."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]
