"""Search: config errors, the named space and decode, the study loop (baselines, resume, refusal of
a changed config, fork/fresh), kill -9 recovery, and export -> merge reproducing evaluated weights."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import load_state, write_mc_task

from evomerge.cli import main
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.search import run_search
from evomerge.study import (ATTR_BASELINE, ATTR_INTERRUPTED, ATTR_OWNER, ATTR_RECIPE, counted, fail_stale_trials,
                            load_existing_study, study_fingerprint)
from evomerge.trials import ask_owned
from evomerge.space import build_space, layer_groups


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory) -> Path:
    """An lm-eval multiple-choice task over local JSONL (dev and test splits)."""
    root = tmp_path_factory.mktemp("tasks")
    for split, offset in (("dev", 0), ("test", 5)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(6):
                a, b = (i + offset) % 10, (2 * i + offset) % 7
                f.write(json.dumps({"q": f"{a} plus {b}", "choices": [str(x) for x in range(8)], "label": (a + b) % 8}) + "\n")
    write_mc_task(root, "tiny_mc", root / "dev.jsonl", root / "test.jsonl", metrics=("acc", "acc_norm"))
    return root


def config_dict(tiny_models, tiny_task, tmp_path, **merge) -> dict:
    return {
        "study": "t",
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "seed": 0,
        "base_model": str(tiny_models["base"]),
        "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])},
        "merge": {"method": "ties", "search": {"weight": [0, 1], "density": [0.3, 1]}, "layer_groups": 2, **merge},
        "fitness": {"include_path": str(tiny_task), "tasks": [{"task": "tiny_mc", "metric": "acc"}], "batch_size": 64},
        "sampler": {"name": "random"},
        "budget": {"trials": 5},
    }


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


# --------------------------------------------------------------------------- config errors
CONFIG_ERRORS = [
    ({"merge": {"method": "tie"}}, "merge.method: unknown method 'tie'"),
    ({"merge": {"method": "ties", "search": {"density": [0.2, 1]}}}, "needs 'weight'"),
    ({"merge": {"method": "ties", "search": {"weight": [1, 0]}}}, "search.weight: expected [low, high] with low < high"),
    ({"merge": {"method": "ties", "search": {"weight": None, "density": [0, 1]}}}, "search.density: range end 0 is invalid"),
    ({"merge": {"method": "ties", "search": {"weight": None, "t": [0, 1]}}}, "search.t: not a parameter of ties"),
    ({"merge": {"method": "ties", "search": {"weight": None, "normalize": [0, 1]}}}, "only numeric knobs"),
    ({"merge": {"method": "ties", "search": {"weight": None}, "layer_groups": 0}}, "layer_groups"),
    ({"sampler": {"name": "cmaes"}, "fitness": {"tasks": [{"task": "x"}, {"task": "y"}], "objective": "multi"}}, "sampler.name: cmaes is single-objective"),
    ({"sampler": {"name": "annealing"}}, "sampler.name"),
    ({"budget": {"trials": 0}}, "budget.trials"),
    ({"models": {"2bad": "x"}}, "model name '2bad'"),
    ({"fitness": {"tasks": []}}, "fitness.tasks"),
    ({"colour": "blue"}, "colour: unknown key"),
    ({"merge": {"method": "slerp", "search": {"t": None}}}, "slerp takes 1 model(s) besides the base, got 2"),
    ({"merge": {"method": "karcher", "search": {"max_iter": None}, "layer_groups": 2}},
     "search.max_iter: an integer knob is searched for the whole model"),
]


@pytest.mark.parametrize("change, message", CONFIG_ERRORS, ids=[m for _, m in CONFIG_ERRORS])
def test_malformed_configs_get_one_line(tiny_models, tiny_task, tmp_path, change, message):
    data = {**config_dict(tiny_models, tiny_task, tmp_path), **change}
    path = write_config(tmp_path / "c.yml", data)
    result = CliRunner().invoke(main, ["search", str(path)])
    assert result.exit_code == 1
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_unknown_task_and_metric(tiny_models, tiny_task, tmp_path):
    data = config_dict(tiny_models, tiny_task, tmp_path)
    data["fitness"]["tasks"] = [{"task": "no_such_task_xyz"}]
    result = CliRunner().invoke(main, ["search", str(write_config(tmp_path / "c.yml", data))])
    assert result.exit_code == 1 and "unknown task 'no_such_task_xyz'" in result.stderr
    assert not (tmp_path / "study.db").exists()


def _other_shapes(tiny_models, tmp_path) -> Path:
    from conftest import make_tiny_llama

    return make_tiny_llama(tmp_path / "wide", seed=7, hidden=48)


# each refused by `search` and by `search --dry-run` before a study (or its database) exists
BEFORE_ANY_STUDY = [
    ("metric", lambda d, m, p: d["fitness"]["tasks"][0].update(metric="f1"),
     "fitness.tasks.tiny_mc.metric: 'f1' is not a metric of the task; available: acc, acc_norm"),
    ("fixed value", lambda d, m, p: d["merge"].update(search={"weight": [0, 1]}, fixed={"density": 1.5}),
     "merge.fixed.density: 1.5 is invalid (expected a value in (0, 1])"),
    ("fixed per model", lambda d, m, p: d["merge"].update(search={"density": [0.3, 1]}, fixed={"weight": {"a": 0.5}}),
     "merge.fixed.weight: no value for model(s) b"),
    ("other shapes", lambda d, m, p: d["models"].update(b=str(_other_shapes(m, p))),
     "models.b: "),
    ("limit", lambda d, m, p: d["fitness"].update(limit=0), "fitness.limit"),
]


@pytest.mark.parametrize("case, change, message", BEFORE_ANY_STUDY, ids=[c[0] for c in BEFORE_ANY_STUDY])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_bad_config_is_refused_before_any_study_exists(tiny_models, tiny_task, tmp_path, case, change, message, dry_run):
    data = config_dict(tiny_models, tiny_task, tmp_path)
    change(data, tiny_models, tmp_path)
    path = write_config(tmp_path / "c.yml", data)
    result = CliRunner().invoke(main, ["search", str(path)] + (["--dry-run"] if dry_run else []))
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 1 and len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "study.db").exists()  # nothing written: the corrected config starts clean


# --------------------------------------------------------------------------- space
def test_layer_groups_cover_every_layer_once():
    for n in (1, 2, 5, 32):
        for spec in (1, 2, 3, 4, 7, "full"):
            groups = layer_groups(n, spec)
            assert [layer for g in groups for layer in g] == list(range(n))
            assert max(map(len, groups)) - min(map(len, groups)) <= 1


def test_space_names_and_decode_round_trip(tiny_models, tiny_task, tmp_path):
    cfg = SearchConfig.from_dict(config_dict(tiny_models, tiny_task, tmp_path, layer_groups="full", split_attn_mlp=True))
    space = build_space(cfg, num_layers=4)
    assert space.names[:4] == ["L00.attn.a.weight", "L00.attn.b.weight", "L00.attn.a.density", "L00.attn.b.density"]
    assert len(space.names) == 4 * 2 * 2 * 2 == len(set(space.names))
    params = {name: 0.31 + 0.01 * i for i, name in enumerate(space.names)}
    recipe = space.decode(params)
    assert recipe.merge_method == "ties" and recipe.base_model == str(tiny_models["base"])
    # the per-layer values come back out of the recipe through the engine's own resolution
    from evomerge.recipe import evaluate

    for m in recipe.models:
        name = "a" if m.model == str(tiny_models["a"]) else "b"
        for layer in range(4):
            t = layer / 3
            for part, tensor in (("attn", f"model.layers.{layer}.self_attn.q_proj.weight"),
                                 ("mlp", f"model.layers.{layer}.mlp.up_proj.weight")):
                for knob in ("weight", "density"):
                    got = evaluate(m.parameters[knob], tensor, t)
                    assert got == pytest.approx(params[f"L{layer:02d}.{part}.{name}.{knob}"], abs=1e-12)
    # a decoded recipe is a valid mergekit recipe and survives YAML
    from evomerge.recipe import Recipe

    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_method_choice_dimension(tiny_models, tiny_task, tmp_path):
    cfg = SearchConfig.from_dict(config_dict(tiny_models, tiny_task, tmp_path, method=["ties", "dare_linear", "task_arithmetic"]))
    space = build_space(cfg, num_layers=2)
    assert space.bounds()["method"] == (0.0, 3.0)
    params = {k: 0.5 for k in space.bounds()}
    for value, name in ((0.2, "ties"), (1.9, "dare_linear"), (2.99, "task_arithmetic"), (3.0, "task_arithmetic")):
        recipe = space.decode({**params, "method": value})
        assert recipe.merge_method == name
        has_density = "density" in (recipe.models[0].parameters or {})
        assert has_density == (name != "task_arithmetic")


# --------------------------------------------------------------------------- the loop
def test_search_records_baselines_resumes_and_refuses_changed_config(tiny_models, tiny_task, tmp_path):
    cfg = SearchConfig.from_dict(config_dict(tiny_models, tiny_task, tmp_path))
    seen = []
    result = run_search(cfg, trials=4, on_trial=seen.append)
    assert result.completed == 4 and [r.number for r in seen] == [0, 1, 2, 3]
    assert [r.baseline for r in seen[:3]] == ["a", "b", "uniform"] and seen[3].baseline is None
    assert all(r.state == "COMPLETE" and 0 <= r.fitness <= 1 for r in seen)

    # resume: the same config continues to the new total, keeping the first trials
    result = run_search(cfg, trials=6)
    study = load_existing_study("t", cfg.storage_url)
    assert result.completed == 6 == counted(study)
    assert [t.number for t in study.trials] == list(range(6))
    assert [t.user_attrs.get(ATTR_BASELINE) for t in study.trials[:3]] == ["a", "b", "uniform"]

    # a changed search-relevant part is refused; --fork starts a new study; --fresh replaces it
    changed = SearchConfig.from_dict(config_dict(tiny_models, tiny_task, tmp_path, layer_groups=1))
    with pytest.raises(ConfigError, match="different config .*merge.*--fork"):
        run_search(changed, trials=1)
    forked = run_search(changed, trials=1, fork=True)
    assert forked.study_name == "t.fork1"
    assert len(load_existing_study("t", cfg.storage_url).trials) == 6
    fresh = run_search(changed, trials=1, fresh=True)
    study = load_existing_study("t", cfg.storage_url)
    assert fresh.study_name == "t" and counted(study) == 1
    assert study.user_attrs["evomerge:fingerprint"] == study_fingerprint(changed) != study_fingerprint(cfg)

    # a change that is not search-relevant (batch size, budget) resumes
    relaxed = config_dict(tiny_models, tiny_task, tmp_path, layer_groups=1)
    relaxed["fitness"]["batch_size"] = 8
    relaxed["budget"] = {"trials": 99}
    assert run_search(SearchConfig.from_dict(relaxed), trials=2).completed == 2


def test_search_with_an_integer_knob_and_the_base_as_an_input(tiny_models, tiny_task, tmp_path):
    """karcher: max_iter is searched as an integer, and the config's base model is one more input
    to the mean (as in mergekit); the new methods' knobs take their default ranges."""
    data = config_dict(tiny_models, tiny_task, tmp_path, method=["karcher", "ramplus_tl"],
                       search={"max_iter": None, "tol": None, "r": None}, layer_groups=1)
    space = build_space(SearchConfig.from_dict(data), num_layers=2)
    assert space.bounds() == {"all.max_iter": (0.0, 20.0), "all.tol": (1e-7, 1e-3), "all.r": (0.0, 1.0),
                              "method": (0.0, 2.0)}
    recipe = space.decode({"all.max_iter": 6.6, "all.tol": 1e-4, "all.r": 0.3, "method": 0.5})
    assert recipe.merge_method == "karcher" and recipe.parameters == {"max_iter": 7, "tol": 1e-4}
    assert isinstance(recipe.parameters["max_iter"], int) and recipe.base_model == str(tiny_models["base"])
    assert space.decode({"all.max_iter": 6.6, "all.tol": 1e-4, "all.r": 0.3, "method": 1.5}).parameters == {"r": 0.3}

    data = config_dict(tiny_models, tiny_task, tmp_path, method="karcher", search={"max_iter": None, "tol": None},
                       layer_groups=1)
    data["sampler"] = {"name": "random", "baselines": False}
    cfg = SearchConfig.from_dict(data)
    reports = []
    run_search(cfg, trials=2, on_trial=reports.append)
    assert [r.state for r in reports] == ["COMPLETE"] * 2, [r.error for r in reports]
    for t in load_existing_study("t", cfg.storage_url).trials:
        r = t.user_attrs[ATTR_RECIPE]
        assert r["merge_method"] == "karcher" and r["base_model"] == str(tiny_models["base"])
        assert isinstance(r["parameters"]["max_iter"], int) and 0 <= r["parameters"]["max_iter"] <= 20


def test_failed_trial_is_recorded_and_search_goes_on(tiny_models, tiny_task, tmp_path):
    data = config_dict(tiny_models, tiny_task, tmp_path, method="della",
                       search={"weight": [0, 1], "density": [0.3, 0.9]}, fixed={"epsilon": 0.25})
    data["sampler"] = {"name": "random", "baselines": False}
    cfg = SearchConfig.from_dict(data)
    reports = []
    run_search(cfg, trials=6, on_trial=reports.append)
    failed = [r for r in reports if r.state == "FAIL"]
    assert failed, "densities below 0.25 or above 0.75 make epsilon invalid and must fail"
    assert all("keep probabilities" in r.error for r in failed)
    study = load_existing_study("t", cfg.storage_url)
    assert counted(study) == 6 and any(t.state.name == "COMPLETE" for t in study.trials)


def test_export_then_merge_rebuilds_the_evaluated_weights(tiny_models, tiny_task, tmp_path):
    data = config_dict(tiny_models, tiny_task, tmp_path, method="dare_ties")
    data["sampler"] = {"name": "random", "baselines": False}
    cfg = SearchConfig.from_dict(data)
    run_search(cfg, trials=2)
    study = load_existing_study("t", cfg.storage_url)
    out = tmp_path / "best.yml"
    result = CliRunner().invoke(main, ["export", "--study", "t", "--storage", cfg.storage_url, "--trial", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    exported = yaml.safe_load(out.read_text())
    assert exported == study.trials[1].user_attrs[ATTR_RECIPE] and exported["random_seed"] == 0
    merged = tmp_path / "merged"
    assert CliRunner().invoke(main, ["merge", str(out), str(merged)]).exit_code == 0

    # the evaluated model: the workspace after loading that trial's recipe
    from evomerge.recipe import Recipe
    from evomerge.workspace import Workspace

    refs = [str(tiny_models[k]) for k in ("base", "a", "b")]
    ws = Workspace(refs, template=refs[0])
    ws.load(Recipe.from_dict(study.trials[1].user_attrs[ATTR_RECIPE]))
    live = ws.state_dict()
    ws.close()
    written = load_state(merged)
    assert set(written) == set(live)
    for name, tensor in written.items():
        assert torch.equal(tensor, live[name]), name


def test_status_and_export_errors(tiny_models, tiny_task, tmp_path):
    cfg = SearchConfig.from_dict(config_dict(tiny_models, tiny_task, tmp_path))
    run_search(cfg, trials=3)
    result = CliRunner().invoke(main, ["status", "--study", "t", "--storage", cfg.storage_url])
    assert result.exit_code == 0 and "uniform" in result.output and "tiny_mc" in result.output
    result = CliRunner().invoke(main, ["export", "--study", "nope", "--storage", cfg.storage_url])
    assert result.exit_code == 1 and "no study named 'nope'" in result.stderr
    result = CliRunner().invoke(main, ["export", "--study", "t", "--storage", cfg.storage_url, "--trial", "42"])
    assert result.exit_code == 1 and "has no trial 42" in result.stderr


@pytest.mark.slow
def test_sigkill_mid_search_then_resume_keeps_completed_trials(tiny_models, tiny_task, tmp_path):
    data = config_dict(tiny_models, tiny_task, tmp_path)
    data["sampler"] = {"name": "cmaes", "popsize": 4}
    data["budget"] = {"trials": 9}
    path = write_config(tmp_path / "c.yml", data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    storage = data["storage"]
    deadline = time.time() + 240
    done_before = 0
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name="t", storage=storage)
            done_before = sum(t.state.name == "COMPLETE" for t in study.trials)
        except Exception:
            continue
        if done_before >= 5:
            break
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    study = optuna.load_study(study_name="t", storage=storage)
    completed = {t.number: t.values for t in study.trials if t.state.name == "COMPLETE"}
    assert len(completed) >= 5

    result = subprocess.run([sys.executable, "-m", "evomerge", "search", str(path)], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    study = optuna.load_study(study_name="t", storage=storage)
    after = {t.number: t.values for t in study.trials if t.state.name == "COMPLETE"}
    assert all(after[n] == v for n, v in completed.items())  # nothing completed was lost
    assert counted(study) == 9
    assert not [t for t in study.trials if t.state.name == "RUNNING"]


class _DiesOnSample(optuna.samplers.RandomSampler):
    """Stands for a process killed while the sampler works on a fresh trial."""

    def before_trial(self, study, trial):
        raise KeyboardInterrupt


def test_a_trial_is_owned_from_the_moment_it_runs(tmp_path):
    """kill -9 between creating a trial and sampling it used to leave an ownerless RUNNING trial
    that resume could not fail (seen in CI). The owner is now written with the trial itself."""
    storage = f"sqlite:///{tmp_path / 's.db'}"
    study = optuna.create_study(study_name="o", storage=storage, sampler=_DiesOnSample())
    study.enqueue_trial({}, user_attrs={ATTR_BASELINE: "a"})
    for _ in range(2):  # the queued baseline, then a new trial
        with pytest.raises(KeyboardInterrupt):
            ask_owned(study)
    running = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert len(running) == 2
    assert all(t.user_attrs[ATTR_OWNER] == f"{socket.gethostname()}:{os.getpid()}" for t in running)
    assert running[0].user_attrs[ATTR_BASELINE] == "a"

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for t in running:  # as if the dead process had created them
        study._storage.set_trial_user_attr(t._trial_id, ATTR_OWNER, f"{socket.gethostname()}:{dead.pid}")
    assert fail_stale_trials(study) == 2
    after = study.get_trials()
    assert [t.state.name for t in after] == ["FAIL", "FAIL"]
    assert all(t.user_attrs[ATTR_INTERRUPTED] for t in after)
    assert counted(study) == 0  # interrupted trials do not use up the budget


def _params_sequence(storage: str) -> list[dict]:
    study = optuna.load_study(study_name="t", storage=storage)
    return [t.params for t in study.trials if t.state.name == "COMPLETE"]


def test_resumed_cmaes_search_continues_the_same_run(tiny_models, tiny_task, tmp_path):
    data = config_dict(tiny_models, tiny_task, tmp_path)
    data["sampler"] = {"name": "cmaes", "popsize": 3}
    run_search(SearchConfig.from_dict(data), trials=6)   # baselines + 3 CMA trials (one generation)
    run_search(SearchConfig.from_dict(data), trials=8)   # resumed in a new sampler/workspace
    data_b = {**data, "storage": f"sqlite:///{tmp_path / 'uninterrupted.db'}"}
    run_search(SearchConfig.from_dict(data_b), trials=8)
    resumed, straight = _params_sequence(data["storage"]), _params_sequence(data_b["storage"])
    assert len(resumed) == len(straight) == 8
    assert resumed == straight
    assert resumed[3] != resumed[4]  # real candidates, not a repeated point


@pytest.mark.parametrize("sampler", ["tpe", "qmc", "nsga2"])
def test_every_sampler_runs_with_baselines(tiny_models, tiny_task, tmp_path, sampler):
    data = config_dict(tiny_models, tiny_task, tmp_path)
    data["sampler"] = {"name": sampler, "popsize": 2} if sampler == "nsga2" else {"name": sampler}
    if sampler == "nsga2":  # multi-objective: one objective per task
        data["fitness"]["tasks"] = [{"task": "tiny_mc", "metric": "acc"}, {"task": "tiny_mc", "metric": "acc_norm", "weight": 0.5}]
        data["fitness"]["objective"] = "multi"
    reports = []
    run_search(SearchConfig.from_dict(data), trials=6, on_trial=reports.append)
    assert [r.state for r in reports] == ["COMPLETE"] * 6, [r.error for r in reports]
    study = optuna.load_study(study_name="t", storage=data["storage"])
    assert len(study.directions) == (2 if sampler == "nsga2" else 1)
    assert all(len(t.params) == 8 for t in study.trials if not t.user_attrs.get(ATTR_BASELINE))


def test_two_stage_ps_then_dfs(tiny_models, tiny_task, tmp_path):
    data = config_dict(tiny_models, tiny_task, tmp_path)
    data["stages"] = ["ps", "dfs"]
    data["dfs"] = {"repeats": 2, "sampler": {"name": "cmaes", "popsize": 3}, "budget": {"trials": 4}}
    cfg = SearchConfig.from_dict(data, root=tmp_path)
    reports = []
    result = run_search(cfg, trials=4, on_trial=reports.append)
    assert result.study_name == "t.dfs" and result.completed == 4
    ps = load_existing_study("t", cfg.storage_url)
    dfs = load_existing_study("t.dfs", cfg.storage_url)
    ps_best = max((t for t in ps.trials if t.state.name == "COMPLETE"), key=lambda t: (t.value, -t.number))
    assert dfs.user_attrs["evomerge:ps_trial"] == ps_best.number
    # sources: the ps winner's 2 layers, then a's, then b's; 2 repeats -> 12 slots, with scales
    assert [m for m, _ in dfs.user_attrs["evomerge:dfs_sources"]] == ["ps"] * 2 + ["a"] * 2 + ["b"] * 2
    assert len(dfs.trials[1].params) == 2 * 12
    # the baseline is the host's own path: the ps winner itself, with the same score
    host = dfs.trials[0]
    assert host.user_attrs[ATTR_BASELINE] == "ps" and host.user_attrs["evomerge:path"] == [[0, 1.0], [1, 1.0]]
    assert host.value == pytest.approx(ps_best.value)
    # resuming runs nothing new; a dfs trial exports to a passthrough recipe and an exact checkpoint
    assert run_search(cfg, trials=4).completed == 4
    trial = dfs.trials[-1]
    out = tmp_path / "dfs.yml"
    merged = tmp_path / "dfs_model"
    result = CliRunner().invoke(main, ["export", "--study", "t.dfs", "--storage", cfg.storage_url, "--trial",
                                       str(trial.number), "-o", str(out), "--merge", str(merged)])
    assert result.exit_code == 0, result.output
    exported = yaml.safe_load(out.read_text())
    assert exported["merge_method"] == "passthrough"
    assert yaml.safe_load((merged / "mergekit_config.yml").read_text()) == exported  # every output has its recipe
    hops = trial.user_attrs["evomerge:path"]
    assert sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in exported["slices"]) == len(hops)
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(merged, trust_remote_code=True).num_hidden_layers == len(hops)


def _tensor_sizes(folder: Path) -> tuple[int, int]:
    """(largest layer's parameter count, parameters outside the layers), read from the files."""
    from safetensors import safe_open

    per_layer: dict[int, int] = {}
    other = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for name in f.keys():
                n = f.get_slice(name).get_shape()
                numel = 1
                for d in n:
                    numel *= d
                if ".layers." in name:
                    index = int(name.split(".layers.")[1].split(".")[0])
                    per_layer[index] = per_layer.get(index, 0) + numel
                else:
                    other += numel
    return max(per_layer.values()), other


@pytest.mark.parametrize("text, value", [("10B", 1e10), ("350m", 3.5e8), ("1.5e9", 1.5e9), ("2.5K", 2500.0), ("20G", 2e10), ("7", 7.0)])
def test_parse_count(text, value):
    from evomerge.config import parse_count

    assert parse_count(text) == value


def test_dfs_parameter_budget_limits_the_path(tiny_models, tiny_task, tmp_path):
    from evomerge.stages import DfsStage

    layer, other = _tensor_sizes(tiny_models["a"])
    data = config_dict(tiny_models, tiny_task, tmp_path)
    data["stages"] = ["dfs"]
    data["dfs"] = {"models": ["a", "b"], "repeats": 3, "max_params": other + 3.5 * layer}
    cfg = SearchConfig.from_dict(data, root=tmp_path)
    stage = DfsStage(cfg, {n: str(tiny_models[n]) for n in ("a", "b")})
    assert stage.space.max_layers == 3
    every_slot_on = {name: 0.5 if name.endswith(".use") else 1.0 for name in stage.bounds()}
    hops = stage.space.decode(every_slot_on)
    assert len(hops) == 3 and hops[-1].layer == stage.space.host_layers[-1]
    # max_layers and max_params together: the smaller wins
    data["dfs"]["max_layers"] = 2
    stage = DfsStage(SearchConfig.from_dict(data, root=tmp_path), {n: str(tiny_models[n]) for n in ("a", "b")})
    assert stage.space.max_layers == 2

    data["dfs"] = {"models": ["a", "b"], "max_params": f"{(other + layer) / 1e3}K"}  # one layer: no room for first+last
    with pytest.raises(ConfigError, match=r"dfs.max_params: .* leave room for 1 layer\(s\).*need at least 2"):
        DfsStage(SearchConfig.from_dict(data, root=tmp_path), {n: str(tiny_models[n]) for n in ("a", "b")})
    data["dfs"] = {"models": ["a", "b"], "max_params": "ten billion"}
    with pytest.raises(ConfigError, match="dfs.max_params"):
        SearchConfig.from_dict(data, root=tmp_path)


# --------------------------------------------------------------------------- studies that move
def test_a_moved_project_folder_resumes_and_exports_relative_paths(tiny_models, tiny_task, tmp_path):
    import shutil

    project = tmp_path / "project"
    for name in ("base", "a", "b"):
        shutil.copytree(tiny_models[name], project / "models" / name)
    data = config_dict(tiny_models, tiny_task, tmp_path, method="task_arithmetic", search={"weight": [0, 1]},
                       layer_groups=1)
    data.update(base_model="models/base", models={"a": "models/a", "b": "models/b"})
    del data["storage"]  # the default: runs/t.db beside the config
    write_config(project / "c.yml", data)
    result = CliRunner().invoke(main, ["search", str(project / "c.yml"), "--trials", "2"])
    assert result.exit_code == 0, result.output

    moved = tmp_path / "elsewhere" / "renamed"
    moved.parent.mkdir()
    shutil.move(project, moved)
    result = CliRunner().invoke(main, ["search", str(moved / "c.yml"), "--trials", "4"])
    assert result.exit_code == 0, result.output
    assert "done: 4 trials in study t" in result.output
    storage = f"sqlite:///{moved / 'runs' / 't.db'}"
    study = load_existing_study("t", storage)
    assert counted(study) == 4 and [t.number for t in study.trials] == [0, 1, 2, 3]

    # the recorded recipes and the exported one name the models relative to the config's folder
    assert {m["model"] for t in study.trials for m in t.user_attrs[ATTR_RECIPE]["models"]} <= {"models/a", "models/b"}
    for number in (2, 3):  # the uniform baseline and a searched trial
        out = moved / f"trial{number}.yml"
        result = CliRunner().invoke(main, ["export", "--study", "t", "--storage", storage, "--trial", str(number),
                                           "-o", str(out), "--merge", str(moved / f"merged{number}")])
        assert result.exit_code == 0, result.output
        text = out.read_text() + (moved / f"merged{number}" / "README.md").read_text()
        assert str(tmp_path) not in text and "models/a" in text
    assert "baseline uniform (the plain average of the sources): a linear merge, not the search's task_arithmetic" \
        in (moved / "trial2.yml").read_text()
    status = CliRunner().invoke(main, ["status", "--study", "t", "--storage", storage], env={"COLUMNS": "250"})
    assert status.exit_code == 0 and "baseline uniform: linear, not the search's task_arithmetic" in status.output
    # evomerge merge rebuilds the exported recipe from the config's folder
    result = CliRunner().invoke(main, ["merge", str(moved / "trial3.yml"), str(moved / "rebuilt")])
    assert result.exit_code == 0, result.output
    rebuilt, merged = load_state(moved / "rebuilt"), load_state(moved / "merged3")
    assert rebuilt.keys() == merged.keys() and all(torch.equal(rebuilt[k], merged[k]) for k in rebuilt)


def test_a_study_made_with_the_old_path_fingerprint_is_accepted_and_upgraded(tiny_models, tiny_task, tmp_path):
    from evomerge.study import ATTR_FINGERPRINT, ATTR_FINGERPRINT_VERSION, FINGERPRINT_VERSION

    cfg = SearchConfig.from_dict(config_dict(tiny_models, tiny_task, tmp_path))
    run_search(cfg, trials=1)
    study = load_existing_study("t", cfg.storage_url)
    # as a study made before content fingerprints: the path-based fingerprint, no version
    import sqlite3

    study.set_user_attr(ATTR_FINGERPRINT, cfg.fingerprint())
    with sqlite3.connect(tmp_path / "study.db") as db:
        db.execute("DELETE FROM study_user_attributes WHERE key = ?", (ATTR_FINGERPRINT_VERSION,))
    assert ATTR_FINGERPRINT_VERSION not in load_existing_study("t", cfg.storage_url).user_attrs
    assert run_search(cfg, trials=2).completed == 2
    attrs = load_existing_study("t", cfg.storage_url).user_attrs
    assert attrs[ATTR_FINGERPRINT] == study_fingerprint(cfg) and attrs[ATTR_FINGERPRINT_VERSION] == FINGERPRINT_VERSION


def test_fingerprint_follows_content_not_paths(tiny_models, tiny_task, tmp_path):
    import shutil

    cfg = SearchConfig.from_dict(config_dict(tiny_models, tiny_task, tmp_path))
    for name in ("base", "a", "b"):
        shutil.copytree(tiny_models[name], tmp_path / "copy" / name)
    shutil.copytree(tiny_task, tmp_path / "task_copy")
    data = config_dict({n: tmp_path / "copy" / n for n in ("base", "a", "b")}, tmp_path / "task_copy", tmp_path)
    assert study_fingerprint(SearchConfig.from_dict(data)) == study_fingerprint(cfg)  # same content elsewhere
    swapped = config_dict(tiny_models, tiny_task, tmp_path)
    swapped["models"] = {"a": str(tiny_models["a"]), "b": str(tiny_models["c"])}  # another fine-tune
    assert study_fingerprint(SearchConfig.from_dict(swapped)) != study_fingerprint(cfg)


# --------------------------------------------------------------------------- drivers starting at once
def _race_driver(url: str, barrier, results) -> None:
    """A driver's first steps on a storage: open it (creating the schema), join the study, tell a trial."""
    from evomerge.study import storage_for

    barrier.wait()
    try:
        study = optuna.create_study(study_name="race", storage=storage_for(url), load_if_exists=True)
        study.tell(study.ask(), 1.0)
        results.put("ok")
    except BaseException as e:  # reported to the test
        results.put(f"{type(e).__name__}: {str(e).splitlines()[0]}")


def start_drivers_at_once(url: str, n: int = 4) -> list[str]:
    """``n`` processes released together by a barrier on a new database; each one's outcome."""
    # spawn, not fork: a child forked while another thread of this process (Ray's, SQLAlchemy's pool)
    # holds a lock can hang before it reaches the barrier (seen: a child stuck in SQLAlchemy's
    # registry, its peer's transaction left open, the schema's DROP waiting forever)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_race_driver, args=(url, barrier, results)) for _ in range(n)]
    try:
        for p in procs:
            p.start()
        return [results.get(timeout=180) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def test_drivers_starting_at_once_on_a_new_sqlite_file_share_its_schema(tmp_path):
    # without the retry, 4 processes on a new file fail about 2 times in 3 (alembic_version, tables)
    for attempt in range(3):
        url = f"sqlite:///{tmp_path / f'new{attempt}.db'}"
        assert start_drivers_at_once(url) == ["ok"] * 4
        assert len(optuna.load_study(study_name="race", storage=url).trials) == 4


def test_the_study_names_its_objectives(tiny_models, tiny_task, tmp_path):
    data = config_dict(tiny_models, tiny_task, tmp_path)
    data["sampler"] = {"name": "random", "baselines": False}
    cfg = SearchConfig.from_dict(data)
    run_search(cfg, trials=1)
    assert load_existing_study("t", cfg.storage_url).metric_names == ["tiny_mc.acc"]
    data.update(study="m", fitness={**data["fitness"], "objective": "multi", "tasks": [
        {"task": "tiny_mc", "metric": "acc"}, {"task": "tiny_mc", "metric": "acc_norm", "weight": 2}]})
    multi = SearchConfig.from_dict(data)
    run_search(multi, trials=1)
    assert load_existing_study("m", multi.storage_url).metric_names == ["tiny_mc.acc", "tiny_mc.acc_norm"]
    summed = SearchConfig.from_dict({**data, "study": "s", "fitness": {**data["fitness"], "objective": "sum"}})
    from evomerge.study import metric_names

    assert metric_names(summed) == ["tiny_mc.acc + 2*tiny_mc.acc_norm"]


def test_ctrl_c_exits_130_after_recording_the_trials_in_flight(tiny_models, tiny_task, tmp_path, monkeypatch):
    """The first Ctrl-C lets the trial in flight finish and be recorded, then `search` exits 130."""
    import evomerge.trials

    data = config_dict(tiny_models, tiny_task, tmp_path)
    path = write_config(tmp_path / "c.yml", data)
    real = evomerge.trials.evaluate

    def evaluate_then_ctrl_c(stage, fitness, record, race=None):  # Ctrl-C arrives while trial 1 is evaluated
        outcome = real(stage, fitness, record, race)
        if record[ATTR_RECIPE]["models"][0]["model"].endswith("/b"):
            os.kill(os.getpid(), signal.SIGINT)
        return outcome

    monkeypatch.setattr(evomerge.trials, "evaluate", evaluate_then_ctrl_c)
    result = CliRunner().invoke(main, ["search", str(path)])
    assert result.exit_code == 130, result.output
    assert "stopped: 2 trials in study t" in result.output
    study = load_existing_study("t", data["storage"])
    assert [t.state.name for t in study.trials[:2]] == ["COMPLETE", "COMPLETE"]


def test_a_bug_stops_the_search_and_an_out_of_memory_fails_only_its_trial(tiny_models, tiny_task, tmp_path, monkeypatch):
    from evomerge.stages import PsStage
    from evomerge.study import ATTR_ERROR

    data = config_dict(tiny_models, tiny_task, tmp_path)
    data["sampler"] = {"name": "random", "baselines": False}
    cfg = SearchConfig.from_dict(data)
    real = PsStage.load
    calls = []

    def load(self, record):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if len(calls) == 3:
            raise ValueError("a bug in our code")
        return real(self, record)

    monkeypatch.setattr(PsStage, "load", load)
    with pytest.raises(ValueError, match="a bug in our code"):
        run_search(cfg, trials=5)
    study = load_existing_study("t", cfg.storage_url)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "FAIL"]
    assert "OutOfMemoryError" in study.trials[1].user_attrs[ATTR_ERROR]
    assert counted(study) == 2  # the bug's trial is interrupted, not counted, not penalised
    assert study.trials[2].user_attrs.get(ATTR_INTERRUPTED) is True
    # through the CLI: one line naming the bug (its traceback under -v)
    calls.clear()
    calls.append(1)
    calls.append(1)
    result = CliRunner().invoke(main, ["search", str(write_config(tmp_path / "c.yml", data)), "--trials", "5"])
    assert result.exit_code == 1 and "internal error (ValueError: a bug in our code); run with -v" in result.stderr
