"""Small file helpers shared by every reader and writer: YAML with one-line errors, atomic writes."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """Parse a YAML file; a missing file or bad YAML becomes one ConfigError line naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def write_atomic(path: str | Path, text: str | bytes) -> Path:
    """Write ``text`` (or bytes) to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def resolve_ref(ref: str, root: Path) -> str:
    """A model or path reference relative to ``root`` (a config file's folder). Absolute paths and
    existing local paths resolve; an ``owner/name`` that is not a local folder stays a hub id."""
    p = Path(ref).expanduser()
    if p.is_absolute():
        return str(p)
    local = (Path(root) / p).resolve()
    if local.exists() or ref.startswith((".", "/")) or ref.count("/") != 1:
        return str(local)
    return ref
