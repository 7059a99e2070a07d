"""Parallel trials on Ray (evomerge.parallel): 2 CPU actors on tiny models, one local Ray runtime
for the module. Every trial recorded; a killed actor fails only its trial and is replaced; a hung
trial times out and its actor restarts; joining a cluster started with `ray start --head`; bad
input is one clear line."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState
from test_search import config_dict, start_drivers_at_once, tiny_task, write_config  # noqa: F401 (tiny_task: a fixture)

from evomerge.cli import main
from evomerge.config import SearchConfig
from evomerge.samplers import ATTR_EXTRA, ATTR_GENERATION, ATTR_INDEX, cma_state
from evomerge.search import run_search
from evomerge.study import (ATTR_BASELINE, ATTR_ERROR, ATTR_INTERRUPTED, ATTR_RECIPE, ATTR_WORKER, counted,
                            study_fingerprint)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_runtime():
    """One local Ray runtime (2 CPUs) for the module; searches in this process join it."""
    from evomerge.parallel import _runtime_env

    ray.init(num_cpus=2, include_dashboard=False, runtime_env=_runtime_env(), log_to_driver=False)
    yield
    ray.shutdown()


def task_of(tiny_task: Path, root: Path, questions: int) -> Path:
    """tiny_task with ``questions`` dev questions (a trial's time grows with them)."""
    import json

    with open(root / "dev.jsonl", "w") as f:
        for i in range(questions):
            a, b = i % 10, (3 * i) % 7
            f.write(json.dumps({"q": f"{a} plus {b}", "choices": [str(x) for x in range(8)], "label": (a + b) % 8}) + "\n")
    (root / "tiny_mc.yaml").write_text((tiny_task / "tiny_mc.yaml").read_text().replace(
        str(tiny_task / "dev.jsonl"), str(root / "dev.jsonl")))
    return root


@pytest.fixture(scope="module")
def slow_task(tiny_task, tmp_path_factory) -> Path:
    """360 questions: a trial takes 1 to 3 s on 2 cores, long enough to be caught running (at 120,
    an idle machine finished the trials after a kill before the second saboteur caught one)."""
    return task_of(tiny_task, tmp_path_factory.mktemp("slow_task"), 360)


def parallel_config(tiny_models, tiny_task, tmp_path, **changes) -> dict:
    data = config_dict(tiny_models, tiny_task, tmp_path, layer_groups=1)
    # these tests time whole trials (a killed, a hung, an interrupted one): no racing
    data["fitness"]["racing"] = {"enabled": False}
    data.update({"workers": 2, **changes})
    return data


def trials_of(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="t", storage=storage).trials


def test_cmaes_study_on_two_actors_records_every_trial(ray_runtime, tiny_models, tiny_task, tmp_path):
    data = parallel_config(tiny_models, tiny_task, tmp_path, sampler={"name": "cmaes"})
    cfg = SearchConfig.from_dict(data)
    seen = []
    # 4 dimensions: pycma's population 4 + floor(3 ln 4) = 8, a multiple of 2 workers already;
    # 3 baselines + one full generation + 2 more
    result = run_search(cfg, trials=13, on_trial=seen.append)
    trials = trials_of(data["storage"])
    assert result.completed == 13 == counted(optuna.load_study(study_name="t", storage=data["storage"]))
    assert [t.number for t in trials] == list(range(13)) and len(seen) == 13
    assert all(t.state == TrialState.COMPLETE for t in trials), [t.user_attrs.get(ATTR_ERROR) for t in trials]
    assert [t.user_attrs.get(ATTR_BASELINE) for t in trials[:3]] == ["a", "b", "uniform"]
    assert all(ATTR_RECIPE in t.user_attrs for t in trials)
    assert len({t.user_attrs[ATTR_WORKER] for t in trials}) == 2  # both actors worked
    cma = [t for t in trials[3:]]
    assert len({tuple(sorted(t.params.items())) for t in cma}) == 10  # no candidate evaluated twice
    state = cma_state(optuna.load_study(study_name="t", storage=data["storage"]))
    # an actor asking while the other holds generation 0's last index gets an extra candidate
    # (never told); on a busy machine two such extras keep all 10 candidates in generation 0
    generations = [t.system_attrs[ATTR_GENERATION] for t in cma]
    first = [t for t, g in zip(cma, generations) if g == 0]
    indexed = sorted(t.system_attrs[ATTR_INDEX] for t in first if ATTR_EXTRA not in t.system_attrs)
    extras = len(first) - len(indexed)
    assert state["popsize"] == 8 and state["generation"] == max(generations) and set(generations) <= {0, 1}
    if state["generation"] == 1:  # generation 0 was complete (each index once) before 1 opened
        assert indexed == list(range(8)) and len(first) == 8 + extras
    else:
        assert len(first) == 10 and extras >= 2 and indexed == list(range(10 - extras))

    # resuming with one worker (in process) continues the same study: workers are not in the fingerprint
    relaxed = SearchConfig.from_dict({**data, "workers": 1})
    assert study_fingerprint(relaxed) == study_fingerprint(cfg)
    assert run_search(relaxed, trials=14).completed == 14


def test_popsize_defaults_to_a_multiple_of_the_workers():
    from evomerge.search import parallel_popsize

    assert parallel_popsize(4, 1) == 8 and parallel_popsize(4, 3) == 9 and parallel_popsize(100, 4) == 20


class _Saboteur(threading.Thread):
    """Stops (SIGSTOP) the actor of a running CMA trial; once the trial is seen still RUNNING a
    second later the actor is frozen mid-trial, and then gets ``then`` (SIGKILL, or nothing:
    a hang). A trial that finished meanwhile is let go (SIGCONT) and another one is tried."""

    def __init__(self, storage: str, then: int | None, skip: set[int]):
        super().__init__(daemon=True)
        self.storage, self.then, self.skip = storage, then, skip
        self.victim: int | None = None
        self.worker: str | None = None

    def run(self) -> None:
        host = socket.gethostname()
        deadline = time.time() + 300
        while self.victim is None and time.time() < deadline:
            time.sleep(0.05)
            try:
                running = [t for t in trials_of(self.storage) if t.state == TrialState.RUNNING
                           and t.user_attrs.get(ATTR_WORKER) and not t.user_attrs.get(ATTR_BASELINE)
                           and t.number not in self.skip]
            except Exception:  # study not created yet
                continue
            for t in running[:1]:
                worker_host, _, pid = t.user_attrs[ATTR_WORKER].rpartition(":")
                assert worker_host == host
                os.kill(int(pid), signal.SIGSTOP)
                time.sleep(1.0)
                now = next(x for x in trials_of(self.storage) if x.number == t.number)
                if now.state == TrialState.RUNNING:
                    self.victim, self.worker = t.number, t.user_attrs[ATTR_WORKER]
                    if self.then is not None:
                        os.kill(int(pid), self.then)
                else:
                    os.kill(int(pid), signal.SIGCONT)


@pytest.mark.slow
def test_killed_actor_fails_only_its_trial_and_a_hung_one_times_out(ray_runtime, tiny_models, slow_task, tmp_path):
    data = parallel_config(tiny_models, slow_task, tmp_path, sampler={"name": "random", "baselines": False})
    data["budget"] = {"trials": 10, "timeout_s": 20}
    killer = _Saboteur(data["storage"], signal.SIGKILL, set())
    killer.start()
    reports = []

    def on_trial(report) -> None:
        reports.append(report)
        if killer.victim is not None and not hasattr(on_trial, "hang"):  # then freeze another one
            on_trial.hang = _Saboteur(data["storage"], None, {killer.victim})
            on_trial.hang.start()

    result = run_search(SearchConfig.from_dict(data), on_trial=on_trial)
    killer.join(timeout=1)
    hang = on_trial.hang
    hang.join(timeout=1)
    assert killer.victim is not None and hang.victim is not None
    trials = trials_of(data["storage"])
    assert result.completed == 10 == len(trials) and [t.number for t in trials] == list(range(10))
    failed = {t.number: t.user_attrs[ATTR_ERROR] for t in trials if t.state == TrialState.FAIL}
    assert set(failed) == {killer.victim, hang.victim}, failed
    assert failed[killer.victim].startswith(f"worker {killer.worker} died: ")
    assert failed[hang.victim] == "timed out after 20s"
    assert all(t.state == TrialState.COMPLETE for t in trials if t.number not in failed)
    workers = [t.user_attrs[ATTR_WORKER] for t in trials]
    assert len(set(workers)) >= 3  # the dead actor was replaced (the hung one too, if trials were left)
    for saboteur in (killer, hang):  # a killed or hung actor never gets another trial
        assert saboteur.worker not in workers[saboteur.victim + 1:]
    assert {r.number for r in reports} == set(range(10))


@pytest.mark.slow
def test_joins_a_cluster_started_with_ray_start(tiny_models, tiny_task, tmp_path):
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="evr")  # Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "RAY_ADDRESS": ""}
    ray_cli = Path(sys.executable).with_name("ray")
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             f"--temp-dir={temp}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_port(port, head)
        data = parallel_config(tiny_models, tiny_task, tmp_path, sampler={"name": "tpe"})
        path = write_config(tmp_path / "c.yml", data)
        run = subprocess.run([sys.executable, "-m", "evomerge", "search", str(path), "--trials", "5",
                              "--ray-address", f"127.0.0.1:{port}"], env=env, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
        assert "2 workers" in run.stderr and "done: 5 trials in study t" in run.stdout
        trials = trials_of(data["storage"])
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
        assert len({t.user_attrs[ATTR_WORKER] for t in trials}) == 2
    finally:
        head.send_signal(signal.SIGTERM)  # --block: stops the head's processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start --head exited: {proc.stdout.read()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            time.sleep(2)  # the GCS listens before the head node has registered
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail("ray start --head did not listen in time")


BAD_INPUT = [
    (["--ray-address", "127.0.0.1:1"], "error: --ray-address: no Ray cluster at 127.0.0.1:1"),
    (["--ray-address", "nowhere"], "error: --ray-address: expected host:port"),
    (["--device", "cuda", "--workers", "2"], "error: workers: 2 GPU worker(s) asked but this machine has 0 GPU(s)"),
]


@pytest.mark.parametrize("args, message", BAD_INPUT, ids=[a[1] for a, _ in BAD_INPUT])
def test_bad_parallel_input_is_one_line(ray_runtime, tiny_models, tiny_task, tmp_path, args, message):
    path = write_config(tmp_path / "c.yml", parallel_config(tiny_models, tiny_task, tmp_path))
    result = CliRunner().invoke(main, ["search", str(path), *args])
    assert result.exit_code == 1, result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "study.db").exists() or not optuna.get_all_study_summaries(
        f"sqlite:///{tmp_path / 'study.db'}")  # nothing created


def test_workers_below_one_is_refused(tiny_models, tiny_task, tmp_path):
    path = write_config(tmp_path / "c.yml", parallel_config(tiny_models, tiny_task, tmp_path, workers=0))
    result = CliRunner().invoke(main, ["search", str(path)])
    assert result.exit_code == 1 and "workers: Input should be greater than or equal to 1" in result.stderr
    result = CliRunner().invoke(main, ["search", str(path), "--workers", "0"])
    assert result.exit_code == 2 and "0 is not in the range x>=1" in result.stderr


def test_one_worker_runs_in_process_without_ray(tiny_models, tiny_task, tmp_path):
    """`workers: 1` keeps the plain loop: Ray is not even imported."""
    data = parallel_config(tiny_models, tiny_task, tmp_path, workers=1)
    path = write_config(tmp_path / "c.yml", data)
    code = ("import sys; from evomerge.config import SearchConfig; from evomerge.search import run_search; "
            f"r = run_search(SearchConfig.load({str(path)!r}), trials=2); "
            "assert r.completed == 2; assert 'ray' not in sys.modules, 'ray imported'")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]


# --------------------------------------------------------------------------- a shared study on PostgreSQL
@pytest.fixture(scope="module")
def postgres_url() -> str:
    """EVOMERGE_TEST_POSTGRES (set by .ci/run), else a server started by .ci/postgres.sh (root,
    Debian's postgresql installed); skips, saying why, where neither works."""
    pytest.importorskip("psycopg2", reason="the PostgreSQL driver psycopg2 is not installed (pip install -e .[test])")
    url = os.environ.get("EVOMERGE_TEST_POSTGRES")
    if not url:
        script = Path(__file__).resolve().parents[1] / ".ci" / "postgres.sh"
        run = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=120)
        if run.returncode != 0:
            pytest.skip(f"no PostgreSQL server: set EVOMERGE_TEST_POSTGRES or run as root with Debian's "
                        f"postgresql installed ({(run.stderr.strip().splitlines() or ['?'])[-1]})")
        url = run.stdout.strip()
    import sqlalchemy

    try:
        sqlalchemy.create_engine(url).connect().close()
    except sqlalchemy.exc.SQLAlchemyError as e:
        pytest.skip(f"no PostgreSQL server at {url}: {str(e).splitlines()[0]}")
    return url


def test_drivers_starting_at_once_on_a_new_postgres_schema_share_it(postgres_url):
    """4 drivers creating Optuna's tables at once in a new schema (PostgreSQL: a duplicate
    pg_type row for the loser, without the retry)."""
    import uuid

    import sqlalchemy

    schema = f"race_{uuid.uuid4().hex[:12]}"
    engine = sqlalchemy.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as db:
        db.execute(sqlalchemy.text(f"CREATE SCHEMA {schema}"))
    sep = "&" if "?" in postgres_url else "?"
    url = f"{postgres_url}{sep}options=-csearch_path%3D{schema}"
    try:
        assert start_drivers_at_once(url) == ["ok"] * 4
        assert len(optuna.load_study(study_name="race", storage=url).trials) == 4
    finally:
        with engine.connect() as db:
            db.execute(sqlalchemy.text(f"DROP SCHEMA {schema} CASCADE"))
        engine.dispose()


@pytest.mark.slow
def test_two_drivers_share_one_cmaes_study_on_postgres(postgres_url, tiny_models, slow_task, tmp_path):
    from evomerge.samplers import ATTR_GENERATION, ATTR_STATE_META, _from_unit, _load_state
    from evomerge.study import ATTR_OWNER

    budget, popsize, drivers = 15, 4, 2  # 3 baselines, then 3 generations of 4
    data = parallel_config(tiny_models, slow_task, tmp_path, workers=1, storage=postgres_url,
                           study=f"shared_{os.getpid()}_{int(time.time())}",
                           sampler={"name": "cmaes", "popsize": popsize}, budget={"trials": budget})
    path = write_config(tmp_path / "c.yml", data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(drivers)]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * drivers, "\n".join(o[-2000:] for o in outputs)
    study = optuna.load_study(study_name=data["study"], storage=postgres_url)
    try:
        trials = study.trials
        # the budget: a driver starts a trial only while counted + running < budget; two drivers
        # reading the count at the same instant may overshoot by one (drivers - 1), never more
        assert budget <= counted(study) <= budget + drivers - 1
        assert not [t for t in trials if t.state == TrialState.RUNNING]
        assert all(t.state == TrialState.COMPLETE for t in trials), [t.user_attrs.get(ATTR_ERROR) for t in trials]
        assert all(ATTR_RECIPE in t.user_attrs for t in trials)
        assert len({t.user_attrs[ATTR_OWNER] for t in trials}) == drivers  # both drivers worked
        assert sorted(t.user_attrs.get(ATTR_BASELINE) or "" for t in trials)[-3:] == ["a", "b", "uniform"]
        assert sum(1 for t in trials if t.user_attrs.get(ATTR_BASELINE)) == 3  # each claimed once
        cma = [t for t in trials if not t.user_attrs.get(ATTR_BASELINE)]
        assert len({tuple(sorted(t.params.items())) for t in cma}) == len(cma)  # no candidate twice
        # coherence: generation g was told exactly g * popsize results; when both drivers opened
        # it at once (the race the sampler tolerates), both computed the same state from the same
        # results; every indexed trial evaluated its generation's solution at its index
        # how many generations 12 candidates span depends on timing: a driver asking while the
        # other holds its generation's last index gets an extra candidate (more of them on a busy
        # machine). Whatever the timing, every generation before the last is complete (each index
        # once), and at least one generation boundary is crossed (with no extras: 3 generations)
        generations = sorted({t.system_attrs[ATTR_GENERATION] for t in cma})
        assert generations == list(range(len(generations))) and len(generations) >= 2
        extras = sum(1 for t in cma if ATTR_EXTRA in t.system_attrs)
        assert len(generations) >= -(-(len(cma) - extras) // popsize)
        for g in generations[:-1]:
            full = sorted(t.system_attrs[ATTR_INDEX] for t in cma
                          if t.system_attrs[ATTR_GENERATION] == g and ATTR_EXTRA not in t.system_attrs)
            assert full == list(range(popsize)), (g, full)
        for g in generations:
            holders = [t for t in trials if (t.system_attrs.get(ATTR_STATE_META) or {}).get("generation") == g]
            assert 1 <= len(holders) <= drivers
            states = [_load_state([h])[0] for h in holders]
            assert all(np.array_equal(s["solutions"], states[0]["solutions"]) for s in states)
            payload, _ = _load_state(holders)
            assert payload["es"].countevals == g * popsize
            indexed = [t for t in cma if t.system_attrs[ATTR_GENERATION] == g and ATTR_EXTRA not in t.system_attrs]
            assert len({t.system_attrs[ATTR_INDEX] for t in indexed}) == len(indexed)
            for t in indexed:
                assert t.params == pytest.approx(_from_unit(payload["space"], payload["solutions"][t.system_attrs[ATTR_INDEX]]))
    finally:
        optuna.delete_study(study_name=data["study"], storage=postgres_url)


@pytest.mark.slow
def test_ctrl_c_twice_interrupts_trials_in_flight_and_resume_finishes(tiny_models, tiny_task, tmp_path):
    """Ctrl-C (to the whole process group, as a terminal sends it) twice: the trials in flight are
    marked interrupted (not counted), Ray stops, exit 130; the next run finishes the budget."""
    slower_task = task_of(tiny_task, tmp_path, 480)  # about 1.5 s a trial
    data = parallel_config(tiny_models, slower_task, tmp_path, sampler={"name": "random", "baselines": False},
                           budget={"trials": 8})
    path = write_config(tmp_path / "c.yml", data)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "search", str(path)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:  # a trial dispatched just now (they take ~1.5 s)
        time.sleep(0.05)
        try:
            fresh = [t for t in trials_of(data["storage"]) if t.state == TrialState.RUNNING and t.number >= 2
                     and ATTR_WORKER in t.user_attrs and (datetime.now() - t.datetime_start).total_seconds() < 0.4]
        except Exception:  # study not created yet
            continue
        if fresh:
            os.killpg(proc.pid, signal.SIGINT)
            while time.time() < deadline and not any("stopping after" in ln for ln in lines):
                time.sleep(0.02)  # the first press seen, then the second
            os.killpg(proc.pid, signal.SIGINT)
            break
    proc.wait(timeout=120)
    reader.join(timeout=10)
    output = "".join(lines)
    assert proc.returncode == 130 and output.strip().splitlines()[-1] == "interrupted", output[-3000:]
    trials = trials_of(data["storage"])
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert interrupted and all(t.user_attrs[ATTR_ERROR] == "interrupted (Ctrl-C)" and t.user_attrs[ATTR_INTERRUPTED]
                               for t in interrupted)
    done = sum(t.state == TrialState.COMPLETE for t in trials)
    assert counted(optuna.load_study(study_name="t", storage=data["storage"])) == done < 8

    run = subprocess.run([sys.executable, "-m", "evomerge", "search", str(path), "--workers", "1"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    study = optuna.load_study(study_name="t", storage=data["storage"])
    assert counted(study) == 8 and len(study.trials) == 8 + len(interrupted)


def test_racing_on_two_actors_records_rungs_items_and_elites(ray_runtime, tiny_models, slow_task, tmp_path):
    from evomerge.racing import Items
    from evomerge.study import ATTR_ITEM_COUNT, ATTR_ITEMS, best_trial, elites_of

    data = parallel_config(tiny_models, slow_task, tmp_path, sampler={"name": "random"}, budget={"trials": 9})
    data["fitness"]["racing"] = {"enabled": True}
    data["fitness"]["elites"] = 2
    run_search(SearchConfig.from_dict(data))
    study = optuna.load_study(study_name="t", storage=data["storage"])
    assert counted(study) == 9 and len({t.user_attrs[ATTR_WORKER] for t in study.trials}) == 2
    for t in study.trials:
        items = Items.from_attr(t.system_attrs[ATTR_ITEMS])
        assert t.state in (TrialState.COMPLETE, TrialState.PRUNED) and items.complete == (t.state == TrialState.COMPLETE)
        assert t.user_attrs[ATTR_ITEM_COUNT] == items.count == max(t.intermediate_values) and t.value is not None
        assert t.intermediate_values[max(t.intermediate_values)] == t.value
    assert len(elites_of(study)) == 2 and best_trial(study).number in elites_of(study)
