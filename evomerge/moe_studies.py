"""``study:NAME`` and ``study:NAME#N`` experts of ``evomerge moe``: the recipe of that study's best
trial (or of trial N), read from its storage (``storage:`` of the moe config, else
``runs/NAME.db`` beside it)."""

from __future__ import annotations

from pathlib import Path

import optuna

from evomerge.errors import ConfigError
from evomerge.export import trial_recipe
from evomerge.moe_config import STUDY_PREFIX, MoEConfig
from evomerge.recipe import Recipe
from evomerge.search import ATTR_PATH

__all__ = ["study_recipes"]


def study_recipes(cfg: MoEConfig):
    """A function from a ``study:`` reference to its trial's recipe, for :func:`evomerge.moe.write_moe`."""

    def recipe_of(ref: str) -> Recipe:
        name, _, number = ref.removeprefix(STUDY_PREFIX).partition("#")
        if not name or (number and not number.isdigit()):
            raise ConfigError(f"source_model {ref!r}: expected study:NAME or study:NAME#N (N a trial number)")
        url = cfg.study_storage(name)
        if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).is_file():
            raise ConfigError(f"source_model {ref!r}: {url.removeprefix('sqlite:///')} does not exist (set storage:)")
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            study = optuna.load_study(study_name=name, storage=url)
        except KeyError:
            raise ConfigError(f"source_model {ref!r}: no study {name!r} in {url}") from None
        try:
            recipe, trial = trial_recipe(study, int(number) if number else None)
        except ConfigError as e:
            raise ConfigError(f"source_model {ref!r}: {e}") from None
        if ATTR_PATH in trial.user_attrs:
            raise ConfigError(f"source_model {ref!r}: trial {trial.number} is a layer-path (dfs) trial; "
                              "experts need a parameter-space (ps) trial")
        return recipe

    return recipe_of
