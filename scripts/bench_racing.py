"""Racing versus full evaluation on the demo world, at an equal budget of item evaluations.

For each seed: a search that scores every candidate on all dev items (``racing.enabled: false``)
for ``--trials`` trials, then a racing search given the same number of item evaluations
(``budget.items``). Reported per seed: the held-out (demo_target test split) score of each run's
chosen recipe, and the item evaluations the racing run needed before its incumbent's held-out
score matched the full run's final one. Over seeds: the paired difference at an equal budget,
and the mean held-out score of the incumbent as a function of the item evaluations spent, one
curve per search; the last line is the ratio of full evaluation's budget to the item evaluations
after which racing's mean curve reaches (and keeps) full evaluation's final mean. One seed's final
score is one noisy draw, so matching it seed by seed (also printed) mostly measures that noise.
The false-stop rate of the bound is measured by replaying racing's rule on the full runs'
item-level results (every candidate there saw every item).

    python scripts/bench_racing.py --out /tmp/racing_demo --seeds 0 1 2 3 4 5 6 7 8 9 --trials 40

``--confidence``, ``--rungs`` and ``--against`` override the config's racing settings;
``--reuse-full`` reuses the full-evaluation studies of an earlier run in the same ``--out``, and
``--reuse`` also its finished racing studies (both searches are deterministic for a seed, so a run
can be extended by more seeds and only the new ones are searched).

The world is built once in ``--out`` (``evomerge demo --out DIR --trials 1`` builds the same one).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import statistics
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState
from scipy.stats import ttest_rel

from evomerge.config import Fitness, FitnessTask
from evomerge.demo.pipeline import demo_config
from evomerge.demo.world import add_world_config_option, build_world
from evomerge.errors import ConfigError
from evomerge.evaluate import LmEvalFitness
from evomerge.racing import Items, decide, rung_sizes
from evomerge.search import run_search
from evomerge.stages import PsStage
from evomerge.study import ATTR_ITEM_COUNT, ATTR_ITEMS, ATTR_RECIPE, best_trial, load_existing_study, trial_fitness

TASK = "demo_target"


class HeldOut:
    """Builds a trial's recipe in one workspace and scores it on the test split (cached)."""

    def __init__(self, cfg, out: Path):
        self.stage = PsStage(cfg)
        self.stage.open()
        spec = Fitness(tasks=[FitnessTask(task=TASK, split="test")], include_path=[str(out / "tasks")], batch_size=64)
        self.fitness = LmEvalFitness(spec, [str(out / "tasks")])
        self.cache: dict[str, float] = {}
        self.evaluated = 0

    def __call__(self, trial: optuna.trial.FrozenTrial) -> float:
        key = json.dumps(trial.user_attrs[ATTR_RECIPE], sort_keys=True)
        if key not in self.cache:
            model, tokenizer = self.stage.load({ATTR_RECIPE: trial.user_attrs[ATTR_RECIPE]})
            self.cache[key] = self.fitness.score(model, tokenizer).fitness
            self.evaluated += 1
        return self.cache[key]


def run(cfg, trials: int, items: int | None = None) -> tuple[optuna.Study, float]:
    t0 = time.perf_counter()
    result = run_search(cfg, trials=trials, fresh=True)
    return load_existing_study(result.study_name, cfg.storage_url), time.perf_counter() - t0


def stored(cfg) -> optuna.Study | None:
    """The study of ``cfg`` from an earlier run of this script (None: there is none)."""
    try:
        return load_existing_study(cfg.stage_study("ps"), cfg.storage_url)
    except ConfigError:
        return None


def reuse(cfg, trials: int) -> tuple[optuna.Study | None, float]:
    """The full-evaluation study of an earlier run of this script, if it has exactly ``trials`` trials."""
    study = stored(cfg)
    if study is None:
        return None, 0.0
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return (study, float("nan")) if len(done) == trials == len(study.trials) else (None, 0.0)


def reuse_racing(cfg, items: int) -> tuple[optuna.Study | None, float]:
    """The racing study of an earlier run of this script with the same seed and settings, if it
    finished: nothing running and at least ``items`` item evaluations spent (its budget)."""
    study = stored(cfg)
    if study is None:
        return None, 0.0
    trials = study.get_trials(deepcopy=False)
    used = sum(int(t.user_attrs.get(ATTR_ITEM_COUNT) or 0) for t in trials)
    finished = trials and used >= items and not any(t.state == TrialState.RUNNING for t in trials)
    return (study, float("nan")) if finished else (None, 0.0)


def trajectory(study: optuna.Study) -> list[tuple[int, optuna.trial.FrozenTrial]]:
    """(item evaluations so far, incumbent) after each finished trial."""
    out, used, best = [], 0, None
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        used += int(t.user_attrs.get(ATTR_ITEM_COUNT) or 0)
        if t.state == TrialState.COMPLETE and (best is None or trial_fitness(t) > trial_fitness(best)):
            best = t
        if best is not None:
            out.append((used, best))
    return out


def false_stops(study: optuna.Study, rungs: list[float], confidence: float) -> tuple[int, int, int]:
    """Replay racing on a full run: (stopped, stopped that would have beaten the incumbent, raced)."""
    stopped = wrong = raced = 0
    best = None
    for t in sorted(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)), key=lambda t: t.number):
        items = Items.from_attr(t.system_attrs[ATTR_ITEMS])
        if best is not None:
            ref = Items.from_attr(best.system_attrs[ATTR_ITEMS])
            raced += 1
            size = items.sizes[TASK]
            plan = rung_sizes(rungs, size)[:-1]
            for n in plan:
                seen = Items({TASK: items.values[TASK][:n]}, items.sizes)
                if decide(seen, ref, trial_fitness(best), {TASK: 1.0}, confidence=confidence, looks=len(plan)).stop:
                    stopped += 1
                    wrong += trial_fitness(t) >= trial_fitness(best)
                    break
        if best is None or trial_fitness(t) > trial_fitness(best):
            best = t
    return stopped, wrong, raced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("/tmp/racing_demo"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--trials", type=int, default=40, help="trials of the full-evaluation run (baselines included)")
    ap.add_argument("--world-seed", type=int, default=0)
    add_world_config_option(ap)
    ap.add_argument("--confidence", type=float, default=None, help="racing.confidence (default: the config's)")
    ap.add_argument("--rungs", type=float, nargs="+", default=None, help="racing.rungs (default: the config's)")
    ap.add_argument("--against", choices=("incumbent", "generation"), default=None,
                    help="racing.against (default: the config's)")
    ap.add_argument("--reuse-full", action="store_true",
                    help="reuse a full-evaluation study already in --out with the same seed and trial count")
    ap.add_argument("--reuse", action="store_true",
                    help="--reuse-full, and also reuse a finished racing study with the same seed and settings "
                         "(runs are deterministic: a finished seed is only scored again, so seeds can be added)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    start = time.perf_counter()
    models = build_world(a.out, seed=a.world_seed, config=a.world_config)
    storage = f"sqlite:///{(a.out / 'runs' / 'bench_racing.db').resolve()}"
    base = demo_config(a.out, models, storage=storage)
    heldout = HeldOut(base, a.out)
    settings: dict = {k: v for k, v in (("confidence", a.confidence), ("rungs", a.rungs)) if v is not None}
    if a.against is not None:
        settings["against"] = a.against
    racing = base.fitness.racing.model_copy(update=settings)
    tag = "-".join(f"{k}{v}" for k, v in sorted(settings.items())) if settings else "default"
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", tag)
    rows, stops, curves = [], [0, 0, 0], {"full": [], "racing": []}
    for seed in a.seeds:
        full_cfg = demo_config(a.out, models, storage=storage, seed=seed, study=f"full-{seed}",
                               fitness={**base.fitness.model_dump(), "racing": {"enabled": False}, "elites": 0})
        full, full_s = reuse(full_cfg, a.trials) if a.reuse_full or a.reuse else (None, 0.0)
        if full is None:
            full, full_s = run(full_cfg, a.trials)
        full_path = trajectory(full)
        full_items = full_path[-1][0]
        full_best = best_trial(full)
        full_test = heldout(full_best)
        race_cfg = demo_config(a.out, models, storage=storage, seed=seed, study=f"racing-{tag}-{seed}",
                               fitness={**base.fitness.model_dump(), "racing": racing.model_dump(), "elites": 0},
                               budget={"trials": 100 * a.trials, "items": full_items})
        raced, race_s = reuse_racing(race_cfg, full_items) if a.reuse else (None, 0.0)
        if raced is None:
            raced, race_s = run(race_cfg, 100 * a.trials)
        path = trajectory(raced)
        race_test = heldout(best_trial(raced))
        match = next((used for used, inc in path if heldout(inc) >= full_test), None)
        curves["full"].append([(used, heldout(inc)) for used, inc in full_path])
        curves["racing"].append([(used, heldout(inc)) for used, inc in path])
        states = [t.state for t in raced.get_trials(deepcopy=False)]
        for i, v in enumerate(false_stops(full, racing.rungs, racing.confidence)):
            stops[i] += v
        rows.append({"seed": seed, "full_trials": len(full.trials), "full_items": full_items, "full_test": full_test,
                     "full_dev": trial_fitness(full_best), "full_s": full_s,
                     "race_trials": len(states), "pruned": states.count(TrialState.PRUNED),
                     "race_items": path[-1][0], "race_test": race_test, "race_dev": trial_fitness(best_trial(raced)),
                     "race_s": race_s, "match_items": match})
        print(json.dumps(rows[-1]), flush=True)
    print()
    print("| seed | full: trials | full: held-out | racing: trials (pruned) | racing: held-out | items (each run) "
          "| racing items to match full's held-out | search s full / racing |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        match = f"{r['match_items']}" if r["match_items"] is not None else f"not matched (> {r['race_items']})"
        print(f"| {r['seed']} | {r['full_trials']} | {r['full_test']:.3f} | {r['race_trials']} ({r['pruned']}) "
              f"| {r['race_test']:.3f} | {r['full_items']} / {r['race_items']} | {match} "
              f"| {r['full_s']:.0f} / {r['race_s']:.0f} |")
    n = len(rows)
    mean_full = sum(r["full_test"] for r in rows) / n
    mean_race = sum(r["race_test"] for r in rows) / n
    print(f"\nmean held-out: full {mean_full:.3f}, racing {mean_race:.3f} (equal item budget)")
    print(f"racing: rungs {racing.rungs}, confidence {racing.confidence}")
    print(f"bound replayed on the full runs: {stops[0]} of {stops[2]} candidates stopped, {stops[1]} of them "
          f"would have beaten the incumbent on all items (confidence {racing.confidence})")
    print(f"held-out models scored: {heldout.evaluated}; wall {time.perf_counter() - start:.0f} s")
    if n > 1:
        diff = [r["race_test"] - r["full_test"] for r in rows]
        p = ttest_rel([r["race_test"] for r in rows], [r["full_test"] for r in rows]).pvalue
        print(f"racing - full at an equal budget: {statistics.mean(diff):+.3f} ± {statistics.stdev(diff) / n ** 0.5:.3f} "
              f"(mean ± se over {n} seeds; paired t-test p = {p:.2f})")
    # per seed: a seed whose racing run never matched counts at the whole budget (ratio 1 there),
    # so this ratio is an upper bound; the table says which seeds did not match
    needed = sum(r["match_items"] if r["match_items"] is not None else r["full_items"] for r in rows)
    print(f"per seed, racing items to match that seed's full held-out: {sum(r['full_items'] for r in rows) / needed:.1f}x "
          f"fewer (upper bound; {sum(r['match_items'] is None for r in rows)} of {n} seeds not matched)")
    # over seeds: the mean held-out of the incumbent after b item evaluations, a curve per search
    # (one seed's final score is one noisy draw; matching it per seed mostly measures that noise)
    budget = min(r["full_items"] for r in rows)
    step = max(1, budget // (8 * a.trials))
    grid = list(range(step, budget + 1, step))
    mean = {k: [mean_at(v, b) for b in grid] for k, v in curves.items()}
    target = statistics.mean(r["full_test"] for r in rows)
    reach = {k: first_staying(grid, m, target) for k, m in mean.items()}
    print("mean held-out of the incumbent after b item evaluations (over seeds):")
    for frac in (0.125, 0.25, 0.5, 0.75, 1.0):
        i = min(len(grid) - 1, max(0, round(frac * len(grid)) - 1))
        print(f"  b = {grid[i]:5d}: full {fmt(mean['full'][i])}, racing {fmt(mean['racing'][i])}")
    print(f"full evaluation's mean held-out at its whole budget ({budget} items): {target:.3f}; reached (and kept) "
          f"by full evaluation at {reach['full']} items, by racing at {reach['racing']} items")
    if reach["racing"] is None:
        print("racing did not reach full evaluation's mean held-out within the budget: 1.0x fewer item evaluations")
    else:
        print(f"{budget / reach['racing']:.1f}x fewer item evaluations")


def mean_at(runs: list[list[tuple[int, float]]], b: int) -> float | None:
    """The mean over runs of the incumbent's held-out score after ``b`` item evaluations (None
    while some run has no incumbent yet)."""
    vals = []
    for path in runs:
        seen = [score for used, score in path if used <= b]
        if not seen:
            return None
        vals.append(seen[-1])
    return statistics.mean(vals)


def first_staying(grid: list[int], values: list[float | None], target: float) -> int | None:
    """The smallest budget from which the curve stays at or above ``target`` (None: never)."""
    at = None
    for b, v in zip(grid, values):
        if v is not None and v >= target - 1e-12:
            at = b if at is None else at
        else:
            at = None
    return at


def fmt(v: float | None) -> str:
    return "  -  " if v is None else f"{v:.3f}"


if __name__ == "__main__":
    main()
