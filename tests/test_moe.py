"""`evomerge moe`: parity with mergekit-moe 0.1.5 (every tensor and the config equal in float32),
the output loads and runs in transformers, bad input is one line with nothing written, and
experts can be study trials built in memory."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import _tiny_tokenizer, make_tiny_llama

from evomerge.cli import main
from evomerge.engine import merge_to_dir
from evomerge.moe import write_moe
from evomerge.moe_config import MoEConfig
from evomerge.moe_studies import study_recipes
from evomerge.recipe import Recipe
from evomerge.study import ATTR_RECIPE

MATH = {"positive_prompts": ["add 12 and 30", "what is 7 times 8"], "negative_prompts": ["the cat sat"]}
LANG = {"positive_prompts": ["the cat sat on the mat", "write a story"]}
CODE = {"positive_prompts": ["def f(x): return x"]}


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_llamas")
    base = make_tiny_llama(root / "base", seed=0)
    out = {"base": base}
    for seed, name in enumerate(("a", "b", "c"), start=1):
        out[name] = make_tiny_llama(root / name, seed=seed, base=base, noise=0.05)
    return out


def _tiny_qwen(path: Path, model_type: str, *, seed: int, base: Path | None = None) -> Path:
    """A tiny float32 Qwen2/Qwen3 folder with a tokenizer (the base plus seeded noise when ``base``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                               tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    cfg.architectures = [type(cfg).__name__.replace("Config", "ForCausalLM")]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if base is not None:
        gen = torch.Generator().manual_seed(seed)
        ref = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
        with torch.no_grad():
            for name, p in model.state_dict().items():
                p.copy_(ref[name] + 0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(path)
    _tiny_tokenizer(64).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwens(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe_qwens")
    out = {}
    for kind in ("qwen2", "qwen3"):
        base = _tiny_qwen(root / f"{kind}_base", kind, seed=0)
        out[f"{kind}_base"] = base
        for seed, name in enumerate(("a", "b", "c"), start=1):
            out[f"{kind}_{name}"] = _tiny_qwen(root / f"{kind}_{name}", kind, seed=seed, base=base)
    return out


def _config(base: Path, experts: list[tuple[Path, dict]], **extra) -> dict:
    return {"base_model": str(base), "dtype": "float32", "experts_per_token": 2,
            "experts": [{"source_model": str(p), **prompts} for p, prompts in experts], **extra}


def _mergekit(data: dict, out: Path) -> Path:
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build

    build(MoEMergeConfig.model_validate(data), str(out), MergeOptions(device="cpu"), device="cpu")
    return out


def _evomerge(data: dict, folder: Path, out: Path) -> Path:
    path = folder / f"{out.name}.yml"
    path.write_text(yaml.safe_dump(data))
    cfg = MoEConfig.load(path)
    return write_moe(cfg, out, study_recipe=study_recipes(cfg))


def _live(path: Path) -> tuple[str, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return type(model).__name__, model.state_dict()


def _assert_same_model(ours: Path, theirs: Path, arch: str) -> None:
    name_a, a = _live(ours)
    name_b, b = _live(theirs)
    assert name_a == name_b == arch
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype == torch.float32, key
        assert torch.equal(a[key], b[key]), key
    cfg_a = json.loads((ours / "config.json").read_text())
    cfg_b = json.loads((theirs / "config.json").read_text())
    assert cfg_a == cfg_b


@pytest.mark.parametrize("mode", ["cheap_embed", "hidden"])
def test_mixtral_parity_with_mergekit(llamas, tmp_path, mode):
    data = _config(llamas["base"], [(llamas["a"], MATH), (llamas["b"], LANG), (llamas["c"], CODE)], gate_mode=mode)
    ours = _evomerge(data, tmp_path, tmp_path / "ours")
    theirs = _mergekit(data, tmp_path / "theirs")
    _assert_same_model(ours, theirs, "MixtralForCausalLM")


def test_qwen2_moe_parity_with_mergekit(qwens, tmp_path):
    # the shared expert is the base: mergekit-moe 0.1.5 opens only the base and the routed experts
    data = _config(qwens["qwen2_base"], [(qwens["qwen2_a"], MATH), (qwens["qwen2_b"], LANG)], gate_mode="hidden",
                   shared_experts=[{"source_model": str(qwens["qwen2_base"]), **CODE}])
    ours = _evomerge(data, tmp_path, tmp_path / "ours")
    theirs = _mergekit(data, tmp_path / "theirs")
    _assert_same_model(ours, theirs, "Qwen2MoeForCausalLM")


def test_qwen2_moe_from_llama_gets_zero_attention_bias(llamas, tmp_path):
    data = _config(llamas["base"], [(llamas["a"], MATH), (llamas["b"], LANG)], gate_mode="cheap_embed",
                   architecture="qwen", shared_experts=[{"source_model": str(llamas["base"]), **CODE}])
    ours = _evomerge(data, tmp_path, tmp_path / "ours")
    theirs = _mergekit(data, tmp_path / "theirs")
    _assert_same_model(ours, theirs, "Qwen2MoeForCausalLM")
    _, state = _live(ours)
    assert not state["model.layers.0.self_attn.q_proj.bias"].any()


def test_qwen3_moe_parity_with_mergekit(qwens, tmp_path):
    data = _config(qwens["qwen3_base"], [(qwens["qwen3_a"], MATH), (qwens["qwen3_b"], LANG), (qwens["qwen3_c"], CODE)],
                   gate_mode="cheap_embed")
    ours = _evomerge(data, tmp_path, tmp_path / "ours")
    theirs = _mergekit(data, tmp_path / "theirs")
    _assert_same_model(ours, theirs, "Qwen3MoeForCausalLM")


def test_cheap_embed_moe_loads_and_runs_in_transformers(llamas, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _config(llamas["base"], [(llamas["a"], MATH), (llamas["b"], LANG)], gate_mode="cheap_embed",
                   experts_per_token=1)
    out = _evomerge(data, tmp_path, tmp_path / "moe")
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.config.num_local_experts == 2 and model.config.num_experts_per_tok == 1
    ids = tok("add 1 and 2", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, ids.shape[1] + 4)
    # the MoE's routers are the unit prompt-embedding vectors, its experts the experts' MLPs
    state = model.state_dict()
    gate = state["model.layers.0.mlp.gate.weight"].double()
    torch.testing.assert_close(gate.norm(dim=-1), torch.ones(2, dtype=torch.float64))
    from safetensors.torch import load_file

    b = load_file(str(llamas["b"] / "model.safetensors"))
    assert torch.equal(state["model.layers.1.mlp.experts.down_proj"][1], b["model.layers.1.mlp.down_proj.weight"])


def test_random_gates_are_seeded(llamas, tmp_path):
    data = _config(llamas["base"], [(llamas["a"], {}), (llamas["b"], {})], gate_mode="random")
    gates = []
    for i, seed in enumerate((5, 5, 6)):
        _, state = _live(_evomerge({**data, "seed": seed}, tmp_path, tmp_path / f"r{i}"))
        gates.append(state["model.layers.1.mlp.gate.weight"])
    g = torch.Generator().manual_seed(5)
    expected = torch.randn((2, 2, 32), generator=g)[1]  # (layers, experts, hidden): layer 1
    assert torch.equal(gates[0], expected) and torch.equal(gates[0], gates[1])
    assert not torch.equal(gates[0], gates[2])


def _bad_cases(llamas, qwens):
    two = [(llamas["a"], MATH), (llamas["b"], LANG)]
    return {
        "mixed architectures": (_config(llamas["base"], [(llamas["a"], MATH), (qwens["qwen3_a"], LANG)],
                                        gate_mode="cheap_embed"), "one architecture"),
        "no prompts (hidden)": (_config(llamas["base"], [(llamas["a"], MATH), (llamas["b"], {})]),
                                "experts[1].positive_prompts"),
        "no prompts (cheap_embed)": (_config(llamas["base"], [(llamas["a"], {}), (llamas["b"], LANG)],
                                             gate_mode="cheap_embed"), "experts[0].positive_prompts"),
        "too many per token": (_config(llamas["base"], two, experts_per_token=3), "experts_per_token"),
        "base no output takes": (_config(qwens["qwen3_base"], [(qwens["qwen3_a"], MATH), (qwens["qwen3_b"], LANG)],
                                         shared_experts=[{"source_model": str(qwens["qwen3_c"]), **CODE}]),
                                 "base_model: no MoE output takes qwen3"),
        "same prompts": (_config(llamas["base"], [(llamas["a"], MATH), (llamas["b"], MATH)]), "same prompts"),
        "unknown key": ({**_config(llamas["base"], two), "gate": "x"}, "gate"),
        "missing study": (_config(llamas["base"], [(llamas["a"], MATH), ("study:nope", LANG)]), "does not exist"),
    }


def test_bad_input_is_one_line_and_writes_nothing(llamas, qwens, tmp_path):
    for label, (data, expected) in _bad_cases(llamas, qwens).items():
        cfg = tmp_path / "bad.yml"
        cfg.write_text(yaml.safe_dump(data))
        out = tmp_path / "out"
        result = CliRunner().invoke(main, ["moe", str(cfg), str(out)])
        assert result.exit_code == 1, (label, result.output)
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], (label, result.output)
        assert not out.exists(), label
        assert [p.name for p in tmp_path.iterdir()] == ["bad.yml"], label


def test_expert_from_study_is_built_in_memory(llamas, tmp_path):
    recipe = Recipe.from_dict({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(llamas["a"]), "parameters": {"weight": 0.3}},
        {"model": str(llamas["b"]), "parameters": {"weight": 0.7}}]})
    (tmp_path / "runs").mkdir()
    study = optuna.create_study(study_name="ps1", storage=f"sqlite:///{tmp_path / 'runs' / 'ps1.db'}",
                                direction="maximize")
    other = recipe.model_copy(update={"models": list(reversed(recipe.models))})
    for value, r in ((0.5, other), (0.9, recipe)):
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={ATTR_RECIPE: r.to_dict()}))
    merged = merge_to_dir(recipe, tmp_path / "merged")
    experts = [("study:ps1", MATH), (llamas["c"], LANG)]
    via_study = _evomerge(_config(llamas["base"], experts, gate_mode="hidden"), tmp_path, tmp_path / "via_study")
    via_trial = _evomerge(_config(llamas["base"], [("study:ps1#1", MATH), (llamas["c"], LANG)], gate_mode="hidden"),
                          tmp_path, tmp_path / "via_trial")
    via_disk = _evomerge(_config(llamas["base"], [(merged, MATH), (llamas["c"], LANG)], gate_mode="hidden"),
                         tmp_path, tmp_path / "via_disk")
    _, a = _live(via_study)
    _, b = _live(via_trial)
    _, c = _live(via_disk)
    for key in c:
        assert torch.equal(a[key], c[key]) and torch.equal(b[key], c[key]), key
