"""Reading and writing Hugging Face model folders (safetensors only).

:class:`Checkpoint` opens a model folder lazily: tensors are read one at a time from the
(possibly sharded) safetensors files. :class:`CheckpointWriter` writes a merged model into a
temporary folder next to the destination and renames it into place only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import threading
import uuid
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.architectures import Architecture, architecture_for
from evomerge.errors import CheckpointError
from evomerge.files import file_mode, write_error
from evomerge.gguf import gguf_hint

__all__ = ["Checkpoint", "CheckpointWriter", "TOKENIZER_FILES"]

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
RECIPE_FILE = "mergekit_config.yml"  # the recipe, under the name mergekit-yaml gives it
INDEX_FILE = "model.safetensors.index.json"

TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied from the tokenizer source into a written model (whichever exist)."""

DEFAULT_SHARD_BYTES = 5_000_000_000
"""Bytes per output shard unless told otherwise (mergekit-yaml's default ``--out-shard-size 5B``)."""

_HUB_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _resolve_ref(ref: str | Path, revision: str | None) -> Path:
    """A local folder for ``ref``: the folder itself, or a Hub snapshot of ``org/name``."""
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: expected a model folder, found a file")
        return path
    text = str(ref)
    if not _HUB_ID.match(text) or text.startswith("."):
        raise CheckpointError(f"{path}: model folder does not exist")
    from huggingface_hub import snapshot_download

    try:
        logger.info("downloading %s (revision %s) from the Hugging Face Hub", text, revision or "main")
        return Path(snapshot_download(text, revision=revision, allow_patterns=_HUB_PATTERNS))
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one user-facing line
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{text}: not a local folder and could not be fetched from the Hugging Face Hub ({reason})"
        ) from exc


def read_config(path: Path) -> dict[str, Any]:
    """A model folder's config.json as a dict (one CheckpointError line if it is not one)."""
    config_path = path / "config.json"
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{config_path}: unreadable JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: expected a JSON object")
    return config


class Checkpoint:
    """A Hugging Face model folder opened lazily (safetensors only).

    Attributes: ``ref`` (what the user passed), ``path`` (the local folder), ``config``
    (the parsed config.json) and ``arch`` (the matched :class:`Architecture`).
    """

    def __init__(self, ref: str, path: Path, config: dict[str, Any], arch: Architecture, weight_map: dict[str, str]):
        self.ref = ref
        self.path = path
        self.config = config
        self.arch = arch
        self._weight_map = weight_map  # tensor name -> file name inside path
        self._handles: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._tied = {
            spec.name: spec.tied_names for spec in (*arch.pre_weights, *arch.post_weights) if spec.tied_names
        }

    @classmethod
    def open(cls, ref: str | Path, *, revision: str | None = None) -> Checkpoint:
        """Open a local model folder or a Hub id ``org/name`` (downloaded with its tokenizer)."""
        path = _resolve_ref(ref, revision)
        if not (path / "config.json").is_file():
            hint = gguf_hint(path)
            raise CheckpointError(f"{path}: no config.json in the model folder" + (f"; {hint}" if hint else ""))
        config = read_config(path)
        config_path = path / "config.json"
        arch = architecture_for(config, source=str(config_path), tensor_names=lambda: list(cls._weight_map_of(path)))
        arch = arch.for_config(config, source=str(config_path))
        ckpt = cls(str(ref), path, config, arch, cls._weight_map_of(path))
        logger.debug("opened %s (%s, %d tensors)", path, arch.name, len(ckpt._weight_map))
        return ckpt

    @staticmethod
    def _weight_map_of(path: Path) -> dict[str, str]:
        index_path = path / INDEX_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CheckpointError(f"{index_path}: expected JSON with a 'weight_map' object ({exc})") from exc
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index_path}: 'weight_map' must map tensor names to file names")
            for shard in sorted(set(weight_map.values())):
                if not (path / shard).is_file():
                    raise CheckpointError(f"{index_path}: shard {shard!r} listed in weight_map is missing")
            return {str(k): str(v) for k, v in weight_map.items()}
        files = [path / SINGLE_FILE] if (path / SINGLE_FILE).is_file() else sorted(path.glob("*.safetensors"))
        if not files:
            legacy = sorted(p.name for p in path.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
            if legacy:
                raise CheckpointError(
                    f"{path}: only PyTorch pickle weights ({', '.join(legacy[:3])}) found; safetensors weights are "
                    "required (convert with model.save_pretrained(..., safe_serialization=True))"
                )
            raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} in the model folder")
        weight_map = {}
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    weight_map.update(dict.fromkeys(handle.keys(), file.name))
            except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
                raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc
        return weight_map

    # -- reading -------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        """Names of the tensors stored in the folder (sorted)."""
        return sorted(self._weight_map)

    def has(self, name: str) -> bool:
        """Whether tensor ``name`` is stored in the folder (tied fallbacks do not count)."""
        return name in self._weight_map

    def _resolve(self, name: str) -> str:
        """The stored tensor that provides ``name`` (itself, or its tie for a missing lm_head)."""
        if name in self._weight_map:
            return name
        for tied in self._tied.get(name, ()):
            if tied in self._weight_map:
                return tied
        raise CheckpointError(f"{self.path}: tensor {name!r} not found in the model folder")

    def _slice(self, name: str) -> Any:
        stored = self._resolve(name)
        return self._handle(self._weight_map[stored]).get_slice(stored)

    def _handle(self, file: str) -> Any:
        with self._lock:
            handle = self._handles.get(file)
            if handle is None:
                try:
                    handle = safe_open(str(self.path / file), framework="pt")
                except Exception as exc:  # noqa: BLE001
                    raise CheckpointError(f"{self.path / file}: not a readable safetensors file ({exc})") from exc
                self._handles[file] = handle
            return handle

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` without loading it."""
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of tensor ``name`` without loading it."""
        code = self._slice(name).get_dtype()
        if code not in _DTYPES:
            raise CheckpointError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return _DTYPES[code]

    def get(self, name: str, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """Load tensor ``name`` (a missing tied ``lm_head`` falls back to the embeddings)."""
        stored = self._resolve(name)
        tensor = self._handle(self._weight_map[stored]).get_tensor(stored)
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    @property
    def num_layers(self) -> int:
        """The layer count from config.json."""
        return self.arch.num_layers(self.config, source=str(self.path / "config.json"))

    def close(self) -> None:
        """Release the open safetensors files."""
        with self._lock:
            self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({self.ref!r}, arch={self.arch.name!r}, tensors={len(self._weight_map)})"


def _owner_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
    return f"{host}-{os.getpid()}"


_TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)-(?P<host>[A-Za-z0-9]+)-(?P<pid>\d+)-[0-9a-f]{12}$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def clean_stale_temps(parent: Path) -> list[Path]:
    """Remove the hidden temp folders a killed writer left in ``parent``: those made on this host
    by a process that no longer runs. Returns what was removed."""
    host = _owner_tag().rsplit("-", 1)[0]
    removed = []
    for entry in parent.iterdir() if parent.is_dir() else ():
        m = _TEMP_NAME.match(entry.name)
        if m is None or m["host"] != host or int(m["pid"]) == os.getpid() or _pid_alive(int(m["pid"])):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        logger.info("removed %s, left by a merge that was killed (process %s)", entry, m["pid"])
        removed.append(entry)
    return removed


class CheckpointWriter:
    """Writes a merged model atomically: a temp folder next to out_dir, renamed into place at the end.

    Tensors are buffered with :meth:`add` and flushed to a shard whenever the next tensor would
    push the buffer past ``max_shard_bytes``. :meth:`close` writes the rest (weights, index,
    config, tokenizer, model card) and swaps the folder into ``out_dir``. Used as a context
    manager, an exception inside the block calls :meth:`abort` instead.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        config: dict[str, Any],
        tokenizer_source: Path | None,
        model_card: str | None = None,
        max_shard_bytes: int = DEFAULT_SHARD_BYTES,
        overwrite: bool = False,
        tokenizer: Any = None,
        recipe_yaml: str | None = None,
    ):
        self.out_dir = Path(out_dir).expanduser().absolute()
        if self.out_dir.exists():
            if not self.out_dir.is_dir():
                raise CheckpointError(f"{self.out_dir}: output path exists and is not a folder")
            if not overwrite and any(self.out_dir.iterdir()):
                raise CheckpointError(f"{self.out_dir}: output folder is not empty (--overwrite replaces it)")
        if tokenizer_source is not None and not Path(tokenizer_source).is_dir():
            raise CheckpointError(f"{tokenizer_source}: tokenizer source folder does not exist")
        self.config = dict(config)
        self.tokenizer_source = Path(tokenizer_source) if tokenizer_source is not None else None
        self.model_card = model_card
        self.tokenizer = tokenizer  # a built tokenizer (save_pretrained) written instead of the source's files
        self.max_shard_bytes = max_shard_bytes  # <= 0: one file, however large (as mergekit)
        self.overwrite = overwrite
        self.recipe_yaml = recipe_yaml
        try:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            clean_stale_temps(self.out_dir.parent)
            self.tmp_dir = self._sibling("tmp")
            self.tmp_dir.mkdir()  # plain mkdir (not mkdtemp) so the final folder gets umask permissions
        except OSError as e:
            raise write_error(self.out_dir, e) from None
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[list[str]] = []  # tensor names per flushed shard
        self._names: set[str] = set()
        self._dtype_bytes: Counter[torch.dtype] = Counter()
        self._total_bytes = 0
        self._done = False
        logger.debug("writing %s via %s", self.out_dir, self.tmp_dir)

    def _sibling(self, kind: str) -> Path:
        """A fresh hidden path next to ``out_dir`` (same filesystem, so renames are atomic), named
        after this host and process so a later run can tell a dead writer's leftovers."""
        return self.out_dir.parent / f".{self.out_dir.name}.{kind}-{_owner_tag()}-{uuid.uuid4().hex[:12]}"

    def _shard_tmp(self, index: int) -> Path:
        return self.tmp_dir / f"shard-{index:05d}.safetensors.part"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Buffer ``tensor`` under ``name``; do not modify it in place afterwards."""
        if self._done:
            raise CheckpointError(f"{self.out_dir}: writer is already closed")
        if name in self._names:
            raise CheckpointError(f"{self.out_dir}: tensor {name!r} was added twice")
        tensor = tensor.detach().to("cpu").contiguous()
        # safetensors refuses tensors sharing storage: copy views and tensors sharing a buffer.
        storage = tensor.untyped_storage()
        shared = any(t.untyped_storage().data_ptr() == storage.data_ptr() for t in self._buffer.values())
        if shared or storage.nbytes() != tensor.nbytes:
            tensor = tensor.clone()
        size = tensor.nbytes
        if self._buffer and self.max_shard_bytes > 0 and self._buffer_bytes + size > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = tensor
        self._buffer_bytes += size
        self._names.add(name)
        self._total_bytes += size
        if tensor.is_floating_point():
            self._dtype_bytes[tensor.dtype] += size

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self._shard_tmp(len(self._shards))
        save_file(self._buffer, str(path), metadata={"format": "pt"})
        os.chmod(path, file_mode())  # safetensors creates files 0600; a model folder is for sharing
        logger.debug("wrote shard %s (%d tensors, %d bytes)", path.name, len(self._buffer), self._buffer_bytes)
        self._shards.append(list(self._buffer))
        self._buffer = {}
        self._buffer_bytes = 0

    def _write_weights(self) -> None:
        self._flush()
        if not self._shards:
            raise CheckpointError(f"{self.out_dir}: no tensors were added to the merged model")
        count = len(self._shards)
        if count == 1:
            os.replace(self._shard_tmp(0), self.tmp_dir / SINGLE_FILE)
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(self._shard_tmp(i), self.tmp_dir / final)
            weight_map.update(dict.fromkeys(names, final))
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    def _write_extras(self) -> None:
        config = dict(self.config)
        if self._dtype_bytes:
            dtype = _dtype_name(self._dtype_bytes.most_common(1)[0][0])
            config["torch_dtype"] = dtype
            config["dtype"] = dtype  # transformers >= 5 reads "dtype" first
        (self.tmp_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if self.tokenizer_source is not None:
            files = ("generation_config.json",) if self.tokenizer is not None else ("generation_config.json", *TOKENIZER_FILES)
            for file in files:
                if (self.tokenizer_source / file).is_file():
                    shutil.copy2(self.tokenizer_source / file, self.tmp_dir / file)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(self.tmp_dir))
        if self.model_card is not None:
            (self.tmp_dir / "README.md").write_text(self.model_card, encoding="utf-8")
        if self.recipe_yaml is not None:
            (self.tmp_dir / RECIPE_FILE).write_text(self.recipe_yaml, encoding="utf-8")

    def _swap_in(self) -> None:
        aside: Path | None = None
        if self.out_dir.exists():
            if any(self.out_dir.iterdir()) and not self.overwrite:  # someone wrote there meanwhile
                raise CheckpointError(f"{self.out_dir}: output folder is not empty (--overwrite replaces it)")
            aside = self._sibling("old")
            os.replace(self.out_dir, aside)
        try:
            os.replace(self.tmp_dir, self.out_dir)
        except OSError:
            if aside is not None:
                os.replace(aside, self.out_dir)
            raise
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def close(self) -> Path:
        """Finish writing and move the model into ``out_dir``; returns ``out_dir``."""
        if self._done:
            raise CheckpointError(f"{self.out_dir}: writer is already closed")
        try:
            self._write_weights()
            self._write_extras()
            self._swap_in()
        except OSError as e:
            self.abort()
            raise write_error(self.out_dir, e) from None
        except BaseException:
            self.abort()
            raise
        self._done = True
        logger.info("wrote %s (%d tensors, %d shard(s))", self.out_dir, len(self._names), len(self._shards))
        return self.out_dir

    def abort(self) -> None:
        """Discard everything written so far (removes the temp folder)."""
        self._done = True
        self._buffer = {}
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._done:
            self.close()
