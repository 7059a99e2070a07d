"""Fisher merging and RegMean: float64 known answers, statistics (Grams, Fisher) against direct
computations, the statistics cache, calibration input errors, recipes, engine/workspace parity
and a short search."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import load_state

from evomerge.calibration import Calibration, load_texts
from evomerge.cli import main
from evomerge.engine import merge_in_memory
from evomerge.errors import ConfigError
from evomerge.methods import METHODS, run_method
from evomerge.methods.fisher import fisher_merge
from evomerge.methods.regmean import regmean, shrink
from evomerge.recipe import Recipe
from evomerge import statistics as S

D = torch.float64
TEXTS = ["hello world this is text", "another line of text here", "third one", "a b c d e f g",
         "the quick brown fox", "jumps over the lazy dog"]


@pytest.fixture
def cal_file(tmp_path) -> Path:
    path = tmp_path / "cal.txt"
    path.write_text("\n".join(TEXTS) + "\n")
    return path


@pytest.fixture(autouse=True)
def stats_cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "stats"
    monkeypatch.setenv("EVOMERGE_STATS_CACHE", str(root))
    return root


# --------------------------------------------------------------------------- Fisher: known answers
def test_fisher_merge_known_answer():
    xs = [torch.tensor([1.0, 2.0, -3.0, 4.0], dtype=D), torch.tensor([3.0, 0.0, 1.0, -4.0], dtype=D)]
    fs = [torch.tensor([1.0, 0.0, 2.0, 1e-9], dtype=D), torch.tensor([3.0, 0.0, 2.0, 0.0], dtype=D)]
    out = fisher_merge(xs, fs, weights=[1.0, 0.5], floor=1e-6)
    # by hand: F clamped to >= 1e-6, then (w1 F1 x1 + w2 F2 x2) / (w1 F1 + w2 F2)
    expect = torch.tensor([(1 * 1 + 0.5 * 3 * 3) / (1 + 1.5),
                           (1e-6 * 2 + 0.5e-6 * 0) / (1e-6 + 0.5e-6),  # no Fisher: weighted average
                           (2 * -3 + 1 * 1) / (2 + 1),
                           (1e-6 * 4 + 0.5e-6 * -4) / (1e-6 + 0.5e-6)], dtype=D)
    assert torch.allclose(out, expect, rtol=1e-15, atol=0)


def test_fisher_registry_entry_matches_reference_and_equal_fishers_give_linear():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(5, 7, generator=g, dtype=D) for _ in range(3)]
    fs = [torch.rand(5, 7, generator=g, dtype=D) for _ in range(3)]
    w = [0.2, 0.7, 1.0]
    out = run_method(METHODS["fisher"], None, xs, {"weight": w, "fisher_floor": 1e-6}, stats=fs)
    num = sum(wi * f.clamp_min(1e-6) * x for wi, f, x in zip(w, fs, xs))
    den = sum(wi * f.clamp_min(1e-6) for wi, f in zip(w, fs))
    assert torch.allclose(out, num / den, rtol=1e-14, atol=0)
    same = run_method(METHODS["fisher"], None, xs, {"weight": w, "fisher_floor": 1e-6}, stats=[fs[0]] * 3)
    lin = run_method(METHODS["linear"], None, xs, {"weight": w, "normalize": True})
    assert torch.allclose(same, lin, rtol=1e-13, atol=1e-15)
    none = run_method(METHODS["fisher"], None, xs, {"weight": w, "fisher_floor": 1e-6}, stats=[None] * 3)
    assert torch.allclose(none, lin, rtol=1e-13, atol=1e-15)


# --------------------------------------------------------------------------- RegMean: known answers
def _problem(seed: int, n: int = 3, out: int = 4, inp: int = 6, tokens: int = 20):
    g = torch.Generator().manual_seed(seed)
    Xs = [torch.randn(tokens, inp, generator=g, dtype=D) for _ in range(n)]  # (tokens, in)
    Ws = [torch.randn(out, inp, generator=g, dtype=D) for _ in range(n)]  # (out, in)
    return Xs, Ws, [X.T @ X for X in Xs]


def test_regmean_alpha_one_is_least_squares_on_the_stacked_inputs():
    Xs, Ws, Gs = _problem(1)
    w = [1.0, 0.5, 2.0]
    out = regmean(Ws, Gs, weights=w, alpha=1.0)
    # independent route: least squares of sqrt(w_i) X_i W^T ~ sqrt(w_i) X_i W_i^T, all models stacked
    A = torch.cat([wi ** 0.5 * X for wi, X in zip(w, Xs)])
    B = torch.cat([wi ** 0.5 * X @ W.T for wi, X, W in zip(w, Xs, Ws)])
    ref = torch.linalg.lstsq(A, B).solution.T
    assert torch.allclose(out, ref, rtol=1e-7, atol=1e-9)


def test_regmean_alpha_zero_is_a_per_input_feature_average():
    Xs, Ws, Gs = _problem(2)
    w = [1.0, 0.5, 2.0]
    out = regmean(Ws, Gs, weights=w, alpha=0.0)
    d = [wi * G.diagonal() for wi, G in zip(w, Gs)]  # (in,) per model
    ref = sum(W * di for W, di in zip(Ws, d)) / sum(d)  # column j weighted by w_i G_i[j, j]
    assert torch.allclose(out, ref, rtol=1e-7, atol=1e-9)


def test_regmean_shrinks_the_off_diagonal_and_solves_the_normal_equations():
    Xs, Ws, Gs = _problem(3)
    alpha, w = 0.6, [1.0, 1.0, 1.0]
    out = regmean(Ws, Gs, weights=w, alpha=alpha)
    Gh = [alpha * G + (1 - alpha) * torch.diag(G.diagonal()) for G in Gs]
    assert torch.equal(shrink(Gs[0], alpha).diagonal(), Gs[0].diagonal())
    # normal equations: (sum G_i) W^T = sum G_i W_i^T
    lhs = sum(Gh) @ out.T
    rhs = sum(G @ W.T for G, W in zip(Gh, Ws))
    assert torch.allclose(lhs, rhs, rtol=1e-7, atol=1e-8)
    # identical models: that model
    same = regmean([Ws[0]] * 3, Gs, weights=w, alpha=alpha)
    assert torch.allclose(same, Ws[0], rtol=1e-9, atol=1e-10)


def test_regmean_entry_averages_tensors_without_grams_and_unseen_inputs():
    Xs, Ws, Gs = _problem(4)
    w = [1.0, 3.0, 0.0]
    avg = run_method(METHODS["regmean"], None, Ws, {"weight": w, "alpha": 0.9}, stats=[None] * 3)
    assert torch.allclose(avg, (Ws[0] + 3 * Ws[1]) / 4, rtol=1e-14, atol=0)
    Gz = [G.clone() for G in Gs]
    for G in Gz:  # input feature 2 never active: its column is the weighted average
        G[2, :] = 0
        G[:, 2] = 0
    out = run_method(METHODS["regmean"], None, Ws, {"weight": [1.0, 1.0, 1.0], "alpha": 0.9}, stats=Gz)
    assert torch.allclose(out[:, 2], sum(W[:, 2] for W in Ws) / 3, rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- statistics
def _reference_grams(model_dir: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """Float64 Grams from one unpadded full forward per text (no layer streaming, no batching)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    acc: dict[str, torch.Tensor] = {}

    def hook(name):
        def fn(_m, inp, _o):
            x = inp[0].reshape(-1, inp[0].shape[-1])
            acc[name] = acc.get(name, 0) + x.T @ x
        return fn

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            mod.register_forward_hook(hook(name + ".weight"))
    with torch.no_grad():
        for t in texts:
            model(input_ids=tok(t, return_tensors="pt")["input_ids"])
    return acc


def test_grams_streamed_layer_by_layer_match_a_full_forward(tiny_models, cal_file):
    cal = Calibration(data=str(cal_file), n=len(TEXTS), max_length=128)
    stats = S.statistics_for("gram", {"a": str(tiny_models["a"])}, cal)
    ref = _reference_grams(tiny_models["a"], TEXTS)
    assert set(stats.names("a")) == set(ref)
    for name, r in ref.items():
        got = stats.get("a", name).to(D)
        assert torch.allclose(got, r, rtol=1e-5, atol=1e-5 * r.abs().max().item()), name
    # q/k/v read one input: one stored Gram
    index = json.loads((stats.folders["a"] / S.INDEX).read_text())["tensors"]
    assert index["model.layers.0.self_attn.k_proj.weight"] == index["model.layers.0.self_attn.q_proj.weight"]


def test_fisher_is_the_mean_squared_per_example_gradient(tiny_models, cal_file):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cal = Calibration(data=str(cal_file), n=3, max_length=128)
    texts = load_texts(cal)
    stats = S.statistics_for("fisher", {"a": str(tiny_models["a"])}, cal)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["a"], dtype=torch.float64)
    tok = AutoTokenizer.from_pretrained(tiny_models["a"])
    ref = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for t in texts:
        model.zero_grad()
        ids = tok(t, return_tensors="pt")["input_ids"]
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
        logp.gather(1, ids[0, 1:, None]).sum().backward()
        for n, p in model.named_parameters():
            ref[n] += p.grad ** 2 / len(texts)
    for n, r in ref.items():
        got = stats.get("a", n).to(D)
        assert torch.allclose(got, r, rtol=1e-4, atol=1e-6 * r.abs().max().item()), n


def test_statistics_are_cached_and_recomputed_when_data_or_settings_change(tiny_models, cal_file, monkeypatch):
    cal = Calibration(data=str(cal_file), n=4, max_length=64)
    refs = {"a": str(tiny_models["a"])}
    first = S.statistics_for("gram", refs, cal)
    assert first.seconds > 0
    calls = []
    real = S._compute_into
    monkeypatch.setattr(S, "_compute_into", lambda *a: (calls.append(a), real(*a)))
    again = S.statistics_for("gram", refs, cal)
    assert again.seconds == 0 and calls == [] and again.folders == first.folders
    assert torch.equal(again.get("a", "model.layers.1.mlp.down_proj.weight"),
                       first.get("a", "model.layers.1.mlp.down_proj.weight"))
    for changed in (cal.model_copy(update={"n": 3}), cal.model_copy(update={"seed": 1}),
                    cal.model_copy(update={"max_length": 8})):
        other = S.statistics_for("gram", refs, changed)
        assert other.folders["a"] != first.folders["a"]
    assert len(calls) == 3
    other_model = S.statistics_for("gram", {"b": str(tiny_models["b"])}, cal)
    assert other_model.folders["b"] != first.folders["a"]


_AT_ONCE = """
import sys, time
from pathlib import Path
from evomerge.calibration import Calibration
from evomerge import statistics as S
model, data, cache, me = sys.argv[1:]
(Path(cache).parent / f"ready-{me}").touch()
while not (Path(cache).parent / "go").exists():
    time.sleep(0.01)
stats = S.statistics_for("gram", {"a": model}, Calibration(data=data, n=4, max_length=64),
                         cache_dir=cache, say=lambda m: print(m, flush=True))
print("folder", stats.folders["a"])
"""


def test_two_processes_needing_the_same_statistics_compute_them_once(tiny_models, cal_file, tmp_path):
    import subprocess
    import sys
    import time

    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-c", _AT_ONCE, str(tiny_models["a"]), str(cal_file), str(cache), str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready-{i}").exists() for i in range(2)) and time.time() < deadline:
        time.sleep(0.05)
    (tmp_path / "go").touch()  # both start asking at the same instant
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert sum(o.count("statistics: computing gram") for o in outs) == 1, outs
    folders = {line for o in outs for line in o.splitlines() if line.startswith("folder ")}
    assert len(folders) == 1
    assert (Path(folders.pop().removeprefix("folder ")) / S.INDEX).is_file()


# --------------------------------------------------------------------------- calibration input
def test_calibration_sources(tmp_path, tiny_task_dir):
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": t}) for t in TEXTS) + "\n")
    texts = load_texts(Calibration(data=str(jl), field="body", n=2, seed=3))
    assert len(texts) == 2 and set(texts) <= set(TEXTS)
    assert texts == load_texts(Calibration(data=str(jl), field="body", n=2, seed=3))
    task = load_texts(Calibration(data=str(tiny_task_dir / "tiny_cal.yaml"), n=100))
    assert task[0] == "0 plus 0 = 0" and len(task) == 6  # validation split, question + gold choice


@pytest.mark.parametrize("data, extra, message", [
    ("missing.txt", {}, "calibration.data: missing.txt is not a file"),
    ("bad.jsonl", {}, "calibration.data: "),
    ("nope_task_xyz", {"include_path": "."}, "calibration.data: 'nope_task_xyz' is neither a file nor a known lm-eval task"),
    ("empty.txt", {}, "has no examples"),
])
def test_bad_calibration_input_is_one_line(tmp_path, monkeypatch, data, extra, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"no_text": 1}\n')
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ConfigError) as e:
        load_texts(Calibration(data=data, **extra))
    assert message in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- recipes
def _recipe(tiny_models, cal_file, method: str, **params) -> dict:
    return {"merge_method": method,
            "models": [{"model": str(tiny_models["a"])}, {"model": str(tiny_models["b"]), "parameters": {"weight": 0.5}}],
            "parameters": params, "calibration": {"data": str(cal_file), "n": 4, "max_length": 64}}


def test_recipe_round_trip_and_one_line_errors(tiny_models, cal_file, tmp_path):
    r = Recipe.from_dict(_recipe(tiny_models, cal_file, "regmean", alpha=0.5))
    path = tmp_path / "r.yml"
    path.write_text(r.to_yaml())
    assert Recipe.from_yaml(path) == r and r.calibration.n == 4
    no_cal = _recipe(tiny_models, cal_file, "fisher")
    del no_cal["calibration"]
    with pytest.raises(ConfigError, match=r"calibration: merge_method fisher needs calibration data"):
        Recipe.from_dict(no_cal)
    bad = _recipe(tiny_models, cal_file, "regmean")
    bad["calibration"]["n"] = 0
    with pytest.raises(ConfigError, match=r"calibration.n: "):
        Recipe.from_dict(bad)
    with pytest.raises(ConfigError, match=r"alpha: expected a value in \[0, 1\]"):
        Recipe.from_dict(_recipe(tiny_models, cal_file, "regmean", alpha=2))
    # mergekit 0.1.5 refuses it: it has no such method
    import mergekit.merge_methods

    for name in ("regmean", "fisher"):
        with pytest.raises(RuntimeError, match="Unimplemented merge method"):
            mergekit.merge_methods.get(name)


@pytest.mark.parametrize("method, params", [("regmean", {"alpha": 0.7}), ("fisher", {"fisher_floor": 1e-6})])
def test_workspace_equals_engine_and_cli_merge(tiny_models, cal_file, tmp_path, method, params):
    from evomerge.workspace import Workspace

    r = Recipe.from_dict(_recipe(tiny_models, cal_file, method, **params))
    engine = merge_in_memory(r)
    refs = [str(tiny_models["a"]), str(tiny_models["b"])]
    ws = Workspace(refs, template=refs[0])
    ws.load(r)
    live = ws.state_dict()
    ws.close()
    for name, t in engine.items():
        assert torch.allclose(live[name], t, rtol=0, atol=0), name
    a, b = load_state(tiny_models["a"]), load_state(tiny_models["b"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(engine[q], (a[q] + 0.5 * b[q]) / 1.5)  # data-aware, not the plain average
    path = tmp_path / "r.yml"
    path.write_text(r.to_yaml())
    res = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert torch.equal(load_state(tmp_path / "out")[q], engine[q])


# --------------------------------------------------------------------------- search
@pytest.fixture
def tiny_task_dir(tmp_path) -> Path:
    from conftest import write_mc_task

    root = tmp_path / "tasks"
    root.mkdir()
    for split in ("dev", "test"):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(6):
                f.write(json.dumps({"q": f"{i} plus {i}", "choices": [str(x) for x in range(8)], "label": 0 if split == "dev" and i == 0 else (2 * i) % 8}) + "\n")
    write_mc_task(root, "tiny_cal", root / "dev.jsonl", root / "test.jsonl")
    return root


@pytest.mark.slow
def test_short_search_over_regmean_and_fisher_knobs(tiny_models, tiny_task_dir, tmp_path):
    from evomerge.config import SearchConfig
    from evomerge.export import export_recipe
    from evomerge.search import run_search
    from evomerge.study import load_existing_study

    cfg = SearchConfig.from_dict({
        "study": "da", "storage": f"sqlite:///{tmp_path / 'da.db'}", "seed": 0,
        "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])},
        "merge": {"method": ["regmean", "fisher"], "search": {"weight": None, "alpha": None}, "layer_groups": 2},
        "fitness": {"include_path": str(tiny_task_dir), "tasks": [{"task": "tiny_cal", "metric": "acc"}]},
        "calibration": {"data": "tasks/tiny_cal.yaml", "n": 6, "max_length": 32},
        "sampler": {"name": "random", "baselines": False},
        "budget": {"trials": 3},
    }, root=tmp_path)
    reports = []
    result = run_search(cfg, trials=3, on_trial=reports.append)
    assert result.completed == 3, [r.error for r in reports]
    study = load_existing_study("da", cfg.storage_url)
    recipes = [Recipe.from_dict(t.user_attrs["evomerge:recipe"]) for t in study.trials]
    assert {r.merge_method for r in recipes} <= {"regmean", "fisher"}
    alphas = [r.parameters["alpha"] for r in recipes if r.merge_method == "regmean"]
    assert all(isinstance(a, list) and len(a) == 2 for a in alphas)  # per layer group
    path, recipe, _ = export_recipe(study, tmp_path / "best.yml")
    text = path.read_text()
    assert "evomerge extension" in text and "mergekit-yaml refuses" in text and "--merge" in text
    assert Recipe.from_yaml(path) == recipe


# --------------------------------------------------------------------------- planner estimate
def test_statistics_estimate_for_a_7b_model():
    from evomerge.dryrun import KNOWN_MODELS, ModelFacts, statistics_estimate

    facts = ModelFacts("meta-llama/Llama-2-7b-hf", KNOWN_MODELS["meta-llama/Llama-2-7b-hf"], "table", True)
    peak, seconds, lines = statistics_estimate("gram", facts, 2, 64, 256, "cuda")
    layer_grams = (3 * 4096 ** 2 + 11008 ** 2) * 4  # q/k/v, o, gate/up and down inputs, float32
    assert peak == facts.params * 4 + layer_grams + 2 * 64 * 256 * 4096 * 4
    assert seconds > 0 and "estimate" in lines[0] and "regmean per trial" in lines[1]
    peak_f, _, lines_f = statistics_estimate("fisher", facts, 2, 64, 256, "cuda")
    assert peak_f > 2 * facts.params * 4 and "fisher" in lines_f[0]


def test_calibration_paths_in_a_stored_recipe_move_with_the_project(tmp_path):
    """A study stores recipes with portable paths: the calibration file inside the project is written
    relative to it, and found again after the project moved."""
    from evomerge.identity import local_ref, map_refs, portable_ref

    old, new = tmp_path / "old", tmp_path / "new"
    (old / "data").mkdir(parents=True)
    (old / "data" / "cal.txt").write_text("one two\n")
    recipe = {"merge_method": "regmean", "models": [{"model": "/elsewhere/a"}],
              "calibration": {"data": str(old / "data" / "cal.txt"), "n": 4}}
    stored = map_refs(recipe, lambda ref: portable_ref(ref, old))
    assert stored["calibration"] == {"data": "data/cal.txt", "n": 4}
    assert stored["models"] == [{"model": "/elsewhere/a"}]
    old.rename(new)
    again = map_refs(stored, lambda ref: local_ref(ref, new))
    assert again["calibration"]["data"] == str((new / "data" / "cal.txt").resolve())
