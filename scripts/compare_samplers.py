"""Compare samplers at equal budget on the demo world, over several sampler seeds: each variant and
seed searches its own study of evomerge/demo/demo.yml (one world, built once with --world-seed), then the
best trial is built and scored on the held-out test split(s).

    python scripts/compare_samplers.py --out demo_out --trials 40 --seeds 0 1 2 3 \
        --variants cmaes "cmaes:sigma0=0.15" tpe "cmaes:groups=1"

``--world-config`` builds another world: a preset of ``evomerge.demo.world.PRESETS`` (``layered``, ``v1``)
or a JSON object of ``DEFAULT_CONFIG`` overrides; give each world its own ``--out``.

A variant is a sampler name, optionally with ``:key=value,...`` overrides: ``sigma0``, ``popsize``
(the sampler's fields) and ``groups`` (``merge.layer_groups``: 1 = one weight per model). Prints
the test score per seed, the mean ± sd per variant and Welch's t-test (two-sided) of each variant
against the first; writes everything to ``<out>/compare_samplers.json``. For CMA-ES runs it also
records pycma's step size per generation and, with ``--score-mean``, the test score of the final
search distribution's mean (what CMA-ES believes is best, as opposed to the luckiest trial).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from scipy import stats

from evomerge.demo.pipeline import demo_config, score_on_test
from evomerge.demo.world import add_world_config_option, build_world
from evomerge.engine import merge_to_dir
from evomerge.export import build_trial_model, trial_recipe
from evomerge.samplers import cma_state
from evomerge.search import run_search
from evomerge.stages import PsStage
from evomerge.study import load_existing_study


def parse_variant(text: str) -> tuple[str, dict[str, Any], int | str | None]:
    name, _, rest = text.partition(":")
    sampler: dict[str, Any] = {"name": name}
    groups: int | str | None = None
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key == "groups":
            groups = value if value == "full" else int(value)
        elif key == "popsize":
            sampler[key] = int(value)
        else:
            sampler[key] = float(value)
    return name, sampler, groups


def run_one(out: Path, models: dict[str, Path], variant: str, seed: int, trials: int, tasks: tuple[str, ...],
            score_mean: bool) -> dict[str, Any]:
    _, sampler, groups = parse_variant(variant)
    slug = variant.replace(":", "_").replace(",", "_").replace("=", "")
    cfg = demo_config(out, models, study=f"compare-{slug}-s{seed}", seed=seed,
                      storage=f"sqlite:///{(out / 'runs' / 'compare.db').resolve()}")
    update: dict[str, Any] = {"sampler": cfg.sampler.model_copy(update=sampler)}
    if groups is not None:
        update["merge"] = cfg.merge.model_copy(update={"layer_groups": groups})
    cfg = cfg.model_copy(update=update)
    t0 = time.perf_counter()
    result = run_search(cfg, trials=trials, fresh=True)
    seconds = time.perf_counter() - t0
    study = load_existing_study(result.study_name, cfg.storage_url)
    recipe, trial = trial_recipe(study)
    folder = build_trial_model(study, trial, recipe, out / "compare-best", overwrite=True)
    row: dict[str, Any] = {"variant": variant, "seed": seed, "trials": result.completed, "best_trial": trial.number,
                           "dev": result.best_fitness, "test": score_on_test(folder, out / "tasks", tasks),
                           "search_s": round(seconds, 1)}
    if sampler["name"] == "cmaes":
        state = cma_state(study)
        if state is not None:
            row["generations"] = state["generation"] + 1
            row["sigma"] = state["sigma"]
            row["mean"] = state["mean"]
            row["stop"] = {k: str(v) for k, v in state["es"].stop(check=True).items()}
            if score_mean:
                mean_recipe = PsStage(cfg).space.decode(state["mean"])
                mean_dir = merge_to_dir(mean_recipe, out / "compare-mean", overwrite=True)
                row["mean_test"] = score_on_test(mean_dir, out / "tasks", tasks)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--variants", nargs="+", default=["cmaes", "tpe"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--world-seed", type=int, default=0)
    add_world_config_option(ap)
    ap.add_argument("--tasks", nargs="+", default=["demo_target"])
    ap.add_argument("--score-mean", action="store_true", help="also score CMA-ES's final mean on test")
    ap.add_argument("--json", type=Path, default=None, help="default: <out>/compare_samplers.json")
    a = ap.parse_args()
    models = build_world(a.out, seed=a.world_seed, config=a.world_config, log=print)
    path = a.json or a.out / "compare_samplers.json"
    rows: list[dict[str, Any]] = json.loads(path.read_text())["runs"] if path.is_file() else []
    done = {(r["variant"], r["seed"], r["trials"]) for r in rows}
    tasks = tuple(a.tasks)
    for seed in a.seeds:  # seeds outermost: a run cut short still has every variant on some seeds
        for variant in a.variants:
            if (variant, seed, a.trials) in done:
                continue
            rows.append(run_one(a.out, models, variant, seed, a.trials, tasks, a.score_mean))
            path.write_text(json.dumps({"runs": rows}, indent=2) + "\n")  # resumable: finished runs are kept
            r = rows[-1]
            print(f"{variant:>28} seed {seed}: best #{r['best_trial']:3d} dev {r['dev']:.3f} "
                  + " ".join(f"{t} {r['test'][t]:.3f}" for t in tasks)
                  + (f" (mean {r['mean_test'][tasks[0]]:.3f})" if "mean_test" in r else ""), flush=True)
    key = tasks[0]
    scores = {v: [r["test"][key] for r in rows
                  if r["variant"] == v and r["trials"] == a.trials and r["seed"] in a.seeds]
              for v in a.variants}
    ref = a.variants[0]
    print(f"\n{key} test after {a.trials} trials, seeds {a.seeds}")
    print(f"{'variant':>28} {'n':>2} {'mean':>6} {'sd':>6}  p vs {ref}")
    for v, s in scores.items():
        sd = statistics.stdev(s) if len(s) > 1 else float("nan")
        p = (stats.ttest_ind(s, scores[ref], equal_var=False).pvalue
             if v != ref and len(s) > 1 and len(scores[ref]) > 1 else float("nan"))
        print(f"{v:>28} {len(s):2d} {statistics.mean(s):6.3f} {sd:6.3f}  {p:.3f}")


if __name__ == "__main__":
    main()
