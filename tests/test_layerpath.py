"""Layer-path models: shells sharing source parameters, per-hop KV cache, input scales, export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_state, make_tiny_llama

from evomerge.engine import merge_in_memory
from evomerge.errors import ConfigError
from evomerge.layerpath import (
    MODELING_FILE,
    Hop,
    LayerPathModel,
    SourceLayer,
    annotated_yaml,
    passthrough_recipe,
)
from evomerge.recipe import Recipe

IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 12, 40]])


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one intra-op thread avoids OpenMP spin contention on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Two 4-layer tiny Llamas; b is a fine-tune of a with large enough noise to differ clearly."""
    root = tmp_path_factory.mktemp("layerpath")
    a = make_tiny_llama(root / "a", seed=21, num_layers=4)
    b = make_tiny_llama(root / "b", seed=22, num_layers=4, base=a, noise=0.05)
    return {"a": a, "b": b}


@pytest.fixture()
def lp(models) -> LayerPathModel:
    return LayerPathModel(dict(models), host="a")


def load(folder: Path, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kwargs).eval()


@torch.no_grad()
def logits(model, ids=IDS, **kwargs) -> torch.Tensor:
    return model(ids, **kwargs).logits


@torch.no_grad()
def generate(model, use_cache: bool, ids=IDS) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                          use_cache=use_cache, pad_token_id=3)


def copied_model(models: dict[str, Path], layers: list[tuple[str, int]], host: str = "a"):
    """The reference: a fresh LlamaForCausalLM whose layers are copied from the files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    states = {k: load_state(p) for k, p in models.items()}
    state = {k: v for k, v in states[host].items() if not k.startswith("model.layers.")}
    for pos, (m, i) in enumerate(layers):
        prefix = f"model.layers.{i}."
        for k, v in states[m].items():
            if k.startswith(prefix):
                state[f"model.layers.{pos}.{k[len(prefix):]}"] = v.clone()
    config = LlamaConfig.from_pretrained(str(models[host]))
    config.num_hidden_layers = len(layers)
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return model, state


def test_sources_and_default_path_reproduce_the_host_exactly(models, lp):
    assert lp.sources == [SourceLayer("a", i) for i in range(4)] + [SourceLayer("b", i) for i in range(4)]
    assert lp.path() == [Hop(i) for i in range(4)]
    assert lp.tokenizer is not None and lp.tokenizer("ab")["input_ids"][0] == 1
    ref = load(models["a"])
    assert torch.equal(logits(lp.model), logits(ref))
    lp.set_path([Hop(i, 1.0) for i in range(4)])
    assert torch.equal(logits(lp.model), logits(ref))
    lp.restore()
    assert len(lp.model.model.layers) == 4 and torch.equal(logits(lp.model), logits(ref))


def test_mixed_path_equals_model_with_copied_layers(models, lp):
    path = [(0, 1.0), (5, 1.0), (6, 1.0), (3, 1.0), (7, 1.0)]  # a0 b1 b2 a3 b3
    lp.set_path(path)
    assert lp.describe() == "a:0 b:1 b:2 a:3 b:3"
    ref, state = copied_model(models, [("a", 0), ("b", 1), ("b", 2), ("a", 3), ("b", 3)])
    assert torch.equal(logits(lp.model), logits(ref))
    mat = lp.state_dict_materialized()
    assert mat.keys() == state.keys()
    assert all(torch.equal(mat[k], state[k]) for k in state)
    # a copy: changing it leaves the sources alone
    mat["model.layers.0.mlp.up_proj.weight"].zero_()
    assert torch.equal(logits(lp.model), logits(ref))


def test_repeated_layers_have_their_own_kv_cache_and_match_the_export(models, lp, tmp_path):
    lp.set_path([0, 1, 1, 2, 0, 3])
    assert [sh.self_attn.layer_idx for sh in lp.model.model.layers] == list(range(6))
    assert lp.model.config.num_hidden_layers == 6
    with torch.no_grad():
        out = lp.model(IDS, use_cache=True)
    assert len(out.past_key_values.layers) == 6
    with torch.no_grad():
        assert len(lp.model(IDS, output_hidden_states=True).hidden_states) == 7
        lp.set_path([0, 1, 1, 2, 0, 3, 3])  # output-capturing hooks are reinstalled on the new shells
        assert len(lp.model(IDS, output_hidden_states=True).hidden_states) == 8
        lp.set_path([0, 1, 1, 2, 0, 3])
    cached, uncached = generate(lp.model, True), generate(lp.model, False)
    assert torch.equal(cached, uncached)
    ref, _ = copied_model(models, [("a", 0), ("a", 1), ("a", 1), ("a", 2), ("a", 0), ("a", 3)])
    assert torch.equal(logits(lp.model), logits(ref))

    out_dir = lp.export(tmp_path / "path6")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 6 and config["architectures"] == ["LlamaForCausalLM"]
    assert "input_scales" not in config and "auto_map" not in config
    assert not (out_dir / MODELING_FILE).exists()
    assert (out_dir / "tokenizer.json").is_file() and (out_dir / "generation_config.json").is_file()
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    assert torch.equal(logits(plain), logits(lp.model))
    assert torch.equal(generate(plain, True), cached)
    assert load_state(out_dir).keys() == lp.state_dict_materialized().keys()


def test_scaled_path_applies_scales_and_exports_with_remote_code(models, lp, tmp_path):
    # scale on the first hop only == feeding scaled embeddings to a model with those layers
    lp.set_path([Hop(0, 0.5), Hop(5), Hop(2)])
    ref, _ = copied_model(models, [("a", 0), ("b", 1), ("a", 2)])
    with torch.no_grad():
        expected = ref(inputs_embeds=ref.get_input_embeddings()(IDS) * 0.5).logits
    assert torch.equal(logits(lp.model), expected)

    hops = [Hop(0), Hop(5, 0.7), Hop(1, 1.3), Hop(1), Hop(3, 0.9)]
    lp.set_path(hops)
    scaled = logits(lp.model)
    lp.set_path([Hop(h.layer) for h in hops])
    assert not torch.allclose(scaled, logits(lp.model))  # the scales do something
    lp.set_path(hops)
    assert torch.equal(generate(lp.model, True), generate(lp.model, False))

    out_dir = lp.export(tmp_path / "scaled")
    config = json.loads((out_dir / "config.json").read_text())
    assert config["input_scales"] == [1.0, 0.7, 1.3, 1.0, 0.9]
    assert config["auto_map"] == {"AutoModelForCausalLM": "modeling_evopath.EvoPathLlamaForCausalLM"}
    assert config["architectures"] == ["EvoPathLlamaForCausalLM"] and config["num_hidden_layers"] == 5
    source = (out_dir / MODELING_FILE).read_text()
    assert "evomerge" not in source.split('"""', 2)[2]  # self-contained: no evomerge import
    assert "trust_remote_code=True" in (out_dir / "README.md").read_text()
    remote = load(out_dir, trust_remote_code=True)
    assert type(remote).__name__ == "EvoPathLlamaForCausalLM"
    assert torch.equal(logits(remote), scaled)
    assert torch.equal(generate(remote, True), generate(lp.model, True))


def test_set_path_allocates_no_parameter_storage(models, lp):
    source_ptrs = {p.data_ptr() for layer in lp._layers for p in layer.parameters()}
    source_ptrs |= {p.data_ptr() for p in lp.model.parameters()}

    def unique_bytes() -> int:
        params = {p.data_ptr(): p.nbytes for p in lp.model.parameters()}
        assert set(params) <= source_ptrs
        return sum(params.values())

    lp.set_path([0, 5, 2, 7])
    small = unique_bytes()
    lp.set_path([i % 8 for i in range(32)])
    assert len(lp.model.model.layers) == 32
    assert unique_bytes() <= small + sum(p.nbytes for i in (1, 3, 4, 6) for p in lp._layers[i].parameters())
    lp.set_path([0, 5, 2, 7] * 8)
    assert unique_bytes() == small
    for shell, hop in zip(lp.model.model.layers, lp.path()):
        for (name, p), q in zip(shell.named_parameters(), lp._layers[hop.layer].parameters()):
            assert p is q, name  # the very same Parameter objects
    assert all(sh is not lp._layers[h.layer] for sh, h in zip(lp.model.model.layers, lp.path()))


def test_set_path_repeatedly_with_different_lengths(models, lp):
    paths = [[4, 5, 6], [0, 1, 5, 5, 6, 2, 3], [7, 0], [0, 1, 2, 3]]
    for path in paths:
        lp.set_path(path)
        layers = [(lp.sources[i].model, lp.sources[i].index) for i in path]
        ref, _ = copied_model(models, layers)
        assert len(lp.model.model.layers) == lp.model.config.num_hidden_layers == len(path)
        assert torch.equal(logits(lp.model), logits(ref)), path
        assert torch.equal(generate(lp.model, True), generate(lp.model, False)), path
    assert torch.equal(logits(lp.model), logits(load(models["a"])))


def test_in_memory_source_is_shared_not_copied(models, tmp_path):
    """A merged model that exists only in memory (e.g. a parameter-space merge) as host and source."""
    a, b = load(models["a"]), load(models["b"])
    merged = load(models["a"])
    with torch.no_grad():
        for (_, pm), pa, pb in zip(merged.named_parameters(), a.parameters(), b.parameters()):
            pm.copy_((pa + pb) / 2)
    merged_ptrs = {p.data_ptr() for p in merged.parameters()}
    before = logits(merged)
    with torch.no_grad():
        assert len(merged(IDS, output_hidden_states=True).hidden_states) == 5  # hooks on the original layers
    lp = LayerPathModel({"merged": merged, "b": models["b"]}, host="merged")
    assert lp.model is merged and lp.tokenizer is None and len(lp.sources) == 8
    lp.set_path([0, 4, 1, 1, 7])
    assert {p.data_ptr() for p in lp.model.model.layers[:4].parameters()} <= merged_ptrs | {
        p.data_ptr() for p in lp._layers[4].parameters()}
    with torch.no_grad():
        assert len(merged(IDS, output_hidden_states=True).hidden_states) == 6
    out = lp.export(tmp_path / "mem")
    assert (out / "generation_config.json").is_file()
    assert torch.equal(logits(load(out)), logits(lp.model))
    lp.restore()
    assert torch.equal(logits(merged), before)
    with torch.no_grad():
        assert len(merged(IDS, output_hidden_states=True).hidden_states) == 5


def test_tied_embeddings_host(tmp_path):
    tied = make_tiny_llama(tmp_path / "tied", seed=5, num_layers=3, tie_embeddings=True)
    lp = LayerPathModel({"t": tied}, host="t")
    lp.set_path([Hop(0), Hop(2), Hop(2), Hop(1)])
    mat = lp.state_dict_materialized()
    assert "lm_head.weight" not in mat and len([k for k in mat if k.endswith("q_proj.weight")]) == 4
    recipe, warnings = lp.passthrough_recipe({"t": str(tied)})
    assert warnings == [] and merge_in_memory(recipe).keys() == mat.keys()
    out = lp.export(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert torch.equal(logits(load(out)), logits(lp.model))


def test_passthrough_recipe_merges_runs_and_matches_the_engine(models, lp):
    hops = [Hop(i) for i in (0, 1, 5, 6, 6, 2, 3)]  # a0 a1 b1 b2 b2 a2 a3
    refs = {k: str(v) for k, v in models.items()}
    recipe, warnings = passthrough_recipe(hops, lp.sources, refs, host="a")
    assert warnings == []
    assert [(s.sources[0].model, s.sources[0].layer_range) for s in recipe.slices] == [
        (refs["a"], (0, 2)), (refs["b"], (1, 3)), (refs["b"], (2, 3)), (refs["a"], (2, 4))]
    assert recipe.merge_method == "passthrough" and recipe.tokenizer_source == refs["a"]
    lp.set_path(hops)
    merged = merge_in_memory(recipe)
    mat = lp.state_dict_materialized()
    assert merged.keys() == mat.keys()
    assert all(torch.equal(merged[k], mat[k]) for k in mat)
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


def test_passthrough_recipe_warns_about_what_mergekit_cannot_express(models, lp):
    refs = {k: str(v) for k, v in models.items()}
    hops = [Hop(4), Hop(1, 0.8), Hop(2), Hop(7, 1.2)]  # starts and ends in b, two scales
    lp.set_path(hops)
    recipe, warnings = lp.passthrough_recipe(refs)
    assert len(recipe.slices) == 3
    assert sum("input scale" in w for w in warnings) == 2
    assert any(w.startswith("embeddings") for w in warnings)
    assert any(w.startswith("final norm") for w in warnings)
    text = annotated_yaml(recipe, warnings, hops)
    assert "# input_scales (not applied by this recipe): [1.0, 0.8, 1.0, 1.2]" in text
    assert Recipe.from_dict(yaml.safe_load(text)) == recipe
    with pytest.raises(ConfigError, match="no reference"):
        passthrough_recipe(hops, lp.sources, {"a": refs["a"]})


def test_errors(models, lp, tmp_path):
    with pytest.raises(ConfigError, match="out of range"):
        lp.set_path([0, 8])
    with pytest.raises(ConfigError, match="at least one hop"):
        lp.set_path([])
    with pytest.raises(ConfigError, match="finite"):
        Hop(0, float("nan"))
    with pytest.raises(ConfigError, match="non-negative integer"):
        Hop(1.5)
    assert Hop(torch.tensor(3).numpy()[()], 2) == Hop(3, 2.0)  # numpy integers are fine
    with pytest.raises(ConfigError, match="host"):
        LayerPathModel(dict(models), host="c")
    wide = make_tiny_llama(tmp_path / "wide", seed=3, num_layers=2, hidden=48, heads=4, kv_heads=2)
    with pytest.raises(ConfigError, match="shapes"):
        LayerPathModel({"a": models["a"], "wide": wide}, host="a")
    assert lp.path() == [Hop(i) for i in range(4)]  # failed calls leave the path alone
