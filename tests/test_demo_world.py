"""The demo world: deterministic offline builds, loadable models, and lm-eval tasks with splits."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from evomerge.demo import MODEL_NAMES, build_world, data, write_task_data, write_tasks  # noqa: E402
from evomerge.demo.tasks import TASKS, task_docs  # noqa: E402
from evomerge.demo.world import PRESETS, world_config  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tasks"

# A reduced recipe: same code path as the real build, a few optimizer steps only.
SMALL = {
    "arch": {"hidden": 32, "mlp": 64, "layers": 2, "heads": 4, "tie": True},
    "batch": 8,
    "base_steps": 6,
    "math_steps": 3,
    "lang_steps": 3,
}

SIZES = {  # expected (dev, test) sizes of every task
    "demo_math": (132, 268),
    "demo_lang": (56, 116),
    "demo_target": (112, 232),
    "demo_compose": (132, 268),
}


def _digests(models: dict[str, Path]) -> dict[str, str]:
    return {n: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest() for n, p in models.items()}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_a")
    return out, build_world(out, seed=0, config=SMALL)


# ------------------------------------------------------------------------------------------------
# builds


def test_same_seed_gives_identical_weights_and_other_seed_differs(small_world, tmp_path):
    _, first = small_world
    again = build_world(tmp_path / "again", seed=0, config=SMALL)
    other = build_world(tmp_path / "other", seed=1, config=SMALL)
    assert set(first) == set(MODEL_NAMES) == {"base", "math", "lang"}
    assert _digests(first) == _digests(again)
    a, b = _digests(first), _digests(other)
    assert all(a[n] != b[n] for n in MODEL_NAMES)


def test_specialists_differ_from_base(small_world):
    from transformers import AutoModelForCausalLM

    _, models = small_world
    sd = {n: AutoModelForCausalLM.from_pretrained(models[n]).state_dict() for n in MODEL_NAMES}
    for name in ("math", "lang"):
        changed = [k for k in sd["base"] if not torch.equal(sd["base"][k], sd[name][k])]
        assert changed, f"{name} equals base"
        assert sd[name].keys() == sd["base"].keys()


def test_models_load_with_auto_classes_and_tokenizer_round_trips(small_world):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, models = small_world
    tok = AutoTokenizer.from_pretrained(models["lang"])
    model = AutoModelForCausalLM.from_pretrained(models["lang"]).eval()
    assert tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    assert tok.pad_token_id == model.config.pad_token_id
    assert tok.eos_token_id == model.config.eos_token_id
    doc = task_docs(0)["demo_compose"]["test"][0]
    ids = tok(doc["question"] + " " + doc["choices"][doc["gold"]])["input_ids"]
    assert tok.unk_token_id not in ids
    assert len(ids) == len(doc["question"].split()) + 1  # word-level, no special tokens added
    assert tok.decode(ids) == doc["question"] + " " + doc["choices"][doc["gold"]]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), len(tok))
    assert torch.isfinite(logits).all()


def test_reuse_when_stamp_matches_and_rebuild_on_force(small_world):
    out, models = small_world
    stamp = json.loads((out / "world.json").read_text())
    assert stamp["seed"] == 0 and stamp["config"]["base_steps"] == SMALL["base_steps"]
    before = {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in models.items()}
    logs: list[str] = []
    again = build_world(out, seed=0, config=SMALL, log=logs.append)
    assert again == models
    assert any("reusing" in m for m in logs)
    assert {n: (p / "model.safetensors").stat().st_mtime_ns for n, p in again.items()} == before
    digests = _digests(models)
    rebuilt = build_world(out, seed=0, config=SMALL, force=True)
    assert _digests(rebuilt) == digests  # rebuilt from scratch, bit-identical


def test_build_writes_a_task_suite_for_its_seed(small_world):
    out, _ = small_world
    for name in TASKS:
        assert (out / "tasks" / f"{name}.yaml").is_file()
        assert (out / "tasks" / "data" / f"{name}_test.jsonl").is_file()
    for rel in ("data/demo_target_dev.jsonl", "data/demo_compose_test.jsonl", "demo_data.py"):
        assert (out / "tasks" / rel).read_bytes() == (TASKS_DIR / rel).read_bytes()


def test_unknown_setting_is_rejected(tmp_path):
    with pytest.raises(KeyError):
        build_world(tmp_path, config={"no_such_knob": 1})


def test_phased_specialists_change_only_the_layers_their_phases_train(tmp_path):
    """The layered preset on the small world (2 layers), with lang cut to its first phase (the
    upper half, layer 1): math changes every layer, lang only layer 1, and neither changes the
    embeddings, the final norm or the head."""
    from transformers import AutoModelForCausalLM

    lang_upper = [dict(PRESETS["layered"]["lang_phases"][0])]
    models = build_world(tmp_path, seed=0, config={**SMALL, **PRESETS["layered"], "lang_phases": lang_upper})
    sd = {n: AutoModelForCausalLM.from_pretrained(models[n]).state_dict() for n in MODEL_NAMES}

    def changed(name: str) -> set[str]:
        return {k.split(".layers.")[1].split(".")[0] if ".layers." in k else "outside"
                for k in sd["base"] if not torch.equal(sd["base"][k], sd[name][k])}

    assert changed("math") == {"0", "1"}
    assert changed("lang") == {"1"}


@pytest.mark.parametrize("phases, field", [
    ([{"layers": "middle", "embed": False, "data": [{"items": "arith", "ask": "en", "answer": "en"}]}], "layers"),
    ([{"layers": [2], "embed": False, "data": [{"items": "arith", "ask": "en", "answer": "en"}]}], "layers"),
    ([{"layers": [], "embed": False, "data": [{"items": "arith", "ask": "en", "answer": "en"}]}], "trains nothing"),
    ([{"layers": "all", "embed": True, "data": [{"items": "arith", "ask": "fr", "answer": "en"}]}], "data"),
    ([{"layers": "all", "embed": True, "data": []}], "data"),
    ([{"layers": "all", "embed": True, "steps": 0, "data": [{"items": "arith", "ask": "en", "answer": "en"}]}], "steps"),
    ([{"layers": "all", "embed": True, "lr": "fast", "data": [{"items": "arith", "ask": "en", "answer": "en"}]}], "lr"),
])  # fmt: skip
def test_bad_phases_are_rejected_before_anything_is_built(tmp_path, phases, field):
    with pytest.raises(ValueError, match=rf"math_phases\[0\].*{field}"):
        build_world(tmp_path / "w", config={**SMALL, "math_phases": phases})
    assert not (tmp_path / "w").exists()


# ------------------------------------------------------------------------------------------------
# data and tasks


def _is_demo_task_file(rel: Path) -> bool:
    """tasks/ also holds the real-world tasks (mgsm_ja*); the demo's are data/ and demo_*."""
    return rel.parts[0] == "data" or rel.name.startswith("demo_")


def test_committed_tasks_are_exactly_what_the_generator_writes(tmp_path):
    write_tasks(tmp_path, seed=0)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated and all(_is_demo_task_file(rel) for rel in generated)
    committed = sorted(
        rel for rel in (p.relative_to(TASKS_DIR) for p in TASKS_DIR.rglob("*"))
        if (TASKS_DIR / rel).is_file() and "__pycache__" not in rel.parts and _is_demo_task_file(rel)
    )
    assert generated == committed
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (TASKS_DIR / rel).read_bytes(), rel


def test_write_task_data_is_deterministic_and_seed_dependent(tmp_path):
    a = write_task_data(tmp_path / "a", seed=0)
    b = write_task_data(tmp_path / "b", seed=0)
    c = write_task_data(tmp_path / "c", seed=1)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert [p.read_bytes() for p in a] != [p.read_bytes() for p in c]


def test_splits_are_disjoint_and_eval_items_unseen_in_fine_tuning():
    sp = data.split_items(0)
    for fam in ("arith", "lookup"):
        train, dev, test = (set(sp[f"{fam}_{s}"]) for s in ("train", "dev", "test"))
        assert not (train & dev) and not (train & test) and not (dev & test)
        assert {i.fact for i in dev}.isdisjoint({i.fact for i in test})
    docs = task_docs(0)
    # demo_compose (arithmetic asked in b) is never trained on: the specialists see English
    # arithmetic and b lookups only; its items are the b translations of held-out phrasings
    compose = docs["demo_compose"]["test"]
    b_numbers = {data.EN2B[w] for w in data.NUMBERS}
    assert all(d["choices"][d["gold"]] in b_numbers for d in compose)
    assert all(len(d["choices"]) == 38 and len(set(d["choices"])) == 38 for d in compose)
    assert all(not (set(d["question"].split()) & set(data.NUMBERS)) for d in compose)
    # demo_target: half English arithmetic, half b lookups, all drawn from those tasks' splits
    for split in ("dev", "test"):
        target = docs["demo_target"][split]
        langs = [d["lang"] for d in target]
        assert langs.count("en") == langs.count("b") == len(docs["demo_lang"][split])
        pool = docs["demo_math"][split] + docs["demo_lang"][split]
        assert all(d in pool for d in target)


def test_dev_share_moves_held_out_facts_between_dev_and_test_only():
    default, wide = data.split_items(0), data.split_items(0, 2 / 3)
    assert default == data.split_items(0, 1 / 3)
    for fam in ("arith", "lookup"):
        assert wide[f"{fam}_train"] == default[f"{fam}_train"]  # so the models do not change
        held = default[f"{fam}_dev"] + default[f"{fam}_test"]
        assert sorted(map(repr, wide[f"{fam}_dev"] + wide[f"{fam}_test"])) == sorted(map(repr, held))
        facts = len({i.fact for i in held})
        assert len({i.fact for i in default[f"{fam}_dev"]}) == facts // 3
        assert len({i.fact for i in wide[f"{fam}_dev"]}) == facts * 2 // 3
        assert {i.fact for i in wide[f"{fam}_dev"]}.isdisjoint({i.fact for i in wide[f"{fam}_test"]})
    assert [len(task_docs(0, s)["demo_target"]["dev"]) for s in (1 / 3, 0.5, 2 / 3)] == [112, 172, 228]
    for bad in (0, 1, 1.5, -0.2):
        with pytest.raises(ValueError, match="dev_share"):
            world_config({"dev_share": bad})


def test_b_language_is_a_bijection_disjoint_from_english():
    assert len(set(data.EN2B.values())) == len(data.EN2B)
    assert set(data.EN2B.values()).isdisjoint(data.ENGLISH_WORDS)
    assert data.to_b("what is two plus three ?").split()[-1] == "?"


def test_tasks_load_offline_with_splits_of_the_expected_sizes(tmp_path, monkeypatch):
    from lm_eval.tasks import TaskManager

    monkeypatch.chdir(tmp_path)  # data paths must not depend on the working directory
    tm = TaskManager(include_path=str(TASKS_DIR))
    names = list(TASKS) + [f"{n}_dev" for n in TASKS]
    if hasattr(tm, "load"):  # lm-eval >= 0.4.10
        tasks = tm.load(names)["tasks"]
    else:
        from lm_eval.tasks import get_task_dict

        tasks = get_task_dict(names, tm)
    assert set(tasks) == set(names)
    for name, (n_dev, n_test) in SIZES.items():
        task = tasks[name]
        assert task.config.output_type == "multiple_choice"
        assert len(task.validation_docs()) == n_dev
        assert len(task.test_docs()) == n_test
        assert len(list(task.eval_docs)) == n_test
        assert len(list(tasks[f"{name}_dev"].eval_docs)) == n_dev
        doc = task.test_docs()[0]
        assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == doc["choices"][doc["gold"]]
        assert task.doc_to_text(doc) == doc["question"]


def _score(model_dir: Path, docs: list[dict]) -> float:
    """Log-likelihood multiple-choice accuracy (single-token choices), as lm-eval computes it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    right = 0
    with torch.no_grad():
        for d in docs:
            ids = tok(d["question"])["input_ids"]
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], -1)
            choice_ids = [tok.convert_tokens_to_ids(c) for c in d["choices"]]
            right += int(int(torch.argmax(logp[choice_ids])) == d["gold"])
    return right / len(docs)


def _task_arithmetic(models: dict[str, Path], out: Path, w_math: float, w_lang: float | list[float]) -> Path:
    """base + w_math * (math - base) + w_lang * (lang - base); a list w_lang holds one weight per
    layer, and tensors outside the layers take layer 0's (as mergekit reads a gradient)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sd = {n: AutoModelForCausalLM.from_pretrained(models[n]).state_dict() for n in MODEL_NAMES}
    merged = AutoModelForCausalLM.from_pretrained(models["base"])

    def lang_weight(key: str) -> float:
        if not isinstance(w_lang, list):
            return w_lang
        return w_lang[int(key.split(".layers.")[1].split(".")[0]) if ".layers." in key else 0]

    merged.load_state_dict(
        {
            k: v + w_math * (sd["math"][k] - v) + lang_weight(k) * (sd["lang"][k] - v)
            for k, v in sd["base"].items()
        }
    )
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(models["base"]).save_pretrained(out)
    return out


@pytest.mark.slow
def test_full_world_merge_beats_every_parent(tmp_path):
    """The real recipe: each parent is poor on the target; a merge that takes lang's upper layers
    and not its drifted lower ones is clearly better, one weight per model is not; and the real
    lm_eval CLI (run from another directory) agrees with a direct computation."""
    models = build_world(tmp_path / "world", seed=0)
    docs = task_docs(0)
    target, compose = docs["demo_target"]["test"], docs["demo_compose"]["test"]
    parents = {n: _score(models[n], target) for n in MODEL_NAMES}
    merged = _task_arithmetic(models, tmp_path / "merged", 1.0, [0.0, 0.0, 1.0, 1.0])
    merge_acc = _score(merged, target)
    uniform_acc = _score(_task_arithmetic(models, tmp_path / "uniform", 1.0, 0.5), target)
    # measured with seed 0: parents 0.065 / 0.405 / 0.500, per-layer merge 0.802, uniform 0.466
    assert max(parents.values()) < 0.55, parents
    assert merge_acc >= max(parents.values()) + 0.2, (parents, merge_acc)
    assert uniform_acc <= merge_acc - 0.2, (uniform_acc, merge_acc)
    # the specialists are good at their own skills
    assert _score(models["math"], docs["demo_math"]["test"]) > 0.8
    assert _score(models["lang"], docs["demo_lang"]["test"]) > 0.9
    # the compositional task (arithmetic asked in b): every parent is poor (lang 0.131); merges gain
    # a little (0.213 here: lang's drift answers arithmetic in b), far from the specialists' own skills
    compose_parents = {n: _score(models[n], compose) for n in MODEL_NAMES}
    compose_merge = _score(merged, compose)
    assert max(compose_parents.values()) < 0.15, compose_parents
    assert max(compose_parents.values()) < compose_merge < 0.35, (compose_parents, compose_merge)

    run = subprocess.run(
        [
            sys.executable, "-m", "lm_eval", "--model", "hf",
            "--model_args", f"pretrained={merged},dtype=float32",
            "--include_path", str(TASKS_DIR), "--tasks", "demo_target",
            "--device", "cpu", "--batch_size", "64",
            "--output_path", str(tmp_path / "lm_eval_out"),
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results = next((tmp_path / "lm_eval_out").rglob("results_*.json"))
    acc = json.loads(results.read_text())["results"]["demo_target"]["acc,none"]
    assert acc == pytest.approx(merge_acc, abs=1e-9)
