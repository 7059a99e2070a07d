"""evomerge report: the plots drawn from plain data, and the report of synthetic studies carrying the
attrs a search writes (single-objective ps, multi-objective ps, dfs)."""

from __future__ import annotations

from pathlib import Path

import optuna
from click.testing import CliRunner
from optuna.distributions import FloatDistribution

from evomerge.cli import main
from evomerge.report import best_so_far, plot_dfs_path, plot_pareto, recipe_values, write_report
from evomerge.study import (ATTR_BASELINE, ATTR_CONFIG, ATTR_DFS_HOST, ATTR_DFS_SOURCES, ATTR_PATH, ATTR_RECIPE,
                            ATTR_SCORES, ATTR_STAGE)

PNG = b"\x89PNG\r\n\x1a\n"
REFS = {"math": "/m/math", "lang": "/m/lang"}


def _png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG


def _ps_study(storage: str, name: str, searched: int, objectives: int = 1) -> optuna.Study:
    """Baselines math, lang, uniform, then ``searched`` trials with 4 dims (2 layers x 2 models)."""
    study = optuna.create_study(study_name=name, storage=storage, directions=["maximize"] * objectives)
    tasks = [{"task": f"task{i}"} for i in range(objectives)]
    study.set_user_attr(ATTR_CONFIG, {"models": REFS, "fitness": {"tasks": tasks}})
    study.set_user_attr(ATTR_STAGE, "ps")
    for k, (base, fit) in enumerate((("math", 0.4), ("lang", 0.5), ("uniform", 0.6))):
        values = [fit + 0.01 * i for i in range(objectives)]
        study.add_trial(optuna.create_trial(values=values, user_attrs={
            ATTR_BASELINE: base, ATTR_SCORES: {t["task"]: v for t, v in zip(tasks, values)},
            ATTR_RECIPE: {"merge_method": "linear", "models": [{"model": REFS["math"]}]}}))
    dists = {f"L0{layer}.{m}.weight": FloatDistribution(0, 1) for layer in (0, 1) for m in REFS}
    for i in range(searched):
        params = {k: ((i * 7 + j * 3) % 10) / 10 for j, k in enumerate(dists)}
        fit = 0.5 + 0.4 * params["L00.math.weight"] - 0.1 * params["L01.lang.weight"]
        values = [fit] if objectives == 1 else [fit, 1.0 - fit + 0.05 * (i % 3)]
        recipe = {"merge_method": "task_arithmetic", "base_model": "/m/base", "parameters": {"lambda": 1.0},
                  "models": [{"model": REFS[m], "parameters": {"weight": [params[f"L0{layer}.{m}.weight"] for layer in (0, 1)]}}
                             for m in REFS]}
        study.add_trial(optuna.create_trial(values=values, params=params, distributions=dists, user_attrs={
            ATTR_RECIPE: recipe, ATTR_SCORES: {t["task"]: v for t, v in zip(tasks, values)}}))
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.FAIL))
    return study


def test_best_so_far_and_recipe_values():
    assert best_so_far([0.2, 0.5, 0.3, 0.7]) == [0.2, 0.5, 0.5, 0.7]
    recipe = {"models": [
        {"model": "/m/math", "parameters": {"weight": [0.1, 0.2], "density": 0.5, "normalize": True}},
        {"model": "/m/lang", "parameters": {"weight": [{"filter": "self_attn", "value": [0.3, 0.4]}, {"value": [0.5, 0.6]}],
                                            "density": 0.7}},
        {"model": "/m/other"}]}
    assert recipe_values(recipe, {"/m/math": "math", "/m/lang": "lang"}) == {
        "weight": {"math": [0.1, 0.2], "lang (attn)": [0.3, 0.4], "lang (mlp)": [0.5, 0.6]},
        "density": {"math": [0.5], "lang": [0.7]},
    }


def test_report_of_a_ps_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = _ps_study(storage, "ps", searched=12)
    report = write_report(study, tmp_path / "out")
    assert [p.name for p in report.files] == ["fitness.png", "recipe.png", "importances.png"]
    assert all(_png(p) for p in report.files) and report.skipped == []
    md = (tmp_path / "out" / "report.md").read_text()
    for link in ("![fitness](fitness.png)", "![recipe](recipe.png)", "![importances](importances.png)"):
        assert link in md
    best = max((t for t in study.trials if t.params), key=lambda t: (t.value, -t.number))
    assert f"| {best.number} | best | {best.value:.4f} | {best.value:.4f} |" in md
    assert "| 0 | baseline: math | 0.4000 | 0.4000 |" in md
    assert "12 searched trials completed, 3 baselines, 1 failed" in md
    assert f"Trial {best.number}, `task_arithmetic`; global: lambda=1.0." in md


def test_too_few_trials_skip_importances_with_a_reason(tmp_path):
    study = _ps_study(f"sqlite:///{tmp_path / 's.db'}", "few", searched=3)
    report = write_report(study, tmp_path / "out")
    assert [p.name for p in report.files] == ["fitness.png", "recipe.png"]
    reason = "parameter importances: 3 searched trial(s), fewer than the 10 needed"
    assert report.skipped == [reason]
    assert f"- {reason}" in (tmp_path / "out" / "report.md").read_text()


def test_multi_objective_study_gets_a_pareto_front(tmp_path):
    study = _ps_study(f"sqlite:///{tmp_path / 's.db'}", "multi", searched=12, objectives=2)
    report = write_report(study, tmp_path / "out")
    assert [p.name for p in report.files] == ["fitness.png", "recipe.png", "importances.png", "pareto.png"]
    front = sorted(t.number for t in study.best_trials)
    md = (tmp_path / "out" / "report.md").read_text()
    assert f"{len(front)} trial(s) on the front: {', '.join(map(str, front))}." in md
    assert "multi-objective (2 objectives)" in md


def test_report_of_a_dfs_study_draws_the_path(tmp_path):
    study = optuna.create_study(study_name="t.dfs", storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    study.set_user_attr(ATTR_STAGE, "dfs")
    study.set_user_attr(ATTR_DFS_SOURCES, [["ps", 0], ["ps", 1], ["a", 0], ["a", 1]])
    study.set_user_attr(ATTR_DFS_HOST, "ps")
    study.add_trial(optuna.create_trial(value=0.5, user_attrs={ATTR_BASELINE: "ps", ATTR_PATH: [[0, 1.0], [1, 1.0]]}))
    dists = {"r0.ps.L00.use": FloatDistribution(-1, 1)}
    for i, path in enumerate(([[0, 1.0], [2, 0.8], [1, 1.0]], [[0, 1.0], [3, 1.2], [2, 0.9], [1, 1.0]])):
        study.add_trial(optuna.create_trial(value=0.6 + 0.1 * i, params={"r0.ps.L00.use": 0.1 * i}, distributions=dists,
                                            user_attrs={ATTR_PATH: path}))
    report = write_report(study, tmp_path / "out")
    assert [p.name for p in report.files] == ["fitness.png", "dfs_path.png"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "Trial 2: 4 hops through ps, a (host: ps)." in md
    assert "![layer path](dfs_path.png)" in md


def test_plot_functions_take_plain_data(tmp_path):
    path = plot_dfs_path([("ps", 0, 1.0), ("a", 5, 0.7), ("ps", 31, 1.0)], tmp_path / "p.png")
    assert _png(path)
    path = plot_pareto([[0.1, 0.9, 0.5], [0.5, 0.5, 0.5], [0.2, 0.2, 0.2]], [0, 1], ["x", "y", "z"],
                       tmp_path / "f.png", baselines={"math": [0.3, 0.3, 0.3]})
    assert _png(path)


def test_report_cli(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    _ps_study(storage, "cli", searched=2)
    out = tmp_path / "rep"
    result = CliRunner().invoke(main, ["report", "--study", "cli", "--storage", storage, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        f"wrote {out / 'fitness.png'}", f"wrote {out / 'recipe.png'}",
        "skipped parameter importances: 2 searched trial(s), fewer than the 10 needed", f"wrote {out / 'report.md'}"]
    result = CliRunner().invoke(main, ["report", "--study", "nope", "--storage", storage])
    assert result.exit_code == 1
    assert result.output.strip() == f"error: --study: no study named 'nope' in {storage}; studies there: cli"


def test_study_without_completed_trials(tmp_path):
    study = optuna.create_study(study_name="empty", storage=f"sqlite:///{tmp_path / 's.db'}")
    report = write_report(study, tmp_path / "out")
    assert report.files == []
    assert report.skipped == ["fitness: no completed trial", "best recipe: no searched trial with per-model parameters",
                              "parameter importances: 0 searched trial(s), fewer than the 10 needed"]
    assert "No completed trial yet." in (tmp_path / "out" / "report.md").read_text()


def test_pruned_trials_are_drawn_as_crosses_and_racing_savings_counted(tmp_path, monkeypatch):
    """A raced study: a baseline and 2 completed trials saw all 40 items, 2 trials were stopped
    after 5 and 10 items (PRUNED, their estimate as value), one failed: 65 of 200 item
    evaluations saved."""
    import numpy as np

    import evomerge.report as report
    from evomerge.racing import Items
    from evomerge.study import ATTR_ITEMS

    def items(n):
        return {ATTR_ITEMS: Items({"task0": np.ones(n)}, {"task0": 40}).to_attr()}

    study = optuna.create_study(study_name="raced", storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    study.add_trial(optuna.create_trial(value=0.5, user_attrs={ATTR_BASELINE: "uniform"}, system_attrs=items(40)))
    study.add_trial(optuna.create_trial(value=0.6, system_attrs=items(40)))
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.PRUNED, intermediate_values={5: 0.31},
                                        system_attrs=items(5)))
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.FAIL))
    study.add_trial(optuna.create_trial(state=optuna.trial.TrialState.PRUNED, intermediate_values={10: 0.42},
                                        system_attrs=items(10)))
    study.add_trial(optuna.create_trial(value=0.7, system_attrs=items(40)))
    assert report.item_evaluations(study.trials) == (3 * 40 + 5 + 10, 5 * 40)
    drawn = []
    real = report.save_figure
    monkeypatch.setattr(report, "save_figure", lambda fig, path: drawn.append(
        {c.get_label(): c.get_offsets().tolist() for c in fig.axes[0].collections}) or real(fig, path))
    write_report(study, tmp_path / "out")
    assert drawn[0]["stopped by racing (estimate)"] == [[2.0, 0.31], [4.0, 0.42]]
    assert drawn[0]["trial"] == [[1.0, 0.6], [5.0, 0.7]]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "2 searched trials completed, 2 stopped early by racing (pruned), 1 baselines, 1 failed." in md
    assert "Item evaluations: 135 of the 200 these trials would have taken on every item; racing saved 65 (32%)." in md
    assert "orange crosses: trials racing stopped early, at their estimated fitness." in md
    assert "stopped early" not in (write_report(_ps_study(f"sqlite:///{tmp_path / 'p.db'}", "plain", searched=2),
                                                tmp_path / "plain").markdown.read_text())  # no item results: no racing
