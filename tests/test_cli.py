"""`evomerge merge` through the real CLI: a good recipe builds a model transformers runs; bad input
gets one clear line, exit code 1, no traceback and nothing written."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.recipe import Recipe


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


def test_merge_end_to_end_through_the_cli(tiny_models, tmp_path):
    recipe = write(tmp_path / "recipe.yml", f"""
        merge_method: dare_ties
        base_model: {tiny_models['base']}
        models:
          - model: {tiny_models['a']}
            parameters: {{weight: [0.3, 0.7], density: 0.6}}
          - model: {tiny_models['b']}
            parameters: {{weight: 0.5, density: [{{filter: mlp, value: 0.4}}, {{value: 0.8}}]}}
        dtype: bfloat16
        random_seed: 3
        """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("hello world", return_tensors="pt")
    generated = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 5
    assert next(model.parameters()).dtype == torch.bfloat16
    # the model card carries the recipe, which parses back to the same recipe
    card = (out / "README.md").read_text()
    embedded = card.split("```yaml\n")[1].split("```")[0]
    assert Recipe.from_dict(yaml.safe_load(embedded)) == Recipe.from_yaml(recipe)

    # rebuilding with the same seed gives the same bytes; --seed changes the DARE masks
    again = tmp_path / "again"
    assert CliRunner().invoke(main, ["merge", str(recipe), str(again)]).exit_code == 0
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()
    reseeded = tmp_path / "reseeded"
    assert CliRunner().invoke(main, ["merge", str(recipe), str(reseeded), "--seed", "4"]).exit_code == 0
    assert (out / "model.safetensors").read_bytes() != (reseeded / "model.safetensors").read_bytes()


BAD = [
    ("unknown method", "merge_method: frobnicate\nmodels: [{{model: {a}}}]\n", "merge_method: unknown method 'frobnicate'"),
    ("missing base", "merge_method: ties\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n", "base_model: merge_method ties needs a base model"),
    ("density", "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, density: 1.5}}}}]\n", "models.0.parameters.density: expected a value in (0, 1], got 1.5"),
    ("density zero", "merge_method: dare_linear\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, density: 0}}}}]\n", "density: expected a value in (0, 1]"),
    ("t", "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}]\nparameters: {{t: [0, 1.2]}}\n", "parameters.t: expected a value in [0, 1], got 1.2"),
    ("epsilon", "merge_method: della\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, density: 0.2, epsilon: 0.3}}}}]\n", "keep probabilities outside (0, 1)"),
    ("layer range", "merge_method: passthrough\nslices: [{{sources: [{{model: {a}, layer_range: [0, 5]}}]}}]\n", "layer_range: [0, 5] is out of bounds"),
    ("missing model", "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: /no/such/model, parameters: {{weight: 1}}}}]\n", "/no/such/model"),
    ("bin weights", "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: {binonly}, parameters: {{weight: 1}}}}]\n", "set EVOMERGE_ALLOW_PICKLE=1"),
    ("shapes", "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}, {{model: {wide}, parameters: {{weight: 1}}}}]\n", "tensor shapes differ"),
    ("missing weight", "merge_method: linear\nmodels: [{{model: {a}}}, {{model: {b}, parameters: {{weight: 1}}}}]\n", "weight: required by linear"),
    ("typo", "merge_method: ties\nbase_model: {base}\nmodels: [{{model: {a}, parameters: {{weight: 1, densty: 0.5}}}}]\n", "densty: not a parameter of ties"),
    ("unknown key", "merge_method: linear\nmodles: []\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\n", "modles: unknown key"),
    ("both", "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\nslices: [{{sources: [{{model: {a}, layer_range: [0, 1]}}]}}]\n", "exactly one of 'models' or 'slices'"),
    ("slerp count", "merge_method: slerp\nbase_model: {base}\nmodels: [{{model: {a}}}, {{model: {b}}}]\nparameters: {{t: 0.5}}\n", "slerp takes 1 model(s) besides the base model, got 2"),
    ("yaml", "merge_method: [linear\n", "not valid YAML"),
    ("dtype", "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\ndtype: float8\n", "dtype: expected one of"),
    ("lora", "merge_method: linear\nmodels: [{{model: '{a}+some/lora', parameters: {{weight: 1}}}}]\n", "some/lora: not a local folder and could not be fetched"),
    ("lora not adapter", "merge_method: linear\nmodels: [{{model: '{a}+{b}', parameters: {{weight: 1}}}}]\n", "not a PEFT adapter"),
    ("tokenizer source", "merge_method: linear\nmodels: [{{model: {a}, parameters: {{weight: 1}}}}]\ntokenizer_source: other\n", "tokenizer_source: 'other' is not one of the recipe's models"),
    ("two revisions", "merge_method: linear\nmodels: [{{model: 'org/m@a@b', parameters: {{weight: 1}}}}]\n", "more than one '@'"),
]


@pytest.mark.parametrize("case, text, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_one_clear_line(tiny_models, tmp_path_factory, case, text, message):
    from conftest import make_tiny_llama

    tmp = tmp_path_factory.mktemp("bad")
    binonly = tmp / "binonly"
    binonly.mkdir()
    (binonly / "config.json").write_text((Path(tiny_models["a"]) / "config.json").read_text())
    (binonly / "pytorch_model.bin").write_bytes(b"\0")
    wide = make_tiny_llama(tmp / "wide", seed=9, hidden=48) if case == "shapes" else tmp
    recipe = tmp / "recipe.yml"
    recipe.write_text(text.format(a=tiny_models["a"], b=tiny_models["b"], base=tiny_models["base"],
                                  binonly=binonly, wide=wide))
    out = tmp / "out"
    result = CliRunner().invoke(main, ["merge", str(recipe), str(out)])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()


def test_missing_recipe_file_and_existing_output(tiny_models, tmp_path):
    result = CliRunner().invoke(main, ["merge", str(tmp_path / "nope.yml"), str(tmp_path / "out")])
    assert result.exit_code == 1 and "nope.yml: recipe file not found" in result.stderr
    recipe = write(tmp_path / "r.yml", f"merge_method: linear\nmodels: [{{model: {tiny_models['a']}, parameters: {{weight: 1}}}}]\n")
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["merge", str(recipe), str(out)])
    assert result.exit_code == 1 and "not empty" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
    assert CliRunner().invoke(main, ["merge", str(recipe), str(out), "--overwrite"]).exit_code == 0
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()


def test_cuda_device_refused_cleanly_without_cuda(tiny_models, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    recipe = write(tmp_path / "r.yml", f"merge_method: linear\nmodels: [{{model: {tiny_models['a']}, parameters: {{weight: 1}}}}]\n")
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "o"), "--device", "cuda"])
    assert result.exit_code == 1 and "CUDA is not available" in result.stderr
