"""``study:NAME`` and ``study:NAME#N`` experts of ``evomerge moe``: the recipe of that study's best
trial (or of trial N), read from its storage (``storage:`` of the moe config, else
``runs/NAME.db`` beside it)."""

from __future__ import annotations

from pathlib import Path

import optuna

from evomerge.errors import ConfigError
from evomerge.export import trial_recipe
from evomerge.identity import local_ref, map_refs
from evomerge.moe_config import STUDY_PREFIX, MoEConfig
from evomerge.recipe import Recipe
from evomerge.study import ATTR_PATH

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
        # a study records local models relative to its search config's folder: by default the
        # folder above its runs/ database; else the moe config's folder
        roots = [cfg.root]
        if url.startswith("sqlite:///"):
            db = Path(url.removeprefix("sqlite:///")).resolve()
            roots.insert(0, db.parent.parent if db.parent.name == "runs" else db.parent)

        def local(ref: str) -> str:
            for root in roots:
                found = local_ref(ref, root)
                if found != ref:
                    return found
            return ref

        return Recipe.from_dict(map_refs(recipe.to_dict(), local), f"source_model {ref!r}")

    return recipe_of
