"""Elite re-evaluation: before a trial is called best, the top few completed trials are scored on
every item of the fitness split (whatever ``fitness.limit`` is) and on the held-out tasks
(``fitness.heldout``), and the results are stored in the study (:data:`~evomerge.study.ATTR_ELITES`,
by trial number; a finished trial's attrs cannot change):

``{"fitness", "low", "high", "confidence", "items", "heldout": {label: value}, "heldout_fitness"}``

``low``/``high`` is a normal interval for the fitness on new items like the dev items (the
item-level standard error, :func:`evomerge.racing.interval`). With ``fitness.elite_fewshot_seed``
the elites are scored on every item a second time, their few-shot examples drawn with that seed,
and ``fitness``/``low``/``high`` are those of the two seeds' mean, item by item; ``"fewshot":
{"seeds": [1234, seed], "fitness": [each seed's]}`` keeps both (a fitness that moves with the
few-shot draw is one a single draw overstates). The best trial is then the elite
with the highest re-evaluated fitness (:func:`evomerge.study.best_of`); ``status``,
``report`` and the export header show its interval and, with held-out tasks, the dev-versus-held-out
gap (the winner's curse: how much the dev score of the chosen trial overstates).

The driver picks the trials (:func:`elite_trials`) and stores the results
(:func:`record_elites`); a worker scores them (:class:`EliteScorer`).
"""

from __future__ import annotations

import logging
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge.config import Fitness as FitnessSpec
from evomerge.config import SearchConfig
from evomerge.evaluate import LM_EVAL_OTHER_SEED
from evomerge.racing import Items, RaceSpec, interval
from evomerge.study import (ATTR_ELITES, ATTR_ITEM_SEED, ATTR_ITEMS, ATTR_PATH, ATTR_RECIPE, elite_line, elites_of,
                            trial_fitness)
from evomerge.trials import Stage, is_trial_error, error_line

log = logging.getLogger(__name__)

CONFIDENCE = 0.95  # of the elites' intervals
RECORD_KEYS = (ATTR_RECIPE, ATTR_PATH)  # what a worker needs to rebuild a trial's model (Stage.load)


def elite_trials(study: optuna.Study, count: int) -> list[optuna.trial.FrozenTrial]:
    """The ``count`` completed trials with the highest fitness that have no re-evaluation yet."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if len(t.values or ()) == 1]
    top = sorted(done, key=lambda t: (-(trial_fitness(t) or 0.0), t.number))[:count]
    known = elites_of(study)
    return [t for t in top if t.number not in known]


def trial_record(trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {k: trial.user_attrs[k] for k in RECORD_KEYS if k in trial.user_attrs}


class EliteScorer:
    """A worker's elite scoring: the fitness tasks on every item (the search's own fitness when it
    has no limit), again with the few-shot seed ``fitness.elite_fewshot_seed`` when set, and the
    held-out tasks, built on first use."""

    def __init__(self, config: SearchConfig, fitness: Any = None):
        """Builds the held-out tasks at once (a worker's start, before any study exists), so a
        bad one is one line before the search rather than after it."""
        from evomerge.evaluate import LmEvalFitness

        self.config = config
        self._dev = fitness if config.fitness.limit is None else None
        self._fewshot: Any = None
        self._heldout: Any = None
        spec = config.fitness
        if spec.heldout and spec.kind == "lm_eval":
            held = FitnessSpec(tasks=spec.heldout, include_path=spec.include_path, num_fewshot=spec.num_fewshot,
                               apply_chat_template=spec.apply_chat_template, batch_size=spec.batch_size,
                               racing={"enabled": False})
            self._heldout = LmEvalFitness(held, config.include_paths, key="heldout")

    def _fitnesses(self, dev: bool) -> tuple[Any, Any, Any]:
        """(the fitness on every item or None when not ``dev``, the same with the second few-shot
        seed or None, the held-out tasks or None)."""
        from evomerge.evaluate import LmEvalFitness

        spec = self.config.fitness
        whole = spec.model_copy(update={"limit": None})
        if dev and self._dev is None:
            self._dev = LmEvalFitness(whole, self.config.include_paths)
        if spec.elite_fewshot_seed is not None and self._fewshot is None:
            self._fewshot = LmEvalFitness(whole, self.config.include_paths, fewshot_seed=spec.elite_fewshot_seed)
        return self._dev if dev else None, self._fewshot, self._heldout

    def score(self, stage: Stage, record: dict[str, Any], seed: int, dev: bool = True) -> dict[str, Any]:
        """The record's model on every item, in the study's order ``seed`` (``dev=False``: the
        driver has them already), with the second few-shot seed, and on the held-out tasks:
        ``{"dev": Items attr, "fewshot": Items attr, "heldout": {label: value}, "heldout_fitness"}``
        (what applies), or ``{"error": ...}`` when the candidate cannot be scored."""
        fitness, fewshot, heldout = self._fitnesses(dev)
        out: dict[str, Any] = {}
        try:
            model, tokenizer = stage.load(record)
            for key, f in (("dev", fitness), ("fewshot", fewshot)):
                if f is not None:
                    out[key] = f.race(model, tokenizer, RaceSpec(seed, (), CONFIDENCE)).items.to_attr()
            held = heldout.score(model, tokenizer) if heldout is not None else None
        except Exception as e:
            if is_trial_error(e):
                return {"error": error_line(e)}
            raise
        if held is not None:
            out["heldout"] = held.values
            out["heldout_fitness"] = held.fitness
        return out


def dev_interval(items: Items, weights: dict[str, float]) -> dict[str, Any]:
    est, low, high = interval(items, weights, CONFIDENCE)
    return {"fitness": est, "low": low, "high": high, "confidence": CONFIDENCE, "items": items.count}


def elite_result(items: Items, scored: dict[str, Any], spec: FitnessSpec) -> dict[str, Any]:
    """An elite's stored re-evaluation from its results on every item (``items``) and what a
    worker scored (:meth:`EliteScorer.score`). With a second few-shot seed, the fitness and its
    interval are those of the two seeds' mean, item by item (the items are the same, in the same
    order), and ``"fewshot": {"seeds": [...], "fitness": [...]}`` keeps each seed's."""
    out = dev_interval(items, spec.weights)
    if "fewshot" in scored:
        other = Items.from_attr(scored["fewshot"])
        mean = Items({k: (v + other.values[k]) / 2 for k, v in items.values.items()}, items.sizes)
        out = {**dev_interval(mean, spec.weights), "items": items.count,
               "fewshot": {"seeds": [LM_EVAL_OTHER_SEED, spec.elite_fewshot_seed],
                           "fitness": [items.fitness(spec.weights), other.fitness(spec.weights)]}}
    return {**out, **{k: scored[k] for k in ("heldout", "heldout_fitness") if k in scored}}


def record_elites(study: optuna.Study, trials: list[optuna.trial.FrozenTrial], results: list[dict[str, Any]]) -> None:
    """Store the elites' re-evaluations in the study (a failed one is logged and left out)."""
    elites = {str(k): v for k, v in elites_of(study).items()}
    for t, result in zip(trials, results):
        if "error" in result:
            log.warning("elite trial %d could not be re-evaluated: %s", t.number, result["error"])
            continue
        elites[str(t.number)] = result
        log.info("elite trial %d: %s", t.number, elite_line(result))
    study.set_user_attr(ATTR_ELITES, elites)


def item_seed(study: optuna.Study, default: int) -> int:
    seed = study.user_attrs.get(ATTR_ITEM_SEED)
    return int(seed) if seed is not None else default


def run_elites(study: optuna.Study, score: Any, config: SearchConfig) -> int:
    """Re-evaluate the top ``fitness.elites`` trials not yet re-evaluated. A trial that already
    saw every item of the split (no ``limit``) keeps its stored items; the model is rebuilt only
    for the items it has not seen, the second few-shot seed and the held-out tasks, by
    ``score(records, seed, dev)``, the runner's (in this process or on its workers). Returns how
    many were re-evaluated."""
    spec = config.fitness
    trials = elite_trials(study, spec.elites)
    if not trials:
        return 0
    known: list[Items | None] = []
    for t in trials:
        items = Items.from_attr(t.system_attrs[ATTR_ITEMS]) if ATTR_ITEMS in t.system_attrs else None
        known.append(items if items is not None and items.complete and spec.limit is None else None)
    more = bool(spec.heldout) or spec.elite_fewshot_seed is not None
    todo = [i for i, k in enumerate(known) if k is None or more]
    log.info("re-evaluating the top %d trial(s) on every item%s%s", len(trials),
             f", also with few-shot seed {spec.elite_fewshot_seed}" * (spec.elite_fewshot_seed is not None),
             " and on the held-out tasks" * bool(spec.heldout))
    scored: list[dict[str, Any]] = [{} for _ in trials]
    if todo:
        for i, result in zip(todo, score([trial_record(trials[i]) for i in todo], item_seed(study, config.seed),
                                         [known[i] is None for i in todo])):
            scored[i] = result
    results = []
    for k, result in zip(known, scored):
        items = k if k is not None else Items.from_attr(result["dev"]) if "dev" in result else None
        results.append(result if "error" in result or items is None else elite_result(items, result, spec))
    record_elites(study, trials, results)
    return len(trials)
