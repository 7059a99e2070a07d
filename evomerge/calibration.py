"""Calibration data for data-aware merge methods (Fisher, RegMean): the ``calibration:`` block of
a recipe or search config (an evomerge extension; mergekit has no such key) and the texts it
names.

``data`` is one of:

- a text file (``.txt``): one example per non-empty line;
- a JSON Lines file (``.jsonl``): one object per line, the example in its ``field`` (``text``);
- an lm-eval task YAML file (``.yaml``/``.yml``): that task, its folder as the include path;
- an lm-eval task name (local tasks under ``include_path``, or lm-eval's own).

An lm-eval example is the text the task scores: ``doc_to_text``, the target delimiter and the
gold target (for multiple choice, the gold choice). ``split`` picks the task's split (default:
its training split, else its validation split; the test split only when asked, since it is
meant to stay held out). ``n`` examples are drawn without replacement with ``seed`` (all of them,
in order, when there are no more than ``n``); each is cut to ``max_length`` tokens when
tokenized.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from evomerge.errors import ConfigError
from evomerge.files import read_jsonl_texts

log = logging.getLogger(__name__)


class Calibration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    data: str  # a .txt / .jsonl file, an lm-eval task YAML file, or an lm-eval task name
    n: int = Field(64, ge=1)  # examples drawn
    max_length: int = Field(256, ge=2)  # tokens per example (longer ones are cut)
    seed: int = 0  # which examples are drawn
    split: Literal["train", "validation", "test"] | None = None  # lm-eval tasks: default train, else validation
    field: str = "text"  # .jsonl: the key holding the text
    include_path: str | None = None  # lm-eval: a folder of task YAMLs (a YAML file as data sets it itself)

    def resolved(self, relative_to: Path | None) -> "Calibration":
        """Paths made absolute: relative to the CWD where they exist there, else to ``relative_to``
        (the recipe's or config's folder)."""
        update = {}
        for key in ("data", "include_path"):
            value = getattr(self, key)
            if value is None or Path(value).expanduser().is_absolute():
                continue
            here = Path(value).expanduser()
            if here.exists():
                update[key] = str(here.resolve())
            elif relative_to is not None and (relative_to / value).exists():
                update[key] = str((relative_to / value).resolve())
        return self.model_copy(update=update) if update else self


def load_texts(cal: Calibration) -> list[str]:
    """The calibration examples (``n`` drawn with ``seed``). One-line ConfigError on bad input."""
    path = Path(cal.data).expanduser()
    if path.suffix in (".txt", ".jsonl", ".yaml", ".yml") and not path.is_file():
        raise ConfigError(f"calibration.data: {cal.data} is not a file (expected a .txt, .jsonl or task .yaml file, "
                          "or an lm-eval task name)")
    if path.suffix == ".txt":
        texts = [line.strip() for line in _read(path).splitlines() if line.strip()]
    elif path.suffix == ".jsonl":
        texts = read_jsonl_texts(path, cal.field, "calibration.data")
    elif path.suffix in (".yaml", ".yml"):
        match = re.search(r"^task:\s*['\"]?([\w.-]+)", _read(path), flags=re.M)
        if match is None:
            raise ConfigError(f"calibration.data: {path} has no 'task:' line (expected an lm-eval task YAML file)")
        texts = _task_texts(match.group(1), str(path.parent), cal.split)
    elif path.exists():
        raise ConfigError(f"calibration.data: {cal.data}: expected a .txt, .jsonl or .yaml file")
    else:
        texts = _task_texts(cal.data, cal.include_path, cal.split)
    if not texts:
        raise ConfigError(f"calibration.data: {cal.data} has no examples")
    if len(texts) <= cal.n:
        if len(texts) < cal.n:
            log.warning("calibration.data: %s has %d examples, fewer than n=%d; using all", cal.data, len(texts), cal.n)
        return texts
    picked = sorted(random.Random(cal.seed).sample(range(len(texts)), cal.n))
    return [texts[i] for i in picked]


def texts_digest(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(hashlib.sha256(t.encode()).digest())
    return h.hexdigest()


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"calibration.data: cannot read {path} ({type(e).__name__}: {e})") from None


def _task_texts(name: str, include_path: str | None, split: str | None) -> list[str]:
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise ConfigError(f"calibration.include_path: {include_path} is not a folder")
    inc = [include_path] if include_path else None
    manager = TaskManager(include_path=inc, include_defaults=False) if inc else None
    if manager is None or name not in manager.all_tasks:
        manager = TaskManager(include_path=inc)
    if name not in manager.all_tasks:
        raise ConfigError(f"calibration.data: {name!r} is neither a file nor a known lm-eval task")
    try:
        task = manager.load([name])["tasks"].get(name)
    except Exception as e:  # noqa: BLE001 - lm-eval raises many kinds (offline datasets, bad YAML)
        raise ConfigError(f"calibration.data: lm-eval task {name!r} could not be loaded "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if task is None:
        raise ConfigError(f"calibration.data: {name!r} is a group or tag; name one task")
    available = {"train": task.has_training_docs(), "validation": task.has_validation_docs(),
                 "test": task.has_test_docs()}
    if split is None:
        split = "train" if available["train"] else "validation" if available["validation"] else None
        if split is None:
            raise ConfigError(f"calibration.split: task {name!r} has no train or validation split; "
                              "set split: test only if the test split is not what you score on")
    elif not available[split]:
        have = ", ".join(k for k, v in available.items() if v) or "none"
        raise ConfigError(f"calibration.split: task {name!r} has no {split} split (has {have})")
    docs = {"train": task.training_docs, "validation": task.validation_docs, "test": task.test_docs}[split]()
    return [_task_example(task, doc) for doc in docs]


def _task_example(task, doc) -> str:  # noqa: ANN001 - an lm-eval Task and one of its docs
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    if task.config.output_type == "multiple_choice":
        choices = task.doc_to_choice(doc)
        if isinstance(target, int):
            target = choices[target]
        elif isinstance(target, list):
            target = choices[target[0]] if isinstance(target[0], int) else target[0]
    elif isinstance(target, list):
        target = target[0]
    delim = task.config.target_delimiter if task.config.target_delimiter is not None else " "
    return f"{text}{delim}{target}"
