"""Export a trial's recipe as mergekit YAML (atomically), optionally building the model."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import optuna
from optuna.trial import TrialState

from evomerge.errors import ConfigError
from evomerge.recipe import Recipe
from evomerge.search import ATTR_BASELINE, ATTR_RECIPE, ATTR_SCORES, best_trial, trial_fitness


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


def recipe_header(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> str:
    lines = [f"# exported by evomerge from study {study.study_name!r}, trial {trial.number}"]
    fit = trial_fitness(trial)
    if fit is not None:
        lines.append(f"# fitness {fit:.6g}")
    for task, value in (trial.user_attrs.get(ATTR_SCORES) or {}).items():
        lines.append(f"#   {task}: {value:.6g}")
    if trial.user_attrs.get(ATTR_BASELINE):
        lines.append(f"# baseline trial: {trial.user_attrs[ATTR_BASELINE]}")
    lines.append("# build it with `evomerge merge THIS.yml OUT` (or mergekit-yaml; random_seed is evomerge's)")
    return "\n".join(lines) + "\n"


def write_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temp file in the same folder and an atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def export_recipe(study: optuna.Study, out: str | Path, number: int | None = None) -> tuple[Path, Recipe, optuna.trial.FrozenTrial]:
    recipe, trial = trial_recipe(study, number)
    path = write_atomic(out, recipe_header(study, trial) + recipe.to_yaml())
    return path, recipe, trial
