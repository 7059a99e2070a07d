"""Unlabelled prompts for the label-free scorers (``evomerge sweep`` and the consistency fitness):
the lines of a JSONL file, or the inputs (``doc_to_text``) of an lm-eval task with its labels
ignored.

``limit: N`` takes a seeded sample of N prompts (:func:`sample_indices`), not the first N: a file
or split sorted by topic or difficulty would otherwise give a biased few. The same seed picks the
same prompts on every machine and Python version.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from evomerge.config import PromptSource
from evomerge.errors import ConfigError
from evomerge.evaluate import load_tasks
from evomerge.files import read_jsonl_texts

if TYPE_CHECKING:
    from lm_eval.api.task import Task


def sample_indices(total: int, limit: int | None, seed: int) -> list[int]:
    """``limit`` of the indices ``0 .. total - 1``, in increasing order: those with the smallest
    ``sha256(f"{seed}:{i}")`` (a uniform sample without replacement that depends on the seed and
    the index only). Every index when ``limit`` is None or at least ``total``."""
    if limit is None or limit >= total:
        return list(range(total))
    rank = sorted(range(total), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return sorted(rank[:limit])


def load_prompts(src: PromptSource, root: Path, where: str = "prompts") -> list[str]:
    """The prompts of ``src`` (a seeded sample of ``src.limit`` of them, in their order); ``where``
    names the config block in errors."""
    text: Callable[[int], str]
    if src.jsonl is not None:
        rows = _jsonl_prompts(src, root, where)
        total, text = len(rows), rows.__getitem__
    else:
        task, docs = _task_docs(src, root, where)
        total = len(docs)

        def text(i: int) -> str:
            out = task.doc_to_text(docs[i])
            return out if isinstance(out, str) else str(out)

    prompts = [text(i) for i in sample_indices(total, src.limit, src.seed)]
    if not prompts:
        raise ConfigError(f"{where}: no prompts")
    return prompts


def _jsonl_prompts(src: PromptSource, root: Path, where: str) -> list[str]:
    path = Path(src.jsonl).expanduser()
    path = path if path.is_absolute() else Path(root) / path
    if not path.is_file():
        raise ConfigError(f"{where}.jsonl: {path} not found")
    return read_jsonl_texts(path, src.field, f"{where}.jsonl", bare_strings=True)


def _task_docs(src: PromptSource, root: Path, where: str) -> tuple[Task, Sequence[dict[str, Any]]]:
    """The task and the docs of ``src.split``: the task's own validation / test / train docs when
    it names one, else that split of its data (with the task's ``process_docs``)."""
    include = [str((Path(root) / p).resolve()) for p in src.include_path]
    task = load_tasks([src.task], include, where=where, key="task")["tasks"][src.task]
    cfg = task.config
    own = {"validation": ("validation_split", task.validation_docs), "test": ("test_split", task.test_docs),
           "train": ("training_split", task.training_docs)}
    if src.split in own and getattr(cfg, own[src.split][0], None):
        return task, own[src.split][1]()
    available = list(getattr(task, "dataset", {}) or {})
    if src.split not in available:
        raise ConfigError(f"{where}.split: {src.split!r} is not a split of {src.task} (has {', '.join(available)})")
    docs = task.dataset[src.split]
    if callable(getattr(cfg, "process_docs", None)):
        docs = cfg.process_docs(docs)
    return task, docs
