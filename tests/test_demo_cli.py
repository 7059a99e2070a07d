"""`evomerge demo` end to end on a tiny world (few steps, few trials): every promised output exists
and the summary holds real scores for every parent and the merge."""

from __future__ import annotations

import json

import pytest
import yaml

from test_demo_world import SMALL as TINY_WORLD  # the reduced world the builder's own tests use

from evomerge.demo.pipeline import DEMO_TASKS, run_demo



@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_tiny_world(tmp_path):
    lines = []
    summary = run_demo(tmp_path / "demo", trials=5, world=TINY_WORLD, on_trial=lines.append)
    out = tmp_path / "demo"
    assert [r.baseline for r in lines[:3]] == ["math", "lang", "uniform"] and len(lines) == 5
    for name in ("base", "math", "lang"):
        assert (out / "models" / name / "model.safetensors").is_file()
    assert (out / "merged" / "config.json").is_file() and (out / "runs" / "demo.db").is_file()
    best = yaml.safe_load((out / "best.yml").read_text())
    assert best["merge_method"] in ("task_arithmetic", "linear")
    written = json.loads((out / "summary.json").read_text())
    assert written == summary and written["trials"] == 5
    # the report of the run: fitness and recipe plots (too few trials for importances, and it says so)
    assert sorted(p.name for p in (out / "report").iterdir()) == ["fitness.png", "recipe.png", "report.md"]
    assert "fewer than the 10 needed" in (out / "report" / "report.md").read_text()
    for model in ("base", "math", "lang", "merged"):
        scores = written["test_scores"][model]
        assert set(scores) == set(DEMO_TASKS) and all(0.0 <= v <= 1.0 for v in scores.values())
    # running it again resumes the finished study: nothing new is evaluated
    again = run_demo(out, trials=5, world=TINY_WORLD, on_trial=lines.append)
    assert len(lines) == 5 and again["best_trial"] == summary["best_trial"]
