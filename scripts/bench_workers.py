#!/usr/bin/env python
"""Benchmark parallel trials (#7): wall time of a fixed number of demo trials with 1 worker (in
process, as ``workers: 1`` runs), 1 Ray worker, and N Ray workers (default 2), same world, same
config, same run; prints the ratios.

    python scripts/bench_workers.py --trials 24
    python scripts/bench_workers.py --trials 40 --workers 4 --sampler tpe --out /tmp/bench

The demo world (``evomerge demo``'s models and tasks) is built once under ``--out`` and reused.
Each run searches a fresh study of its own (``evomerge/demo/demo.yml``, baselines included). Two times
per run: ``total`` is the whole ``run_search`` call (for Ray: starting the runtime and loading
every worker's sources and tasks); ``trials`` runs from the moment the workers are ready (the
study's start) to the end, i.e. the part that grows with the budget. The 1-Ray-worker run
(``ray_address: local``) separates the gain of parallelism from the difference between the
in-process loop and an actor (Ray gives a 1-CPU actor one intra-op thread; the in-process torch
uses every core).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.demo.pipeline import demo_config  # noqa: E402
from evomerge.demo.world import add_world_config_option, build_world  # noqa: E402
from evomerge.search import run_search  # noqa: E402


def timed_search(out: Path, models: dict[str, Path], workers: int, trials: int, sampler: str,
                 ray: bool) -> dict[str, Any]:
    """One fresh study with ``workers`` workers (on a new local Ray runtime if ``ray``)."""
    label = f"{workers} {'Ray' if ray else 'in process'}"
    cfg = demo_config(out, models, workers=workers, ray_address="local" if ray else None,
                      storage=f"sqlite:///{out / 'runs' / f'bench_w{workers}_{int(ray)}.db'}")
    cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"name": sampler})})
    started: list[float] = []
    t0 = time.perf_counter()
    result = run_search(cfg, trials=trials, fresh=True, on_start=lambda info: started.append(time.perf_counter()))
    end = time.perf_counter()
    states = [r.state for r in result.reports]
    return {"workers": label, "total_s": round(end - t0, 2), "trials_s": round(end - started[0], 2),
            "completed": result.completed, "failed": states.count("FAIL"), "best": result.best_fitness}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=24, help="Trials per run (baselines included).")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers of the parallel run.")
    parser.add_argument("--sampler", default="random", choices=["random", "tpe", "qmc", "cmaes"])
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "evomerge_bench_workers",
                        help="Where the demo world and the studies go (the world is reused).")
    parser.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    add_world_config_option(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    models = build_world(args.out, seed=0, config=args.world_config, log=lambda m: print(m, file=sys.stderr))
    runs = [timed_search(args.out, models, w, args.trials, args.sampler, ray)
            for w, ray in ((1, False), (1, True), (args.workers, True))]
    print(f"{args.trials} demo trials, sampler {args.sampler}, {os.cpu_count()} CPU cores")
    print(f"{'workers':>14}  {'total s':>8}  {'trials s':>8}  completed  failed")
    for r in runs:
        print(f"{r['workers']:>14}  {r['total_s']:>8.1f}  {r['trials_s']:>8.1f}  {r['completed']:>9}  {r['failed']:>6}")
    ratio = {}
    for base in runs[:2]:
        key = f"{base['workers']} -> {runs[2]['workers']}"
        ratio[key] = {k: round(base[f"{k}_s"] / runs[2][f"{k}_s"], 2) for k in ("total", "trials")}
        print(f"speed-up {key}: total x{ratio[key]['total']:.2f}, trials x{ratio[key]['trials']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"trials": args.trials, "sampler": args.sampler, "runs": runs,
                                         "speedup": ratio, "cpus": os.cpu_count()}, indent=2) + "\n")


if __name__ == "__main__":
    main()
