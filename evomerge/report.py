"""``evomerge report``: PNG plots of a study and a Markdown summary (report.md) linking them.

Plots (one function each, taking plain data, so they can be drawn without a study):

- :func:`plot_fitness`: fitness per trial, the best-so-far line, the parents' baselines and the
  trials racing stopped early (at their estimated fitness);
- :func:`plot_recipe`: the best recipe's per-layer values of each knob per model (heatmap);
- :func:`plot_dfs_path`: a dfs trial's path (source model and layer at each hop, with its scale);
- :func:`plot_importances`: parameter importances (fANOVA);
- :func:`plot_pareto`: the Pareto front of a multi-objective study.

:func:`write_report` reads the study (the ``evomerge:*`` attrs written by the search) and decides
which plots apply; a plot that cannot be drawn is skipped with a line in report.md saying why.
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import optuna  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from evomerge.files import write_atomic  # noqa: E402
from evomerge.racing import Items  # noqa: E402
from evomerge.study import (ATTR_BASELINE, ATTR_CONFIG, ATTR_DFS_HOST, ATTR_DFS_SOURCES, ATTR_ITEMS,  # noqa: E402
                            ATTR_PATH, ATTR_RECIPE, ATTR_SCORES, ATTR_STAGE, best_trial, elite_line, elites_of,
                            trial_fitness)

MIN_IMPORTANCE_TRIALS = 10  # searched trials needed before parameter importances mean anything
TOP_IMPORTANCES = 20
DPI = 110


# --------------------------------------------------------------------------- plots (plain data)
def save_figure(fig: Any, path: Path) -> Path:
    """Write ``fig`` as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return write_atomic(path, buf.getvalue())


def best_so_far(values: Sequence[float]) -> list[float]:
    """The running maximum of ``values``."""
    return list(itertools.accumulate(values, max))


def plot_fitness(numbers: Sequence[int], values: Sequence[float], baselines: dict[str, float], path: Path, *,
                 title: str = "fitness per trial", failed: Sequence[int] = (),
                 pruned: Sequence[tuple[int, float]] = ()) -> Path:
    """Searched trials as points, their best-so-far as a step line, each baseline as a dashed line;
    ``pruned``: (number, estimated fitness) of the trials racing stopped, as crosses (not in the
    best-so-far line: an estimate is not a score)."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.scatter(numbers, values, s=18, color="tab:blue", alpha=0.7, label="trial", zorder=3)
    if pruned:
        ax.scatter([n for n, _ in pruned], [v for _, v in pruned], s=22, marker="x", color="tab:orange", alpha=0.8,
                   label="stopped by racing (estimate)", zorder=2)
    if values:
        ax.step(numbers, best_so_far(values), where="post", color="tab:red", lw=2, label="best so far", zorder=4)
    colors = plt.get_cmap("Dark2")
    for i, (name, value) in enumerate(sorted(baselines.items(), key=lambda kv: -kv[1])):
        ax.axhline(value, ls="--", lw=1.3, color=colors(i % 8), label=f"baseline: {name} ({value:.3f})")
    for j, n in enumerate(failed):
        ax.axvline(n, color="0.6", lw=0.8, ls=":", label="failed trial" if j == 0 else None)
    ax.set_xlabel("trial number")
    ax.set_ylabel("fitness")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return save_figure(fig, path)


def plot_recipe(values: dict[str, dict[str, list[float]]], path: Path, *, title: str = "best recipe") -> Path:
    """One heatmap per knob: rows are models (or ``model (attn)``/``model (mlp)``), columns layers.
    ``values``: knob -> row label -> per-layer values (all rows of a knob the same length)."""
    knobs = list(values)
    fig, axes = plt.subplots(len(knobs), 1, squeeze=False, layout="constrained",
                             figsize=(max(6.0, 0.28 * max(len(r) for k in knobs for r in values[k].values()) + 3),
                                      1.2 + sum(0.45 * len(values[k]) + 0.9 for k in knobs)))
    for ax, knob in zip(axes[:, 0], knobs):
        rows = values[knob]
        data = [rows[r] for r in rows]
        n = len(data[0])
        im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(rows)), list(rows))
        step = max(1, n // 16)
        ax.set_xticks(range(0, n, step), [str(i) for i in range(0, n, step)] if n > 1 else ["all"])
        ax.set_xlabel("layer")
        ax.set_ylabel("model")
        ax.set_title(knob)
        fig.colorbar(im, ax=ax, label=knob, fraction=0.04, pad=0.01)
        if n * len(rows) <= 64:
            for (i, j), v in _cells(data):
                bright = im.norm(v) > 0.6  # viridis is light at the top: dark text there
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="k" if bright else "w")
    fig.suptitle(title)
    return save_figure(fig, path)


def _cells(data: list[list[float]]) -> list[tuple[tuple[int, int], float]]:
    return [((i, j), v) for i, row in enumerate(data) for j, v in enumerate(row)]


def plot_dfs_path(hops: Sequence[tuple[str, int, float]], path: Path, *, models: Sequence[str] | None = None,
                  title: str = "layer path") -> Path:
    """``hops``: (source model, layer index, input scale) in path order. Top: which source layer
    runs at each hop, coloured by model; bottom: the hop's input scale."""
    models = list(models or dict.fromkeys(m for m, _, _ in hops))
    colors = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(models)}
    x = list(range(len(hops)))
    fig, (top, bottom) = plt.subplots(2, 1, sharex=True, layout="constrained", figsize=(max(7.0, 0.22 * len(hops) + 3), 6),
                                      gridspec_kw={"height_ratios": [3, 1.3]})
    top.plot(x, [layer for _, layer, _ in hops], color="0.7", lw=1, zorder=1)
    for m in models:
        idx = [i for i, h in enumerate(hops) if h[0] == m]
        top.scatter(idx, [hops[i][1] for i in idx], color=colors[m], s=30, label=m, zorder=2)
        bottom.bar(idx, [hops[i][2] for i in idx], color=colors[m], width=0.8)
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    top.set_ylabel("source layer index")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(title="source model", fontsize=8, loc="upper left")
    bottom.axhline(1.0, color="k", lw=0.8, ls="--")
    bottom.set_ylabel("input scale")
    bottom.set_xlabel("hop (position on the path)")
    bottom.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_importances(importances: dict[str, float], path: Path, *, top: int = TOP_IMPORTANCES,
                     title: str = "parameter importances") -> Path:
    """Horizontal bars, most important first (the ``top`` largest)."""
    items = sorted(importances.items(), key=lambda kv: -kv[1])[:top]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(items) + 1.5))
    ax.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="tab:blue")
    ax.set_xlabel("importance (fANOVA, share of fitness variance)")
    ax.set_ylabel("dimension")
    shown = f" (top {len(items)} of {len(importances)})" if len(importances) > len(items) else ""
    ax.set_title(title + shown)
    ax.grid(axis="x", alpha=0.3)
    return save_figure(fig, path)


def plot_pareto(points: Sequence[Sequence[float]], front: Sequence[int], names: Sequence[str], path: Path, *,
                baselines: dict[str, Sequence[float]] | None = None, title: str = "Pareto front") -> Path:
    """Every pair of objectives: all trials in grey, the front (indices into ``points``) in red,
    baselines as labelled stars."""
    pairs = list(itertools.combinations(range(len(names)), 2))
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(rows, cols, squeeze=False, layout="constrained", figsize=(4.6 * cols, 4.2 * rows))
    on_front = set(front)
    for ax, (a, b) in zip(axes.flat, pairs):
        rest = [p for i, p in enumerate(points) if i not in on_front]
        best = sorted((points[i] for i in on_front), key=lambda p: p[a])
        ax.scatter([p[a] for p in rest], [p[b] for p in rest], s=14, color="0.6", label="trial")
        ax.scatter([p[a] for p in best], [p[b] for p in best], s=30, color="tab:red", label="Pareto front", zorder=3)
        for k, (name, p) in enumerate((baselines or {}).items()):
            ax.scatter([p[a]], [p[b]], marker="*", s=120, color=plt.get_cmap("Dark2")(k % 8), label=name, zorder=4)
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(pairs):]:
        ax.set_visible(False)
    fig.suptitle(title)
    return save_figure(fig, path)


# --------------------------------------------------------------------------- reading the study
def recipe_values(recipe: dict[str, Any], names: dict[str, str]) -> dict[str, dict[str, list[float]]]:
    """knob -> row label -> per-layer values of a recipe's per-model numeric parameters. ``names``
    maps model refs to the config's short names. Scalars become one value; ``split_attn_mlp``
    gradients (``[{filter: self_attn, value}, {value}]``) two rows, ``(attn)`` and ``(mlp)``."""
    out: dict[str, dict[str, list[float]]] = {}
    for entry in recipe.get("models", []):
        model = names.get(entry["model"], Path(entry["model"]).name)
        for knob, value in (entry.get("parameters") or {}).items():
            for label, layers in _rows_of(model, value):
                out.setdefault(knob, {})[label] = layers
    return {k: v for k, v in out.items() if len({len(r) for r in v.values()}) == 1}


def _rows_of(model: str, value: Any) -> list[tuple[str, list[float]]]:
    if isinstance(value, bool):
        return []
    if isinstance(value, (int, float)):
        return [(model, [float(value)])]
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        return [(model, [float(v) for v in value])]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        rows = []
        for v in value:
            part = "attn" if v.get("filter") == "self_attn" else "mlp" if "filter" not in v else v["filter"]
            rows += [(f"{model} ({part})", r) for _, r in _rows_of(model, v.get("value"))]
        return rows
    return []


@dataclass
class Report:
    out_dir: Path
    files: list[Path] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    markdown: Path | None = None
    storage: str | None = None  # the study's storage URL, for the commands report.md suggests


def _trials(every: Sequence[optuna.trial.FrozenTrial]) -> tuple[list[optuna.trial.FrozenTrial],
                                                                list[optuna.trial.FrozenTrial], list[int]]:
    """(searched complete trials, baseline complete trials, failed trial numbers) of a study's
    trials, by number."""
    trials = sorted(every, key=lambda t: t.number)
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    searched = [t for t in done if not t.user_attrs.get(ATTR_BASELINE)]
    baselines = [t for t in done if t.user_attrs.get(ATTR_BASELINE)]
    return searched, baselines, [t.number for t in trials if t.state == TrialState.FAIL]


def pruned_estimate(t: optuna.trial.FrozenTrial) -> float | None:
    """A PRUNED trial's estimated fitness: its value, which Optuna takes from its last
    intermediate value (the last rung's estimate)."""
    if t.value is not None:
        return float(t.value)
    return float(t.intermediate_values[max(t.intermediate_values)]) if t.intermediate_values else None


def item_evaluations(trials: Sequence[optuna.trial.FrozenTrial]) -> tuple[int, int]:
    """(item evaluations the trials with per-item results took, those they would have taken on
    every item): the difference is what racing saved."""
    used = full = 0
    for t in trials:
        if isinstance(t.system_attrs.get(ATTR_ITEMS), dict):
            items = Items.from_attr(t.system_attrs[ATTR_ITEMS])
            used, full = used + items.count, full + sum(items.sizes.values())
    return used, full


def _model_names(study: optuna.Study) -> dict[str, str]:
    config = study.user_attrs.get(ATTR_CONFIG) or {}
    return {ref: name for name, ref in (config.get("models") or {}).items()}


def importances(study: optuna.Study, searched: list[optuna.trial.FrozenTrial]) -> dict[str, float]:
    """fANOVA importances of the searched dimensions for the fitness (sum of objectives), over
    the searched trials (baselines have no parameters). Seeded, so reports are reproducible."""
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    params = sorted(set().union(*(t.params for t in searched)))  # trials lacking one (baselines) are left out
    return get_param_importances(study, evaluator=FanovaImportanceEvaluator(seed=0), params=params,
                                 target=trial_fitness)


def write_report(study: optuna.Study, out_dir: str | Path, storage: str | None = None) -> Report:
    """Every applicable plot of ``study`` as PNG under ``out_dir`` and report.md linking them.
    ``storage``: the study's URL, written into the commands report.md suggests."""
    out = Report(Path(out_dir), storage=storage)
    every = study.get_trials(deepcopy=False)
    searched, baselines, failed = _trials(every)
    pruned = sorted((t.number, v) for t in every if t.state == TrialState.PRUNED and (v := pruned_estimate(t)) is not None)
    stage = study.user_attrs.get(ATTR_STAGE) or ("dfs" if ATTR_DFS_SOURCES in study.user_attrs else "ps")
    multi = len(study.directions) > 1
    base_fit = {t.user_attrs[ATTR_BASELINE]: trial_fitness(t) for t in baselines}
    best = best_trial(study)
    best_searched = max(searched, key=lambda t: (trial_fitness(t), -t.number)) if searched else None
    used, full = item_evaluations(every)
    stopped = f"{len(pruned)} stopped early by racing (pruned), " if full else ""
    md = [f"# Study `{study.study_name}`", "",
          f"Stage **{stage}**, {'multi-objective (' + str(len(study.directions)) + ' objectives)' if multi else 'single objective'}; "
          f"{len(searched)} searched trials completed, {stopped}{len(baselines)} baselines, {len(failed)} failed.", ""]
    if full:
        md += [f"Item evaluations: {used:,} of the {full:,} these trials would have taken on every item; "
               f"racing saved {full - used:,} ({(full - used) / full:.0%}).", ""]
    md += _best_table(best, baselines)
    elites = elites_of(study)
    if elites:
        md += ["Re-evaluated on every item (the best is chosen among these):", ""]
        md += [f"- trial {n}: {elite_line(e)}" for n, e in sorted(elites.items(), key=lambda kv: -kv[1]["fitness"])]
        md += [""]

    if searched or baselines:
        out.files.append(plot_fitness([t.number for t in searched], [trial_fitness(t) for t in searched], base_fit,
                                      out.out_dir / "fitness.png", failed=failed, pruned=pruned,
                                      title=f"{study.study_name}: fitness per trial"
                                      + (" (sum of objectives)" if multi else "")))
        md += ["## Fitness per trial", "", "![fitness](fitness.png)", "",
               "Points: searched trials; red: best so far; dashed: the baselines (parents, uniform merge)"
               + ("; orange crosses: trials racing stopped early, at their estimated fitness." if pruned else "."), ""]
    else:
        out.skipped.append("fitness: no completed trial")

    if stage == "dfs":
        _dfs_section(study, best_searched, out, md)
    else:
        _recipe_section(study, best_searched, out, md)

    if len(searched) >= MIN_IMPORTANCE_TRIALS:
        imp = importances(study, searched)
        out.files.append(plot_importances(imp, out.out_dir / "importances.png",
                                          title=f"{study.study_name}: parameter importances"))
        md += ["## Parameter importances", "", "![importances](importances.png)", "",
               "fANOVA over the searched trials (fitness = sum of objectives).", ""]
    else:
        out.skipped.append(f"parameter importances: {len(searched)} searched trial(s), "
                           f"fewer than the {MIN_IMPORTANCE_TRIALS} needed")

    if multi:
        _pareto_section(study, out, md)

    if out.skipped:
        md += ["## Not drawn", ""] + [f"- {s}" for s in out.skipped] + [""]
    out.markdown = write_atomic(out.out_dir / "report.md", "\n".join(md))
    return out


def _best_table(best: optuna.trial.FrozenTrial | None, baselines: list[optuna.trial.FrozenTrial]) -> list[str]:
    if best is None:
        return ["No completed trial yet.", ""]
    rows = [best] + [b for b in baselines if b.number != best.number]
    tasks = sorted({k for t in rows for k in (t.user_attrs.get(ATTR_SCORES) or {})})
    lines = ["## Best trial and baselines", "", "| trial | what | fitness | " + " | ".join(tasks) + " |",
             "|---|---|---|" + "---|" * len(tasks)]
    for t in rows:
        what = f"baseline: {t.user_attrs[ATTR_BASELINE]}" if t.user_attrs.get(ATTR_BASELINE) else "best"
        if t is best and t.user_attrs.get(ATTR_BASELINE):
            what = f"best (a baseline: {t.user_attrs[ATTR_BASELINE]})"
        scores = t.user_attrs.get(ATTR_SCORES) or {}
        lines.append(f"| {t.number} | {what} | {trial_fitness(t):.4f} | "
                     + " | ".join(f"{scores[k]:.4f}" if k in scores else "" for k in tasks) + " |")
    return lines + [""]


def _recipe_section(study: optuna.Study, best: optuna.trial.FrozenTrial | None, out: Report, md: list[str]) -> None:
    recipe = best.user_attrs.get(ATTR_RECIPE) if best is not None else None
    values = recipe_values(recipe, _model_names(study)) if recipe else {}
    if not values:
        out.skipped.append("best recipe: no searched trial with per-model parameters")
        return
    method = recipe.get("merge_method", "")
    out.files.append(plot_recipe(values, out.out_dir / "recipe.png",
                                 title=f"{study.study_name}: trial {best.number} ({method}), fitness {trial_fitness(best):.4f}"))
    extra = ", ".join(f"{k}={v}" for k, v in (recipe.get("parameters") or {}).items())
    md += ["## Best searched recipe", "", f"Trial {best.number}, `{method}`" + (f"; global: {extra}" if extra else "")
           + ". Export it with `evomerge export --study " + study.study_name
           + (f" --storage {out.storage}" if out.storage else "") + f" --trial {best.number}`.", "",
           "![recipe](recipe.png)", ""]


def _dfs_section(study: optuna.Study, best: optuna.trial.FrozenTrial | None, out: Report, md: list[str]) -> None:
    sources = study.user_attrs.get(ATTR_DFS_SOURCES)
    if best is None or not sources or ATTR_PATH not in best.user_attrs:
        out.skipped.append("layer path: no searched dfs trial with a recorded path")
        return
    hops = [(sources[int(layer)][0], int(sources[int(layer)][1]), float(scale))
            for layer, scale in best.user_attrs[ATTR_PATH]]
    models = list(dict.fromkeys(m for m, _ in sources))
    out.files.append(plot_dfs_path(hops, out.out_dir / "dfs_path.png", models=models,
                                   title=f"{study.study_name}: trial {best.number} path ({len(hops)} hops), "
                                         f"fitness {trial_fitness(best):.4f}"))
    host = study.user_attrs.get(ATTR_DFS_HOST)
    md += ["## Best layer path", "", f"Trial {best.number}: {len(hops)} hops through {', '.join(models)}"
           + (f" (host: {host})" if host else "") + ".", "", "![layer path](dfs_path.png)", ""]


def _pareto_section(study: optuna.Study, out: Report, md: list[str]) -> None:
    done = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE and t.values]
    if len(done) < 2:
        out.skipped.append("Pareto front: fewer than 2 completed trials")
        return
    config = study.user_attrs.get(ATTR_CONFIG) or {}
    tasks = [t.get("task", f"objective {i}") for i, t in enumerate((config.get("fitness") or {}).get("tasks", []))]
    names = tasks if len(tasks) == len(study.directions) else [f"objective {i}" for i in range(len(study.directions))]
    front_numbers = {t.number for t in study.best_trials}
    searched = [t for t in done if not t.user_attrs.get(ATTR_BASELINE)]
    points = [list(t.values) for t in searched]
    front = [i for i, t in enumerate(searched) if t.number in front_numbers]
    baselines = {t.user_attrs[ATTR_BASELINE]: list(t.values) for t in done if t.user_attrs.get(ATTR_BASELINE)}
    out.files.append(plot_pareto(points, front, names, out.out_dir / "pareto.png", baselines=baselines,
                                 title=f"{study.study_name}: Pareto front ({len(front_numbers)} trials)"))
    md += ["## Pareto front", "", f"{len(front_numbers)} trial(s) on the front: "
           + ", ".join(str(n) for n in sorted(front_numbers)) + ".", "", "![Pareto front](pareto.png)", ""]
