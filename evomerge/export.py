"""Export a trial's recipe as mergekit YAML (atomically), optionally building the model."""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.files import write_atomic
from evomerge.recipe import Recipe
from evomerge.search import (ATTR_BASELINE, ATTR_DFS_HOST, ATTR_DFS_REFS, ATTR_DFS_SOURCES, ATTR_PATH, ATTR_RECIPE,
                             ATTR_SCORES, best_trial, trial_fitness)


def trial_recipe(study: optuna.Study, number: int | None = None) -> tuple[Recipe, optuna.trial.FrozenTrial]:
    """The recipe that was evaluated in trial ``number`` (default: the best trial)."""
    if number is None:
        trial = best_trial(study)
        if trial is None:
            raise ConfigError(f"study {study.study_name!r} has no completed trial yet")
    else:
        trials = [t for t in study.get_trials(deepcopy=False) if t.number == number]
        if not trials:
            raise ConfigError(f"--trial: study {study.study_name!r} has no trial {number}")
        trial = trials[0]
        if trial.state != TrialState.COMPLETE:
            raise ConfigError(f"--trial: trial {number} is {trial.state.name}, not COMPLETE")
    data = trial.user_attrs.get(ATTR_RECIPE)
    if data is None:
        raise ConfigError(f"trial {trial.number} has no recorded recipe (not an evomerge study?)")
    return Recipe.from_dict(data, f"trial {trial.number} recipe"), trial


def recipe_header(study: optuna.Study, trial: optuna.trial.FrozenTrial, recipe: Recipe | None = None) -> str:
    lines = [f"# exported by evomerge from study {study.study_name!r}, trial {trial.number}"]
    fit = trial_fitness(trial)
    if fit is not None:
        lines.append(f"# fitness {fit:.6g}")
    for task, value in (trial.user_attrs.get(ATTR_SCORES) or {}).items():
        lines.append(f"#   {task}: {value:.6g}")
    if trial.user_attrs.get(ATTR_BASELINE):
        lines.append(f"# baseline trial: {trial.user_attrs[ATTR_BASELINE]}")
    if recipe is not None and recipe.method.needs:
        lines += [f"# evomerge extension: merge_method {recipe.merge_method} and the calibration block are not",
                  "# mergekit's; mergekit-yaml refuses this recipe. Build it with `evomerge merge THIS.yml OUT`,",
                  f"# or export the merged checkpoint: `evomerge export --study {study.study_name} --merge OUT`"]
    else:
        lines.append("# build it with `evomerge merge THIS.yml OUT` (or mergekit-yaml; random_seed is evomerge's)")
    return "\n".join(lines) + "\n"


def export_recipe(study: optuna.Study, out: str | Path, number: int | None = None) -> tuple[Path, Recipe, optuna.trial.FrozenTrial]:
    """Write the trial's recipe. For a dfs trial it is a passthrough recipe, preceded by comments
    on what mergekit cannot express (input scales, embeddings/head of the host)."""
    recipe, trial = trial_recipe(study, number)
    body = recipe.to_yaml()
    if ATTR_PATH in trial.user_attrs:
        from evomerge.layerpath import Hop, SourceLayer, annotated_yaml, passthrough_recipe

        hops = [Hop(int(a), float(b)) for a, b in trial.user_attrs[ATTR_PATH]]
        sources = [SourceLayer(m, int(i)) for m, i in study.user_attrs[ATTR_DFS_SOURCES]]
        _, warnings = passthrough_recipe(hops, sources, study.user_attrs[ATTR_DFS_REFS],
                                         dtype=recipe.dtype or "float32", host=study.user_attrs[ATTR_DFS_HOST])
        body = annotated_yaml(recipe, warnings, hops)
    path = write_atomic(out, recipe_header(study, trial, recipe) + body)
    return path, recipe, trial


def build_trial_model(study: optuna.Study, trial: optuna.trial.FrozenTrial, recipe: Recipe, out: str | Path,
                      *, device: str = "cpu", overwrite: bool = False) -> Path:
    """Build exactly the model the trial evaluated: the recipe's merge, or for a dfs trial the
    layer path materialised (with its input scales) from the recorded sources."""
    if ATTR_PATH not in trial.user_attrs:
        from evomerge.engine import merge_to_dir

        return merge_to_dir(recipe, out, device=device, overwrite=overwrite)
    import torch

    from evomerge.engine import TORCH_DTYPES
    from evomerge.layerpath import Hop, LayerPathModel

    refs = study.user_attrs[ATTR_DFS_REFS]
    names = list(dict.fromkeys(m for m, _ in study.user_attrs[ATTR_DFS_SOURCES]))
    model = LayerPathModel({n: refs[n] for n in names}, host=study.user_attrs[ATTR_DFS_HOST], device=device,
                           dtype=TORCH_DTYPES.get(recipe.dtype or "float32", torch.float32))
    model.set_path([Hop(int(a), float(b)) for a, b in trial.user_attrs[ATTR_PATH]])
    return model.export(out, overwrite=overwrite)
