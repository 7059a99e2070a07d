#!/usr/bin/env python
"""Benchmark the search driver's own cost per trial as a study grows: ask, suggest, store the
recipe, tell, budget check and progress report, plus the sampler, on SQLite -- with an instant
fake fitness, so nothing else is measured.

    python scripts/bench_driver.py --trials 1000
    python scripts/bench_driver.py --trials 300 --sampler tpe --out /tmp/bench_driver

The demo world's search config (``evomerge/demo/demo.yml``: task arithmetic, 4 layers x 2 models = 8
dimensions, CMA-ES) gives the stage and its real recipe records; the world is built once under
``--out`` and reused. The fitness is a smooth function of the trial's recipe weights, computed in
microseconds. Prints the median driver milliseconds per trial over the 20 trials up to trial 20,
100 and 1000 (as far as ``--trials`` reaches; the median, because a busy machine has outliers) and
the part spent in the sampler's ``sample_relative`` (wall time), and the driver's CPU time per
trial (less sensitive to other processes on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.demo.pipeline import demo_config  # noqa: E402
from evomerge.demo.world import add_world_config_option, build_world  # noqa: E402
from evomerge.fitness import Score  # noqa: E402
from evomerge.search import make_sampler  # noqa: E402
from evomerge.stages import PsStage  # noqa: E402
from evomerge.study import ATTR_RECIPE, enqueue_baselines, open_study  # noqa: E402
from evomerge.trials import StageJob, run_one  # noqa: E402

WINDOWS = (20, 100, 1000)


class RecordStage(PsStage):
    """The demo's ps stage, except that a trial's "model" is its stored recipe record."""

    def open(self) -> None:
        self.workspace = None

    def load(self, record: dict[str, Any]) -> tuple[Any, Any]:
        return record[ATTR_RECIPE], None


class InstantFitness:
    """A smooth, deterministic function of the recipe's weights (maximum at 0.8 each)."""

    def score(self, recipe: dict[str, Any], tokenizer: Any) -> Score:
        weights: list[float] = []

        def walk(node: Any) -> None:
            if isinstance(node, dict):
                for k, v in node.items():
                    if k == "weight" and isinstance(v, (int, float)):
                        weights.append(float(v))
                    else:
                        walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)

        walk(recipe)
        value = 1.0 - sum((w - 0.8) ** 2 for w in weights) / max(len(weights), 1)
        return Score({"fake": value}, value, [value])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--trials", type=int, default=1000)
    ap.add_argument("--sampler", default="cmaes")
    ap.add_argument("--json", type=Path, default=None, help="also write the per-trial times here")
    add_world_config_option(ap)
    a = ap.parse_args()
    models = build_world(a.out, seed=0, config=a.world_config)
    db = a.out / "runs" / f"bench_driver_{a.sampler}.db"
    db.unlink(missing_ok=True)
    cfg = demo_config(a.out, models, storage=f"sqlite:///{db.resolve()}", study=f"bench-driver-{a.sampler}")
    cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"name": a.sampler})})
    stage = RecordStage(cfg)
    stage.open()
    sampler = make_sampler(cfg, stage.bounds(), stage.sampler_config)
    in_sampler = [0.0]
    inner = sampler.sample_relative

    def timed_sample_relative(*args: Any) -> Any:
        t = time.perf_counter()
        try:
            return inner(*args)
        finally:
            in_sampler[0] += time.perf_counter() - t

    sampler.sample_relative = timed_sample_relative  # type: ignore[method-assign]

    def prepare(study: Any) -> None:
        stage.prepare_study(study)
        enqueue_baselines(study, stage.baselines())

    study, _ = open_study(cfg, sampler, fresh=True, prepare=prepare)
    from optuna.distributions import FloatDistribution

    job = StageJob(study, stage, {k: FloatDistribution(lo, hi) for k, (lo, hi) in stage.bounds().items()},
                   False, a.trials)
    fitness = InstantFitness()
    per_trial: list[float] = []
    cpu_s: list[float] = []
    sampler_s: list[float] = []
    while job.budget_left() > 0:
        in_sampler[0] = 0.0
        t0, c0 = time.perf_counter(), time.process_time()
        run_one(job, fitness)  # type: ignore[arg-type]
        job.budget_left()  # the loop's check, counted with the trial it follows
        per_trial.append(time.perf_counter() - t0)
        cpu_s.append(time.process_time() - c0)
        sampler_s.append(in_sampler[0])
    rows = []
    for at in WINDOWS:
        if at > len(per_trial):
            break
        lo, hi = max(0, at - 20), at  # the 20 trials up to trial `at` (median: a busy machine's outliers)
        ms = statistics.median(per_trial[lo:hi]) * 1e3
        s_ms = statistics.median(sampler_s[lo:hi]) * 1e3
        cpu_ms = statistics.median(cpu_s[lo:hi]) * 1e3
        rows.append({"trials": at, "driver_ms": round(ms, 2), "cpu_ms": round(cpu_ms, 2), "sampler_ms": round(s_ms, 2)})
    print(f"sampler {a.sampler}, SQLite {db}")
    print(f"{'trials':>7} {'driver ms/trial':>16} {'CPU ms/trial':>13} {'sampler ms':>11}")
    for r in rows:
        print(f"{r['trials']:7d} {r['driver_ms']:16.2f} {r['cpu_ms']:13.2f} {r['sampler_ms']:11.2f}")
    if a.json:
        a.json.write_text(json.dumps({"sampler": a.sampler, "windows": rows,
                                      "per_trial_s": per_trial, "cpu_s": cpu_s, "sampler_s": sampler_s}) + "\n")


if __name__ == "__main__":
    main()
