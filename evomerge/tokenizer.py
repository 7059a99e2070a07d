"""The output tokenizer of a merge and, for every model, where each output token's row is.

This follows mergekit's ``tokenizer_source`` / ``tokenizer.source``:

- ``base``: the base model's tokenizer (the first model's when there is no base), without tokens
  whose ids are past the base's embedding rows;
- ``union``: that tokenizer plus every other model's tokens it lacks, added in the order the
  recipe first names the models (each model's tokens in id order), then every model's added
  (special) tokens, first definition kept. mergekit adds them in set and hash order, so its ids
  differ from run to run; the set of tokens, and the row each token gets, are the same;
- a model: that model's tokenizer.

Tokens named in the ``tokenizer.tokens`` block that the result lacks are added last. The
vocabularies themselves are read and edited with ``transformers``/``tokenizers``.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from evomerge.errors import CheckpointError, ConfigError

__all__ = ["Vocabulary", "build_vocabulary"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Vocabulary:
    """The output tokenizer and how every model's rows map onto it."""

    tokenizer: Any  # a transformers PreTrainedTokenizerFast, saved with the merged model
    size: int  # rows of the output embeddings: len(vocab), rounded up to pad_to_multiple_of
    rows: dict[str, list[int]]  # per model: for each output id, that model's row (-1: it lacks the token)
    own: dict[str, dict[str, int]]  # per model: its own vocabulary (token -> row)

    @property
    def vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()


def _load(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), use_fast=True)


def _copy(tokenizer: Any) -> Any:
    """An independent copy (a save/load round trip: tokenizers share their Rust state otherwise)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return _load(Path(tmp))


def _strip(tokenizer: Any, rows: int, ref: str) -> Any:
    """``tokenizer`` without the tokens whose ids are ``>= rows`` (ids the model has no row for)."""
    unused = {tok for tok, i in tokenizer.get_vocab().items() if i >= rows}
    if not unused:
        return tokenizer
    if not getattr(tokenizer, "is_fast", False):
        raise CheckpointError(f"{ref}: the tokenizer has ids past the embedding rows and no fast version to trim")
    from tokenizers import Tokenizer

    data = json.loads(tokenizer.backend_tokenizer.to_str())
    model = data["model"]
    if model.get("type") not in ("BPE", "WordLevel", "WordPiece"):
        raise CheckpointError(f"{ref}: the tokenizer ({model.get('type')}) has ids past the embedding rows; only "
                              "BPE, WordLevel and WordPiece vocabularies can be trimmed")
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < rows]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in unused}
    if model.get("type") == "BPE":
        model["merges"] = [m for m in model.get("merges", [])
                           if not set(m.split(" ") if isinstance(m, str) else m) & unused]
    out = _copy(tokenizer)
    out._tokenizer = Tokenizer.from_str(json.dumps(data))
    log.info("%s: tokenizer trimmed to the %d embedding rows (%d tokens dropped)", ref, rows, len(unused))
    return out


def _union(base: Any, ordered: Sequence[tuple[str, Any, int]]) -> Any:
    words: dict[str, None] = {}  # ordinary tokens, first-mention order
    added: dict[str, Any] = {}  # content -> AddedToken, first definition kept
    for ref, tok, rows in ordered:
        for token, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if i < rows:
                words.setdefault(token)
        for i, info in sorted(tok.added_tokens_decoder.items()):
            if i >= rows:
                continue
            if info.content not in added:
                added[info.content] = info
            elif added[info.content] != info:
                log.warning("token %r is added with different settings by %s; the first is kept", info.content, ref)
    out = _copy(base)
    known = base.get_vocab()
    new = [w for w in words if w not in added and w not in known]
    if new:
        out.add_tokens(new)
    out.add_tokens(list(added.values()))
    return out


def build_vocabulary(source: str, base: str, models: Sequence[str], folders: Mapping[str, Path],
                     rows: Mapping[str, int], add_tokens: Sequence[str] = (),
                     pad_to_multiple_of: int | None = None) -> Vocabulary:
    """The output tokenizer for ``source`` (``base``, ``union`` or one of ``models``).

    ``base``: the model whose tokenizer the result starts from; ``models``: every model of the
    recipe in first-mention order; ``folders``: where each model's tokenizer files are;
    ``rows``: each model's embedding rows (tokens with ids past them are ignored)."""
    tokenizers: dict[str, Any] = {}
    for ref in dict.fromkeys([base, *models]):
        try:
            tok = _load(folders[ref])
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
            if ref == base:
                raise CheckpointError(f"{folders[ref]}: no usable tokenizer for {ref} ({exc})") from exc
            log.warning("%s: no usable tokenizer (%s); its vocabulary is taken to be the base's", ref, exc)
            continue
        tokenizers[ref] = _strip(tok, rows[ref], ref) if ref == base else tok
    if source == "base":
        out = _copy(tokenizers[base])
    elif source == "union":
        out = _union(tokenizers[base], [(r, t, rows[r]) for r, t in tokenizers.items()])
    elif source in tokenizers:
        out = _copy(tokenizers[source])
    else:
        raise ConfigError(f"tokenizer source {source!r}: no usable tokenizer in {folders.get(source, source)}")
    known = set(out.get_vocab())
    extra = [t for t in dict.fromkeys(add_tokens) if t not in known]
    if extra:
        out.add_tokens(extra)
    vocab = out.get_vocab()
    size = len(vocab)
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    by_id = sorted(vocab.items(), key=lambda kv: kv[1])
    if [i for _, i in by_id] != list(range(len(vocab))):
        raise CheckpointError(f"tokenizer source {source!r}: the output vocabulary's ids are not 0..{len(vocab) - 1}")
    perms: dict[str, list[int]] = {}
    own: dict[str, dict[str, int]] = {}
    for ref in models:
        mine = (tokenizers.get(ref) or tokenizers[base]).get_vocab()
        n = rows[ref]
        own[ref] = mine
        perms[ref] = [mine[t] if t in mine and mine[t] < n else -1 for t, _ in by_id]
    log.info("output vocabulary: %d tokens (%s), %d rows", len(vocab), source, size)
    return Vocabulary(out, size, perms, own)
