"""`evomerge demo` end to end on a tiny world (few steps, few trials): every promised output exists
and the summary holds real scores for every parent and the merge."""

from __future__ import annotations

import json

import pytest
import yaml

from test_demo_world import SMALL as TINY_WORLD  # the reduced world the builder's own tests use

from evomerge.demo import pipeline
from evomerge.demo.pipeline import DEMO_TASKS, run_demo
from evomerge.errors import ConfigError


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


def test_a_missing_demo_config_stops_the_demo_before_the_world_is_built(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "DEMO_CONFIG", tmp_path / "site-packages" / "evomerge" / "demo" / "demo.yml")
    with pytest.raises(ConfigError, match="demo.yml: the demo's search config is missing from the installed package"):
        run_demo(tmp_path / "demo", trials=1, world=TINY_WORLD)
    assert not (tmp_path / "demo").exists()


def test_the_shipped_demo_config_points_at_the_world_in_its_folder(tmp_path):
    models = {n: tmp_path / "models" / n for n in ("base", "math", "lang")}
    for folder in models.values():
        folder.mkdir(parents=True)
    cfg = pipeline.demo_config(tmp_path, models)
    moved = tmp_path / "demo.yml"  # as `evomerge demo` copies it: `evomerge search OUT/demo.yml` by hand
    moved.write_bytes(pipeline.DEMO_CONFIG.read_bytes())
    again = type(cfg).load(moved)
    assert again.base_ref == cfg.base_ref and again.source_refs == cfg.source_refs
    assert again.include_paths == cfg.include_paths and again.storage_url == cfg.storage_url
