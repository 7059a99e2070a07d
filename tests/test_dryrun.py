"""`evomerge search --dry-run` and the real-world configs: offline (HF_HUB_OFFLINE, set in conftest),
the hub models' facts come from the bundled table; local models' from their config.json. Also the
MGSM-ja task's answer extraction, language check and fitness/held-out split."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import write_mc_task

from evomerge.checkpoint import Checkpoint
from evomerge.cli import main
from evomerge.config import SearchConfig
from evomerge.dryrun import (
    KNOWN_MODELS,
    TOKENS_PER_S_7B,
    ModelReader,
    TaskCost,
    dry_run,
    eval_seconds,
    read_models,
    task_costs,
)
from evomerge.space import build_space

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
sys.path.insert(0, str(ROOT / "tasks"))
import mgsm_ja_utils  # noqa: E402


def test_ja_math_dry_run_offline_prints_space_plan_and_time():
    cfg = SearchConfig.load(CONFIGS / "ja_math.yml")
    lines, stages = dry_run(cfg)
    # ps: 32 layers x 3 models x (weight, density); dfs: (32 ps + 32 wizard layers) x 3 repeats x (use, scale)
    assert [(s.name, s.dimensions) for s in stages] == [("ps", 192), ("dfs", 384)]
    assert stages[0].examples == ["L00.ja.weight", "L00.wizard.weight", "L00.abel.weight", "L00.ja.density", "...",
                                  "L31.abel.density"]
    assert stages[1].examples[:2] == ["r0.ps.L00.use", "r0.ps.L00.scale"] and stages[1].examples[-1] == "r2.wizard.L31.scale"
    text = "\n".join(lines)
    assert ("  base     mistralai/Mistral-7B-v0.1: 32 layers, hidden 4096, intermediate 14336, 32 heads (8 kv), "
            "vocab 32000, 7.24B params [assumed: evomerge's bundled table]") in lines
    assert "[assumed: same architecture as mistralai/Mistral-7B-v0.1]" in text
    assert "  hub: HF_HUB_OFFLINE is set" in lines
    assert "stage ps (study ja_math): 192 dimensions, 1000 trials" in lines
    assert "stage dfs (study ja_math.dfs): 384 dimensions, 500 trials" in lines
    # four bf16 Mistral-7B sources of 7,241,732,096 parameters each
    assert text.count("source                 ") == 4 and "13.49 GiB" in text
    assert "mgsm_ja_fitness: 150 examples x (200 prompt + 300 generated tokens)" in text
    assert all(s.seconds > 0 for s in stages)


def test_mistral_parameter_count_matches_the_published_size():
    facts = ModelReader().read("mistralai/Mistral-7B-v0.1")
    assert facts.params == 7_241_732_096 and facts.assumed and facts.num_layers == 32


def test_dry_run_cli_exits_0_and_creates_nothing(tmp_path):
    config = tmp_path / "ja.yml"
    data = yaml.safe_load((CONFIGS / "ja_math.yml").read_text())
    data["fitness"]["include_path"] = str(ROOT / "tasks")
    config.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(main, ["search", str(config), "--dry-run", "--stage", "dfs"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].startswith("dry run of study ja_math: stages dfs; device cuda, dtype bfloat16")
    assert "stage dfs (study ja_math.dfs): 384 dimensions, 500 trials" in result.output
    assert "stage ps" not in result.output
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["code_chat_math_ties", "label_free_ja_math", "ja_math"])
def test_real_world_configs_validate_offline(name):
    result = CliRunner().invoke(main, ["search", str(CONFIGS / f"{name}.yml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "dry run only: nothing downloaded, no study created"


def test_local_models_are_read_from_their_config(tiny_models, tmp_path):
    cfg = SearchConfig.from_dict({
        "study": "local", "base_model": str(tiny_models["base"]),
        "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])},
        "merge": {"method": "ties", "search": {"weight": [0, 1], "density": [0.3, 1]}, "layer_groups": "full"},
        "fitness": {"tasks": [{"task": "some_task"}]}, "stages": ["ps", "dfs"]}, root=tmp_path)
    facts = read_models(cfg)
    assert {n: f.source for n, f in facts.items()} == {
        n: f"read {tiny_models[n] / 'config.json'}" for n in ("base", "a", "b")}
    with Checkpoint.open(tiny_models["base"]) as ck:
        expected = len(build_space(cfg, ck.num_layers).bounds())
        stored = sum(ck.get(n).numel() for n in ck.tensor_names())
    assert facts["base"].params == stored
    lines, stages = dry_run(cfg)
    assert stages[0].dimensions == expected == 2 * 2 * 2  # 2 layers x 2 models x 2 knobs
    assert stages[1].dimensions == 3 * 2 * 3 * 2  # (ps, a, b) x 2 layers x 3 repeats x (use, scale)
    assert "assumed" not in "\n".join(lines).split("fitness:")[0]
    assert "some_task: 500 examples x (200 prompt + 256 generated tokens) (data not read: sizes assumed)" in "\n".join(lines)


def sized_mc_task(tmp_path: Path) -> Path:
    """A task folder with the local multiple-choice task ``sized_mc``: 60 dev and 40 test docs."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for split, n in (("dev", 60), ("test", 40)):
        with open(tasks / f"{split}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"q": f"{i} plus {i}", "choices": ["a", "b", "c", "d"], "label": i % 4}) + "\n")
    write_mc_task(tasks, "sized_mc", tasks / "dev.jsonl", tasks / "test.jsonl")
    return tasks


def test_a_local_task_is_counted_not_assumed(tiny_models, tmp_path):
    """A task in the include path with local data: its evaluated split is counted (after
    fitness.limit, as lm-eval applies it), with its output type and choices; a task of lm-eval's
    registry and a local YAML over hub data keep an assumption, and say so."""
    tasks = sized_mc_task(tmp_path)
    (tasks / "sized_gen.yaml").write_text(
        f"task: sized_gen\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tasks / 'test.jsonl'}\n"
        "output_type: generate_until\ntest_split: test\ndoc_to_text: '{{q}} ='\ndoc_to_target: label\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 12\n"
        "metric_list:\n  - metric: exact_match\n")
    (tasks / "hub_data.yaml").write_text("task: hub_data\ndataset_path: someone/not_here\noutput_type: multiple_choice\n"
                                        "test_split: test\ndoc_to_text: '{{q}}'\ndoc_to_target: 0\ndoc_to_choice: ['a']\n")

    def config(limit=None, **fitness):
        return SearchConfig.from_dict({
            "study": "sized", "base_model": str(tiny_models["base"]),
            "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])},
            "fitness": {"tasks": [{"task": "sized_mc"}, {"task": "sized_gen", "split": "test"},
                                  {"task": "hub_data", "split": "test"}, {"task": "gsm8k"}],
                        "include_path": "tasks", "limit": limit, **fitness}}, root=tmp_path)

    costs = {task: (cost, note) for task, cost, note in task_costs(config())}
    assert costs["sized_mc"] == (TaskCost(60, 200, 0, 4), "read: 60 of the 60 docs of its validation split; multiple_choice, "
                                                         "4 choices; prompt tokens assumed")
    assert costs["sized_gen"] == (TaskCost(40, 200, 12, 1), "read: 40 of the 40 docs of its test split; "
                                                           "generate_until, up to 12 generated tokens; prompt tokens assumed")
    assert costs["hub_data"] == (TaskCost(500, 200, 256), "data not read: sizes assumed")
    assert costs["gsm8k"] == (TaskCost(7473, 900, 200), "typical sizes, assumed")
    # fitness.limit as lm-eval applies it: a count, or a fraction rounded up
    assert [c.examples for _, c, _ in task_costs(config(limit=25))] == [25, 25, 25, 25]
    assert [c.examples for _, c, _ in task_costs(config(limit=0.1))][:2] == [6, 4]
    lines, stages = dry_run(config(limit=25))
    text = "\n".join(lines)
    assert ("sized_mc: 25 examples x (200 prompt x 4 choices + 0 generated tokens) (read: 25 of the 60 docs of its validation "
            "split, fitness.limit 25; multiple_choice, 4 choices; prompt tokens assumed) = ") in text
    assert "hub_data: 25 examples x (200 prompt + 256 generated tokens) (data not read: sizes assumed) = " in text
    # the estimate uses the count: 40 test docs x 4 choices x 200 prompt tokens, nothing generated,
    # at the CPU's assumed 50 prompt tokens/s for a 7B model, scaled to the tiny model's size
    one = SearchConfig.from_dict({
        "study": "one", "base_model": str(tiny_models["base"]), "models": {"a": str(tiny_models["a"])},
        "merge": {"method": "task_arithmetic"},
        "fitness": {"tasks": [{"task": "sized_mc", "split": "test"}], "include_path": "tasks"}}, root=tmp_path)
    params = read_models(one)["base"].params
    seconds, _ = eval_seconds(one, params)
    assert seconds == pytest.approx(40 * 4 * 200 / (TOKENS_PER_S_7B["cpu"][0] * 7e9 / params), rel=1e-12)


def test_consistency_prompts_are_counted(tiny_models, tmp_path):
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(7)))
    data = {"study": "c", "base_model": str(tiny_models["base"]),
            "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])},
            "fitness": {"kind": "consistency", "consistency": {"prompts": {"jsonl": "p.jsonl", "limit": 20}}}}
    text = "\n".join(dry_run(SearchConfig.from_dict(data, root=tmp_path))[0])
    assert "consistency: 3 generations x 7 prompts (read) x " in text
    data["fitness"]["consistency"]["prompts"] = {"task": "mgsm_ja_fitness", "include_path": str(ROOT / "tasks"), "limit": 16}
    text = "\n".join(dry_run(SearchConfig.from_dict(data, root=tmp_path))[0])
    assert "consistency: 3 generations x 16 prompts (assumed) x " in text  # hub data: not read


def test_unknown_hub_model_offline_is_one_line(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "study": "x", "base_model": "someone/unknown-base", "models": {"a": "someone/ft-a", "b": "someone/ft-b"},
        "merge": {"method": "ties", "search": {"weight": None, "density": None}},
        "fitness": {"tasks": [{"task": "t"}]}}))
    result = CliRunner().invoke(main, ["search", str(config), "--dry-run"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        "error: base_model someone/unknown-base: no local folder, no cached or reachable config.json on the hub "
        f"(HF_HUB_OFFLINE is set), and not in the bundled table ({', '.join(KNOWN_MODELS)}); give base_model one "
        "of those or a local folder"]


def test_unreachable_hub_is_tried_once(monkeypatch):
    import huggingface_hub

    calls = []

    def fail(repo_id, filename, **kw):
        calls.append(kw.get("local_files_only", False))
        raise OSError("no route to host")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    reader = ModelReader()
    reader.hub_ok, reader.hub_note = True, ""
    base = reader.read("mistralai/Mistral-7B-v0.1")
    ft = reader.read("someone/ft", base)
    assert calls == [True, False, True]  # cache, network (fails), then the cache only
    assert reader.hub_note == "hub not reachable: OSError"
    assert ft.source == "assumed: same architecture as mistralai/Mistral-7B-v0.1" and ft.config == base.config


# --------------------------------------------------------------------------- MGSM-ja task
@pytest.mark.parametrize("text, number", [
    ("答えは 18 です。", 18.0), ("1,234円と５６７円で、合計は１，８０１円", 1801.0), ("-3.5 度", -3.5),
    ("答えが分かりません", None), ("The answer is 72.", 72.0)])
def test_last_number(text, number):
    assert mgsm_ja_utils.last_number(text) == number


def test_acc_ja_counts_only_japanese_answers():
    doc = {"answer_number": 18}
    assert mgsm_ja_utils.process_results(doc, ["ジャネットは 16 - 3 - 4 = 9 個を売るので、9 * 2 = 18 ドルです。"]) == {
        "acc": 1.0, "acc_ja": 1.0}
    assert mgsm_ja_utils.process_results(doc, ["She sells 16 - 3 - 4 = 9 eggs, so 9 * 2 = 18 dollars."]) == {
        "acc": 1.0, "acc_ja": 0.0}
    assert mgsm_ja_utils.process_results(doc, ["答えは 17 ドルです。"]) == {"acc": 0.0, "acc_ja": 0.0}
    assert mgsm_ja_utils.japanese_share("abc あいう") == 0.5


def test_fitness_and_heldout_splits_partition_the_test_set():
    from datasets import Dataset

    test = Dataset.from_dict({"question": [f"q{i}" for i in range(250)], "answer_number": list(range(250))})
    fit, held = mgsm_ja_utils.fitness_docs(test), mgsm_ja_utils.heldout_docs(test)
    assert (len(fit), len(held)) == (150, 100)
    assert list(fit["answer_number"]) + list(held["answer_number"]) == list(range(250))


def test_lm_eval_indexes_the_mgsm_ja_tasks():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(ROOT / "tasks"))
    assert {"mgsm_ja", "mgsm_ja_fitness", "mgsm_ja_heldout"} <= set(manager.all_tasks)
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(ROOT / "tasks" / "mgsm_ja_fitness.yaml")  # the template included, functions resolved
    assert config["dataset_path"] == "juletxara/mgsm" and config["dataset_name"] == "ja"
    assert config["process_docs"].__name__ == "fitness_docs" and config["process_results"].__name__ == "process_results"
    assert [m["metric"] for m in config["metric_list"]] == ["acc", "acc_ja"]


def test_missing_local_model_folder_is_one_line(tmp_path):
    config = tmp_path / "c.yml"
    config.write_text(yaml.safe_dump({
        "study": "x", "base_model": str(tmp_path / "nowhere" / "base"),
        "models": {"a": str(tmp_path / "nowhere" / "a")},
        "merge": {"method": "task_arithmetic"}, "fitness": {"tasks": [{"task": "t"}]}}))
    result = CliRunner().invoke(main, ["search", str(config), "--dry-run"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [f"error: base_model {tmp_path / 'nowhere' / 'base'}: model folder does not exist"]


def test_the_dry_run_states_racing_and_the_elites_cost(tiny_models, tmp_path):
    """Racing's settings and the item evaluations of one trial (first rung to all items), and the
    elites' re-evaluation at the end: every item (trials saw fitness.limit), a second few-shot
    seed and the held-out task, each counted on the local task's splits (60 dev, 40 test docs)."""
    tasks = sized_mc_task(tmp_path)

    def config(**fitness):
        return SearchConfig.from_dict({
            "study": "raced", "base_model": str(tiny_models["base"]), "models": {"a": str(tiny_models["a"])},
            "merge": {"method": "task_arithmetic"},
            "fitness": {"tasks": [{"task": "sized_mc"}], "include_path": "tasks", **fitness}}, root=tmp_path)

    cfg = config(limit=25, elites=2, num_fewshot=1, elite_fewshot_seed=5, racing={"against": "generation"},
                 heldout=[{"task": "sized_mc", "split": "test"}])
    lines, (stage,) = dry_run(cfg)
    params = read_models(cfg)["base"].params
    per_doc = 4 * 200 / (TOKENS_PER_S_7B["cpu"][0] * 7e9 / params)  # 4 choices x 200 assumed prompt tokens
    assert stage.elite_seconds == pytest.approx(2 * (60 + 60 + 40) * per_doc, rel=1e-12)
    assert lines[lines.index("fitness: sized_mc.acc (validation split); objective sum") + 1:][:2] == [
        "racing: on; rungs 0.125, 0.25, 0.5 of each task's items, then all; confidence 0.8; against the best of "
        "its CMA-ES generation so far (the incumbent while the generation has none)",
        "  item evaluations per trial: 4 (stopped after the first rung) to 25 (all items; the first trial and "
        "the baselines see all)"]
    assert ("  elites at the end: the top 2 trials re-scored on every item of the fitness split (60) + again with "
            "few-shot seed 5 (60) + the held-out tasks sized_mc (40): 2 x 160 = 320 item evaluations, about "
            f"{stage.elite_seconds:.0f} s") in lines
    assert lines[-2].endswith(" for every stage's budget (trials on every item; racing stops some sooner)")

    lines, (stage,) = dry_run(config(racing={"enabled": False}, elites=2))
    assert "racing: off; every trial is scored on all 60 items" in lines and stage.elite_seconds == 0
    assert "  elites: the top 2 trials' intervals come from their stored items (no model rebuilt)" in lines
    lines, (stage,) = dry_run(config(elites=0, num_fewshot=1, elite_fewshot_seed=5))
    assert not any("elites" in line for line in lines) and lines[-2].endswith("sooner)")
