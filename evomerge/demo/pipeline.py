"""`evomerge demo`: build the offline world, search it, export the winner, score everything on
the held-out test splits.

Writes into ``out``: ``models/<name>/`` (the parents), ``tasks/`` (the lm-eval task suite),
``demo.yml`` (the search config), ``runs/demo.db`` (the study, resumable), ``best.yml`` (the winning recipe), ``merged/`` (the
winner as a Hugging Face folder) and ``summary.json`` (every model's test scores).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError

log = logging.getLogger(__name__)

DEMO_TASKS = ("demo_target", "demo_compose", "demo_math", "demo_lang")
DEMO_CONFIG = Path(__file__).resolve().parent / "demo.yml"
"""The demo's search config (package data); its paths are relative to the demo's output folder."""


def demo_settings(config_path: Path | None = None) -> dict[str, Any]:
    """The demo config (default: :data:`DEMO_CONFIG`) as a mapping."""
    from evomerge.files import read_yaml

    config_path = DEMO_CONFIG if config_path is None else config_path
    if not config_path.is_file():
        raise ConfigError(f"{config_path}: the demo's search config is missing from the installed package "
                          "(reinstall evomerge)")
    data = read_yaml(config_path, "demo config")
    if not isinstance(data, dict):
        raise ConfigError(f"{config_path}: expected a mapping of config keys")
    return data


def demo_config(out: Path, models: dict[str, Path], *, config_path: Path | None = None, **overrides: Any) -> SearchConfig:
    """The demo config pointed at the world built in ``out``."""
    config_path = DEMO_CONFIG if config_path is None else config_path
    data = demo_settings(config_path)
    data["base_model"] = str(Path(models["base"]).resolve())
    data["models"] = {name: str(Path(models[name]).resolve()) for name in data["models"]}
    data["storage"] = f"sqlite:///{(out / 'runs' / 'demo.db').resolve()}"
    data["fitness"]["include_path"] = str((out / "tasks").resolve())
    return SearchConfig.from_dict({**data, **{k: v for k, v in overrides.items() if v is not None}},
                                  root=out.resolve(), source=str(config_path))


def score_on_test(folder: Path, include_path: Path, tasks: tuple[str, ...] = DEMO_TASKS, batch_size: int = 32) -> dict[str, float]:
    """Accuracy of the model in ``folder`` on each task's test split, as ``lm_eval`` computes it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.config import Fitness, FitnessTask
    from evomerge.evaluate import LmEvalFitness

    fitness = LmEvalFitness(Fitness(tasks=[FitnessTask(task=t, metric="acc", split="test") for t in tasks],
                                    include_path=[str(include_path)], batch_size=batch_size), [str(include_path)])
    # a layer path with input scales is exported with its modelling code (trust_remote_code)
    remote = "auto_map" in json.loads((Path(folder) / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return fitness.score(model, tokenizer).values


def run_demo(out: Path, *, trials: int | None = None, sampler: str | None = None, seed: int = 0, fresh: bool = False,
             say: Callable[[str], None] = log.info, on_trial: Callable[..., None] | None = None,
             on_start: Callable[..., None] | None = None, world: dict[str, Any] | None = None) -> dict[str, Any]:
    """``world`` overrides the world's build settings (tests use a tiny, quick world)."""
    from evomerge.demo.world import MODEL_NAMES, build_world
    from evomerge.export import build_trial_model, export_recipe
    from evomerge.search import run_search
    from evomerge.study import load_existing_study

    out = Path(out)
    overrides: dict[str, Any] = {"seed": seed}
    # the whole config is read and validated first: a broken install stops here, not after the world is built
    demo_config(out, {name: out / "models" / name for name in MODEL_NAMES}, **overrides)
    t0 = time.perf_counter()
    models = build_world(out, seed=seed, log=say, config=world)
    shutil.copyfile(DEMO_CONFIG, out / DEMO_CONFIG.name)  # for `evomerge search OUT/demo.yml` by hand
    t_world = time.perf_counter() - t0
    cfg = demo_config(out, models, **overrides)
    if sampler is not None:
        cfg = cfg.model_copy(update={"sampler": cfg.sampler.model_copy(update={"name": sampler})})
    t1 = time.perf_counter()
    result = run_search(cfg, trials=trials, fresh=fresh, on_trial=on_trial, on_start=on_start)
    t_search = time.perf_counter() - t1
    if result.interrupted:
        return {"interrupted": True, "study": result.study_name}
    study = load_existing_study(result.study_name, cfg.storage_url)
    best_yml, recipe, trial = export_recipe(study, out / "best.yml")
    merged = build_trial_model(study, trial, recipe, out / "merged", overwrite=True)
    say("scoring parents and the best merge on the test splits")
    scores = {name: score_on_test(path, out / "tasks") for name, path in models.items()}
    scores["merged"] = score_on_test(merged, out / "tasks")
    summary = {
        "study": result.study_name,
        "storage": cfg.storage_url,
        "trials": result.completed,
        "best_trial": trial.number,
        "best_dev_fitness": result.best_fitness,
        "sampler": cfg.sampler.name,
        "method": recipe.merge_method,
        "test_scores": scores,
        "seconds": {"world": round(t_world, 1), "search": round(t_search, 1),
                    "total": round(time.perf_counter() - t0, 1)},
        "best_yml": str(best_yml),
        "merged": str(merged),
    }
    from evomerge.report import write_report

    report = write_report(study, out / "report", storage=cfg.storage_url)
    summary["report"] = str(report.markdown)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
