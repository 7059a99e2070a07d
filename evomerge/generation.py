"""Greedy responses to prompts, batched: what the label-free scorers compare (``evomerge sweep``
and the consistency fitness)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from evomerge.config import GenerationSettings

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def generate_responses(model: PreTrainedModel, tokenizer: Any, prompts: Sequence[str],
                       settings: GenerationSettings) -> list[str]:
    """Greedy responses, one per prompt, in batches of ``settings.batch_size`` with left padding
    (prompts sorted by length so batches pad little; results come back in prompt order)."""
    texts = list(prompts)
    if settings.chat_template:
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in texts]
    encoded = [tokenizer(t, add_special_tokens=settings.add_special_tokens)["input_ids"] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i]), i))
    out: list[str] = [""] * len(encoded)
    was_training = model.training
    model.eval()
    for start in range(0, len(order), settings.batch_size):
        idx = order[start : start + settings.batch_size]
        width = max(len(encoded[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            seq = encoded[i]
            if seq:
                ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
                mask[row, width - len(seq):] = 1
        with torch.no_grad():
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=settings.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                                 num_beams=1, temperature=None, top_p=None, top_k=None)
        new = gen[:, width:].cpu()
        for row, i in enumerate(idx):
            tokens = new[row].tolist()
            if eos is not None and eos in tokens:
                tokens = tokens[: tokens.index(eos)]
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            out[i] = cut_at_stop(text, settings.stop)
    if was_training:
        model.train()
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cut = len(text)
    for s in stop:
        if s:
            k = text.find(s)
            if k != -1:
                cut = min(cut, k)
    return text[:cut]
