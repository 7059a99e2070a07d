"""What a search asks of a fitness, and what it gets back.

Two fitnesses implement :class:`Fitness`: ``evaluate.LmEvalFitness`` (lm-eval tasks, labelled) and
``consistency.ConsistencyFitness`` (label-free, AdaMMS-style). A search process builds one per
stage, binds it once to the stage's :class:`RecipeHost` (the workspace holding the live merged
model), then calls ``score`` on every trial's model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from evomerge.recipe import Recipe


@dataclass(frozen=True)
class Score:
    values: dict[str, float]  # task name -> metric value
    fitness: float  # weighted sum
    objectives: list[float]  # one per task (multi-objective studies)


class RecipeHost(Protocol):
    """A live model built from a recipe, which can be rebuilt from another recipe in place
    (``workspace.Workspace``)."""

    @property
    def model(self) -> PreTrainedModel: ...

    @property
    def tokenizer(self) -> Any: ...  # a transformers tokenizer

    @property
    def recipe(self) -> Recipe | None: ...  # the recipe the model holds (None before the first load)

    def load(self, recipe: Recipe) -> None: ...


class Fitness(Protocol):
    def bind(self, host: RecipeHost | None) -> None:
        """Called once per stage, before any score, with the host that will hold every trial's
        model (None where the stage has none). A fitness that only reads the model ignores it."""
        ...

    def score(self, model: PreTrainedModel, tokenizer: Any) -> Score:
        """Score the model (the host's current one). Raises for a candidate it cannot score."""
        ...
