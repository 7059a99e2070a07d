"""Model references: org/model@revision, model+lora (PEFT, float32, same tensors as mergekit), and
pickle weights behind EVOMERGE_ALLOW_PICKLE=1."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import load_state

from evomerge.cli import main
from evomerge.engine import merge_in_memory
from evomerge.errors import CheckpointError, ConfigError
from evomerge.recipe import Recipe
from evomerge.sources import ALLOW_PICKLE_ENV, ModelRef, open_model, parse_reference


@pytest.mark.parametrize("text, ref", [
    ("org/model", ModelRef("org/model")),
    ("org/model@v1.0", ModelRef("org/model", "v1.0")),
    ("org/model+org/adapter", ModelRef("org/model", None, "org/adapter")),
    ("org/model@main+org/adapter@abc123", ModelRef("org/model", "main", "org/adapter", "abc123")),
])
def test_references_parse(text, ref):
    assert parse_reference(text) == ref


@pytest.mark.parametrize("text, message", [
    ("a@b@c", "more than one '@'"), ("a+b+c", "more than one '+'"), ("a+", "both parts"), ("@rev", "both parts"),
])
def test_malformed_references_get_one_line(text, message):
    with pytest.raises(ConfigError) as err:
        parse_reference(text)
    assert message in str(err.value)


def test_a_local_folder_with_at_or_plus_in_its_name_is_a_folder(tiny_models, tmp_path):
    odd = tmp_path / "my@model+v2"
    odd.symlink_to(tiny_models["a"], target_is_directory=True)
    assert parse_reference(str(odd)) == ModelRef(str(odd))
    assert open_model(str(odd)).has("model.norm.weight")
    ref = parse_reference("my@model+v2", relative_to=tmp_path)
    assert ref == ModelRef(str(odd))


def test_revision_is_passed_to_the_hub_download(tiny_models, monkeypatch):
    import huggingface_hub

    calls = []

    def fake(repo, revision=None, **kwargs):
        calls.append((repo, revision))
        return str(tiny_models["a"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    ck = open_model("someorg/tiny@0123abc")
    assert calls == [("someorg/tiny", "0123abc")] and ck.ref == "someorg/tiny@0123abc"
    assert torch.equal(ck.get("model.norm.weight"), load_state(tiny_models["a"])["model.norm.weight"])


# --------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def adapter(tiny_models, tmp_path_factory) -> Path:
    """A rank-4 LoRA on q/v/down projections of model a, randomly initialised (so it changes them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["a"], dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter") / "lora"
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def test_lora_reference_equals_mergekit(tiny_models, adapter, tmp_path):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": f"{tiny_models['a']}+{adapter}", "parameters": {"weight": 0.6}},
                         {"model": str(tiny_models["b"]), "parameters": {"weight": 0.4}}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "ours")])
    assert res.exit_code == 0, res.output
    run_merge(MergeConfiguration.model_validate(recipe), str(tmp_path / "mk"),
              options=MergeOptions(quiet=True, lora_merge_cache=str(tmp_path / "cache"), copy_tokenizer=False))
    ours, theirs = load_state(tmp_path / "ours"), load_state(tmp_path / "mk")
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    # the adapter did change the projections it targets
    plain = load_state(tiny_models["a"])
    applied = open_model(f"{tiny_models['a']}+{adapter}")
    assert not torch.equal(applied.get("model.layers.0.self_attn.q_proj.weight"), plain["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(applied.get("model.layers.0.self_attn.k_proj.weight"), plain["model.layers.0.self_attn.k_proj.weight"])


def test_a_lora_path_that_is_not_an_adapter_gets_one_line(tiny_models, tmp_path):
    recipe = {"merge_method": "linear", "models": [{"model": f"{tiny_models['a']}+{tiny_models['b']}",
                                                     "parameters": {"weight": 1.0}}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")])
    assert res.exit_code != 0 and "not a PEFT adapter (no adapter_config.json)" in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="LoRA adapter folder .* does not exist"):
        open_model(f"{tiny_models['a']}+{tmp_path / 'missing'}")


# --------------------------------------------------------------------------- pickle weights
@pytest.fixture()
def pickled(tiny_models, tmp_path) -> Path:
    folder = tmp_path / "pickled"
    folder.mkdir()
    for file in Path(tiny_models["a"]).iterdir():
        if file.suffix != ".safetensors":
            (folder / file.name).write_bytes(file.read_bytes())
    torch.save(load_state(tiny_models["a"]), folder / "pytorch_model.bin")
    return folder


def test_pickle_weights_need_the_opt_in(tiny_models, pickled, tmp_path, monkeypatch):
    monkeypatch.delenv(ALLOW_PICKLE_ENV, raising=False)
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(pickled), "parameters": {"weight": 0.5}},
                         {"model": str(tiny_models["b"]), "parameters": {"weight": 0.5}}]}
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")])
    assert res.exit_code != 0 and f"set {ALLOW_PICKLE_ENV}=1" in res.output
    assert len(res.output.strip().splitlines()) == 1

    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    from_pickle = merge_in_memory(Recipe.from_dict(recipe))
    same = merge_in_memory(Recipe.from_dict({**recipe, "models": [{**recipe["models"][0], "model": str(tiny_models["a"])},
                                                                  recipe["models"][1]]}))
    assert all(torch.equal(from_pickle[k], same[k]) for k in same)


class Payload:
    """An arbitrary object in a pickle: torch.load(weights_only=True) must refuse to build it."""


def test_pickle_with_code_is_refused_even_with_the_opt_in(pickled, monkeypatch):
    monkeypatch.setenv(ALLOW_PICKLE_ENV, "1")
    torch.save({"w": Payload()}, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        open_model(str(pickled))
