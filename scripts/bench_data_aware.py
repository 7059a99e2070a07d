#!/usr/bin/env python
"""Data-aware merging on the demo world: RegMean and Fisher against task_arithmetic, TIES and the
parents, with default knobs and after a short search, scored on the held-out test splits.

    evomerge demo --out demo_out            # once: builds the world (and runs the demo's search)
    python scripts/bench_data_aware.py --world demo_out --trials 12

Calibration data: the dev split of ``demo_target`` (half arithmetic questions, half questions in
language b; the question and its gold answer), ``n`` examples, the same for every model. The
searches score on that dev split too (the demo's fitness); every number in the table is on the
test splits, which neither the statistics nor the searches saw. Statistics are computed into a
fresh cache under the world's folder, so their time is measured, and reported apart from the
merge's time. Writes ``<world>/bench_data_aware/`` (merged models, the study, ``results.json``)
and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.demo.pipeline import DEMO_TASKS, demo_config, score_on_test  # noqa: E402
from evomerge.engine import load_statistics, merge_to_dir, open_sources  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402

log = logging.getLogger("bench_data_aware")

DEFAULTS: dict[str, dict[str, Any]] = {  # default knobs per method (registry defaults where it has them)
    "task_arithmetic": {"model": {"weight": 1.0}, "global": {}},
    "ties": {"model": {"weight": 1.0, "density": 0.5}, "global": {}},
    "regmean": {"model": {"weight": 1.0}, "global": {"alpha": 0.9}},
    "fisher": {"model": {"weight": 1.0}, "global": {"fisher_floor": 1e-6}},
}
SEARCH: dict[str, dict[str, Any]] = {  # what the short search varies, per layer
    "task_arithmetic": {"weight": [0.0, 1.5]},
    "ties": {"weight": [0.0, 1.5], "density": [0.1, 1.0]},
    "regmean": {"weight": [0.0, 1.0], "alpha": [0.0, 1.0]},
    "fisher": {"weight": [0.0, 1.0]},
}


def recipe_for(method: str, models: dict[str, Path], calibration: dict[str, Any]) -> Recipe:
    knobs = DEFAULTS[method]
    data: dict[str, Any] = {"merge_method": method, "dtype": "float32",
                            "models": [{"model": str(models[n]), "parameters": dict(knobs["model"])} for n in ("math", "lang")]}
    if knobs["global"]:
        data["parameters"] = dict(knobs["global"])
    if method in ("task_arithmetic", "ties"):
        data["base_model"] = str(models["base"])
    else:
        data["calibration"] = calibration
    return Recipe.from_dict(data, method)


def build(recipe: Recipe, out: Path) -> tuple[Path, float, float]:
    """Merge ``recipe`` into ``out``; (folder, statistics seconds, merge seconds)."""
    sources = open_sources(recipe)
    try:
        stats = load_statistics(recipe, sources)
    finally:
        for ck in sources.values():
            ck.close()
    t0 = time.perf_counter()
    merge_to_dir(recipe, out, overwrite=True, stats=stats)
    return out, (stats.seconds if stats else 0.0), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=Path("demo_out"), help="folder of `evomerge demo --out`")
    ap.add_argument("--trials", type=int, default=12, help="trials per method's short search (0: none)")
    ap.add_argument("--n", type=int, default=64, help="calibration examples")
    ap.add_argument("--methods", default="task_arithmetic,ties,regmean,fisher")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("lm_eval", "transformers", "datasets", "optuna", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    world = args.world.resolve()
    models = {n: world / "models" / n for n in ("base", "math", "lang")}
    if not all((p / "config.json").is_file() for p in models.values()):
        raise SystemExit(f"{world}: no demo world here; build it with `evomerge demo --out {args.world}`")
    tasks = world / "tasks"
    out = world / "bench_data_aware"
    shutil.rmtree(out / "stats", ignore_errors=True)
    os.environ["EVOMERGE_STATS_CACHE"] = str(out / "stats")  # fresh: statistics time is measured
    calibration = {"data": str(tasks / "demo_target.yaml"), "split": "validation", "n": args.n, "max_length": 64, "seed": 0}
    methods = args.methods.split(",")
    rows: list[dict[str, Any]] = []

    def row(name: str, knobs: str, folder: Path, stats_s: float | None, merge_s: float | None) -> None:
        scores = score_on_test(folder, tasks)
        rows.append({"model": name, "knobs": knobs, **scores, "stats_s": stats_s, "merge_s": merge_s})
        log.info("%s (%s): %s", name, knobs, {k: round(v, 3) for k, v in scores.items()})

    for name in ("base", "math", "lang"):
        row(name, "parent", models[name], None, None)
    for method in methods:
        folder, stats_s, merge_s = build(recipe_for(method, models, calibration), out / "merged" / f"{method}_default")
        row(method, "default", folder, stats_s, merge_s)
    if args.trials:
        from evomerge.export import export_recipe
        from evomerge.search import run_search
        from evomerge.study import load_existing_study

        for method in methods:
            cfg = demo_config(world, models, study=f"bench_{method}",
                              merge={"method": method, "search": SEARCH[method], "layer_groups": "full"},
                              sampler={"name": "cmaes", "sigma0": 0.3, "baselines": False},
                              budget={"trials": args.trials}, storage=f"sqlite:///{out / 'bench.db'}",
                              **({"calibration": calibration} if method in ("regmean", "fisher") else {}))
            t0 = time.perf_counter()
            result = run_search(cfg, trials=args.trials, fresh=True)
            search_s = time.perf_counter() - t0
            study = load_existing_study(result.study_name, cfg.storage_url)
            _, recipe, trial = export_recipe(study, out / f"best_{method}.yml")
            folder, stats_s, merge_s = build(recipe, out / "merged" / f"{method}_searched")
            row(method, f"searched ({args.trials} trials, dev {result.best_fitness:.3f}, {search_s:.0f} s)",
                folder, stats_s, merge_s)

    (out / "results.json").write_text(json.dumps({"calibration": calibration, "trials": args.trials, "rows": rows}, indent=2))
    cols = list(DEMO_TASKS)
    print("| model | knobs | " + " | ".join(cols) + " | statistics s | merge s |")
    print("|---|---|" + "---|" * len(cols) + "---|---|")
    for r in rows:
        fmt = lambda v: "" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"| {r['model']} | {r['knobs']} | " + " | ".join(f"{r[c]:.3f}" for c in cols)
              + f" | {fmt(r['stats_s'])} | {fmt(r['merge_s'])} |")


if __name__ == "__main__":
    main()
