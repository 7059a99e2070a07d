"""Tokenizers as mergekit builds them: tokenizer_source base | union | a model, and the tokenizer
block (per-token sources, zero rows, force, pad_to_multiple_of), on tiny Llamas with different
word-level vocabularies. mergekit 0.1.5 is the reference: same tokens, same rows per token, same
tensors. (mergekit numbers a union's new tokens in set/hash order, which changes from run to
run; rows are compared token by token.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import load_state, make_tiny_llama

from evomerge.cli import main
from evomerge.engine import merge_in_memory, prepare
from evomerge.errors import ConfigError, EvomergeError
from evomerge.recipe import Recipe

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
SPECIAL = "<|special_token|>"


def word_tokenizer(words: list[str], special: tuple[str, ...] = ()):
    """A whitespace word-level tokenizer over ``<unk> <s> </s> *words`` (+ special tokens), offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<unk>")
    if special:
        fast.add_special_tokens({"additional_special_tokens": list(special)})
    return fast


def make_vocab_llama(path: Path, words: list[str], *, seed: int, special: tuple[str, ...] = (),
                     base: Path | None = None) -> Path:
    """A tiny Llama whose vocabulary is ``words`` (see :func:`word_tokenizer`)."""
    tok = word_tokenizer(words, special)
    make_tiny_llama(path, seed=seed, vocab=len(tok), base=base)
    for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (path / file).unlink(missing_ok=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vocab_models(tmp_path_factory) -> dict[str, str]:
    """a (the base), b and c: three vocabularies that overlap in part. 'egg' is in b and c only (its
    rows are their mean), 'kiwi' in c only, the special token in b only."""
    root = tmp_path_factory.mktemp("vocab_models")
    return {
        "a": str(make_vocab_llama(root / "a", ["apple", "banana", "cherry", "date"], seed=1)),
        "b": str(make_vocab_llama(root / "b", ["banana", "egg", "fig", "apple", "grape"], seed=2, special=(SPECIAL,))),
        "c": str(make_vocab_llama(root / "c", ["egg", "cherry", "kiwi"], seed=3)),
    }


def _recipe(m: dict[str, str], weights=(0.5, 0.3, 0.2), **extra) -> dict:
    return {"merge_method": "linear", "base_model": m["a"], "dtype": "float32",
            "models": [{"model": m[k], "parameters": {"weight": w}} for k, w in zip("abc", weights)], **extra}


MODES = {
    "union": lambda m: {"tokenizer_source": "union"},
    "base": lambda m: {"tokenizer_source": "base"},
    "model": lambda m: {"tokenizer_source": m["b"]},
    "block": lambda m: {"tokenizer": {
        "source": "union",
        "tokens": {SPECIAL: {"source": m["b"], "force": True},  # b's row for every model
                   "zz": {"source": {"kind": "zero"}},  # a new token, zero rows
                   "kiwi": {"source": {"kind": "model_token", "model": m["a"], "token": "apple"}},
                   "fig": {"source": {"kind": "model_token", "model": m["c"], "token_id": 5}}},
        "pad_to_multiple_of": 8}},
}


def _mergekit(recipe: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(recipe), str(out), options=MergeOptions(quiet=True))
    return out


def _vocab(folder: Path) -> tuple[dict[str, int], set[str], int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    return tok.get_vocab(), set(tok.all_special_tokens), json.loads((folder / "config.json").read_text())["vocab_size"]


def _by_token(state: dict[str, torch.Tensor], vocab: dict[str, int]) -> dict[str, torch.Tensor]:
    """Vocabulary tensors with rows in token order (then padding rows); other tensors as they are."""
    order = torch.tensor([i for _, i in sorted(vocab.items())])
    out = dict(state)
    for name in VOCAB_TENSORS:
        t = state[name]
        out[name] = torch.cat([t[order], t[len(vocab):]])
    return out


@pytest.mark.parametrize("mode", list(MODES))
def test_same_vocabulary_and_tensors_as_mergekit(vocab_models, tmp_path, mode):
    recipe = _recipe(vocab_models, **MODES[mode](vocab_models))
    (tmp_path / "r.yml").write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "ours")])
    assert res.exit_code == 0, res.output
    theirs_dir = _mergekit(recipe, tmp_path / "mk")
    ours_vocab, ours_special, ours_size = _vocab(tmp_path / "ours")
    theirs_vocab, theirs_special, theirs_size = _vocab(theirs_dir)
    assert set(ours_vocab) == set(theirs_vocab) and ours_special == theirs_special and ours_size == theirs_size
    ours = _by_token(load_state(tmp_path / "ours"), ours_vocab)
    theirs = _by_token(load_state(theirs_dir), theirs_vocab)
    assert sorted(ours) == sorted(theirs)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("mode", ["union", "block"])
def test_each_models_vocabulary_rows_equal_mergekits_exactly(vocab_models, tmp_path, mode):
    """One-hot linear weights give each model's rows as they enter the merge: bit for bit."""
    for i, key in enumerate("abc"):
        weights = [1.0 if j == i else 0.0 for j in range(3)]
        recipe = _recipe(vocab_models, weights, **MODES[mode](vocab_models))
        theirs_dir = _mergekit(recipe, tmp_path / f"mk{key}")
        theirs = _by_token(load_state(theirs_dir), _vocab(theirs_dir)[0])
        ours_state = merge_in_memory(Recipe.from_dict(recipe))
        _, sources, vocab = prepare(Recipe.from_dict(recipe))
        for ck in sources.values():
            ck.close()
        ours = _by_token(ours_state, vocab.vocab)
        n = len(vocab.vocab)
        for name in VOCAB_TENSORS:
            assert torch.equal(ours[name][:n], theirs[name][:n]), (key, name)
            # padding rows are the mean of the rows, summed in id order (which mergekit shuffles from
            # run to run): summation-order rounding over ~12 float32 rows, a few ulps (rtol 1e-6)
            torch.testing.assert_close(ours[name][n:], theirs[name][n:], rtol=1e-6, atol=1e-8)


def test_union_vocabulary_known_answer(vocab_models):
    """The base's tokens keep their ids; new tokens follow in first-mention order, specials last."""
    plan, sources, vocab = prepare(Recipe.from_dict(_recipe(vocab_models, tokenizer_source="union")))
    try:
        ids = [t for t, _ in sorted(vocab.vocab.items(), key=lambda kv: kv[1])]
        assert ids == ["<unk>", "<s>", "</s>", "apple", "banana", "cherry", "date", "egg", "fig", "grape", "kiwi",
                       SPECIAL]
        assert plan.config["vocab_size"] == vocab.size == 12
        a, b, c = (sources[vocab_models[k]].get("model.embed_tokens.weight") for k in "abc")
        raw = {k: load_state(Path(vocab_models[k]))["model.embed_tokens.weight"] for k in "abc"}
        # egg: b's row 4 and c's row 3 -> their mean in every model lacking it (a); b and c keep theirs
        mean = (torch.zeros(32) + raw["b"][4] + raw["c"][3]) / 2
        assert torch.equal(a[7], mean) and torch.equal(b[7], raw["b"][4]) and torch.equal(c[7], raw["c"][3])
        # kiwi: only c has it -> c's row everywhere; apple: c lacks it -> the base's row
        assert torch.equal(a[10], raw["c"][5]) and torch.equal(c[3], raw["a"][3])
    finally:
        for ck in sources.values():
            ck.close()


def test_output_folder_carries_the_built_tokenizer(vocab_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    (tmp_path / "r.yml").write_text(yaml.safe_dump(_recipe(vocab_models, tokenizer_source="union")))
    assert CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")]).exit_code == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = tok("apple kiwi egg", return_tensors="pt")["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0].tolist()) == ["apple", "kiwi", "egg"]
    assert model.get_input_embeddings().weight.shape[0] == len(tok) == 12
    with torch.no_grad():
        assert bool(torch.isfinite(model(ids).logits).all())


# --------------------------------------------------------------------------- bad input
BAD = [
    ({"tokenizer_source": "nowhere"}, "tokenizer_source: 'nowhere' is not one of the recipe's models"),
    ({"tokenizer": {"source": "nowhere"}}, "tokenizer.source: 'nowhere' is not one of the recipe's models"),
    ({"tokenizer": {"tokens": {"x": {"source": "elsewhere"}}}},
     "tokenizer.tokens.x.source: 'elsewhere' is not one of the recipe's models"),
    ({"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "m", "token": "a", "token_id": 1}}}}},
     "give exactly one of token or token_id"),
    ({"tokenizer": {"pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
    ({"tokenizer_source": "union", "tokenizer": {"source": "union"}}, "either tokenizer_source or a tokenizer block"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[m for _, m in BAD])
def test_bad_tokenizer_settings_get_one_line(vocab_models, tmp_path, extra, message):
    (tmp_path / "r.yml").write_text(yaml.safe_dump(_recipe(vocab_models, **extra)))
    res = CliRunner().invoke(main, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out")])
    assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("tokens, message", [
    ({"kiwi": {"source": {"kind": "model_token", "model": "A", "token": "nope"}}}, "'nope' is not in"),
    ({"kiwi": {"force": True}}, "tokenizer.tokens.kiwi: some models lack this token; give it a source"),
    ({"kiwi": {"source": "A"}}, "has no token 'kiwi'"),
])
def test_token_sources_that_cannot_be_built_are_refused(vocab_models, tmp_path, tokens, message):
    tokens = json.loads(json.dumps(tokens).replace('"A"', json.dumps(vocab_models["a"])))
    recipe = Recipe.from_dict(_recipe(vocab_models, tokenizer={"tokens": tokens}))
    with pytest.raises(EvomergeError, match=message):
        merge_in_memory(recipe)


def test_recipe_round_trips_the_tokenizer_block(vocab_models):
    data = _recipe(vocab_models, **MODES["block"](vocab_models))
    recipe = Recipe.from_dict(data)
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())) == recipe
    with pytest.raises(ConfigError):
        Recipe.from_dict({**data, "tokenizer": {"source": "union", "colour": 1}})


# --------------------------------------------------------------------------- search
def test_search_over_models_with_different_vocabularies(vocab_models, tmp_path, tmp_path_factory):
    """Two sources with different vocabularies, tokenizer_source: union: the workspace builds the
    union once; the evaluated weights equal ``evomerge merge`` of the trial's recipe."""
    from conftest import write_mc_task

    from evomerge.config import SearchConfig
    from evomerge.search import run_search
    from evomerge.study import ATTR_RECIPE, load_existing_study
    from evomerge.workspace import Workspace

    task = tmp_path / "task"
    task.mkdir()
    rows = [{"q": "apple banana", "choices": ["egg", "kiwi"], "label": 0}, {"q": "cherry", "choices": ["fig", "date"], "label": 1}]
    for split in ("dev", "test"):
        (task / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_mc_task(task, "vocab_mc", task / "dev.jsonl", task / "test.jsonl")
    data = {"study": "v", "storage": f"sqlite:///{tmp_path / 'v.db'}", "base_model": vocab_models["a"],
            "models": {"b": vocab_models["b"], "c": vocab_models["c"]},
            "merge": {"method": "task_arithmetic", "search": {"weight": [0, 1]}, "tokenizer_source": "union"},
            "fitness": {"include_path": str(task), "tasks": [{"task": "vocab_mc", "metric": "acc"}]},
            "sampler": {"name": "random", "baselines": False}, "budget": {"trials": 2}}
    cfg = SearchConfig.from_dict(data)
    assert run_search(cfg, trials=2).completed == 2
    recipe = Recipe.from_dict(load_existing_study("v", cfg.storage_url).trials[1].user_attrs[ATTR_RECIPE])
    assert recipe.tokenizer_source == "union"

    ws = Workspace([vocab_models["b"], vocab_models["c"], vocab_models["a"]], template=vocab_models["a"],
                   tokenizer_source="union", base=vocab_models["a"])
    try:
        ws.load(recipe)
        live = ws.state_dict()
        assert len(ws.tokenizer) == 12 and ws.model.get_input_embeddings().weight.shape[0] == 12
        _, sources, vocab = prepare(recipe)
        for ck in sources.values():
            ck.close()
        assert ws.tokenizer.get_vocab() == vocab.vocab
    finally:
        ws.close()
    built = merge_in_memory(recipe)
    for name, tensor in built.items():
        assert torch.equal(live[name], tensor), name


def test_search_config_names_a_known_tokenizer_source(vocab_models):
    from evomerge.config import SearchConfig

    data = {"study": "v", "models": {"b": vocab_models["b"]}, "merge": {"method": "linear", "tokenizer_source": "zz"},
            "fitness": {"tasks": [{"task": "x"}]}}
    with pytest.raises(ConfigError, match="merge.tokenizer_source: 'zz' is not base, union or one of models"):
        SearchConfig.from_dict(data)
