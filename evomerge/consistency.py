"""A label-free search fitness: generation consistency under small perturbations of the recipe.

``fitness: {kind: consistency, consistency: {...}}`` in a search config scores each candidate
recipe the way ``evomerge sweep`` scores a grid point (AdaMMS, arXiv 2503.23733), with the grid
neighbours replaced by perturbations of the candidate itself:

- Neighbours: ``2 * pairs`` recipes, ``recipe(x + delta * s)`` and ``recipe(x - delta * s)``, where
  ``x`` are the candidate's searched coefficients (every searched knob, every model, every layer
  group: each numeric leaf of the recipe's parameter values), each step ``delta`` times the width
  of the knob's search range, and ``s`` a sign per leaf.
- Direction of the first pair: the *contrast* direction, ``+`` for the first source model, ``-``
  for the second, ``+`` for the third and so on, ``+`` for global knobs (slerp's ``t``). For two
  models this trades one model's share for the other's - in weight space the direction
  ``theta_a - theta_b`` of AdaMMS' interpolation ``theta(alpha)``, whose neighbours ``alpha +- delta``
  it reproduces exactly for one global knob. Nudging every coefficient the same way (the
  "diagonal") would be a null move for normalised merges (linear, nuslerp: all weights up by the
  same amount is the same model) and would make every such candidate look perfectly consistent.
  Further pairs use seeded random signs per leaf (fixed for the study, so the fitness is a
  deterministic function of the recipe, as the samplers assume).
- A leaf whose step leaves the parameter's valid range (``t`` or ``density`` past 1) steps the
  other way, so a candidate on a boundary is still compared with recipes ``delta`` away instead of
  with itself.
- Score: the AdaMMS disagreement ``D`` between the candidate's greedy responses and its
  neighbours' (``exact``: a prompt counts when its response differs from every neighbour's;
  ``embedding``: 1 - cos of sentence embeddings; ``aggregate: mean`` averages over neighbours),
  and ``fitness = 1 - D / n_prompts`` in [0, 1] (higher is more consistent). Empty responses agree
  with nothing (``empty_disagrees``), so a merge that says nothing is not "consistent".
- A recipe that reads one model only (the search's parent baselines) is an *endpoint*: like
  AdaMMS, which never chooses one, the fitness refuses it (the trial fails with that reason; set
  ``sampler.baselines: false`` to skip them). The uniform baseline is scored.

Cost per candidate: ``1 + 2 * pairs`` generations on the prompts and ``2 * pairs + 1`` workspace
loads (the candidate is written back afterwards). Keep the prompts few (8-32) and short.

Caveat (as for the sweep): consistency is a proxy. Flat regions of function space are stable
whether the model there is good or degenerate; keep the search ranges to sensible merges (for
task arithmetic, weights bounded away from 0, where the base model's behaviour is very stable).
"""

from __future__ import annotations

import hashlib
import logging
from typing import TYPE_CHECKING, Any, Hashable

from evomerge.config import SearchConfig
from evomerge.disagreement import minilm_embedder, score_table
from evomerge.errors import CandidateError, EvomergeError
from evomerge.fitness import RecipeHost, Score
from evomerge.generation import generate_responses
from evomerge.methods import METHODS
from evomerge.prompts import load_prompts
from evomerge.recipe import Recipe

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)


class ConsistencyError(CandidateError):
    """A candidate the consistency fitness cannot score (a single source, nothing to perturb)."""


def knob_steps(config: SearchConfig) -> dict[str, float]:
    """knob -> step: ``delta`` times the width of its search range (the config's, else the
    method's default)."""
    spec = config.fitness.consistency
    methods = [METHODS[m] for m in config.merge.methods]
    steps = {}
    for knob, rng in config.merge.search.items():
        p = next((m.param(knob) for m in methods if m.param(knob) is not None), None)
        if p is None:
            continue
        lo, hi = rng if rng is not None else p.search
        steps[knob] = spec.delta * (float(hi) - float(lo))
    return steps


def _sign(pair: int, seed: int, knob: str, model_index: int | None, leaf: int) -> int:
    if pair == 0:
        return 1 if model_index is None or model_index % 2 == 0 else -1
    h = hashlib.sha256(f"{seed}:{pair}:{knob}:{model_index}:{leaf}".encode()).digest()
    return 1 if h[0] & 1 else -1


def perturb(recipe: Recipe, steps: dict[str, float], model_order: list[str], *, side: int, pair: int = 0,
            seed: int = 0) -> Recipe:
    """The recipe with every searched knob's numeric leaves moved by ``side * sign * step``
    (``side`` is +1 or -1; signs as in the module doc). ``model_order``: the source references,
    in config order (their index gives the contrast sign)."""
    method = recipe.method
    data = recipe.to_dict()
    index = {ref: i for i, ref in enumerate(model_order)}

    def nudge(knob: str, model_index: int | None, value: Any, counter: list[int]) -> Any:
        spec = method.param(knob)
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)):
            leaf = counter[0]
            counter[0] += 1
            step = side * _sign(pair, seed, knob, model_index, leaf) * steps[knob]
            for candidate in (value + step, value - step):
                if spec is None or spec.check(candidate) is None:
                    return float(candidate)
            return value
        if isinstance(value, list):
            return [nudge(knob, model_index, v, counter) for v in value]
        if isinstance(value, dict) and "value" in value:
            return {**value, "value": nudge(knob, model_index, value["value"], counter)}
        return value

    def block(params: dict[str, Any] | None, model_index: int | None) -> dict[str, Any] | None:
        if not params:
            return params
        out = dict(params)
        for knob in params:
            if knob in steps:
                out[knob] = nudge(knob, model_index, params[knob], [0])
        return out

    data["parameters"] = block(data.get("parameters"), None)
    for m in data.get("models") or []:
        m["parameters"] = block(m.get("parameters"), index.get(m["model"], len(index)))
    for s in data.get("slices") or []:
        s["parameters"] = block(s.get("parameters"), None)
        for src in s.get("sources") or []:
            src["parameters"] = block(src.get("parameters"), index.get(src["model"], len(index)))
    data = _drop_none(data)
    return Recipe.from_dict(data, "perturbed recipe")


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    if isinstance(d, list):
        return [_drop_none(v) for v in d]
    return d


class ConsistencyFitness:
    """The label-free fitness. ``bind(workspace)`` once, then ``score(model, tokenizer)`` scores the
    recipe the workspace holds (the search's interface); ``score_candidate(workspace, recipe)``
    is the same for any recipe."""

    def __init__(self, config: SearchConfig, prompts: list[str] | None = None):
        spec = config.fitness.consistency
        if spec is None:
            raise EvomergeError("fitness.consistency: required for kind consistency")
        self.spec = spec
        self.seed = int(config.seed)
        self.steps = knob_steps(config)
        self.model_order = list(config.source_refs.values())
        self.prompts = prompts if prompts is not None else load_prompts(spec.prompts, config.root,
                                                                         "fitness.consistency.prompts")
        self.embed = minilm_embedder() if spec.metric == "embedding" else None
        self.workspace: RecipeHost | None = None
        self.generations = 0  # how many response sets were generated (tests, logs)

    def bind(self, host: RecipeHost) -> None:
        self.workspace = host

    def neighbours(self, recipe: Recipe) -> list[Recipe]:
        out = []
        for pair in range(self.spec.pairs):
            for side in (1, -1):
                out.append(perturb(recipe, self.steps, self.model_order, side=side, pair=pair, seed=self.seed))
        return out

    def _generate(self, workspace: RecipeHost) -> list[str]:
        self.generations += 1
        return generate_responses(workspace.model, workspace.tokenizer, self.prompts, self.spec.generation)

    def score_candidate(self, workspace: RecipeHost, recipe: Recipe) -> Score:
        if len(recipe.referenced_models()) < 2:
            raise ConsistencyError("a single source model is an endpoint; the consistency fitness does not score it "
                                   "(AdaMMS never chooses one; sampler.baselines: false skips these)")
        nbrs = self.neighbours(recipe)
        if all(n == recipe for n in nbrs):
            raise ConsistencyError("no searched coefficient in this recipe to perturb")
        if workspace.recipe != recipe:
            workspace.load(recipe)
        responses: dict[Hashable, list[str]] = {"candidate": self._generate(workspace)}
        try:
            for k, n in enumerate(nbrs):
                workspace.load(n)
                responses[k] = self._generate(workspace)
        finally:
            workspace.load(recipe)  # leave the candidate in place
        d = score_table(responses, {"candidate": list(range(len(nbrs)))}, self.spec.metric,
                        aggregate=self.spec.aggregate, empty_disagrees=self.spec.empty_disagrees,
                        embed=self.embed)["candidate"]
        value = 1.0 - d / len(self.prompts)
        return Score({"consistency": value}, value, [value])

    def score(self, model: PreTrainedModel, tokenizer: Any) -> Score:
        ws = self.workspace
        if ws is None or ws.recipe is None or ws.model is not model:
            raise EvomergeError("consistency fitness: bind() it to the workspace that holds the candidate")
        return self.score_candidate(ws, ws.recipe)
