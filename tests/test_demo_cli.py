"""`evomerge demo` end to end on a tiny world (few steps, few trials): every promised output exists
and the summary holds real scores for every parent and the merge."""

from __future__ import annotations

import json

import pytest
import yaml

from test_demo_world import SMALL as TINY_WORLD  # the reduced world the builder's own tests use

from evomerge.demo import pipeline
from evomerge.demo.pipeline import DEMO_TASKS, run_demo
from evomerge.demo.world import PRESETS, world_config, world_settings
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


# ------------------------------------------------------------------------------------------------
# --world: a preset or a JSON object of world settings, checked before anything is written


@pytest.mark.parametrize("value, message", [
    ("v2", "--world: expected a preset (layered, v1) or a JSON object of demo world settings, got 'v2'"),
    ('{"base_steps": ', "--world: expected a preset (layered, v1) or a JSON object of demo world settings; "
                        "'{\"base_steps\": ' is not valid JSON (Expecting value: line 1 column 16 (char 15))"),
    ('{"no_such_knob": 1}', "--world: unknown demo world setting 'no_such_knob' (known: arch, batch, "),
    ('{"math_phases": 3}', "--world: demo world setting math_phases: expected a list of phases or null, got 3"),
])  # fmt: skip
def test_a_bad_world_is_one_line_and_writes_nothing(tmp_path, value, message):
    from click.testing import CliRunner

    from evomerge.cli import main

    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--world", value])
    assert result.exit_code == 1
    assert result.output.startswith(f"error: {message}") and result.output.count("\n") == 1
    assert not out.exists()


def test_the_demo_help_names_every_world_preset():
    from click.testing import CliRunner

    from evomerge.cli import main

    text = " ".join(CliRunner().invoke(main, ["demo", "--help"]).output.split())
    assert all(f"{name}:" in text for name in PRESETS)
    assert "v1: rebuilds the world of evomerge's earlier releases" in text


def test_world_settings_reads_a_preset_or_json_overrides():
    assert world_settings(None) is None
    v1 = world_settings("v1")
    assert v1 == PRESETS["v1"] == {"math_lr": 3e-4, "math_phases": None, "lang_phases": None}
    layered = world_settings("layered")
    layered["lang_phases"].clear()  # a copy: the preset itself is untouched
    assert PRESETS["layered"]["lang_phases"] and world_config(PRESETS["layered"]) == world_config()
    assert world_settings('{"base_steps": 500, "math_phases": null}') == {"base_steps": 500, "math_phases": None}
    assert world_settings(json.dumps(TINY_WORLD)) == TINY_WORLD


@pytest.mark.parametrize("value, message", [
    ("[1, 2]", r"^--world-config: expected a preset \(layered, v1\) or a JSON object of demo world settings, got '\[1, 2\]'$"),
    ("{'batch': 8}", r"^--world-config: .* is not valid JSON \(Expecting property name enclosed in double quotes"),
    ('{"no_such_knob": 1}', r"^--world-config: unknown demo world setting 'no_such_knob' \(known: arch, batch, .*lang_phases\)$"),
    ('{"base_steps": "many"}', r"^--world-config: demo world setting base_steps: expected an integer, got 'many'$"),
    ('{"batch": true}', r"^--world-config: demo world setting batch: expected an integer, got True$"),
    ('{"math_phases": ["all"]}', r"^--world-config: demo world setting math_phases\[0\]: expected an object"),
])  # fmt: skip
def test_world_settings_rejects_anything_else_in_one_line_naming_the_option(value, message):
    with pytest.raises(ConfigError, match=message):
        world_settings(value, option="--world-config")


def test_the_scripts_world_config_option_reads_the_same_values(capsys):
    import argparse

    from evomerge.demo.world import add_world_config_option

    ap = argparse.ArgumentParser(prog="script")
    add_world_config_option(ap)
    assert ap.parse_args([]).world_config is None
    assert ap.parse_args(["--world-config", "v1"]).world_config == PRESETS["v1"]
    assert ap.parse_args(["--world-config", '{"batch": 8}']).world_config == {"batch": 8}
    with pytest.raises(SystemExit) as stop:
        ap.parse_args(["--world-config", "v2"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        "script: error: argument --world-config: expected a preset (layered, v1) or a JSON object of demo world "
        "settings, got 'v2'")
