"""Small file helpers shared by every reader and writer: YAML with one-line errors, atomic writes,
one-line errors for folders that cannot be written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import ConfigError, EvomergeError


def file_mode() -> int:
    """The mode a new file gets under the process umask (0644 under the usual 022)."""
    try:  # Linux: read the umask without changing it (os.umask would, for a moment, for every thread)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def write_error(path: str | Path, exc: OSError) -> EvomergeError:
    """One line for a file or folder that cannot be written (permissions, a read-only or full disk)."""
    reason = exc.strerror or type(exc).__name__
    where = exc.filename if exc.filename and str(exc.filename) != str(path) else None
    return EvomergeError(f"{path}: cannot write here ({reason}" + (f": {where})" if where else ")"))


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


def read_text(path: str | Path, what: str = "config") -> str:
    """A text file's contents; a missing or unreadable file becomes one ConfigError line naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} file not found")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the {what} file ({getattr(e, 'strerror', None) or e})") from None


def write_atomic(path: str | Path, text: str | bytes) -> Path:
    """Write ``text`` (or bytes) to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, e) from None
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


def read_jsonl_texts(path: Path, field: str, where: str, *, bare_strings: bool = False) -> list[str]:
    """The string ``field`` of every non-blank line of a JSONL file (a line may also be a bare JSON
    string with ``bare_strings``); one ConfigError line naming ``where``, the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read {path} ({type(e).__name__}: {e})") from None
    texts = []
    for k, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{where}: {path}, line {k}: not JSON ({e.msg})") from None
        if bare_strings and isinstance(row, str):
            texts.append(row)
        elif isinstance(row, dict) and isinstance(row.get(field), str):
            texts.append(row[field])
        else:
            raise ConfigError(f"{where}: {path}, line {k}: expected an object with a string {field!r}")
    return texts
