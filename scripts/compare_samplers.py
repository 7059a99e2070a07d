"""Compare samplers at equal budget on the demo world: each runs its own study of evomerge/demo/demo.yml,
then the best trial of each is built and scored on the held-out test splits.

    python scripts/compare_samplers.py --out demo_out --trials 60 --samplers cmaes random
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from evomerge.demo.pipeline import DEMO_TASKS, demo_config, score_on_test
from evomerge.demo.world import build_world
from evomerge.export import build_trial_model, trial_recipe
from evomerge.search import run_search
from evomerge.study import load_existing_study


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--trials", type=int, default=60)
    ap.add_argument("--samplers", nargs="+", default=["cmaes", "random"])
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    models = build_world(a.out, seed=a.seed)
    rows = {}
    for name in a.samplers:
        cfg = demo_config(a.out, models, study=f"compare-{name}", seed=a.seed)
        cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"name": name})})
        t0 = time.perf_counter()
        result = run_search(cfg, trials=a.trials)
        seconds = time.perf_counter() - t0
        study = load_existing_study(result.study_name, cfg.storage_url)
        recipe, trial = trial_recipe(study)
        folder = build_trial_model(study, trial, recipe, a.out / f"compare-{name}-best", overwrite=True)
        rows[name] = {"trials": result.completed, "best_trial": trial.number, "dev": result.best_fitness,
                      "test": score_on_test(folder, a.out / "tasks"), "search_s": round(seconds, 1)}
    parents = {n: score_on_test(p, a.out / "tasks") for n, p in models.items()}
    print(f"{'':>10} {'trials':>6} {'best#':>5} {'dev':>6} " + " ".join(f"{t:>12}" for t in DEMO_TASKS) + f" {'search s':>9}")
    for n, s in parents.items():
        print(f"{n:>10} {'':>6} {'':>5} {'':>6} " + " ".join(f"{s[t]:12.3f}" for t in DEMO_TASKS))
    for n, r in rows.items():
        print(f"{n:>10} {r['trials']:6d} {r['best_trial']:5d} {r['dev']:6.3f} "
              + " ".join(f"{r['test'][t]:12.3f}" for t in DEMO_TASKS) + f" {r['search_s']:9.1f}")
    (a.out / "compare_samplers.json").write_text(json.dumps({"parents": parents, "samplers": rows}, indent=2))


if __name__ == "__main__":
    main()
