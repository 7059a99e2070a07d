"""What ``evomerge sweep`` found, and the files it writes: ``table.csv`` (one row a grid point),
``chosen.yml`` (the chosen recipe, runnable by ``evomerge merge``), ``sweep.png`` (disagreement
against the coefficients) and ``sweep.json`` (everything, including how the prompts were sampled).
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.files import write_atomic
from evomerge.recipe import Recipe


@dataclass
class PointResult:
    """One grid point: its coefficients, recipe and responses, and (after scoring) its scores."""

    index: tuple[int, ...]
    values: dict[str, float]
    recipe: Recipe
    responses: list[str]
    interior: bool
    disagreement: float | None = None
    smoothed: float | None = None
    accuracy: float | None = None
    cached: bool = False
    seconds: float = 0.0


@dataclass
class SweepResult:
    """A scored sweep: every point, the chosen one and its ties, and the files written."""

    name: str
    out: Path
    metric: str
    aggregate: str
    smoothing: int
    coefficients: list[dict[str, Any]]
    prompts: int
    points: list[PointResult]
    chosen: PointResult
    ties: list[PointResult]
    generated: int  # points generated in this run (0 when everything came from the cache)
    label_best: PointResult | None = None
    prompt_sample: dict[str, int] | None = None  # {limit, seed} of a sampled prompt set; None: every prompt
    files: dict[str, Path] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        def pt(p: PointResult) -> dict[str, Any]:
            return {"index": list(p.index), "values": p.values, "interior": p.interior,
                    "disagreement": p.disagreement, "smoothed": p.smoothed, "accuracy": p.accuracy}

        return {
            "sweep": self.name,
            "metric": self.metric,
            "aggregate": self.aggregate,
            "smoothing": self.smoothing,
            "prompts": self.prompts,
            "prompt_sample": self.prompt_sample,
            "coefficients": self.coefficients,
            "points": [pt(p) for p in self.points],
            "chosen": pt(self.chosen),
            "ties": [pt(p) for p in self.ties],
            "label_best": pt(self.label_best) if self.label_best else None,
            "recipe": str(self.files.get("recipe", "")),
        }


# --------------------------------------------------------------------------- outputs
def table_rows(res: SweepResult) -> tuple[list[str], list[list[str]]]:
    names = [c["name"] for c in res.coefficients]
    header = [*names, "disagreement"]
    if res.smoothing:
        header.append("smoothed")
    labelled = any(p.accuracy is not None for p in res.points)
    if labelled:
        header.append("accuracy")
    header.append("note")
    tie_set = {t.index for t in res.ties}
    rows = []
    for p in res.points:
        row = [f"{p.values[n]:g}" for n in names]
        row.append("" if p.disagreement is None else f"{p.disagreement:.4g}")
        if res.smoothing:
            row.append("" if p.smoothed is None else f"{p.smoothed:.4g}")
        if labelled:
            row.append("" if p.accuracy is None else f"{p.accuracy:.4f}")
        notes = []
        if p.index == res.chosen.index:
            notes.append("chosen")
        elif p.index in tie_set:
            notes.append("tie")
        if not p.interior:
            notes.append("endpoint")
        if res.label_best is not None and p.index == res.label_best.index:
            notes.append("label-best")
        row.append(", ".join(notes))
        rows.append(row)
    return header, rows


def write_outputs(res: SweepResult, *, plot: bool = True) -> None:
    """table.csv, chosen.yml, sweep.png (unless ``plot`` is False) and sweep.json in ``res.out``."""
    out = res.out
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(res)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    res.files["table"] = write_atomic(out / "table.csv", buf.getvalue())
    label = ", ".join(f"{k}={v:g}" for k, v in res.chosen.values.items())
    sample = f" (sampled, seed {res.prompt_sample['seed']})" if res.prompt_sample else ""
    head = [f"# chosen by `evomerge sweep` ({res.name}): {label}",
            f"# disagreement {res.chosen.disagreement:.4g} of {res.prompts} prompts{sample} ({res.metric}, aggregate "
            f"{res.aggregate}, smoothing {res.smoothing}), {len(res.ties)} tied point(s)"]
    if res.chosen.accuracy is not None:
        head.append(f"# accuracy (reported only, not used to choose): {res.chosen.accuracy:.4f}")
    head.append("# build it with `evomerge merge THIS.yml OUT`")
    res.files["recipe"] = write_atomic(out / "chosen.yml", "\n".join(head) + "\n" + res.chosen.recipe.to_yaml())
    if plot:
        res.files["plot"] = plot_sweep(res, out / "sweep.png")
    res.files["json"] = write_atomic(out / "sweep.json", json.dumps(res.to_json(), indent=2) + "\n")




# --------------------------------------------------------------------------- plot
def _axis_label(c: dict[str, Any]) -> str:
    if c.get("model"):
        return f"{c['name']} ({c['param']} of {Path(c['model']).name})"
    return c["name"] if c["name"] == c["param"] else f"{c['name']} ({c['param']})"


def plot_sweep(res: SweepResult, path: Path) -> Path:
    """1-D: disagreement (and smoothed) against the coefficient, accuracy on a second axis. 2-D:
    a heatmap of disagreement (and one of accuracy). 3-D: one heatmap per value of the third."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib import patheffects

    coefs = res.coefficients
    ylabel = "disagreement (prompts)" if res.metric == "exact" else "disagreement (sum of 1 - cos)"
    rule = {("exact", "all"): "exact match: prompts answered unlike every neighbour",
            ("exact", "mean"): "exact match: differing prompts, mean over neighbours",
            ("embedding", "all"): "1 - cos to the closest neighbour, summed over prompts",
            ("embedding", "mean"): "1 - cos, mean over neighbours, summed over prompts"}[(res.metric, res.aggregate)]
    how = f"{rule}; {res.prompts} prompts" + (f"; smoothing ±{res.smoothing}" if res.smoothing else "")
    by = {p.index: p for p in res.points}
    labelled = any(p.accuracy is not None for p in res.points)
    title = (f"sweep {res.name}: chosen " + ", ".join(f"{k}={v:g}" for k, v in res.chosen.values.items())
             + (f" ({len(res.ties)} tied)" if len(res.ties) > 1 else "") + f"\n{how}")
    if len(coefs) == 1:
        c = coefs[0]
        xs = c["values"]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ys = [by[(i,)].disagreement for i in range(len(xs))]
        pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
        ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", color="tab:blue", label="disagreement")
        if res.smoothing:
            sm = [(x, by[(i,)].smoothed) for i, x in enumerate(xs) if by[(i,)].smoothed is not None]
            ax.plot([x for x, _ in sm], [y for _, y in sm], "--", color="tab:cyan", label=f"smoothed (±{res.smoothing})")
        for k, t in enumerate(res.ties):
            ax.axvline(t.values[c["name"]], color="tab:red", alpha=0.15, lw=8, label="tie" if k == 0 and len(res.ties) > 1 else None)
        ax.axvline(res.chosen.values[c["name"]], color="tab:red", lw=1.5, label="chosen")
        ax.set_xlabel(_axis_label(c))
        ax.set_ylabel(ylabel)
        ax.set_xticks(xs)
        ax.tick_params(axis="x", labelrotation=45 if len(xs) > 12 else 0)
        handles, labels_ = ax.get_legend_handles_labels()
        if labelled:
            ax2 = ax.twinx()
            ax2.plot(xs, [by[(i,)].accuracy for i in range(len(xs))], "s:", color="tab:green", label="accuracy (labels)")
            ax2.set_ylabel("accuracy (reported only)")
            h2, l2 = ax2.get_legend_handles_labels()
            handles, labels_ = handles + h2, labels_ + l2
        ax.legend(handles, labels_, loc="best", fontsize=8)
        ax.set_title(title, fontsize=10)
    else:
        a, b = coefs[0], coefs[1]
        slices = [()] if len(coefs) == 2 else [(k,) for k in range(len(coefs[2]["values"]))]
        cols = 2 if labelled else 1
        fig, axes = plt.subplots(len(slices), cols, figsize=(5.2 * cols, 4.2 * len(slices)), squeeze=False)
        for r, rest in enumerate(slices):
            for col, what in enumerate(["disagreement", "accuracy"][:cols]):
                ax = axes[r][col]
                grid = np.full((len(a["values"]), len(b["values"])), np.nan)
                for i in range(len(a["values"])):
                    for j in range(len(b["values"])):
                        p = by[(i, j, *rest)]
                        v = p.smoothed if what == "disagreement" else p.accuracy
                        if v is not None:
                            grid[i, j] = v
                im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis_r" if what == "disagreement" else "viridis")
                if grid.size <= 144:
                    for (i, j), v in np.ndenumerate(grid):
                        if not np.isnan(v):
                            ax.text(j, i, f"{v:.3g}", ha="center", va="center", fontsize=7, color="white",
                                    path_effects=[patheffects.withStroke(linewidth=1.5, foreground="black")])
                fig.colorbar(im, ax=ax, label=(ylabel if what == "disagreement" else "accuracy (reported only)"))
                ax.set_xticks(range(len(b["values"])), [f"{v:g}" for v in b["values"]], rotation=45)
                ax.set_yticks(range(len(a["values"])), [f"{v:g}" for v in a["values"]])
                ax.set_xlabel(_axis_label(b))
                ax.set_ylabel(_axis_label(a))
                if res.chosen.index[2:] == rest:
                    ax.plot(res.chosen.index[1], res.chosen.index[0], marker="*", color="red", ms=16, label="chosen")
                    ax.legend(loc="upper right", fontsize=8)
                for t in res.ties:
                    if t.index[2:] == rest and t.index != res.chosen.index:
                        ax.plot(t.index[1], t.index[0], marker="o", mfc="none", color="red", ms=10)
                sub = f" ({coefs[2]['name']}={coefs[2]['values'][rest[0]]:g})" if rest else ""
                ax.set_title(f"{what}{sub}" + (" (smoothed)" if what == "disagreement" and res.smoothing else ""), fontsize=10)
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
