"""Stage moe: the space decodes as documented, a trial's live MoE equals what `evomerge moe`
writes for the same experts, gate rows are s*g + b*mu, and the stage runs after ps through
run_search with top_ps candidates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_llama, write_mc_task

from evomerge.config import SearchConfig
from evomerge.moe import write_moe
from evomerge.moe_config import MoEConfig
from evomerge.moe_stage import ATTR_MOE, MoeSpace, MoeStage
from evomerge.search import run_search
from evomerge.stages import moe_candidates
from evomerge.study import load_existing_study

PROMPTS = {"math": ["add 1 and 2", "what is 3 times 4"], "lang": ["the cat sat", "a long story"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_stage")
    base = make_tiny_llama(root / "base", seed=0)
    out = {"base": base, "math": make_tiny_llama(root / "math", seed=1, base=base, noise=0.05),
           "lang": make_tiny_llama(root / "lang", seed=2, base=base, noise=0.05)}
    for split, offset in (("dev", 0), ("test", 5)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(6):
                a, b = (i + offset) % 10, (2 * i + offset) % 7
                f.write(json.dumps({"q": f"{a} plus {b}", "choices": [str(x) for x in range(8)],
                                    "label": (a + b) % 8}) + "\n")
    write_mc_task(root, "tiny_mc", root / "dev.jsonl", root / "test.jsonl")
    out["tasks"] = root
    return out


def _config(world, tmp_path, **moe) -> SearchConfig:
    return SearchConfig.from_dict({
        "study": "s", "storage": f"sqlite:///{tmp_path / 's.db'}", "base_model": str(world["base"]),
        "models": {"math": str(world["math"]), "lang": str(world["lang"])},
        "merge": {"method": "linear", "search": {"weight": [0, 1]}, "layer_groups": 1},
        "fitness": {"include_path": str(world["tasks"]), "tasks": [{"task": "tiny_mc", "metric": "acc"}]},
        "sampler": {"name": "random"}, "budget": {"trials": 3},
        "stages": ["ps", "moe"],
        "moe": {"prompts": PROMPTS, "gate_mode": "cheap_embed", "sampler": {"name": "random"},
                "budget": {"trials": 3}, **moe},
    })


def test_space_names_x0_and_decode():
    space = MoeSpace(("math", "lang"), ("lang", "math", "ps3"), num_layers=2)
    bounds = space.bounds()
    assert bounds["slot.math.expert"] == (0.0, 3.0)
    assert set(bounds) == {"slot.math.expert", "slot.lang.expert"} | {
        f"L0{i}.{s}.{k}" for i in range(2) for s in ("math", "lang") for k in ("scale", "bias")}
    plain = space.decode(space.x0())
    assert plain.experts == ("math", "lang")
    assert plain.scale == ((1.0, 1.0), (1.0, 1.0)) and plain.bias == ((0.0, 0.0), (0.0, 0.0))
    params = {**space.x0(), "slot.math.expert": 3.0, "slot.lang.expert": 0.99, "L01.lang.bias": -0.5}
    choice = space.decode(params)
    assert choice.experts == ("ps3", "lang")  # floored, the upper bound stays in range
    assert choice.bias[1] == (0.0, -0.5)


def test_trial_model_equals_evomerge_moe_and_gate_rows(world, tmp_path):
    cfg = _config(world, tmp_path)
    stage = MoeStage(cfg, dict(cfg.source_refs))
    stage.open()
    try:
        model, _ = stage.load(stage.candidate({}, "moe"))
        live = {k: v.clone() for k, v in model.state_dict().items()}
        # the plain MoE equals what `evomerge moe` writes for the same base, experts and prompts
        data = stage.moe_config(("math", "lang")).model_dump(mode="json", exclude={"root"})
        for expert in data["experts"]:
            expert["source_model"] = cfg.source_refs[expert["source_model"]]
        (tmp_path / "moe.yml").write_text(yaml.safe_dump(data))
        from transformers import AutoModelForCausalLM

        written = AutoModelForCausalLM.from_pretrained(write_moe(MoEConfig.load(tmp_path / "moe.yml"), tmp_path / "o"))
        for key, value in written.state_dict().items():
            assert torch.equal(live[key], value), key
        # swapped experts, scaled and biased gates
        params = {**stage.space.x0(), "slot.math.expert": 1.5, "slot.lang.expert": 0.5,
                  "L01.math.scale": 2.5, "L01.math.bias": 0.75, "L01.lang.bias": -0.25}
        model, _ = stage.load(stage.candidate(params, None))
        state = model.state_dict()
        assert torch.equal(state["model.layers.0.mlp.experts.down_proj"][0], live["model.layers.0.mlp.experts.down_proj"][1])
        g = live["model.layers.1.mlp.gate.weight"].double()  # unit gate vectors (scale 1, bias 0)
        mu = g.sum(0) / g.sum(0).norm()
        expected = torch.stack([2.5 * g[0] + 0.75 * mu, g[1] - 0.25 * mu])
        torch.testing.assert_close(state["model.layers.1.mlp.gate.weight"].double(), expected, rtol=1e-6, atol=1e-7)
        assert torch.equal(state["model.layers.0.mlp.gate.weight"], live["model.layers.0.mlp.gate.weight"])
    finally:
        stage.close()


def test_moe_stage_after_ps_with_top_ps_candidates(world, tmp_path):
    cfg = _config(world, tmp_path, candidates="top_ps", top_k=2)
    result = run_search(cfg)
    assert result.study_name == "s.moe" and result.completed == 3
    study = load_existing_study("s.moe", cfg.storage_url)
    trials = study.get_trials()
    assert trials[0].user_attrs["evomerge:baseline"] == "moe"
    assert all(set(t.user_attrs[ATTR_MOE]["experts"]) <= set(moe_candidates(cfg, "s")) for t in trials)
    assert all(n.startswith("ps") for n in moe_candidates(cfg, "s"))
    assert all(t.value is not None for t in trials)


@pytest.mark.parametrize("moe, message", [
    ({"prompts": {"math": ["x"]}, "experts_per_token": 1}, "at least 2 expert slots"),
    ({"experts_per_token": 3}, "experts_per_token: 3 is more than the 2 expert slots"),
    ({"scale_range": [2, 3]}, "scale_range"),
    ({"prompts": {"math": [], "lang": ["y"]}}, "prompts.math"),
])
def test_moe_stage_config_errors(world, tmp_path, moe, message):
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _config(world, tmp_path, **moe)
