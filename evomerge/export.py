"""Export a trial's recipe as mergekit YAML (atomically), optionally building the model.

Model paths in an exported recipe are as the study records them (:mod:`evomerge.identity`):
relative to the search config's folder for models inside it. So write the recipe into that
folder and run ``mergekit-yaml best.yml OUT`` (or ``evomerge merge best.yml OUT``) there.
"""

from __future__ import annotations

from pathlib import Path

import optuna
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.files import write_atomic
from evomerge.identity import local_ref
from evomerge.recipe import Recipe
from evomerge.study import (ATTR_BASELINE, ATTR_DFS_HOST, ATTR_DFS_REFS, ATTR_DFS_SOURCES, ATTR_PATH,
                            ATTR_RECIPE, ATTR_ROOT, ATTR_SCORES, best_trial, elite_line, elites_of, searched_methods,
                            trial_fitness)


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
    elite = elites_of(study).get(trial.number)
    if elite is not None:
        lines.append(f"# re-evaluated on every item: {elite_line(elite)}")
    note = baseline_note(study, trial)
    if note:
        lines.append(f"# {note}")
    if recipe is not None and recipe.method.needs:
        lines += [f"# evomerge extension: merge_method {recipe.merge_method} and the calibration block are not",
                  "# mergekit's; mergekit-yaml refuses this recipe. Build it with `evomerge merge THIS.yml OUT`,",
                  f"# or export the merged checkpoint: `evomerge export --study {study.study_name} --merge OUT`"]
    else:
        lines.append("# build it with `evomerge merge THIS.yml OUT` (or mergekit-yaml; random_seed is evomerge's)")
    lines.append("# relative model paths are relative to the search config's folder: put this file there and run it from there")
    return "\n".join(lines) + "\n"


def baseline_note(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str | None:
    """For a baseline trial, what it is and the method its recipe uses, next to the search's:
    ``baseline uniform (the plain average of the sources): a linear merge, not the search's
    task_arithmetic``. None for a searched trial."""
    name = trial.user_attrs.get(ATTR_BASELINE)
    if not name:
        return None
    what = "the plain average of the sources" if name == "uniform" else "one source model as it is"
    method = (trial.user_attrs.get(ATTR_RECIPE) or {}).get("merge_method", "?")
    searched = searched_methods(study)
    other = f", not the search's {', '.join(searched)}" if searched and method not in searched else ""
    return f"baseline {name} ({what}): a {method} merge{other}"


def export_recipe(study: optuna.Study, out: str | Path, number: int | None = None) -> tuple[Path, Recipe, optuna.trial.FrozenTrial]:
    """Write the trial's recipe. For a dfs trial it is a passthrough recipe, preceded by comments
    on what mergekit cannot express (input scales, embeddings/head of the host)."""
    recipe, trial = trial_recipe(study, number)
    path = write_atomic(out, recipe_header(study, trial, recipe) + _recipe_body(study, trial, recipe))
    return path, recipe, trial


def _recipe_body(study: optuna.Study, trial: optuna.trial.FrozenTrial, recipe: Recipe) -> str:
    """The trial's recipe as YAML; for a dfs trial, the passthrough recipe with its comments."""
    body = recipe.to_yaml()
    if ATTR_PATH in trial.user_attrs:
        from evomerge.layerpath import Hop, SourceLayer, annotated_yaml, passthrough_recipe

        hops = [Hop(int(a), float(b)) for a, b in trial.user_attrs[ATTR_PATH]]
        sources = [SourceLayer(m, int(i)) for m, i in study.user_attrs[ATTR_DFS_SOURCES]]
        _, warnings = passthrough_recipe(hops, sources, study.user_attrs[ATTR_DFS_REFS],
                                         dtype=recipe.dtype or "float32", host=study.user_attrs[ATTR_DFS_HOST])
        body = annotated_yaml(recipe, warnings, hops)
    return body


def build_trial_model(study: optuna.Study, trial: optuna.trial.FrozenTrial, recipe: Recipe, out: str | Path,
                      *, device: str = "cpu", overwrite: bool = False) -> Path:
    """Build exactly the model the trial evaluated: the recipe's merge, or for a dfs trial the
    layer path materialised (with its input scales) from the recorded sources."""
    root = Path(study.user_attrs.get(ATTR_ROOT) or ".")

    def local(ref: str) -> str:  # recorded relative to the config's folder; else as given (the CWD)
        return local_ref(ref, root)

    if ATTR_PATH not in trial.user_attrs:
        from evomerge.engine import merge_to_dir

        # the recipe as recorded (its model card keeps the portable paths), resolved against the root
        return merge_to_dir(recipe, out, device=device, overwrite=overwrite, relative_to=root)
    import torch

    from evomerge.engine import TORCH_DTYPES
    from evomerge.layerpath import Hop, LayerPathModel

    refs = {n: local(r) for n, r in study.user_attrs[ATTR_DFS_REFS].items()}
    names = list(dict.fromkeys(m for m, _ in study.user_attrs[ATTR_DFS_SOURCES]))
    model = LayerPathModel({n: refs[n] for n in names}, host=study.user_attrs[ATTR_DFS_HOST], device=device,
                           dtype=TORCH_DTYPES.get(recipe.dtype or "float32", torch.float32))
    model.set_path([Hop(int(a), float(b)) for a, b in trial.user_attrs[ATTR_PATH]])
    return model.export(out, overwrite=overwrite, recipe_yaml=_recipe_body(study, trial, recipe))
