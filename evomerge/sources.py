"""Model references as recipes write them, opened as checkpoints.

A reference is mergekit's ``model[@revision][+lora[@revision]]``:

- ``org/model@revision`` downloads that revision (branch, tag or commit) from the Hub;
- ``model+adapter`` applies a PEFT LoRA adapter to the model, in float32, before merging;
- a local folder that exists is taken as it is, so a path holding ``@`` or ``+`` still works.

Folders holding only PyTorch pickle weights (``*.bin``) are refused unless ``EVOMERGE_ALLOW_PICKLE=1``
is set; they are then read with ``torch.load(weights_only=True)``, which unpickles tensors only.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
import torch

from evomerge.architectures import Architecture, architecture_for
from evomerge.checkpoint import Checkpoint, read_config
from evomerge.errors import CheckpointError, ConfigError

__all__ = ["ALLOW_PICKLE_ENV", "ModelRef", "TensorDictCheckpoint", "open_model", "parse_reference"]

log = logging.getLogger(__name__)

ALLOW_PICKLE_ENV = "EVOMERGE_ALLOW_PICKLE"
"""Environment variable: ``1`` lets folders with only ``*.bin`` pickle weights be read."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class ModelRef:
    """One parsed reference: the model (folder or Hub id) and revision, and an optional adapter."""

    model: str
    revision: str | None = None
    lora: str | None = None
    lora_revision: str | None = None


def _exists(path: str, relative_to: Path | None) -> str | None:
    p = Path(path).expanduser()
    if p.exists():
        return str(p)
    if relative_to is not None and (relative_to / path).exists():
        return str(relative_to / path)
    return None


def _split_revision(part: str, text: str, relative_to: Path | None) -> tuple[str, str | None]:
    local = _exists(part, relative_to)
    if local is not None:
        return local, None
    if part.count("@") > 1:
        raise ConfigError(f"model {text!r}: more than one '@' (expected name@revision)")
    name, at, revision = part.partition("@")
    if at and (not name or not revision):
        raise ConfigError(f"model {text!r}: expected name@revision with both parts non-empty")
    local = _exists(name, relative_to)
    return (local or name), (revision or None)


def parse_reference(text: str, relative_to: Path | None = None) -> ModelRef:
    """Parse ``model[@revision][+lora[@revision]]``; a folder (relative to the CWD, else to
    ``relative_to``) that exists under the whole text wins."""
    local = _exists(text, relative_to)
    if local is not None:
        return ModelRef(local)
    if text.count("+") > 1:
        raise ConfigError(f"model {text!r}: more than one '+' (expected model+lora)")
    model, plus, lora = text.partition("+")
    if plus and (not model or not lora):
        raise ConfigError(f"model {text!r}: expected model+lora with both parts non-empty")
    name, revision = _split_revision(model, text, relative_to)
    if not plus:
        return ModelRef(name, revision)
    lora_name, lora_revision = _split_revision(lora, text, relative_to)
    return ModelRef(name, revision, lora_name, lora_revision)


class TensorDictCheckpoint(Checkpoint):
    """A checkpoint whose tensors are already in memory (a model with its LoRA applied, or pickle
    weights read with ``torch.load``); otherwise a :class:`Checkpoint`."""

    def __init__(self, ref: str, path: Path, config: dict, arch: Architecture, tensors: dict[str, torch.Tensor]):
        super().__init__(ref, path, config, arch, dict.fromkeys(tensors, ""))
        self._tensors = tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[self._resolve(name)].shape)

    def dtype(self, name: str) -> torch.dtype:
        return self._tensors[self._resolve(name)].dtype

    def get(self, name: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        t = self._tensors[self._resolve(name)]
        return t.to(device=device, dtype=dtype or t.dtype, copy=True)


# --------------------------------------------------------------------------- opening
def open_model(text: str, relative_to: Path | None = None, *,
               allow_pickle: bool | None = None) -> Checkpoint:
    """Open the model a recipe names (see the module docstring). ``allow_pickle`` defaults to the
    ``EVOMERGE_ALLOW_PICKLE`` environment variable."""
    ref = parse_reference(text, relative_to)
    if allow_pickle is None:
        allow_pickle = os.environ.get(ALLOW_PICKLE_ENV, "") == "1"
    local = Path(ref.model)
    if local.is_dir() and _pickle_only(local):
        if not allow_pickle:
            files = ", ".join(p.name for p in _pickle_files(local)[:3])
            raise CheckpointError(f"{local}: only PyTorch pickle weights ({files}); set {ALLOW_PICKLE_ENV}=1 to "
                                  "read them with torch.load(weights_only=True), or convert them to safetensors")
        ck: Checkpoint = _open_pickle(text, local)
    else:
        ck = Checkpoint.open(ref.model, revision=ref.revision)
        ck.ref = text
    if ref.lora is None:
        return ck
    try:
        return _apply_lora(text, ck, _adapter_folder(ref, text))
    finally:
        ck.close()


def _pickle_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())


def _pickle_only(path: Path) -> bool:
    return not any(path.glob("*.safetensors")) and bool(_pickle_files(path))


def _open_pickle(text: str, path: Path) -> TensorDictCheckpoint:
    index = path / "pytorch_model.bin.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({exc})") from exc
        paths = [path / f for f in files]
    else:
        paths = _pickle_files(path)
    tensors: dict[str, torch.Tensor] = {}
    for file in paths:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - torch raises many types for unreadable pickles
            raise CheckpointError(f"{file}: not a readable tensor file for torch.load(weights_only=True) "
                                  f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from exc
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{file}: expected a mapping of tensor names to tensors")
        tensors.update(state)
    log.warning("%s: reading PyTorch pickle weights (%s=1)", path, ALLOW_PICKLE_ENV)
    config = read_config(path)
    source = str(path / "config.json")
    arch = architecture_for(config, source=source, tensor_names=lambda: list(tensors)).for_config(config, source=source)
    return TensorDictCheckpoint(text, path, config, arch, tensors)


def _adapter_folder(ref: ModelRef, text: str) -> Path:
    lora = ref.lora or ""
    path = Path(lora).expanduser()
    if not path.exists():
        if not _HUB_ID.match(lora):
            raise CheckpointError(f"{ref.lora}: LoRA adapter folder of {text!r} does not exist")
        path = _download(lora, ref.lora_revision, list(_ADAPTER_FILES))
    if not (path / "adapter_config.json").is_file():
        raise CheckpointError(f"{path}: not a PEFT adapter (no adapter_config.json) in model reference {text!r}")
    return path


def _download(repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{repo}: not a local folder and could not be fetched from the Hugging Face Hub "
                              f"({reason})") from exc


def _apply_lora(text: str, ck: Checkpoint, adapter: Path) -> TensorDictCheckpoint:
    """The model with the adapter merged in (PEFT's ``merge_and_unload``, float32)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    log.info("applying LoRA adapter %s to %s (float32)", adapter, ck.path)
    model = AutoModelForCausalLM.from_pretrained(ck.path, dtype=torch.float32)
    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False).merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - PEFT raises many types for adapters that do not fit
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{adapter}: the LoRA adapter does not apply to {ck.path} ({reason})") from exc
    state = {k: v.detach() for k, v in model.state_dict().items()}
    stored = set(ck.tensor_names())
    # keep the names the checkpoint stores (a tied head stays absent, so planning sees the same model)
    tensors = {k: v for k, v in state.items() if k in stored}
    missing = stored - set(tensors)
    if missing:
        raise CheckpointError(f"{ck.path}: the model built for the LoRA adapter lacks {sorted(missing)[0]!r}")
    return TensorDictCheckpoint(text, ck.path, ck.config, ck.arch, tensors)
