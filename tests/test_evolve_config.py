"""mergekit-evolve configs: written from the examples in mergekit's docs/evolve.md, read by
`evomerge search` (the mapping logged once) and written out by `evomerge convert`."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.evolve_config import is_evolve_config, load_native, load_search_config, to_native

# docs/evolve.md's "general syntax" example, with its placeholders filled by the tiny models
# (2 layers, so layer_granularity 1 rather than the doc's 8 for a 32-layer Mistral)
DOC_EXAMPLE = """\
genome:
    models:
       - {a}
       - {b}
       - {c}
    merge_method: dare_ties
    base_model: {base}
    tokenizer_source: null # optional
    layer_granularity: {granularity}

    # optional:
    normalize: false
    allow_negative_weights: {negative}
    smooth: false
tasks:
  - name: arc_easy
    weight: 1.0 # optional
    metric: "acc,none" # defaults to acc,none
  - name: gsm8k
    weight: 0.5
    metric: "exact_match,flexible-extract"
  - piqa
"""


def _write(tmp: Path, m: dict, name: str = "evolve.yml", **kw) -> Path:
    fill = {"granularity": 1, "negative": "false", **{k: str(v) for k, v in m.items()}, **kw}
    path = tmp / name
    path.write_text(DOC_EXAMPLE.format(**fill))
    return path


def test_doc_example_maps_with_the_same_meaning(tiny_models, tmp_path):
    native, lines = load_native(_write(tmp_path, tiny_models))
    assert native == {
        "study": "evolve",
        "base_model": str(tiny_models["base"]),
        "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"]), "c": str(tiny_models["c"])},
        "merge": {"method": "dare_ties", "search": {"weight": None, "density": None},
                  "fixed": {"normalize": False}, "layer_groups": 2},  # 2 layers / 1 per block
        "fitness": {"tasks": [
            {"task": "arc_easy", "metric": "acc", "weight": 1.0, "split": None},
            {"task": "gsm8k", "metric": "exact_match,flexible-extract", "weight": 0.5, "split": None},
            {"task": "piqa", "metric": "acc", "weight": 1.0, "split": None}],
            "apply_chat_template": True},
        "sampler": {"name": "cmaes"}, "budget": {"trials": 100}, "dtype": "bfloat16",
    }
    assert any("layer_granularity: 1 layers per block -> merge.layer_groups: 2" in ln for ln in lines)
    cfg = SearchConfig.from_dict(native, root=tmp_path)
    assert cfg.merge.layer_groups == 2 and cfg.fitness.tasks[1].weight == 0.5


def test_granularity_negative_weights_normalize_default_and_filters(tiny_models, tmp_path):
    whole = yaml.safe_load(_write(tmp_path, tiny_models, granularity=2, negative="true").read_text())
    native, _ = to_native(whole, study="s")
    assert native["merge"]["layer_groups"] == 1 and native["merge"]["search"]["weight"] == [-1.0, 1.0]
    whole["genome"].pop("normalize")
    whole["genome"]["layer_granularity"] = 0
    whole["genome"]["filters"] = ["self_attn"]
    native, _ = to_native(whole, study="s")
    assert native["merge"]["fixed"] == {"normalize": True}  # mergekit-evolve's default for dare_ties
    assert native["merge"]["split_attn_mlp"] is True and native["merge"]["layer_groups"] == 1


@pytest.mark.parametrize("edit, message", [
    ({"layer_granularity": 3}, "genome.layer_granularity: 3 does not divide the 2 layers"),
    ({"filters": ["self_attn", "mlp"]}, "genome.filters: only [self_attn]"),
    ({"smooth": True}, "genome.smooth"),
    ({"tokenizer_source": "union"}, "genome.tokenizer_source"),
    ({"merge_method": "della"}, "genome.merge_method: expected one of"),
    ({"mutation": 1}, "genome.mutation: not a mergekit-evolve genome key"),
])
def test_unmappable_fields_get_one_line(tiny_models, tmp_path, edit, message):
    data = yaml.safe_load(_write(tmp_path, tiny_models).read_text())
    data["genome"].update(edit)
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        load_native(path)
    result = CliRunner().invoke(main, ["search", str(path), "--dry-run"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_search_reads_it_and_logs_the_mapping_once(tiny_models, tmp_path, caplog):
    path = _write(tmp_path, tiny_models)
    assert is_evolve_config(yaml.safe_load(path.read_text()))
    with caplog.at_level(logging.INFO, logger="evomerge.evolve_config"):
        cfg = load_search_config(path, storage=f"sqlite:///{tmp_path / 'x.db'}")
    mapping = [r for r in caplog.records if "mergekit-evolve config" in r.getMessage()]
    assert len(mapping) == 1 and "merge.layer_groups: 2" in mapping[0].getMessage()
    assert cfg.study == "evolve" and cfg.sampler.name == "cmaes"


def test_convert_writes_a_native_config_that_loads_the_same(tiny_models, tmp_path):
    path = _write(tmp_path, tiny_models)
    out = tmp_path / "native.yml"
    result = CliRunner().invoke(main, ["convert", str(path), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output
    text = out.read_text()
    assert text.startswith("# converted by `evomerge convert`")
    assert SearchConfig.load(out) == load_search_config(path)
    # a native config is not an evolve config
    result = CliRunner().invoke(main, ["convert", str(out), "-o", str(tmp_path / "again.yml")])
    assert result.exit_code == 1 and "not a mergekit-evolve config" in result.stderr
