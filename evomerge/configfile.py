"""The shared shape of evomerge's YAML configs (search, sweep): read once, validate once, every
error one line naming the file and the field. Paths inside are relative to the file's folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from evomerge.errors import ConfigError
from evomerge.files import read_yaml
from evomerge.recipe import format_validation_error

C = TypeVar("C", bound="YamlConfig")

IDENTIFIER = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # model and coefficient names (they appear in dimension names)
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_file_name(value: str) -> str:
    """A study or sweep name: it names files and folders (runs/<name>.db, runs/<name>/)."""
    if not _FILE_NAME.fullmatch(value):
        raise ValueError("expected letters, digits, '_', '-' or '.'")
    return value


class YamlConfig(BaseModel):
    """Subclasses declare a ``root: Path`` field and may override :meth:`after_validate`."""

    def after_validate(self) -> None:
        """Checks that need the whole validated config; raise ConfigError."""

    @classmethod
    def load(cls: type[C], path: str | Path, **overrides: Any) -> C:
        path = Path(path)
        return cls.from_dict(read_yaml(path, "config"), root=path.resolve().parent, source=str(path), **overrides)

    @classmethod
    def from_dict(cls: type[C], data: Any, *, root: Path = Path("."), source: str = "config", **overrides: Any) -> C:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of config keys")
        data = {**data, **{k: v for k, v in overrides.items() if v is not None}, "root": root}
        try:
            cfg = cls.model_validate(data)
            cfg.after_validate()
        except ValidationError as e:
            raise ConfigError(f"{source}: {format_validation_error(e)}") from None
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        return cfg
