"""Shared test fixtures: tiny, deterministic Llama checkpoints built offline.

``make_tiny_llama`` writes a real ``LlamaForCausalLM`` folder (safetensors weights, config,
generation config and a character-level tokenizer). The session fixture ``tiny_models``
provides a base model and three "fine-tunes" of it (base + small seeded noise).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# statistics of data-aware methods (evomerge.statistics) are cached in a folder of this test
# session, not in ~/.cache, and removed when it ends
if "EVOMERGE_STATS_CACHE" not in os.environ:
    os.environ["EVOMERGE_STATS_CACHE"] = _stats_cache = tempfile.mkdtemp(prefix="evomerge-stats-")
    atexit.register(shutil.rmtree, _stats_cache, ignore_errors=True)

import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")
CHARS = " abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()\"ABCDEFGHIJKLMNOPQRSTUVWXYZ\n"
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def one_line_error(result, *needles: str) -> str:
    """A CliRunner result that failed with exactly one ``error:`` line (holding every needle), no traceback."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert result.exit_code == 1, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(autouse=True)
def _lm_eval_quiet_again():
    """`evomerge -v` turns lm-eval's logs and bars on for the process (LMEVAL_LOG_LEVEL): a test that
    runs the CLI with -v in-process must not leave them on for the tests after it."""
    before = os.environ.get("LMEVAL_LOG_LEVEL")
    yield
    if before is None:
        os.environ.pop("LMEVAL_LOG_LEVEL", None)
    else:
        os.environ["LMEVAL_LOG_LEVEL"] = before


def _tiny_tokenizer(vocab: int):
    """A character-level tokenizer of exactly ``vocab`` tokens (built offline)."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    if vocab < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab must be at least {len(SPECIAL_TOKENS) + 1}")
    symbols = list(SPECIAL_TOKENS) + list(CHARS)
    symbols += [f"<extra_{i}>" for i in range(vocab - len(symbols))]
    ids = {s: i for i, s in enumerate(symbols[:vocab])}
    tok = Tokenizer(models.BPE(vocab=ids, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", ids["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        model_max_length=128,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _state_dict(model: torch.nn.Module, *, seed: int, base: Path | None, noise: float) -> dict[str, torch.Tensor]:
    """Deterministic weights: seeded init, or the base model's weights plus seeded noise."""
    gen = torch.Generator().manual_seed(seed)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if base is not None:
        base_state = load_state(base)
        base_state.setdefault("lm_head.weight", base_state["model.embed_tokens.weight"])  # tied base
    for name in sorted(state):
        shape = state[name].shape
        if base is not None:
            state[name] = base_state[name] + noise * torch.randn(shape, generator=gen)
        elif name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[name] = 0.05 * torch.randn(shape, generator=gen)
    return state


def make_tiny_llama(
    path: Path,
    *,
    seed: int,
    num_layers: int = 2,
    hidden: int = 32,
    intermediate: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 64,
    base: Path | None = None,
    noise: float = 0.02,
    shards: int = 1,
    tie_embeddings: bool = False,
) -> Path:
    """Write a tiny float32 LlamaForCausalLM folder at ``path`` and return ``path``.

    Weights are a deterministic function of ``seed`` (or of ``base`` + ``noise`` * seeded
    gaussian noise). ``shards`` > 1 splits the weights into that many files plus an index.
    With ``tie_embeddings`` no ``lm_head.weight`` is stored.
    """
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=128,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    state = _state_dict(model, seed=seed, base=base, noise=noise)
    if tie_embeddings:
        state.pop("lm_head.weight", None)
    state = {k: v.to(torch.float32).contiguous() for k, v in state.items()}

    names = list(state)
    shards = max(1, min(shards, len(names)))
    if shards == 1:
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        per = -(-len(names) // shards)
        groups = [names[i * per : (i + 1) * per] for i in range(shards)]
        groups = [g for g in groups if g] or [names]
        for i, group in enumerate(groups):
            file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
            save_file({k: state[k] for k in group}, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(group, file))
        total = sum(t.nbytes for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(path)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=3).save_pretrained(path)
    _tiny_tokenizer(vocab).save_pretrained(path)
    return path


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors folder, for assertions in tests."""
    state: dict[str, torch.Tensor] = {}
    for file in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"base", "a", "b", "c"}: a tiny Llama and three fine-tunes of it (built once per session)."""
    root = tmp_path_factory.mktemp("tiny_models")
    base = make_tiny_llama(root / "base", seed=0)
    models = {"base": base}
    for seed, name in enumerate(("a", "b", "c"), start=1):
        models[name] = make_tiny_llama(root / name, seed=seed, base=base)
    return models


@pytest.fixture(scope="session")
def make_tiny_llama_factory():
    """The ``make_tiny_llama`` function, for tests that prefer a fixture over an import."""
    return make_tiny_llama


def write_mc_task(folder: Path, name: str, validation: Path, test: Path, metrics: tuple[str, ...] = ("acc",)) -> Path:
    """An lm-eval multiple-choice task YAML over local JSONL rows ``{q, choices, label}``."""
    metric_list = "".join(f"""
          - metric: {m}
            aggregation: mean
            higher_is_better: true""" for m in metrics)
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(f"""
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            validation: {validation}
            test: {test}
        output_type: multiple_choice
        validation_split: validation
        test_split: test
        doc_to_text: "{{{{q}}}} ="
        doc_to_target: label
        doc_to_choice: choices
        metric_list:{metric_list}
        """))
    return path

