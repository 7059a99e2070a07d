"""Loader for the smol_chat task (tasks/smol_chat/smol_chat.yaml, via `custom_dataset`).

lm-eval imports this file from the YAML's folder, so smol_chat.jsonl is found next to it whatever
the working directory is; nothing is downloaded.
"""

import json
from pathlib import Path

import datasets

DATA = Path(__file__).resolve().parent / "smol_chat.jsonl"


def load(**_ignored):
    """A DatasetDict {"test"} of the 20 questions (lm-eval's metadata keywords are ignored)."""
    with DATA.open(encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
