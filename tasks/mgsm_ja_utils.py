"""MGSM-ja (juletxara/mgsm, config ``ja``) for lm-eval: the fitness/held-out split of the test set
and the scoring (answer = the last number of the response; ``acc_ja`` counts it only when the
response is written in Japanese, as in Sakana's EvoLLM-JP fitness).

Pure Python, no lm-eval imports, so the extraction and the language check are unit-tested.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

FITNESS_SIZE = 150  # the first 150 of the 250 test problems are the search's fitness split
JAPANESE_SHARE = 0.5  # acc_ja: at least this share of the response's letters are kana or kanji

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_JAPANESE = re.compile(r"[\u3040-\u309f\u30a0-\u30ff\u4e00-\u9fff\u3400-\u4dbf\uff66-\uff9f]")


def fitness_docs(dataset: Any) -> Any:
    """The search's split: test problems 0..149 (what the merge is optimised on)."""
    return dataset.select(range(min(FITNESS_SIZE, len(dataset))))


def heldout_docs(dataset: Any) -> Any:
    """The held-out split: test problems 150..249 (never seen by the search)."""
    return dataset.select(range(min(FITNESS_SIZE, len(dataset)), len(dataset)))


def last_number(text: str) -> float | None:
    """The last number in ``text`` (full-width digits and thousands separators understood)."""
    found = _NUMBER.findall(unicodedata.normalize("NFKC", text))
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:
        return None


def japanese_share(text: str) -> float:
    """The share of the letters in ``text`` that are hiragana, katakana or kanji (0 with no letters)."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return 0.0
    return sum(1 for c in letters if _JAPANESE.match(c)) / len(letters)


def is_japanese(text: str) -> bool:
    return japanese_share(text) >= JAPANESE_SHARE


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    """``acc``: the last number equals the gold answer; ``acc_ja``: that, and the response is Japanese."""
    response = results[0]
    answer = last_number(response)
    correct = answer is not None and abs(answer - float(doc["answer_number"])) < 1e-6
    return {"acc": float(correct), "acc_ja": float(correct and is_japanese(response))}
