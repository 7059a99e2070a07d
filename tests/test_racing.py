"""Racing: the paired bound (known cases stop or continue, exact numbers), packing of item results,
the rung loop, PRUNED trials with intermediate values, item results equal to lm-eval's aggregate,
resume after a trial interrupted between rungs, and elite re-evaluation with a held-out task."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from conftest import write_mc_task
from scipy.stats import t as student_t

from evomerge.cli import main
from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.racing import Items, RaceSpec, decide, interval, item_order, pack, race, rung_sizes, unpack
from evomerge.search import run_search
from evomerge.study import (ATTR_INTERRUPTED, ATTR_ITEM_COUNT, ATTR_ITEM_SEED, ATTR_ITEMS, best_trial, counted,
                            elites_of, load_existing_study, study_fingerprint)
from evomerge.trials import Candidate, Outcome, tell_outcome

N = 112  # the demo's dev split


def _items(values, size=N, label="t"):
    return Items({label: np.asarray(values, dtype=np.float64)}, {label: size})


def _upper(d: np.ndarray, size: int, confidence: float, looks: int) -> float:
    """The bound written out in float64: mean + t_{1-α, n-1} * sqrt(s²/n * (1 - n/N)), s² over
    the differences and the two pseudo-differences -1 and +1."""
    n = d.size
    padded = np.concatenate([d, [-1.0, 1.0]])
    s2 = ((padded - padded.mean()) ** 2).sum() / (n + 1)
    se = math.sqrt(s2 / n * (1 - n / size))
    return d.mean() + student_t.ppf(1 - (1 - confidence) / looks, n - 1) * se


# --------------------------------------------------------------------------- the bound
@pytest.mark.parametrize("losses, wins, stop, upper", [
    (6, 0, True, -0.06024679),  # 6 of 14 items lost, none won: cannot beat the incumbent
    (5, 0, False, 0.00103315),  # 5 lost: still could
    (5, 2, False, 0.23188776),  # mixed
    (0, 0, False, 0.21722602),  # all ties: no evidence either way
    (14, 0, True, -0.70255102),  # all lost: the pseudo-differences keep the spread above zero
])
def test_known_cases_stop_or_continue(losses, wins, stop, upper):
    reference = _items(np.ones(N))
    reference.values["t"][:wins] = 0.0  # the candidate wins where the reference failed
    cand = np.ones(14)
    cand[wins:wins + losses] = 0.0
    cand[:wins] = 1.0
    d = decide(_items(cand), reference, 0.75, {"t": 1.0}, confidence=0.95, looks=3)
    diff = (wins - losses) / 14
    assert d.difference == pytest.approx(diff, abs=1e-15)
    assert d.estimate == pytest.approx(0.75 + diff, abs=1e-15)
    assert d.upper == pytest.approx(upper, abs=1e-8)
    assert d.upper == pytest.approx(_upper(cand - reference.values["t"][:14], N, 0.95, 3), abs=1e-12)
    assert d.stop is stop


def test_more_looks_or_confidence_widen_the_bound_and_all_items_decide_exactly():
    reference = _items(np.ones(N))
    cand = np.ones(14)
    cand[:6] = 0
    assert decide(_items(cand), reference, 0.8, {"t": 1}, confidence=0.95, looks=3).stop
    assert not decide(_items(cand), reference, 0.8, {"t": 1}, confidence=0.99, looks=3).stop
    assert not decide(_items(cand), reference, 0.8, {"t": 1}, confidence=0.95, looks=12).stop
    # every item seen: no sampling error left (finite-population correction 0), one lost item decides
    full = np.ones(N)
    full[0] = 0
    d = decide(_items(full), reference, 0.8, {"t": 1}, confidence=0.999, looks=3)
    assert d.upper == pytest.approx(-1 / N, abs=1e-15) and d.stop
    # one item: no spread to bound with, however it went
    assert not decide(_items([0.0]), reference, 0.8, {"t": 1}, confidence=0.5 + 1e-9, looks=1).stop


def test_two_tasks_use_the_stratified_variance():
    ref = Items({"a": np.ones(40), "b": np.zeros(20)}, {"a": 40, "b": 20})
    cand = Items({"a": np.array([1, 0, 1, 0, 1.0]), "b": np.array([1, 0, 0.0])}, {"a": 40, "b": 20})
    d = decide(cand, ref, 0.5, {"a": 2.0, "b": 0.5}, confidence=0.9, looks=2)
    da, db = cand.values["a"] - 1, cand.values["b"]
    pa, pb = np.r_[da, -1, 1], np.r_[db, -1, 1]
    var = 4 * pa.var(ddof=1) / 5 * (1 - 5 / 40) + 0.25 * pb.var(ddof=1) / 3 * (1 - 3 / 20)
    want = 2 * da.mean() + 0.5 * db.mean() + student_t.ppf(1 - 0.1 / 2, 4 + 2) * math.sqrt(var)
    assert d.upper == pytest.approx(want, abs=1e-12)
    assert d.difference == pytest.approx(2 * (-0.4) + 0.5 / 3, abs=1e-15)


def test_interval_is_the_item_level_normal_interval():
    items = _items(np.r_[np.ones(90), np.zeros(22)])
    est, low, high = interval(items, {"t": 1.0})
    p = 90 / N
    half = 1.959963984540054 * math.sqrt(p * (1 - p) * N / (N - 1) / N)
    assert (est, low, high) == pytest.approx((p, p - half, p + half), abs=1e-12)


# --------------------------------------------------------------------------- packing and the order
def test_pack_round_trips_bits_and_floats():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2, 1001).astype(float)
    packed = pack(bits)
    assert "bits" in packed and len(packed["bits"]) <= 4 * math.ceil(1001 / 8 / 3) + 4
    assert np.array_equal(unpack(packed), bits)
    floats = rng.random(7).astype(np.float32).astype(float)
    assert "f32" in pack(floats) and np.array_equal(unpack(pack(floats)), floats)
    items = Items({"a": bits[:10], "b": floats}, {"a": 20, "b": 7})
    again = Items.from_attr(json.loads(json.dumps(items.to_attr())))
    assert again.sizes == {"a": 20, "b": 7} and again.count == 17 and not again.complete


def test_item_order_is_a_seeded_permutation_and_rungs_cover_all_items():
    o = item_order(3, "demo_target", N)
    assert sorted(o.tolist()) == list(range(N))
    assert np.array_equal(o, item_order(3, "demo_target", N))
    assert not np.array_equal(o, item_order(4, "demo_target", N))
    assert not np.array_equal(o, item_order(3, "other", N))
    assert rung_sizes([0.125, 0.25, 0.5], N) == [14, 28, 56, 112]
    assert rung_sizes([0.125, 0.25, 0.5], 5) == [1, 2, 3, 5]
    assert rung_sizes([], 5) == [5]


def test_race_scores_each_item_once_and_stops_at_the_rung_the_bound_says():
    order = {"t": item_order(0, "t", N)}
    truth = np.ones(N)
    truth[order["t"][:20]] = 0  # the candidate fails the first 20 items of the order
    calls = []

    def score_items(wanted):
        calls.append(list(wanted["t"]))
        return {"t": truth[wanted["t"]]}

    spec = RaceSpec(0, (0.125, 0.25, 0.5), 0.95, _items(np.ones(N)).to_attr(), 0.9, 5)
    result = race(score_items, order, {"t": "t"}, {"t": 1.0}, spec)
    assert result.stopped and [n for n, _ in result.rungs] == [14]  # 14 losses of 14
    assert calls == [order["t"][:14].tolist()]
    assert result.rungs[0][1] == pytest.approx(0.9 - 1.0)

    truth[:] = 1  # as good as the reference: every rung, each item scored once, in the study's order
    calls.clear()
    result = race(score_items, order, {"t": "t"}, {"t": 1.0}, spec)
    assert not result.stopped and [n for n, _ in result.rungs] == [14, 28, 56, 112]
    assert sum(calls, []) == order["t"].tolist()
    assert result.items.complete and result.rungs[-1][1] == 1.0


# --------------------------------------------------------------------------- the study
def test_a_stopped_candidate_is_pruned_with_its_rungs_and_estimate(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}", direction="maximize")
    trial = study.ask()
    items = _items(np.zeros(28)).to_attr()

    class Stage:
        def summarize(self, params):
            return ""

    outcome = Outcome(None, 1.5, items=items, rungs=((14, 0.61), (28, 0.52)), pruned=True)
    report = tell_outcome(study, Stage(), Candidate(trial, {}, None, {}), outcome, False, 10)
    t = study.trials[0]
    assert report.state == "PRUNED" and report.fitness == 0.52
    assert t.state == optuna.trial.TrialState.PRUNED and t.intermediate_values == {14: 0.61, 28: 0.52}
    assert t.value == 0.52  # Optuna keeps the last intermediate value: what TPE and pycma read
    assert t.user_attrs[ATTR_ITEM_COUNT] == 28 and t.system_attrs[ATTR_ITEMS] == items
    assert counted(study) == 1 and best_trial(study) is None


@pytest.fixture(scope="module")
def race_task(tmp_path_factory) -> Path:
    """A multiple-choice task with 48 dev and 24 test items (enough rungs to race)."""
    root = tmp_path_factory.mktemp("race_tasks")
    for split, n, offset in (("dev", 48, 0), ("test", 24, 3)):
        with open(root / f"{split}.jsonl", "w") as f:
            for i in range(n):
                a, b = (i + offset) % 10, (3 * i + offset) % 7
                f.write(json.dumps({"q": f"{a} plus {b}", "choices": [str(x) for x in range(6)], "label": (a + b) % 6}) + "\n")
    write_mc_task(root, "race_mc", root / "dev.jsonl", root / "test.jsonl")
    return root


def _config(tiny_models, race_task, tmp_path, **fitness) -> SearchConfig:
    return SearchConfig.from_dict({
        "study": "r", "storage": f"sqlite:///{tmp_path / 'r.db'}", "seed": 3,
        "base_model": str(tiny_models["base"]), "models": {"a": str(tiny_models["a"]), "b": str(tiny_models["b"])},
        "merge": {"method": "task_arithmetic", "search": {"weight": [0, 1.5]}, "layer_groups": 1},
        "fitness": {"include_path": str(race_task), "tasks": [{"task": "race_mc", "metric": "acc"}], "batch_size": 64,
                    **fitness},
        "sampler": {"name": "cmaes", "popsize": 4, "baselines": False}, "budget": {"trials": 7},
    })


def test_item_results_equal_lm_evals_aggregate(tiny_models, race_task, tmp_path):
    from evomerge.evaluate import LmEvalFitness
    from evomerge.stages import PsStage

    cfg = _config(tiny_models, race_task, tmp_path)
    stage = PsStage(cfg)
    stage.open()
    fitness = LmEvalFitness(cfg.fitness, cfg.include_paths)
    recipe = stage.candidate({}, "uniform")
    model, tok = stage.load(recipe)
    whole = fitness.score(model, tok).fitness  # lm-eval's own aggregate over the split
    items = fitness.race(model, tok, RaceSpec(3, (), 0.95)).items
    assert items.complete and items.count == 48 and items.fitness(fitness.weights) == whole
    order = item_order(3, "race_mc", 48)
    some = fitness.score_items(model, tok, {"race_mc": order[:5].tolist()})["race_mc"]
    assert np.array_equal(some, items.values["race_mc"][:5])  # the same items, paired, in the order
    stage.close()


@pytest.mark.slow
def test_racing_search_resumes_after_a_trial_interrupted_between_rungs(tiny_models, race_task, tmp_path, monkeypatch):
    from evomerge.evaluate import LmEvalFitness

    # limit 40: trials see 40 of the 48 dev items; the elites are re-scored on all 48
    cfg = _config(tiny_models, race_task, tmp_path, heldout=[{"task": "race_mc", "split": "test"}], elites=2, limit=40)
    real = LmEvalFitness.score_items
    calls = {"n": 0}

    def flaky(self, model, tok, wanted):
        calls["n"] += 1
        if calls["n"] == 3:  # trial 1's second rung (trial 0 saw every item in one call)
            raise KeyboardInterrupt
        return real(self, model, tok, wanted)

    monkeypatch.setattr(LmEvalFitness, "score_items", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_search(cfg)
    study = load_existing_study("r", cfg.storage_url)
    cut = [t for t in study.trials if t.user_attrs.get(ATTR_INTERRUPTED)]
    assert [t.number for t in cut] == [1] and study.user_attrs[ATTR_ITEM_SEED] == 3 and not elites_of(study)
    monkeypatch.setattr(LmEvalFitness, "score_items", real)

    result = run_search(cfg)  # the same command continues: the order persists, the trial re-runs
    study = load_existing_study("r", cfg.storage_url)
    assert result.completed == 7 == counted(study) and study.user_attrs[ATTR_ITEM_SEED] == 3
    done = [t for t in study.trials if not t.user_attrs.get(ATTR_INTERRUPTED)]
    assert len(done) == 7 and done[1].number == 2  # CMA-ES hands the interrupted candidate out again
    assert done[1].user_attrs["evomerge:recipe"] == cut[0].user_attrs["evomerge:recipe"]
    for t in done:
        items = Items.from_attr(t.system_attrs[ATTR_ITEMS])
        steps = sorted(t.intermediate_values)
        assert steps and t.user_attrs[ATTR_ITEM_COUNT] == items.count == steps[-1]
        if t.state == optuna.trial.TrialState.PRUNED:
            assert not items.complete and t.value == t.intermediate_values[steps[-1]]
        else:
            assert items.complete and t.value == pytest.approx(items.fitness({"race_mc": 1.0}), abs=1e-15)
            assert t.intermediate_values[40] == t.value and items.count == 40

    # elite re-evaluation: the top 2 on every item and the held-out task; the best is one of them
    elites = elites_of(study)
    assert len(elites) == 2 and best_trial(study).number in elites
    for n, e in elites.items():
        assert e["items"] == 48 and e["low"] <= e["fitness"] <= e["high"] and 0 <= e["heldout_fitness"] <= 1
        assert e["fitness"] * 48 == pytest.approx(round(e["fitness"] * 48), abs=1e-9)  # a mean over 48 items
    out = CliRunner().invoke(main, ["status", "--study", "r", "--storage", cfg.storage_url])
    assert out.exit_code == 0 and f"best trial {best_trial(study).number}, re-evaluated:" in out.output
    assert "held-out" in out.output and "95% interval" in out.output
    out = CliRunner().invoke(main, ["export", "--study", "r", "--storage", cfg.storage_url, "-o", str(tmp_path / "b.yml")])
    assert out.exit_code == 0, out.output
    header = (tmp_path / "b.yml").read_text()
    assert f"trial {best_trial(study).number}" in header and "# re-evaluated on every item: " in header
    assert "(dev - held-out " in header


@pytest.mark.parametrize("fitness, message", [
    ({"objective": "multi", "tasks": [{"task": "race_mc"}, {"task": "race_mc", "metric": "acc_norm"}],
      "racing": {"enabled": True}}, "fitness.racing: races one objective"),
    ({"racing": {"rungs": [0.5, 0.25]}}, "fitness.racing.rungs: .*increasing fractions"),
    ({"racing": {"confidence": 1.0}}, "fitness.racing.confidence"),
    ({"elite_fewshot_seed": 7}, r"^config: fitness.elite_fewshot_seed: reseeds the few-shot examples, so it needs "
                                r"num_fewshot > 0 \(got num_fewshot: None\)$"),
    ({"elite_fewshot_seed": 7, "num_fewshot": 0}, r"fitness.elite_fewshot_seed: .*\(got num_fewshot: 0\)$"),
])
def test_bad_racing_settings_get_one_line(tiny_models, race_task, tmp_path, fitness, message):
    with pytest.raises(ConfigError, match=message):
        _config(tiny_models, race_task, tmp_path, **fitness)


def test_racing_elites_and_heldout_leave_the_fingerprint_alone(tiny_models, race_task, tmp_path):
    plain = _config(tiny_models, race_task, tmp_path, racing={"enabled": False}, elites=0, num_fewshot=2)
    other = _config(tiny_models, race_task, tmp_path, racing={"rungs": [0.5], "confidence": 0.9, "against": "generation"},
                    elites=5, heldout=[{"task": "race_mc", "split": "test"}], num_fewshot=2, elite_fewshot_seed=7)
    assert study_fingerprint(plain) == study_fingerprint(other)


def test_pycma_is_told_a_pruned_trials_estimate_not_a_penalty():
    from optuna.distributions import FloatDistribution

    from evomerge.samplers import PyCmaSampler, cma_state

    space = {"x": FloatDistribution(0, 1), "y": FloatDistribution(0, 1)}
    study = optuna.create_study(sampler=PyCmaSampler(space, seed=0, popsize=2), direction="maximize")
    study.tell(study.ask(space), 0.5)
    pruned = study.ask(space)
    pruned.report(0.7, 14)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    study.ask(space)  # opens generation 1: generation 0 is told
    assert sorted(float(v) for v in cma_state(study)["es"].fit.fit) == [-0.7, -0.5]  # pycma minimises


def test_a_bad_heldout_task_is_one_line_before_any_study(tiny_models, race_task, tmp_path):
    cfg = _config(tiny_models, race_task, tmp_path, heldout=[{"task": "no_such_task", "split": "test"}])
    with pytest.raises(ConfigError, match="fitness.heldout: unknown task 'no_such_task'"):
        run_search(cfg, trials=1)
    assert not (tmp_path / "r.db").exists() or not optuna.get_all_study_summaries(cfg.storage_url)


def test_elites_that_saw_every_item_need_the_model_only_for_held_out_tasks(tiny_models, race_task, tmp_path):
    from evomerge.elites import run_elites
    from evomerge.study import ATTR_RECIPE

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'e.db'}", direction="maximize")
    values = np.r_[np.ones(30), np.zeros(18)]
    for fit in (0.5, 30 / 48):
        t = study.ask()
        t.set_user_attr(ATTR_RECIPE, {"fit": fit})
        mine = np.r_[np.ones(round(48 * fit)), np.zeros(48 - round(48 * fit))]
        study._storage.set_trial_system_attr(t._trial_id, ATTR_ITEMS, _items(mine, 48, "race_mc").to_attr())
        study.tell(t, fit)
    calls = []

    def score(records, seed, dev):
        calls.append((records, seed, dev))
        return [{"heldout": {"race_mc": 0.5}, "heldout_fitness": 0.5} for _ in records]

    assert run_elites(study, score, _config(tiny_models, race_task, tmp_path, elites=1)) == 1
    assert calls == []  # no held-out task: the interval comes from the stored items
    est, low, high = interval(_items(values, 48, "race_mc"), {"race_mc": 1.0})
    assert elites_of(study) == {1: {"fitness": est, "low": low, "high": high, "confidence": 0.95, "items": 48}}
    held = _config(tiny_models, race_task, tmp_path, elites=2, heldout=[{"task": "race_mc", "split": "test"}])
    assert run_elites(study, score, held) == 1  # trial 1 is done; trial 0 is next
    assert calls == [([{ATTR_RECIPE: {"fit": 0.5}}], 3, [False])]
    assert elites_of(study)[0]["heldout_fitness"] == 0.5 and elites_of(study)[0]["items"] == 48
    assert best_trial(study).number == 1


# --------------------------------------------------------------------------- the reference
def _generation_study(incumbent: np.ndarray, generation_best: np.ndarray):
    """CMA-ES (popsize 2): generation 0 = the incumbent and an all-wrong trial, generation 1 = the
    generation's best so far and the candidate, asked (RUNNING). Items on the study's order."""
    from optuna.distributions import FloatDistribution

    from evomerge.samplers import ATTR_GENERATION, PyCmaSampler

    space = {"x": FloatDistribution(0, 1)}
    study = optuna.create_study(sampler=PyCmaSampler(space, seed=0, popsize=2), direction="maximize")
    study.set_user_attr(ATTR_ITEM_SEED, 0)
    order = item_order(0, "t", N)
    for values in (incumbent, np.zeros(N), generation_best):
        t = study.ask(space)
        study._storage.set_trial_system_attr(t._trial_id, ATTR_ITEMS, _items(values).to_attr())
        study.tell(t, float(values.mean()))
    candidate = study.ask(space)
    generations = [t.system_attrs[ATTR_GENERATION] for t in study.trials]
    assert generations == [0, 0, 1, 1]
    # the stored items are in the study's order: item i of the order is values[i]
    return study, candidate, order


def _race_as(study, candidate, truth, order, against):
    from evomerge.config import Racing
    from evomerge.trials import StageJob

    job = StageJob(study, None, {}, False, 10, racing=Racing(against=against), races=True)
    spec = job.race_spec(candidate)
    result = race(lambda wanted: {"t": truth[np.argsort(order)][wanted["t"]]}, {"t": order}, {"t": "t"},
                  {"t": 1.0}, spec)
    return spec.reference_number, result


def test_racing_against_the_generation_stops_a_candidate_the_incumbent_would_not_and_vice_versa():
    alternate = np.arange(N) % 2.0  # wins every other item: 0.5
    # the incumbent (1.0) beats the candidate on 7 of its first 14 items; its generation's best is
    # the candidate's equal, item by item
    study, cand, order = _generation_study(np.ones(N), alternate)
    ref, result = _race_as(study, cand, alternate, order, "incumbent")
    assert ref == 0 and result.stopped and [n for n, _ in result.rungs] == [14]
    ref, result = _race_as(study, cand, alternate, order, "generation")
    assert ref == 2 and not result.stopped and result.items.complete and result.rungs[-1] == (N, 0.5)

    # the incumbent (0.875) wins only after the first 14 items, the generation's best (0.125) only on
    # them: the candidate (0 on the first 14, then 1) ties the incumbent item by item, loses 14 of
    # 14 to its generation's best
    late, early = np.r_[np.zeros(14), np.ones(N - 14)], np.r_[np.ones(14), np.zeros(N - 14)]
    study, cand, order = _generation_study(late, early)
    ref, result = _race_as(study, cand, late, order, "incumbent")
    assert ref == 0 and not result.stopped and result.rungs[-1] == (N, 0.875)
    ref, result = _race_as(study, cand, late, order, "generation")
    assert ref == 2 and result.stopped and result.rungs == [(14, pytest.approx(0.125 - 1.0))]


def test_a_generation_without_a_fully_scored_trial_races_against_the_incumbent():
    from optuna.distributions import FloatDistribution

    from evomerge.config import Racing
    from evomerge.samplers import ATTR_EXTRA, PyCmaSampler
    from evomerge.trials import StageJob

    space = {"x": FloatDistribution(0, 1)}
    study = optuna.create_study(sampler=PyCmaSampler(space, seed=0, popsize=2), direction="maximize")
    for value in (1.0, 0.0):  # generation 0
        t = study.ask(space)
        study._storage.set_trial_system_attr(t._trial_id, ATTR_ITEMS, _items(np.full(N, value)).to_attr())
        study.tell(t, value)
    pruned = study.ask(space)  # generation 1: stopped early, so no reference
    study._storage.set_trial_system_attr(pruned._trial_id, ATTR_ITEMS, _items(np.ones(14)).to_attr())
    pruned.report(0.9, 14)
    study.tell(pruned, state=optuna.trial.TrialState.PRUNED)
    cand = study.ask(space)
    extra = study.ask(space)  # every index of generation 1 is held: an extra candidate, never told
    study._storage.set_trial_system_attr(extra._trial_id, ATTR_ITEMS, _items(np.full(N, 0.5)).to_attr())
    study.tell(extra, 0.5)
    assert study.trials[-1].system_attrs[ATTR_EXTRA] == 0
    job = StageJob(study, None, {}, False, 10, racing=Racing(against="generation"), races=True)
    assert job.race_spec(cand).reference_number == 0  # the incumbent
    assert job.race_spec(None).reference_number == 0


@pytest.mark.parametrize("change, key", [
    ({"sampler": {"name": "tpe"}}, "sampler"),
    ({"stages": ["ps", "dfs"], "dfs": {"sampler": {"name": "random"}}}, "dfs.sampler"),
])
def test_racing_against_the_generation_needs_cma_es_everywhere(tiny_models, race_task, tmp_path, change, key):
    cfg = _config(tiny_models, race_task, tmp_path, racing={"against": "generation"})
    assert cfg.fitness.racing.against == "generation"
    name = change.get("sampler", change.get("dfs", {}).get("sampler", {})).get("name")
    with pytest.raises(ConfigError, match=rf"^config: fitness.racing.against: generation races against the top of a "
                                          rf"CMA-ES generation, but {key}.name is {name}; use against: incumbent or "
                                          rf"{key}.name: cmaes$"):
        SearchConfig.from_dict(cfg.model_dump(mode="json") | change)


# --------------------------------------------------------------------------- a second few-shot seed
def test_elites_with_a_second_few_shot_seed_are_ranked_by_the_mean_of_both(tiny_models, race_task, tmp_path):
    from evomerge.elites import run_elites
    from evomerge.study import ATTR_RECIPE, elite_line

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'e.db'}", direction="maximize")
    first = np.r_[np.ones(30), np.zeros(18)]  # 30 of 48 with the search's few-shot draw
    second = np.r_[np.zeros(6), np.ones(18), np.zeros(24)]  # 18 of 48 with seed 7's
    t = study.ask()
    t.set_user_attr(ATTR_RECIPE, {"fit": 1})
    study._storage.set_trial_system_attr(t._trial_id, ATTR_ITEMS, _items(first, 48, "race_mc").to_attr())
    study.tell(t, 30 / 48)
    calls = []

    def score(records, seed, dev):
        calls.append(dev)
        return [{"fewshot": _items(second, 48, "race_mc").to_attr()}]

    cfg = _config(tiny_models, race_task, tmp_path, elites=1, num_fewshot=2, elite_fewshot_seed=7)
    assert run_elites(study, score, cfg) == 1 and calls == [[False]]  # the trial saw every item already
    mean = (first + second) / 2
    est, low, high = interval(_items(mean, 48, "race_mc"), {"race_mc": 1.0})
    elite = elites_of(study)[0]
    assert elite == {"fitness": est, "low": low, "high": high, "confidence": 0.95, "items": 48,
                     "fewshot": {"seeds": [1234, 7], "fitness": [30 / 48, 18 / 48]}}
    assert est == 0.5 and elite_line(elite) == (f"0.5000 (95% interval {low:.4f}-{high:.4f}, 48 items; "
                                                "mean of few-shot seeds 1234: 0.6250, 7: 0.3750)")


def test_the_elite_scorer_draws_the_second_seeds_few_shot_examples(tiny_models, race_task, tmp_path):
    from evomerge.elites import EliteScorer
    from evomerge.evaluate import LmEvalFitness
    from evomerge.stages import PsStage

    cfg = _config(tiny_models, race_task, tmp_path, num_fewshot=2, elite_fewshot_seed=7)
    stage = PsStage(cfg)
    stage.open()
    record = stage.candidate({}, "uniform")
    out = EliteScorer(cfg).score(stage, record, 3)
    model, tok = stage.load(record)
    for key, seed in (("dev", 1234), ("fewshot", 7)):
        fitness = LmEvalFitness(cfg.fitness, cfg.include_paths, fewshot_seed=seed)
        items = fitness.race(model, tok, RaceSpec(3, (), 0.95)).items
        assert items.complete and Items.from_attr(out[key]).values["race_mc"].tolist() == items.values["race_mc"].tolist()
        logged = fitness._run(model, tok, samples={"race_mc": [0, 1, 2]}, log_samples=True)["samples"]["race_mc"]
        contexts = [s["arguments"][0][0] for s in logged]  # (context, continuation) of the first choice
        if seed == 1234:
            first = contexts
    assert contexts != first and all(c.count("=") == 3 for c in contexts + first)  # 2 shots + the question
    stage.close()


@pytest.mark.slow
def test_a_search_raced_against_generations_with_a_second_few_shot_seed(tiny_models, race_task, tmp_path):
    from evomerge.samplers import ATTR_GENERATION

    cfg = _config(tiny_models, race_task, tmp_path, racing={"against": "generation"}, num_fewshot=2,
                  elite_fewshot_seed=7, elites=1)
    assert run_search(cfg).completed == 7
    study = load_existing_study("r", cfg.storage_url)
    assert {t.system_attrs[ATTR_GENERATION] for t in study.trials} == {0, 1}
    (number, elite), = elites_of(study).items()
    assert elite["fewshot"]["seeds"] == [1234, 7] and elite["fitness"] == pytest.approx(sum(elite["fewshot"]["fitness"]) / 2)
    assert elite["fewshot"]["fitness"][0] == study.trials[number].value  # the search's own draw, on every item
    out = CliRunner().invoke(main, ["status", "--study", "r", "--storage", cfg.storage_url])
    assert out.exit_code == 0 and "mean of few-shot seeds 1234: " in out.output
