"""The chat template a recipe's ``chat_template`` key (mergekit's) sets on the merged model's tokenizer.

- ``auto``: the template most of the recipe's models carry (each stripped of surrounding
  whitespace); a tie goes to the model named first, the base model before the others. mergekit
  breaks ties in the iteration order of a Python set, which changes from run to run. When no model
  has a template, none is set.
- a built-in name (:data:`BUILTIN`: ``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``):
  evomerge's own template for that format, in ``evomerge/chat_templates/``. Each renders the text
  mergekit 0.1.5's template of that name renders, oddities included (tested on typical and odd
  conversations, with and without a generation prompt).
- anything else is the Jinja template itself: at least 20 characters and a ``{``, as mergekit asks.

The tokenizer is then saved with it (transformers 5 writes ``chat_template.jinja``).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from evomerge.errors import CheckpointError

__all__ = ["AUTO", "BUILTIN", "chat_template_problem", "resolve_chat_template", "tokenizer_with_template"]

log = logging.getLogger(__name__)

AUTO = "auto"
TEMPLATE_DIR = Path(__file__).with_name("chat_templates")
BUILTIN: tuple[str, ...] = tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))
MIN_JINJA_CHARS = 20  # mergekit refuses shorter templates


def _is_name(value: str) -> bool:
    """Whether mergekit would look ``value`` up as a template name rather than take it as Jinja."""
    return len(value) < 256 and "\n" not in value and "{" not in value


def chat_template_problem(value: str) -> str | None:
    """What is wrong with a ``chat_template`` value (None: nothing)."""
    if value == AUTO or (_is_name(value) and value in BUILTIN):
        return None
    if len(value) >= MIN_JINJA_CHARS and "{" in value:
        return None
    shown = value if len(value) <= 40 else value[:37] + "..."
    return (f"expected auto, a built-in template ({', '.join(BUILTIN)}) or a Jinja template (at least "
            f"{MIN_JINJA_CHARS} characters with a '{{'), got {shown!r}")


def _template_of(folder: Path) -> str | None:
    from transformers import AutoTokenizer

    template = AutoTokenizer.from_pretrained(str(folder)).chat_template
    if isinstance(template, dict):  # several named templates: the default one
        template = template.get("default")
    return template.strip() if template else None


def resolve_chat_template(value: str, folders: Sequence[tuple[str, Path]]) -> str | None:
    """The template text ``value`` asks for. ``folders``: each model's (reference, folder), base
    model first, in which ``auto`` looks; a model whose tokenizer cannot be read is skipped with a
    warning. None when ``auto`` finds no template."""
    if value != AUTO:
        return (TEMPLATE_DIR / f"{value}.jinja").read_text(encoding="utf-8") if _is_name(value) else value
    found: list[str] = []
    for ref, folder in folders:
        try:
            template = _template_of(folder)
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
            log.warning("chat_template auto: no usable tokenizer for %s (%s); skipped", ref, exc)
            continue
        if template:
            found.append(template)
    if not found:
        log.warning("chat_template auto: none of the models has a chat template; none is set")
        return None
    counts = Counter(found)  # counts keep first-seen order, so most_common breaks ties by it
    template, n = counts.most_common(1)[0]
    log.info("chat_template auto: the template of %d of %d models with one", n, len(found))
    return template


def tokenizer_with_template(value: str, folders: Sequence[tuple[str, Path]], donor: Path,
                            tokenizer: Any = None) -> Any:
    """The tokenizer to save with the merged model: ``tokenizer`` (a vocabulary the recipe built),
    else the one in ``donor`` read afresh, with the template ``value`` asks for (see
    :func:`resolve_chat_template`; unchanged when ``auto`` finds none). mergekit also saves the
    tokenizer anew, rather than copying its files, whenever a recipe has a ``chat_template``."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(donor))
        except Exception as exc:  # noqa: BLE001 - transformers raises many types for a missing tokenizer
            raise CheckpointError(f"{donor}: no usable tokenizer to set the chat_template on ({exc})") from exc
    template = resolve_chat_template(value, folders)
    if template is not None:
        tokenizer.chat_template = template
    return tokenizer
