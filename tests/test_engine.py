"""The engine: recipes resolved per tensor as mergekit does, executed exactly, written loadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_state, make_tiny_llama

from evomerge.engine import all_finite, merge_in_memory, merge_to_dir, open_sources, plan_merge, tensor_seed
from evomerge.errors import CheckpointError, ConfigError, MergeError
from evomerge.methods import METHODS
from evomerge.methods.task_arithmetic import generalized_task_arithmetic
from evomerge.recipe import Recipe


@pytest.fixture(scope="module")
def four(tmp_path_factory) -> dict[str, Path]:
    """A 4-layer base and three fine-tunes (one of them sharded)."""
    root = tmp_path_factory.mktemp("four")
    base = make_tiny_llama(root / "base", seed=10, num_layers=4)
    return {
        "base": base,
        "a": make_tiny_llama(root / "a", seed=11, num_layers=4, base=base),
        "b": make_tiny_llama(root / "b", seed=12, num_layers=4, base=base, shards=3),
        "c": make_tiny_llama(root / "c", seed=13, num_layers=4, base=base),
    }


def recipe(data: dict) -> Recipe:
    return Recipe.from_dict(data)


def states(models: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    return {k: {n: t.double() for n, t in load_state(p).items()} for k, p in models.items()}


def test_linear_gradient_interpolates_across_layers_and_pre_post_use_t0(four):
    r = recipe({
        "merge_method": "linear",
        "models": [
            {"model": str(four["a"]), "parameters": {"weight": [0.0, 1.0]}},
            {"model": str(four["b"]), "parameters": {"weight": [1.0, 0.0]}},
        ],
        "dtype": "float32",
    })
    out = merge_in_memory(r)
    s = states(four)
    for layer in range(4):
        t = layer / 3  # mergekit: t = index / (num_layers - 1) within the slice
        name = f"model.layers.{layer}.mlp.down_proj.weight"
        expected = t * s["a"][name] + (1 - t) * s["b"][name]
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-6, atol=1e-7)
    # embeddings and the head are planned at t = 0: weight(a) = 0, weight(b) = 1
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(out[name].double(), s["b"][name], rtol=0, atol=0)


def test_filters_pick_values_per_tensor_name(four):
    r = recipe({
        "merge_method": "linear",
        "models": [
            {"model": str(four["a"]), "parameters": {"weight": [{"filter": "self_attn", "value": 1.0}, {"value": 0.0}]}},
            {"model": str(four["c"]), "parameters": {"weight": [{"filter": "self_attn", "value": 0.0}, {"value": 1.0}]}},
        ],
    })
    out = merge_in_memory(r)
    s = states(four)
    assert torch.equal(out["model.layers.2.self_attn.k_proj.weight"].double(), s["a"]["model.layers.2.self_attn.k_proj.weight"])
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"].double(), s["c"]["model.layers.2.mlp.up_proj.weight"])


def test_model_parameters_override_slice_and_global(four):
    r = recipe({
        "merge_method": "task_arithmetic",
        "base_model": str(four["base"]),
        "models": [
            {"model": str(four["a"]), "parameters": {"weight": 0.3}},
            {"model": str(four["b"])},
        ],
        "parameters": {"weight": 0.7, "lambda": 2.0},
    })
    out = merge_in_memory(r)
    s = states(four)
    name = "model.layers.1.self_attn.o_proj.weight"
    base = s["base"][name]
    expected = base + 2.0 * (0.3 * (s["a"][name] - base) + 0.7 * (s["b"][name] - base))
    torch.testing.assert_close(out[name].double(), expected, rtol=1e-6, atol=1e-7)


def test_engine_matches_method_function_for_ties(four):
    r = recipe({
        "merge_method": "ties",
        "base_model": str(four["base"]),
        "models": [
            {"model": str(four["a"]), "parameters": {"weight": 1.0, "density": 0.4}},
            {"model": str(four["c"]), "parameters": {"weight": 0.5, "density": 0.6}},
        ],
    })
    out = merge_in_memory(r)
    s = load_state(four["base"]), load_state(four["a"]), load_state(four["c"])
    name = "model.layers.3.mlp.gate_proj.weight"
    expected = generalized_task_arithmetic(
        s[0][name], [s[1][name], s[2][name]], weights=[1.0, 0.5], densities=[0.4, 0.6],
        sparsifier="magnitude", consensus="sum", normalize=True)
    assert torch.equal(out[name], expected)


def test_frankenmerge_slices_copy_layers_in_order(four, tmp_path):
    r = recipe({
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(four["a"]), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(four["c"]), "layer_range": [1, 4], "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]},
        ],
    })
    out_dir = merge_to_dir(r, tmp_path / "franken")
    out = load_state(out_dir)
    a, c = load_state(four["a"]), load_state(four["c"])
    assert json.loads((out_dir / "config.json").read_text())["num_hidden_layers"] == 6
    for out_layer, (src, src_layer) in enumerate([(a, 0), (a, 1), (a, 2), (c, 1), (c, 2), (c, 3)]):
        for suffix in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(out[f"model.layers.{out_layer}.{suffix}"], src[f"model.layers.{src_layer}.{suffix}"])
        scale = 0.5 if src is c else 1.0
        assert torch.equal(out[f"model.layers.{out_layer}.self_attn.o_proj.weight"],
                           src[f"model.layers.{src_layer}.self_attn.o_proj.weight"] * scale)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["lm_head.weight"], c["lm_head.weight"])

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out_dir)
    assert len(model.model.layers) == 6
    assert torch.isfinite(model(torch.tensor([[1, 5, 6, 7]])).logits).all()


def _dare(four, seed=None):
    data = {
        "merge_method": "dare_ties",
        "base_model": str(four["base"]),
        "models": [
            {"model": str(four["a"]), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": str(four["b"]), "parameters": {"weight": 0.4, "density": 0.5}},
        ],
    }
    if seed is not None:
        data["random_seed"] = seed
    return recipe(data)


def test_stochastic_merges_are_reproducible_and_ignore_global_rng(four):
    torch.manual_seed(1)
    first = merge_in_memory(_dare(four))
    torch.manual_seed(2)
    torch.rand(1000)
    second = merge_in_memory(_dare(four))
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = merge_in_memory(_dare(four, seed=7))
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(first[name], other[name])
    assert tensor_seed(0, name, 0) != tensor_seed(0, name, 1) != tensor_seed(1, name, 1)


def test_every_method_builds_a_loadable_model(four, tmp_path):
    from transformers import AutoModelForCausalLM

    base, a, b, c = (str(four[k]) for k in ("base", "a", "b", "c"))
    for name, method in METHODS.items():
        if name == "passthrough":
            data = {"slices": [{"sources": [{"model": a, "layer_range": [0, 4]}]}]}
        elif method.max_models == 1:
            data = {"base_model": base, "models": [{"model": base}, {"model": a}], "parameters": {"t": 0.3 if name == "slerp" else 0.01}}
        elif name == "nuslerp":
            data = {"base_model": base, "models": [{"model": a, "parameters": {"weight": 0.4}}, {"model": b, "parameters": {"weight": 0.6}}]}
        else:
            data = {"models": [{"model": m, "parameters": {"weight": 0.5, "density": 0.7}} for m in (a, b, c)]}
            if method.base != "unused":
                data["base_model"] = base
            data["models"] = [{"model": m["model"], "parameters": {k: v for k, v in m["parameters"].items() if method.param(k)}}
                              for m in data["models"]]
        if method.needs:  # data-aware: a few lines of calibration text
            (tmp_path / "cal.txt").write_text("one two three\nfour five six seven\n")
            data["calibration"] = {"data": str(tmp_path / "cal.txt"), "n": 2, "max_length": 16}
        out = merge_to_dir(recipe({"merge_method": name, **data}), tmp_path / name)
        model = AutoModelForCausalLM.from_pretrained(out)
        logits = model(torch.tensor([[1, 8, 9, 10]])).logits
        assert torch.isfinite(logits).all(), name
        assert name in (out / "README.md").read_text()


def test_out_dtype_and_tokenizer_source(four, tmp_path):
    tok_dir = make_tiny_llama(tmp_path / "tok", seed=3, num_layers=4, vocab=64)
    (tok_dir / "tokenizer_config.json").write_text(
        (tok_dir / "tokenizer_config.json").read_text().replace('"model_max_length": 128', '"model_max_length": 77'))
    r = recipe({
        "merge_method": "linear",
        "models": [{"model": str(four["a"]), "parameters": {"weight": 1}}, {"model": str(tok_dir), "parameters": {"weight": 1}}],
        "out_dtype": "bfloat16",
        "tokenizer_source": str(tok_dir),
    })
    out = merge_to_dir(r, tmp_path / "bf16")
    assert {t.dtype for t in load_state(out).values()} == {torch.bfloat16}
    assert '"model_max_length": 77' in (out / "tokenizer_config.json").read_text()


def test_vocab_size_mismatch_truncates_embeddings(four, tmp_path):
    big = make_tiny_llama(tmp_path / "big", seed=4, num_layers=4, vocab=72, base=None)
    r = recipe({"merge_method": "linear", "models": [{"model": str(four["a"]), "parameters": {"weight": 1}},
                                                     {"model": str(big), "parameters": {"weight": 1}}]})
    out = merge_in_memory(r)
    assert out["model.embed_tokens.weight"].shape[0] == 64
    expected = (load_state(four["a"])["model.embed_tokens.weight"] + load_state(big)["model.embed_tokens.weight"][:64]) / 2
    torch.testing.assert_close(out["model.embed_tokens.weight"], expected)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"hidden": 48}, MergeError, "tensor shapes differ"),
])
def test_mismatched_models_are_refused_before_writing(four, tmp_path, kwargs, error, message):
    odd = make_tiny_llama(tmp_path / "odd", seed=5, num_layers=4, **kwargs)
    r = recipe({"merge_method": "linear", "models": [{"model": str(four["a"]), "parameters": {"weight": 1}},
                                                     {"model": str(odd), "parameters": {"weight": 1}}]})
    with pytest.raises(error, match=message):
        merge_to_dir(r, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_different_architectures_are_refused(four, tmp_path):
    other = make_tiny_llama(tmp_path / "mistralish", seed=6, num_layers=4)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (other / "config.json").write_text(json.dumps(cfg))
    r = recipe({"merge_method": "linear", "models": [{"model": str(four["a"]), "parameters": {"weight": 1}},
                                                     {"model": str(other), "parameters": {"weight": 1}}]})
    with pytest.raises(CheckpointError, match="different architectures"):
        open_sources(r)


def test_plan_errors(four):
    r = recipe({"merge_method": "passthrough", "slices": [{"sources": [{"model": str(four["a"]), "layer_range": [2, 6]}]}]})
    with pytest.raises(ConfigError, match=r"layer_range: \[2, 6\] is out of bounds .* has 4 layers"):
        plan_merge(r, open_sources(r))
    r = recipe({"merge_method": "della", "base_model": str(four["base"]),
                "models": [{"model": str(four["a"]), "parameters": {"weight": 1, "density": [0.5, 0.9], "epsilon": 0.15}}]})
    with pytest.raises(MergeError, match="keep probabilities outside"):
        plan_merge(r, open_sources(r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_sees_nan_and_inf_anywhere(dtype):
    x = torch.randn(1001, dtype=torch.float64).to(dtype)
    assert bool(all_finite(x)) and bool(all_finite(x[:0]))
    for index in (0, 500, 1000):
        for bad in (float("nan"), float("inf"), -float("inf")):
            y = x.clone()
            y[index] = bad
            assert not bool(all_finite(y)), (index, bad)
            assert not bool(all_finite(y.view(7, 143)))
