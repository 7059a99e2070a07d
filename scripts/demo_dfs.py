"""Two-stage search on the demo world: the PS study of evomerge/demo/demo.yml (resumed if it exists), then a
DFS stage over the PS winner and both specialists; the parents, the PS winner and the DFS winner are
scored on the held-out test splits.

    python scripts/demo_dfs.py --out demo_out --dfs-trials 96 --max-layers 8

Rows: the parents, the ps winner, the dfs winner (which may be its baseline, the ps winner's own
path) and the best searched dfs path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from evomerge.demo.pipeline import DEMO_TASKS, demo_config, score_on_test
from evomerge.demo.world import add_world_config_option, build_world
from evomerge.export import build_trial_model, trial_recipe
from evomerge.search import run_search
from evomerge.study import best_trial, load_existing_study, trial_fitness


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--ps-trials", type=int, default=60)
    ap.add_argument("--dfs-trials", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-layers", type=int, default=8)
    ap.add_argument("--sampler", default="cmaes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fresh", action="store_true", help="Start the dfs study over (the ps study is kept).")
    add_world_config_option(ap)
    a = ap.parse_args()
    models = build_world(a.out, seed=a.seed, config=a.world_config)
    cfg = demo_config(a.out, models, seed=a.seed, stages=["ps", "dfs"],
                      dfs={"repeats": a.repeats, "max_layers": a.max_layers, "sampler": {"name": a.sampler},
                           "budget": {"trials": a.dfs_trials}})
    t0 = time.perf_counter()
    run_search(cfg, stages=["ps"], trials=a.ps_trials)
    t1 = time.perf_counter()
    run_search(cfg, stages=["dfs"], trials=a.dfs_trials, fresh=a.fresh)
    t2 = time.perf_counter()

    rows: dict[str, dict] = {n: {"dev": None, "layers": 4, "test": score_on_test(p, a.out / "tasks")} for n, p in models.items()}
    # the dfs study's baseline is the ps winner itself: show the best searched path as well
    for stage, label, baselines in (("ps", "ps best", True), ("dfs", "dfs best", True), ("dfs", "dfs path", False)):
        study = load_existing_study(cfg.stage_study(stage), cfg.storage_url)
        trial = best_trial(study, include_baselines=baselines)
        recipe, trial = trial_recipe(study, trial.number)
        folder = build_trial_model(study, trial, recipe, a.out / label.replace(" ", "-"), overwrite=True)
        path = trial.user_attrs.get("evomerge:path")
        rows[label] = {"dev": trial_fitness(trial), "trial": trial.number, "layers": len(path) if path else 4,
                                 "path": path, "test": score_on_test(folder, a.out / "tasks")}
    print(f"{'':>10} {'dev':>6} {'layers':>6} " + " ".join(f"{t:>12}" for t in DEMO_TASKS))
    for name, r in rows.items():
        dev = f"{r['dev']:6.3f}" if r["dev"] is not None else f"{'':>6}"
        print(f"{name:>10} {dev} {r['layers']:6d} " + " ".join(f"{r['test'][t]:12.3f}" for t in DEMO_TASKS))
    for label in ("dfs best", "dfs path"):
        print(f"{label} #{rows[label]['trial']} (source layer, scale): {rows[label]['path']}")
    print(f"search seconds: ps {t1 - t0:.0f}, dfs {t2 - t1:.0f} ({a.dfs_trials} trials)")
    (a.out / "demo_dfs.json").write_text(json.dumps({"rows": rows, "seconds": {"ps": t1 - t0, "dfs": t2 - t1}}, indent=2))


if __name__ == "__main__":
    main()
