"""Statistics of source models on calibration text, for data-aware merge methods: computed once,
kept on disk, read lazily tensor by tensor.

Kinds (a registry entry's ``needs``; what the backends hand a method as ``inputs.stat(i)``):

- ``"gram"``: for every ``nn.Linear`` inside the decoder layers, the Gram matrix ``X^T X``
  (``(in, in)``, float32) of its inputs over every calibration token (padding excluded), keyed
  by the linear's weight name. Computed layer by layer: the inputs of the first decoder layer
  are captured once, then each layer runs over all examples with hooks on its linears, its
  Grams are written to disk, and its outputs become the next layer's inputs; memory holds one
  layer's Grams and the hidden states of the examples, never the whole model's Grams. Linears
  that read the same input (q/k/v, gate/up) share one Gram (stored once). Linears outside the
  decoder layers (a head) get none: RegMean averages them.
- ``"fisher"``: the diagonal empirical Fisher of every parameter: the mean over examples of the
  squared gradient of the example's log-likelihood (sum over its tokens), one backward pass per
  example (squared per-example gradients, not squared batch gradients). Each parameter's
  gradient is squared into its accumulator as soon as it is ready and then freed, so memory is
  the model, one float32 accumulator per parameter and one example's activations.

The cache: one folder per (kind, model, data, settings) under the cache root (``cache_dir``,
else ``$EVOMERGE_STATS_CACHE``, else ``~/.cache/evomerge/stats``), named by a SHA-256 of

- the model's digest: its ``config.json``, tokenizer files, and for every safetensors file its
  header and 64 blocks of 64 KiB spread over its data (a sampled content digest: reading a
  14 GB checkpoint whole would cost as much as the statistics; a fine-tune changes every
  block, so two checkpoints of one architecture never share a digest in practice);
- the calibration examples themselves (their texts, after drawing ``n`` with ``seed``);
- ``max_length``, the kind and :data:`STATS_VERSION`.

Workers that need the same entry at once compute it once: a file lock beside the entry
(``filelock``, which works on shared file systems too) holds the others until it is cached. The
folder is also written under a temporary name and renamed into place, so no reader ever sees a
partial one, even where locks do not hold (the later rename loses, harmlessly).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from filelock import FileLock
from torch import Tensor, nn

from evomerge.calibration import Calibration, load_texts, texts_digest
from evomerge.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

STATS_VERSION = 1
KINDS = ("gram", "fisher")
INDEX = "index.json"
GRAM_BATCH = 8  # examples per forward pass while collecting Grams
_DIGEST_BLOCKS, _DIGEST_BLOCK = 64, 1 << 16
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "merges.txt")


def default_cache_dir() -> Path:
    env = os.environ.get("EVOMERGE_STATS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "evomerge" / "stats"


# --------------------------------------------------------------------------- reading
@dataclass
class Statistics:
    """One kind of statistics for several models, read lazily from their cache folders.
    ``seconds``: time spent computing them in this process (0 when every one came from the cache)."""

    kind: str
    folders: dict[str, Path]  # model reference -> cache folder
    seconds: float = 0.0
    _index: dict[str, dict[str, list[str]]] = field(default_factory=dict, repr=False)
    _handles: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    def get(self, model: str, tensor: str) -> Tensor | None:
        """Model ``model``'s statistic for ``tensor`` (float32, CPU), None if it has none."""
        folder = self.folders.get(model)
        if folder is None:
            return None
        index = self._index.get(model)
        if index is None:
            index = self._index[model] = json.loads((folder / INDEX).read_text())["tensors"]
        where = index.get(tensor)
        if where is None:
            return None
        file, name = where
        handle = self._handles.get((model, file))
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[(model, file)] = safe_open(str(folder / file), framework="pt")
        return handle.get_tensor(name)

    def names(self, model: str) -> list[str]:
        self.get(model, "")
        return sorted(self._index.get(model, {}))


def statistics_for(kind: str, models: Mapping[str, str | Path], cal: Calibration, *,
                   cache_dir: str | Path | None = None, device: str | torch.device = "cpu",
                   say: Callable[[str], None] = log.info) -> Statistics:
    """Statistics of ``kind`` for every model (reference -> folder), from the cache where present,
    else computed (on ``device``) and cached."""
    if kind not in KINDS:
        raise ConfigError(f"statistics: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    texts: list[str] | None = None
    folders: dict[str, Path] = {}
    seconds = 0.0
    for ref, path in models.items():
        path = Path(path)
        if texts is None:
            texts = load_texts(cal)
        key = cache_key(kind, path, texts, cal.max_length)
        folder = root / kind / key
        if not (folder / INDEX).is_file():
            # one computer per entry: a worker (or driver) that finds another computing it waits
            # for the lock, then finds the entry cached
            folder.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(folder.parent / f".{folder.name}.lock")):
                if not (folder / INDEX).is_file():
                    t0 = time.perf_counter()
                    say(f"statistics: computing {kind} of {path.name} on {len(texts)} calibration examples")
                    _compute_into(kind, path, texts, cal.max_length, torch.device(device), folder)
                    dt = time.perf_counter() - t0
                    seconds += dt
                    say(f"statistics: {kind} of {path.name} took {dt:.1f} s (cached in {folder})")
        folders[ref] = folder
    return Statistics(kind, folders, seconds)


def cache_key(kind: str, model_path: Path, texts: Sequence[str], max_length: int) -> str:
    payload = {"version": STATS_VERSION, "kind": kind, "model": model_digest(model_path),
               "data": texts_digest(list(texts)), "max_length": max_length}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def model_digest(path: Path) -> str:
    """config.json, tokenizer files, and per safetensors file its header and sampled blocks."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (statistics need a local model folder)")
    h = hashlib.sha256((path / "config.json").read_bytes())
    for name in _TOKENIZER_FILES:
        if (path / name).is_file():
            h.update(name.encode() + (path / name).read_bytes())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files")
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(n))
            start = 8 + n
            span = max(0, size - start - _DIGEST_BLOCK)
            for k in range(_DIGEST_BLOCKS):
                fh.seek(start + (span * k) // max(1, _DIGEST_BLOCKS - 1))
                h.update(fh.read(_DIGEST_BLOCK))
    return h.hexdigest()


# --------------------------------------------------------------------------- computing
def _compute_into(kind: str, path: Path, texts: list[str], max_length: int, device: torch.device, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    model.eval()
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        encoded = [tok(t, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"][0] for t in texts]
        if kind == "gram":
            index = collect_grams(model, encoded, tok.pad_token_id, device, tmp)
        else:
            index = collect_fisher(model, encoded, device, tmp)
        meta = {"kind": kind, "model": str(path), "examples": len(texts), "max_length": max_length,
                "tokens": int(sum(len(e) for e in encoded)), "version": STATS_VERSION}
        (tmp / INDEX).write_text(json.dumps({"meta": meta, "tensors": index}, indent=1))
        try:
            os.replace(tmp, folder)
        except OSError:  # another worker finished first: its copy is as good
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        del model


class _Captured(Exception):
    """Raised by the hook that captures the first decoder layer's inputs (stops the forward)."""


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder layers: the ModuleList with ``num_hidden_layers`` entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return name, mod
    raise CheckpointError(f"{type(model).__name__}: no list of {n} decoder layers found (Gram statistics need one)")


def _batches(encoded: list[Tensor], pad_id: int, size: int) -> list[tuple[Tensor, Tensor]]:
    out = []
    for a in range(0, len(encoded), size):
        group = encoded[a:a + size]
        width = max(len(e) for e in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)  # (batch, tokens), right padding
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for k, e in enumerate(group):
            ids[k, :len(e)] = e
            mask[k, :len(e)] = 1
        out.append((ids, mask))
    return out


@torch.no_grad()
def collect_grams(model: nn.Module, encoded: list[Tensor], pad_id: int, device: torch.device, out: Path) -> dict[str, list[str]]:
    """Input Grams of every Linear in the decoder layers, layer by layer, one file per layer in
    ``out``; returns the index (weight name -> [file, stored name])."""
    from safetensors.torch import save_file

    prefix, layers = decoder_layers(model)
    batches = _batches(encoded, pad_id, GRAM_BATCH)
    captured: list[tuple[Tensor, dict[str, Any], Tensor]] = []  # (hidden, layer kwargs, valid-token mask)

    def capture(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden, kwargs, current_mask[0]))
        raise _Captured

    current_mask: list[Tensor] = [torch.empty(0)]
    handle = layers[0].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        for ids, mask in batches:
            current_mask[0] = mask.to(device).bool()
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        handle.remove()

    index: dict[str, list[str]] = {}
    for k, layer in enumerate(layers):
        grams: dict[str, Tensor] = {}
        alias: dict[str, str] = {}
        valid: list[Tensor] = [torch.empty(0)]
        seen: dict[tuple, tuple[str, Tensor]] = {}  # holding the input keeps its memory from reuse

        def hook(name: str) -> Callable:
            def fn(_mod: nn.Module, inp: tuple, _out: Any) -> None:
                if name in alias:
                    return
                x = inp[0]
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                first = seen.get(key)
                if first is not None and first[0] != name:
                    alias[name] = first[0]  # same input as an earlier linear of this layer: one Gram
                    return
                seen[key] = (name, x)
                rows = x[valid[0]].reshape(-1, x.shape[-1]).float()  # (valid tokens, in)
                g = grams.get(name)
                if g is None:
                    grams[name] = rows.T @ rows
                else:
                    g.addmm_(rows.T, rows)
            return fn

        handles = [mod.register_forward_hook(hook(name)) for name, mod in layer.named_modules()
                   if isinstance(mod, nn.Linear)]
        try:
            nxt = []
            for hidden, kwargs, mask in captured:
                seen.clear()
                valid[0] = mask
                out_h = layer(hidden, **kwargs)
                nxt.append((out_h[0] if isinstance(out_h, tuple) else out_h, kwargs, mask))
            captured = nxt
        finally:
            for h in handles:
                h.remove()
        file = f"layer_{k:04d}.safetensors"
        stored = {f"{name}.weight": g.cpu().contiguous() for name, g in grams.items()}
        save_file(stored, str(out / file))
        base = f"{prefix}.{k}."
        for name in grams:
            index[f"{base}{name}.weight"] = [file, f"{name}.weight"]
        for name, first in alias.items():
            index[f"{base}{name}.weight"] = [file, f"{first}.weight"]
        del grams, stored
    return index


@torch.enable_grad()  # callers may run under no_grad (a workspace's load)
def collect_fisher(model: nn.Module, encoded: list[Tensor], device: torch.device, out: Path) -> dict[str, list[str]]:
    """Diagonal empirical Fisher of every parameter; one file in ``out``; returns the index."""
    from safetensors.torch import save_file

    params = {name: p for name, p in model.named_parameters() if p.dtype.is_floating_point}
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    handles = []
    for name, p in params.items():
        p.requires_grad_(True)

        def square(param: Tensor, name: str = name) -> None:
            fisher[name].addcmul_(param.grad, param.grad)
            param.grad = None

        handles.append(p.register_post_accumulate_grad_hook(square))
    used = 0
    try:
        for ids in encoded:
            if len(ids) < 2:
                continue  # no next token to predict
            ids = ids.to(device)[None]  # (1, tokens)
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss  # mean over predicted tokens
            (loss * (ids.shape[1] - 1)).backward()  # minus the sequence's log-likelihood
            used += 1
    finally:
        for h in handles:
            h.remove()
        for p in params.values():
            p.requires_grad_(False)
            p.grad = None
    if used == 0:
        raise ConfigError("calibration.data: every example is shorter than 2 tokens (no gradient to take)")
    stored = {name: (f / used).cpu().contiguous() for name, f in fisher.items()}
    save_file(stored, str(out / "fisher.safetensors"))
    return {name: ["fisher.safetensors", name] for name in stored}
