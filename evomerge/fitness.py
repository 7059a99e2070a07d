"""What a search asks of a fitness, and what it gets back.

Two fitnesses implement :class:`Fitness`: ``evaluate.LmEvalFitness`` (lm-eval tasks, labelled) and
``consistency.ConsistencyFitness`` (label-free, AdaMMS-style). A search process builds one per
stage and calls ``score`` on every trial's model. The consistency fitness is a
:class:`HostedFitness`: it scores the *recipe* the stage's workspace holds (rebuilding nudged
copies of it in place), so the search binds it once to that :class:`RecipeHost` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from evomerge.racing import RaceResult, RaceSpec
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
    def score(self, model: PreTrainedModel, tokenizer: Any) -> Score:
        """Score the model. Raises for a candidate it cannot score."""
        ...


@runtime_checkable
class HostedFitness(Fitness, Protocol):
    def bind(self, host: RecipeHost) -> None:
        """Called once per stage, before any score, with the host that will hold every trial's
        model; ``score`` then scores the host's current recipe."""
        ...


@runtime_checkable
class ItemFitness(Fitness, Protocol):
    """A fitness that is a weighted sum of means over items (lm-eval tasks), so it can keep each
    item's result and race a candidate rung by rung (:mod:`evomerge.racing`)."""

    @property
    def weights(self) -> dict[str, float]: ...  # fitness label -> weight

    def check_items(self) -> None:
        """Raises ConfigError when a task's metric is not a mean over items."""
        ...

    def race(self, model: PreTrainedModel, tokenizer: Any, spec: RaceSpec) -> RaceResult: ...
