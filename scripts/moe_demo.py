"""Mixture of experts on the demo world: MoEs of the math and lang specialists against the parents
and the best PS merge, on the held-out test splits of demo_target and demo_compose.

    evomerge demo --out demo_out            # the world, the PS study and its best merge (merged/)
    python scripts/moe_demo.py --out demo_out --moe-trials 30

Rows: the parents; the best PS merge (``merged/`` of ``evomerge demo``); ``evomerge moe`` of math and
lang with hidden gates (prompts: the first ``--prompts`` dev questions of demo_math and demo_lang),
top-1 and top-2 routing; the moe search stage's best trial (candidates ``--candidates``, gate scale
and bias per layer searched on demo_target's dev split, like the PS stage). Columns: test accuracy,
parameters (all, and active per token) and evaluation seconds (load + lm-eval of both test splits,
on this machine's CPUs, shared with whatever else runs). Writes ``<out>/moe/table.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from safetensors import safe_open

from evomerge.demo.pipeline import demo_config, score_on_test
from evomerge.demo.world import add_world_config_option, build_world
from evomerge.moe import save_moe, write_moe
from evomerge.moe_config import MoEConfig
from evomerge.moe_stage import ATTR_MOE, MoeStage
from evomerge.search import run_search
from evomerge.stages import moe_candidates
from evomerge.study import best_trial, load_existing_study

TASKS = ("demo_target", "demo_compose")


def dev_questions(tasks: Path, name: str, n: int) -> list[str]:
    rows = [json.loads(line) for line in (tasks / "data" / f"{name}_dev.jsonl").read_text().splitlines()[:n]]
    return [r["question"] for r in rows]


def param_counts(folder: Path) -> tuple[int, int]:
    """(all parameters stored, parameters active per token: the unrouted experts left out)."""
    config = json.loads((folder / "config.json").read_text())
    total, expert = 0, 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                numel = 1
                for d in f.get_slice(name).get_shape():
                    numel *= d
                total += numel
                expert += numel if ".experts." in name or ".block_sparse_moe.experts" in name else 0
    n = config.get("num_local_experts") or config.get("num_experts")
    if not n:
        return total, total
    return total, total - expert + expert * config["num_experts_per_tok"] // n


def row(label: str, folder: Path, tasks: Path) -> dict:
    t0 = time.perf_counter()
    scores = score_on_test(folder, tasks, TASKS)
    seconds = time.perf_counter() - t0
    total, active = param_counts(folder)
    return {"model": label, **{t: scores[t] for t in TASKS}, "params": total, "active_params": active,
            "eval_seconds": round(seconds, 1), "folder": str(folder)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_out"))
    ap.add_argument("--prompts", type=int, default=8, help="Dev questions per expert used as router prompts.")
    ap.add_argument("--moe-trials", type=int, default=30)
    ap.add_argument("--candidates", choices=["parents", "top_ps"], default="parents")
    ap.add_argument("--seed", type=int, default=0)
    add_world_config_option(ap)
    a = ap.parse_args()
    models = build_world(a.out, seed=a.seed, config=a.world_config)
    tasks, work = a.out / "tasks", a.out / "moe"
    work.mkdir(parents=True, exist_ok=True)
    prompts = {"math": dev_questions(tasks, "demo_math", a.prompts), "lang": dev_questions(tasks, "demo_lang", a.prompts)}

    built = {}
    for k in (1, 2):
        cfg = MoEConfig.from_dict({"base_model": str(models["base"]), "gate_mode": "hidden", "dtype": "float32",
                                   "experts_per_token": k,
                                   "experts": [{"source_model": str(models[n]), "positive_prompts": p}
                                               for n, p in prompts.items()]})
        built[k] = write_moe(cfg, work / f"moe_hidden_top{k}", overwrite=True)

    cfg = demo_config(a.out, models, seed=a.seed, stages=["ps", "moe"],
                      moe={"prompts": prompts, "candidates": a.candidates, "gate_mode": "hidden",
                           "experts_per_token": 2, "budget": {"trials": a.moe_trials}})
    t0 = time.perf_counter()
    run_search(cfg, stages=["moe"])
    search_seconds = time.perf_counter() - t0
    study = load_existing_study(cfg.stage_study("moe"), cfg.storage_url)
    best = best_trial(study)
    stage = MoeStage(cfg, moe_candidates(cfg, cfg.stage_study("ps")))
    stage.open()
    model, tokenizer = stage.load({ATTR_MOE: best.user_attrs[ATTR_MOE]})
    searched = save_moe(model, tokenizer, work / "moe_searched")
    stage.close()

    rows = [row("math (parent)", models["math"], tasks), row("lang (parent)", models["lang"], tasks),
            row("best PS merge", a.out / "merged", tasks),
            row("MoE math+lang, hidden gates, top-1", built[1], tasks),
            row("MoE math+lang, hidden gates, top-2", built[2], tasks),
            row(f"searched MoE (trial {best.number}, {a.moe_trials} trials)", searched, tasks)]
    lines = ["| model | demo_target | demo_compose | parameters | active / token | eval s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['demo_target']:.3f} | {r['demo_compose']:.3f} | {r['params'] / 1e6:.2f}M "
                     f"| {r['active_params'] / 1e6:.2f}M | {r['eval_seconds']:.1f} |")
    choice = best.user_attrs[ATTR_MOE]
    note = (f"searched MoE: experts {choice['experts']}, dev fitness {best.value:.4f}, "
            f"moe search {search_seconds:.0f} s")
    (work / "table.md").write_text("\n".join(lines) + "\n\n" + note + "\n")
    (work / "table.json").write_text(json.dumps({"rows": rows, "searched": {"trial": best.number, **choice,
                                                 "dev_fitness": best.value, "search_seconds": search_seconds}},
                                                indent=2) + "\n")
    print("\n".join(lines))
    print(note)


if __name__ == "__main__":
    main()
