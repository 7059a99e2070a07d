"""Incremental study reading (study.TrialReader / StudyTally / tally): the same answers as reading
every trial, on an RDB storage (the incremental query) and in memory (the fallback)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from evomerge.study import (ATTR_INTERRUPTED, TrialReader, best_of, counted_of, storage_for, tally)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _study(kind: str, tmp_path) -> optuna.Study:
    storage = storage_for(f"sqlite:///{tmp_path / 'r.db'}") if kind == "sqlite" else None
    return optuna.create_study(study_name="r", storage=storage, direction="maximize")


def _add(study: optuna.Study, outcome: str, value: float = 0.0) -> optuna.Trial:
    trial = study.ask()
    if outcome == "complete":
        study.tell(trial, value)
    elif outcome == "fail":
        study.tell(trial, state=TrialState.FAIL)
    elif outcome == "interrupted":
        trial.set_user_attr(ATTR_INTERRUPTED, True)
        study.tell(trial, state=TrialState.FAIL)
    return trial  # "running": left RUNNING


def _expected(study: optuna.Study) -> tuple[int, int, int | None]:
    trials = study.get_trials(deepcopy=False)
    best = best_of(trials)
    running = sum(1 for t in trials if t.state == TrialState.RUNNING)
    return counted_of(trials), running, best.number if best else None


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
def test_tally_matches_reading_every_trial(kind, tmp_path):
    study = _study(kind, tmp_path)
    now = tally(study)
    assert (now.counted, now.running, now.best) == (0, 0, None)
    _add(study, "complete", 0.5)
    _add(study, "fail")
    _add(study, "interrupted")
    open_trial = _add(study, "running")
    now = tally(study)
    assert (now.counted, now.running, now.best.number) == _expected(study) == (2, 1, 0)
    # the running trial finishes best; a later one ties it (the lower number stays best)
    study.tell(open_trial, 0.9)
    _add(study, "complete", 0.9)
    _add(study, "running")
    now = tally(study)
    assert (now.counted, now.running, now.best.number) == _expected(study) == (4, 1, 3)
    assert tally(study) is now  # one tally per study object


def test_reader_returns_each_finished_trial_once(tmp_path):
    study = _study("sqlite", tmp_path)
    reader = TrialReader(study)
    first = _add(study, "running")
    _add(study, "complete", 1.0)
    assert [t.number for t in reader.refresh()] == [1]
    assert [t.number for t in reader.unfinished.values()] == [0]
    assert reader.refresh() == []
    study.tell(first, 2.0)
    _add(study, "complete", 3.0)
    finished = reader.refresh()
    assert [(t.number, t.value) for t in finished] == [(0, 2.0), (2, 3.0)]
    assert reader.unfinished == {}
