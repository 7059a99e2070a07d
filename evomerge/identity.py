"""What a model or a task folder *is*, independent of where it lies: portable references and
content digests.

A study must resume when its project folder is copied or renamed, and on a cluster node that
mounts the models elsewhere. So a study never identifies a local model by its absolute path:

- in recipes and the recorded config, a model (or task folder) inside the config's folder is
  written relative to that folder (``models/a``), any other local path stays absolute, and a hub
  id stays an id (:func:`portable_ref`, :func:`map_refs`);
- in the fingerprint, a local model is its content digest (:func:`model_digest`: ``config.json``,
  the safetensors headers, and 16 evenly spaced 64 KiB samples of each weight file's data), a
  task folder the digest of its task definitions (:func:`folder_digest`: every ``.yaml``,
  ``.yml`` and ``.py`` file under it, by relative name and content; data files and anything else
  kept there, such as a study database, do not count), a hub id itself.

The digest reads at most about 1 MiB per weight file. Two folders with the same config, the same
tensor layout and the same sampled bytes are taken as the same model: a fine-tune differs from
its base throughout its layers, so the samples tell them apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Callable

SAMPLES = 16  # data samples per weight file
SAMPLE_BYTES = 64 * 1024
TASK_FILES = (".yaml", ".yml", ".py")  # what defines lm-eval tasks in an include_path folder


def portable_ref(ref: str, root: Path) -> str:
    """``ref`` (resolved: an absolute path or a hub id) relative to ``root`` when it lies inside
    it, else unchanged."""
    p = Path(ref)
    if not p.is_absolute():
        return ref  # a hub id (or already relative)
    try:
        return p.relative_to(Path(root).resolve()).as_posix() or "."
    except ValueError:
        return ref


def local_ref(ref: str, root: Path) -> str:
    """The inverse of :func:`portable_ref`: a relative ref that exists under ``root`` becomes
    that absolute path; absolute paths and hub ids are returned unchanged."""
    p = Path(ref)
    if p.is_absolute():
        return ref
    candidate = Path(root) / p
    return str(candidate.resolve()) if candidate.exists() else ref


def map_refs(recipe: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of a recipe dict (``Recipe.to_dict()``) with every model reference, and the paths of
    its ``calibration`` block, passed through ``fn``."""
    out = dict(recipe)
    if out.get("base_model"):
        out["base_model"] = fn(out["base_model"])
    if out.get("models"):
        out["models"] = [{**m, "model": fn(m["model"])} for m in out["models"]]
    if out.get("slices"):
        slices = []
        for s in out["slices"]:
            s = {**s, "sources": [{**src, "model": fn(src["model"])} for src in s["sources"]]}
            if s.get("base_model"):
                s["base_model"] = fn(s["base_model"])
            slices.append(s)
        out["slices"] = slices
    if isinstance(out.get("tokenizer_source"), str) and out["tokenizer_source"] not in ("base", "union"):
        out["tokenizer_source"] = fn(out["tokenizer_source"])
    block = out.get("tokenizer")
    if isinstance(block, dict):
        block = dict(block)
        if isinstance(block.get("source"), str) and block["source"] not in ("base", "union"):
            block["source"] = fn(block["source"])
        tokens = {}
        for token, spec in (block.get("tokens") or {}).items():
            src = spec.get("source") if isinstance(spec, dict) else None
            if isinstance(src, str):
                spec = {**spec, "source": fn(src)}
            elif isinstance(src, dict) and isinstance(src.get("model"), str):
                spec = {**spec, "source": {**src, "model": fn(src["model"])}}
            tokens[token] = spec
        if block.get("tokens"):
            block["tokens"] = tokens
        out["tokenizer"] = block
    cal = out.get("calibration")
    if isinstance(cal, dict):  # a data-aware method's calibration file and task folder are local paths too
        out["calibration"] = {**cal, **{k: fn(cal[k]) for k in ("data", "include_path") if isinstance(cal.get(k), str)}}
    return out


def model_digest(ref: str) -> str:
    """``sha256:<hex>`` of a local model folder's content (see the module docstring); a hub id
    (anything that is not a local folder) is returned as ``hub:<id>``."""
    folder = Path(ref)
    if not folder.is_dir():
        return f"hub:{ref}"
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(b"config.json\0" + _canonical_json(config.read_bytes()))
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode() + b"\0")
        _digest_safetensors(f, h)
    for f in sorted([*folder.glob("*.bin"), *folder.glob("*.gguf")]):  # weights in other formats: samples too
        h.update(f.name.encode() + b"\0")
        _digest_samples(f, 0, f.stat().st_size, h)
    return "sha256:" + h.hexdigest()[:32]


def folder_digest(path: str) -> str:
    """``sha256:<hex>`` of the task definitions under a folder (:data:`TASK_FILES`: relative
    names and contents); ``missing:<name>`` when it is not a folder (the config check reports it)."""
    root = Path(path)
    if not root.is_dir():
        return f"missing:{Path(path).name}"
    h = hashlib.sha256()
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__pycache__")
        for name in sorted(files):
            f = Path(dirpath) / name
            if name.startswith(".") or not name.endswith(TASK_FILES):
                continue
            data = f.read_bytes()
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return "sha256:" + h.hexdigest()[:32]


def _canonical_json(raw: bytes) -> bytes:
    try:
        return json.dumps(json.loads(raw), sort_keys=True).encode()
    except (ValueError, UnicodeDecodeError):
        return raw


def _digest_safetensors(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            h.update(head)
            return
        (n,) = struct.unpack("<Q", head)
        header = f.read(n)
        h.update(header)
    _digest_samples(path, 8 + n, path.stat().st_size, h)


def _digest_samples(path: Path, start: int, end: int, h: Any) -> None:
    """:data:`SAMPLES` evenly spaced reads of :data:`SAMPLE_BYTES` from ``[start, end)``."""
    length = max(0, end - start)
    with open(path, "rb") as f:
        if length <= SAMPLES * SAMPLE_BYTES:
            f.seek(start)
            h.update(f.read(length))
            return
        step = (length - SAMPLE_BYTES) // (SAMPLES - 1)
        for i in range(SAMPLES):
            f.seek(start + i * step)
            h.update(f.read(SAMPLE_BYTES))
