"""Tests for evomerge.architectures and evomerge.checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_state, make_tiny_llama
from safetensors import safe_open

from evomerge.architectures import architecture_for, load_architectures
from evomerge.checkpoint import Checkpoint, CheckpointWriter
from evomerge.errors import CheckpointError, EvomergeError

# -- architectures -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "llama"),
        ({"architectures": ["MistralForCausalLM"], "model_type": "mistral"}, "mistral"),
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}, "qwen2"),
        ({"model_type": "mistral"}, "mistral"),  # no architectures: model_type decides
        ({"architectures": ["Qwen2ForCausalLM"], "model_type": "llama"}, "qwen2"),  # architectures[0] first
        ({"architectures": ["SomethingNew"], "model_type": "llama"}, "llama"),  # falls back to model_type
    ],
)
def test_architecture_for_matches(config: dict, expected: str) -> None:
    assert architecture_for(config).name == expected


def test_architecture_for_unknown_names_file_and_supported_list() -> None:
    with pytest.raises(CheckpointError) as info:
        architecture_for({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, source="/m/config.json")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("/m/config.json")
    assert "GPT2LMHeadModel" in message
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"):
        assert supported in message
    assert isinstance(info.value, EvomergeError)


def test_bundled_architectures_describe_the_tensors() -> None:
    archs = load_architectures()
    assert {"llama", "mistral", "qwen2"} <= set(archs)
    for arch in archs.values():
        assert [w.name for w in arch.pre_weights] == ["model.embed_tokens.weight"]
        assert arch.pre_weights[0].is_embed
        assert "model.norm.weight" in [w.name for w in arch.post_weights]
        lm_head = arch.post_weights[-1]
        assert lm_head.name == "lm_head.weight" and arch.tied_head() == lm_head
        assert lm_head.optional and lm_head.is_embed
        assert lm_head.tied_names == ("model.embed_tokens.weight",)
        assert arch.num_layers_key == "num_hidden_layers"
    llama = archs["llama"].layer_weights
    required = [w.name for w in llama if not w.optional]
    assert len(required) == 9 and not any(n.endswith(".bias") for n in required)
    assert all(w.name.endswith(".bias") for w in llama if w.optional)  # attention_bias / mlp_bias
    qwen = archs["qwen2"].layer_weight_names(0)
    assert {f"model.layers.0.self_attn.{p}_proj.bias" for p in "qkv"} <= set(qwen)
    assert len(qwen) == 12


def test_layer_templates_and_parsing() -> None:
    arch = load_architectures()["llama"]
    names = arch.layer_weight_names(3)
    assert names[0] == "model.layers.3.input_layernorm.weight"
    assert all(n.startswith("model.layers.3.") for n in names)
    assert "model.layers.3.mlp.down_proj.weight" in names
    assert arch.layer_index("model.layers.7.mlp.up_proj.weight") == 7
    assert arch.layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert arch.layer_index("model.norm.weight") is None
    assert arch.layer_index("lm_head.weight") is None
    assert arch.layer_index("model.layers.x.mlp.up_proj.weight") is None
    assert arch.with_layer_index("model.layers.7.mlp.up_proj.weight", 11) == "model.layers.11.mlp.up_proj.weight"
    assert arch.with_layer_index("model.layers.10.input_layernorm.weight", 1) == "model.layers.1.input_layernorm.weight"
    with pytest.raises(ValueError, match="model.norm.weight"):
        arch.with_layer_index("model.norm.weight", 1)
    spec = arch.find_spec("model.layers.5.self_attn.k_proj.weight")
    assert spec is not None and spec.name == "model.layers.${layer_index}.self_attn.k_proj.weight"


def test_num_layers_reads_config_and_rejects_bad_values() -> None:
    arch = load_architectures()["llama"]
    assert arch.num_layers({"num_hidden_layers": 32}) == 32
    with pytest.raises(CheckpointError, match="num_hidden_layers"):
        arch.num_layers({}, source="x/config.json")
    with pytest.raises(CheckpointError, match="x/config.json"):
        arch.num_layers({"num_hidden_layers": "32"}, source="x/config.json")


# -- Checkpoint ----------------------------------------------------------------------------


def test_open_single_file(tiny_models: dict[str, Path]) -> None:
    path = tiny_models["a"]
    expected = load_state(path)
    with Checkpoint.open(path) as ckpt:
        assert ckpt.path == path and ckpt.ref == str(path)
        assert ckpt.arch.name == "llama"
        assert ckpt.num_layers == 2
        assert ckpt.config["hidden_size"] == 32
        assert ckpt.tensor_names() == sorted(expected)
        name = "model.layers.1.mlp.up_proj.weight"
        assert ckpt.has(name) and not ckpt.has("nope.weight")
        assert ckpt.shape(name) == (64, 32)
        assert ckpt.dtype(name) == torch.float32
        assert torch.equal(ckpt.get(name), expected[name])
        half = ckpt.get(name, dtype=torch.bfloat16)
        assert half.dtype == torch.bfloat16 and torch.equal(half, expected[name].to(torch.bfloat16))
        # every architecture weight of the model is present
        for spec in ckpt.arch.all_weights(ckpt.num_layers):
            assert spec.optional or ckpt.has(spec.name), spec.name


def test_open_sharded_matches_single_file(tmp_path: Path) -> None:
    single = make_tiny_llama(tmp_path / "single", seed=7)
    sharded = make_tiny_llama(tmp_path / "sharded", seed=7, shards=3)
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    with Checkpoint.open(single) as one, Checkpoint.open(sharded) as many:
        assert one.tensor_names() == many.tensor_names()
        for name in many.tensor_names():
            assert many.shape(name) == one.shape(name)
            assert torch.equal(many.get(name), one.get(name)), name
        assert len(many._handles) == 3  # one cached handle per shard
    assert many._handles == {}  # closed by the context manager


def test_tied_lm_head_falls_back_to_embeddings(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "tied", seed=3, tie_embeddings=True)
    with Checkpoint.open(path) as ckpt:
        assert not ckpt.has("lm_head.weight")
        embed = ckpt.get("model.embed_tokens.weight")
        assert torch.equal(ckpt.get("lm_head.weight"), embed)
        assert ckpt.shape("lm_head.weight") == (64, 32)
        assert ckpt.dtype("lm_head.weight") == torch.float32
        with pytest.raises(CheckpointError, match="model.norm.bias"):
            ckpt.get("model.norm.bias")  # untied names get no fallback


def test_open_errors_are_one_line_and_name_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def error(ref: str | Path) -> str:
        with pytest.raises(CheckpointError) as info:
            Checkpoint.open(ref)
        assert "\n" not in str(info.value)
        return str(info.value)

    missing = tmp_path / "missing"
    assert str(missing) in error(missing) and "does not exist" in error(missing)

    empty = tmp_path / "empty"
    empty.mkdir()
    assert str(empty) in error(empty) and "config.json" in error(empty)

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    torch.save({"w": torch.zeros(1)}, legacy / "pytorch_model.bin")
    message = error(legacy)
    assert str(legacy) in message and "safetensors" in message and "pytorch_model.bin" in message

    no_weights = tmp_path / "noweights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "model.safetensors" in error(no_weights)

    unsupported = tmp_path / "gpt2"
    unsupported.mkdir()
    (unsupported / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    assert str(unsupported / "config.json") in error(unsupported)

    monkeypatch.chdir(tmp_path)  # "org/name" is no local folder here and the hub is offline
    assert "org/name" in error("org/name") and "Hub" in error("org/name")


def test_missing_tensor_names_tensor_and_folder(tiny_models: dict[str, Path]) -> None:
    with Checkpoint.open(tiny_models["base"]) as ckpt:
        with pytest.raises(CheckpointError) as info:
            ckpt.get("model.layers.9.mlp.up_proj.weight")
        assert "model.layers.9.mlp.up_proj.weight" in str(info.value)
        assert str(tiny_models["base"]) in str(info.value)
        with pytest.raises(CheckpointError, match="model.layers.9"):
            ckpt.shape("model.layers.9.mlp.up_proj.weight")


def test_index_with_missing_shard_is_refused(tmp_path: Path) -> None:
    path = make_tiny_llama(tmp_path / "m", seed=1, shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors"):
        Checkpoint.open(path)


# -- CheckpointWriter ----------------------------------------------------------------------


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _logits(path: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 12, 40, 2, 7]])).logits


def test_writer_sharded_round_trip(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    src = tiny_models["b"]
    out = tmp_path / "merged"
    with Checkpoint.open(src) as ckpt:
        names = ckpt.tensor_names()
        total = sum(ckpt.get(n).nbytes for n in names)
        with CheckpointWriter(
            out, config=ckpt.config, tokenizer_source=ckpt.path, model_card="# merged\n", max_shard_bytes=total // 4
        ) as writer:
            for name in names:
                writer.add(name, ckpt.get(name))
            assert not out.exists()  # nothing visible until close
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) >= 4 and "model.safetensors" not in files
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == total
    assert set(index["weight_map"]) == set(names)
    for shard in shards:
        with safe_open(str(out / shard), framework="pt") as handle:
            assert set(handle.keys()) == {n for n, f in index["weight_map"].items() if f == shard}
    for extra in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "README.md"):
        assert extra in files, extra
    assert (out / "README.md").read_text() == "# merged\n"
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "float32" and config["num_hidden_layers"] == 2
    assert torch.equal(_logits(out), _logits(src))
    assert _leftovers(out) == []
    with Checkpoint.open(out) as merged:
        assert merged.tensor_names() == names


def test_writer_single_file_dtype_and_shared_tensors(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "single"
    with Checkpoint.open(tiny_models["a"]) as ckpt:
        embed = ckpt.get("model.embed_tokens.weight", dtype=torch.bfloat16)
        with CheckpointWriter(out, config=ckpt.config, tokenizer_source=None) as writer:
            writer.add("model.embed_tokens.weight", embed)
            writer.add("lm_head.weight", embed)  # same storage twice
            writer.add("model.norm.weight", embed[0])  # a view into it
            writer.add("transposed", embed.t())  # non-contiguous
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    state = load_state(out)
    assert torch.equal(state["lm_head.weight"], embed)
    assert torch.equal(state["model.norm.weight"], embed[0])
    assert torch.equal(state["transposed"], embed.t())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_writer_exception_leaves_nothing(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="boom"):
        with CheckpointWriter(out, config={"model_type": "llama"}, tokenizer_source=None, max_shard_bytes=16) as w:
            w.add("a", torch.zeros(8))
            w.add("b", torch.zeros(8))  # forces a shard onto disk
            assert len(list(w.tmp_dir.iterdir())) == 1
            raise RuntimeError("boom")
    assert not out.exists()
    assert _leftovers(out) == []


def test_writer_refuses_non_empty_out_dir(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not empty"):
        CheckpointWriter(out, config={}, tokenizer_source=None)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert _leftovers(out) == []


def test_writer_overwrite_replaces_and_empty_dir_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with CheckpointWriter(out, config={"a": 1}, tokenizer_source=None, overwrite=True) as writer:
        writer.add("w", torch.ones(3))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_state(out)["w"], torch.ones(3))
    assert _leftovers(out) == []

    empty = tmp_path / "empty"
    empty.mkdir()
    with CheckpointWriter(empty, config={}, tokenizer_source=None) as writer:
        writer.add("w", torch.zeros(2))
    assert (empty / "model.safetensors").is_file()


def test_writer_misuse_errors(tmp_path: Path) -> None:
    out = tmp_path / "m"
    writer = CheckpointWriter(out, config={}, tokenizer_source=None)
    writer.add("w", torch.zeros(2))
    with pytest.raises(CheckpointError, match="'w' was added twice"):
        writer.add("w", torch.zeros(2))
    writer.abort()
    assert not out.exists() and _leftovers(out) == []

    nothing = CheckpointWriter(out, config={}, tokenizer_source=None)
    with pytest.raises(CheckpointError, match="no tensors"):
        nothing.close()
    assert not out.exists() and _leftovers(out) == []

    with pytest.raises(CheckpointError, match="tokenizer source"):
        CheckpointWriter(out, config={}, tokenizer_source=tmp_path / "nope")
