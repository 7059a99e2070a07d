"""Embedding and head rows moved into the output vocabulary before the merge method runs.

For each vocabulary tensor (the architecture's ``is_embed`` weights, vocabulary along dim 0) and
each model reading it, a tensor of ``Vocabulary.size`` rows is built as mergekit builds it:

- a token the model has keeps the model's own row (unless the ``tokens`` block forces a source);
- a token it lacks gets a default row: the ``tokens`` block's source when given (another model's
  row of that token, a named token of a model, or zeros); otherwise the row of the only model that
  has it, else the base model's row, else the mean of the rows of the models that have it, and
  zeros (with a warning) when no model has it;
- padding rows (``pad_to_multiple_of``) are the mean of the model's real rows.

The models taking part are those merged into that tensor: the defaults depend on them.
:class:`AlignedCheckpoint` serves these tensors in place of the stored ones, so the engine and the
workspace merge them like any other tensor.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from evomerge.errors import MergeError
from evomerge.recipe import ModelToken, TokenSource, ZeroToken
from evomerge.tokenizer import Vocabulary

__all__ = ["AlignedCheckpoint", "Aligner", "align_rows"]

log = logging.getLogger(__name__)


def _default_row(token: str, tid: int, spec: TokenSource, tensors: Mapping[str, Tensor], vocab: Vocabulary) -> Tensor:
    where = f"tokenizer.tokens.{token}"
    first = next(iter(tensors.values()))
    if isinstance(spec.source, ZeroToken):
        return first.new_zeros(first.shape[1:])
    model = spec.model()
    if model is None:
        raise MergeError(f"{where}: some models lack this token; give it a source (a model or {{kind: zero}})")
    if model not in tensors:
        raise MergeError(f"{where}.source: {model!r} is not merged into this tensor (expected one of: "
                         f"{', '.join(tensors)})")
    if isinstance(spec.source, ModelToken):
        row = spec.source.token_id
        if row is None:
            row = vocab.own[model].get(spec.source.token or "")
            if row is None:
                raise MergeError(f"{where}.source.token: {spec.source.token!r} is not in {model}'s vocabulary")
        if row >= tensors[model].shape[0]:
            raise MergeError(f"{where}.source.token_id: {row} is past {model}'s {tensors[model].shape[0]} rows")
        return tensors[model][row]
    row = vocab.rows[model][tid]
    if row < 0:
        raise MergeError(f"{where}.source: {model!r} has no token {token!r}")
    return tensors[model][row]


def align_rows(tensors: Mapping[str, Tensor], vocab: Vocabulary, *, base: str | None,
               tokens: Mapping[str, TokenSource] | None = None) -> dict[str, Tensor]:
    """Every model's tensor (vocabulary along dim 0) with its rows in the output vocabulary's order:
    ``vocab.size`` rows, filled as the module docstring says. Keys and order of ``tensors`` are kept."""
    models = list(tensors)
    first = tensors[models[0]]
    dtype = first.dtype
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
        if t.shape[1:] != first.shape[1:]:
            shapes = ", ".join(f"{m}: {list(x.shape)}" for m, x in tensors.items())
            raise MergeError(f"vocabulary tensors differ beyond the vocabulary dimension ({shapes})")
    tensors = {m: t.to(dtype) for m, t in tensors.items()}
    names = [t for t, _ in sorted(vocab.vocab.items(), key=lambda kv: kv[1])]
    n = len(names)
    rows = {m: torch.tensor(vocab.rows[m], dtype=torch.long) for m in models}
    has = torch.stack([rows[m] >= 0 for m in models])  # (n_models, n)
    configs: dict[str, TokenSource] = dict(tokens or {})
    average: list[int] = []
    count = has.sum(0)
    for tid, token in enumerate(names):
        if token in configs:
            continue
        k = int(count[tid])
        if k == 1:
            configs[token] = TokenSource(source=models[int(has[:, tid].nonzero()[0, 0])])
        elif k == 0:
            configs[token] = TokenSource(source=ZeroToken(kind="zero"))
            log.warning("token %r is in no model's vocabulary; its rows are zeros", token)
        elif base in rows and bool(has[models.index(base), tid]):
            configs[token] = TokenSource(source=base)
        else:
            average.append(tid)
    forced = torch.tensor([bool(configs.get(t) and configs[t].force) for t in names], dtype=torch.bool)
    need = forced | ~has.all(0)
    averaged = set(average)
    defaults: dict[int, Tensor] = {}
    for tid in need.nonzero().flatten().tolist():
        if tid in averaged:
            acc = first.new_zeros(first.shape[1:], dtype=dtype)
            k = 0
            for m in models:
                if rows[m][tid] >= 0:
                    acc = acc + tensors[m][rows[m][tid]]
                    k += 1
            defaults[tid] = acc / k
        elif names[tid] in configs:
            defaults[tid] = _default_row(names[tid], tid, configs[names[tid]], tensors, vocab)
    out: dict[str, Tensor] = {}
    for m in models:
        new = first.new_zeros((vocab.size, *first.shape[1:]), dtype=dtype)  # (size, hidden)
        keep = (rows[m] >= 0) & ~forced
        new[:n][keep] = tensors[m][rows[m][keep]]
        for tid, row in defaults.items():
            if not keep[tid]:
                new[tid] = row
        if vocab.size > n:
            new[n:] = torch.mean(new[:n], dim=0)
        out[m] = new
    return out


class Aligner:
    """The aligned vocabulary tensors of a set of sources, computed once per tensor and group and
    handed out one model at a time (each model's tensor is released when it is taken)."""

    def __init__(self, vocab: Vocabulary, sources: Mapping[str, Any], *, names: Sequence[str],
                 group: Callable[[str], Sequence[str]], base: str | None,
                 tokens: Mapping[str, TokenSource] | None, dtype: torch.dtype | None):
        self.vocab = vocab
        self.sources = sources
        self.names = frozenset(names)
        self.group = group
        self.base = base
        self.tokens = tokens
        self.dtype = dtype
        self._ready: dict[tuple[str, str], Tensor] = {}
        self._lock = threading.Lock()

    def get(self, ref: str, name: str) -> Tensor:
        with self._lock:
            key = (ref, name)
            if key not in self._ready:
                models = list(dict.fromkeys(self.group(name)))
                if ref not in models:
                    models.append(ref)
                stored = {m: self.sources[m].get(name, dtype=self.dtype) for m in models}
                aligned = align_rows(stored, self.vocab, base=self.base, tokens=self.tokens)
                self._ready.update({(m, name): t for m, t in aligned.items()})
            return self._ready.pop(key)


class AlignedCheckpoint:
    """A checkpoint whose vocabulary tensors come from an :class:`Aligner`; everything else is the
    wrapped checkpoint's."""

    def __init__(self, ck: Any, ref: str, aligner: Aligner):
        self._ck = ck
        self._ref = ref
        self._aligner = aligner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ck, name)

    def shape(self, name: str) -> tuple[int, ...]:
        shape = tuple(self._ck.shape(name))
        return (self._aligner.vocab.size, *shape[1:]) if name in self._aligner.names else shape

    def dtype(self, name: str) -> torch.dtype:
        return self._aligner.dtype or self._ck.dtype(name) if name in self._aligner.names else self._ck.dtype(name)

    def get(self, name: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> Tensor:
        if name not in self._aligner.names:
            return self._ck.get(name, dtype=dtype, device=device)
        t = self._aligner.get(self._ref, name)
        return t.to(device=device, dtype=dtype or t.dtype)

    def close(self) -> None:
        self._ck.close()
