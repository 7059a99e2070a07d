"""The study: its vocabulary (the ``evomerge:*`` attribute names), its storage, and how a study
is created, resumed and read. The search writes studies; export, report, status and the Ray
runner read them, all through this module.

Everything needed to resume lives in the study: the config (portable: see
:mod:`evomerge.identity`) and its fingerprint in the study's user attrs; each trial's recipe,
per-task scores, timing, owner process and failure reason in the trial's user attrs; the CMA-ES
state in trial system attrs (see ``samplers``).

Fingerprints identify models and task folders by content, not by path (version 2). A study made
before that (no ``evomerge:fingerprint_version``) is still accepted when its old, path-based
fingerprint matches, and is then upgraded in place, so it can be moved from then on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import socket
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.trial import TrialState

from evomerge.config import SearchConfig
from evomerge.errors import ConfigError
from evomerge.identity import folder_digest, model_digest, portable_ref

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- vocabulary
ATTR_CONFIG = "evomerge:config"  # the search-relevant config, with portable references
ATTR_FINGERPRINT = "evomerge:fingerprint"
ATTR_FINGERPRINT_VERSION = "evomerge:fingerprint_version"  # absent: version 1 (absolute paths)
ATTR_ROOT = "evomerge:root"  # the config's folder, as the last driver saw it (resolves relative refs)
ATTR_SPACE = "evomerge:space"
ATTR_RECIPE = "evomerge:recipe"
ATTR_BASELINE = "evomerge:baseline"
ATTR_SCORES = "evomerge:scores"
ATTR_SECONDS = "evomerge:seconds"
ATTR_ERROR = "evomerge:error"
ATTR_INTERRUPTED = "evomerge:interrupted"
ATTR_OWNER = "evomerge:owner"
ATTR_WORKER = "evomerge:worker"  # host:pid of the Ray actor that evaluated the trial (parallel runs)
ATTR_STAGE = "evomerge:stage"
ATTR_ITEM_SEED = "evomerge:item_seed"  # study: seeds the order of every task's items (racing)
ATTR_ITEMS = "evomerge:items"  # trial system attr: per-item results, packed (racing.Items.to_attr)
ATTR_ITEM_COUNT = "evomerge:item_count"  # trial: item evaluations it took
ATTR_ELITES = "evomerge:elites"  # study: {trial number: its re-evaluation on every item (+ held-out tasks)}
ATTR_PATH = "evomerge:path"  # dfs trials: [[source layer, scale], ...]
ATTR_DFS_SOURCES = "evomerge:dfs_sources"  # dfs studies: [[model, layer index], ...]
ATTR_DFS_REFS = "evomerge:dfs_refs"  # dfs studies: {model name: folder (portable) or hub id}
ATTR_DFS_HOST = "evomerge:dfs_host"
ATTR_PS_TRIAL = "evomerge:ps_trial"  # dfs studies: the ps trial whose model is the "ps" source

FINGERPRINT_VERSION = 2


# --------------------------------------------------------------------------- identity
def study_config(config: SearchConfig, stage: str = "ps") -> dict[str, Any]:
    """The stage's search-relevant config as recorded in the study: model and task-folder
    references relative to the config's folder where they lie inside it."""
    def portable(ref: str | None) -> str | None:
        return portable_ref(ref, config.root) if ref else ref

    return _with_refs(config, stage, portable, portable)


def study_fingerprint(config: SearchConfig, stage: str = "ps") -> str:
    """What makes a study's trials comparable, with local models and task folders identified by
    their content (:mod:`evomerge.identity`), so the fingerprint survives a moved folder."""
    def model(ref: str | None) -> str | None:
        return model_digest(ref) if ref else ref

    data = _with_refs(config, stage, model, folder_digest)
    data["fingerprint_version"] = FINGERPRINT_VERSION
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _with_refs(config: SearchConfig, stage: str, model: Callable[[Any], Any], folder: Callable[[str], Any]) -> dict[str, Any]:
    data = config.relevant(stage)
    if "base_model" in data:
        data["base_model"] = model(data["base_model"])
    data["models"] = {name: model(ref) for name, ref in data["models"].items()}
    data["fitness"] = {**data["fitness"], "include_path": [folder(p) for p in data["fitness"]["include_path"]]}
    return data


def metric_names(config: SearchConfig, stage: str = "ps") -> list[str]:
    """One name per objective, shown by optuna-dashboard: ``task.metric`` per task for a
    multi-objective study, else the fitness as a (weighted) sum of them."""
    f = config.fitness
    if f.kind == "consistency":
        return ["consistency"]
    labels = [f"{t.task}.{t.metric}" for t in f.tasks]
    if f.objective == "multi" and stage == "ps":
        return labels
    if len(labels) == 1 and f.tasks[0].weight == 1:
        return labels
    return [" + ".join(lbl if t.weight == 1 else f"{t.weight:g}*{lbl}" for t, lbl in zip(f.tasks, labels))]


# --------------------------------------------------------------------------- storage
SCHEMA_TRIES = 8  # attempts to open a storage whose schema another process is creating


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """Open an RDB storage, creating Optuna's schema in a new database. Several drivers starting
    at once on a new database race to create the schema (PostgreSQL: a duplicate ``pg_type`` row,
    SQLite: a duplicate ``alembic_version`` row or a locked file); the loser waits a moment and
    opens the schema the winner made."""
    if url.startswith("sqlite:///"):
        folder = Path(url.removeprefix("sqlite:///")).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"storage: cannot create the folder {folder} for {url} ({e.strerror})") from None
    delay = 0.05
    for attempt in range(SCHEMA_TRIES):
        try:
            storage = optuna.storages.RDBStorage(
                url, engine_kwargs={"pool_pre_ping": True} if not url.startswith("sqlite") else None)
            if url.startswith("sqlite"):
                _commit_without_flush(storage)
            return storage
        except Exception as e:  # SQLAlchemy errors: bad URL, server down, missing driver, the race
            if attempt + 1 < SCHEMA_TRIES and _schema_race(e):
                log.debug("storage %s: schema being created by another process (%s); retrying", url,
                          type(e).__name__)
                time.sleep(delay * (1 + random.random()))
                delay = min(2 * delay, 1.0)
                continue
            raise ConfigError(f"storage: cannot open {url}: {str(e).splitlines()[0]}") from None
    raise AssertionError("unreachable")  # pragma: no cover


def _commit_without_flush(storage: optuna.storages.RDBStorage) -> None:
    """SQLite in write-ahead-log mode with ``synchronous=NORMAL``: a commit no longer waits for the
    disk (a trial makes ~20 small commits; each cost 10-20 ms on a busy disk, more than everything
    else the driver does). The database stays consistent; a crash of the process loses nothing, a
    crash of the machine or a power cut may lose the last commits (the trial in flight, which a
    resumed search runs again). SQLite's write-ahead log needs a local file system, as SQLite's
    locking does anyway. A database whose mode cannot be changed (another process holds it)
    keeps its rollback journal and its full flushes."""
    import sqlalchemy

    def on_connect(connection: Any, _record: Any) -> None:
        cursor = connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            if str(cursor.fetchone()[0]).lower() == "wal":
                cursor.execute("PRAGMA synchronous=NORMAL")
        except Exception as e:  # sqlite3.OperationalError: locked by another process
            log.debug("SQLite: keeping the rollback journal (%s)", e)
        finally:
            cursor.close()

    sqlalchemy.event.listen(storage.engine, "connect", on_connect)
    storage.engine.dispose()  # pooled connections made while creating the schema reconnect with it


def _schema_race(e: BaseException) -> bool:
    """An error of two processes creating the same schema at once (not a bad URL or a dead server)."""
    import sqlalchemy.exc

    if isinstance(e, sqlalchemy.exc.IntegrityError):
        return True
    text = str(e).lower()
    return isinstance(e, sqlalchemy.exc.DBAPIError) and any(
        s in text for s in ("already exists", "duplicate", "database is locked"))


def load_existing_study(name: str, storage_url: str) -> optuna.Study:
    storage = storage_for(storage_url)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if name not in names:
        known = f"; studies there: {', '.join(names)}" if names else ""
        raise ConfigError(f"--study: no study named {name!r} in {storage_url}{known}")
    return optuna.load_study(study_name=name, storage=storage)


def directions(config: SearchConfig) -> list[str]:
    if config.fitness.objective == "multi":
        return ["maximize"] * len(config.fitness.tasks)
    return ["maximize"]


def open_study(config: SearchConfig, sampler: optuna.samplers.BaseSampler, *, fresh: bool = False,
               fork: bool = False, stage: str = "ps", name: str | None = None,
               prepare: Callable[[optuna.Study], None] | None = None) -> tuple[optuna.Study, bool]:
    """Create the stage's study or resume it. Returns ``(study, created)``. A study whose
    search-relevant config differs is refused unless ``fresh`` (delete and restart) or ``fork``
    (new study beside it).

    A new study gets its config, then ``prepare(study)`` (space attrs, baselines), then its
    fingerprint, last: another driver opening the same study at the same moment waits for the
    fingerprint (see :func:`_settled_summaries`) and so finds the study complete."""
    storage = storage_for(config.storage_url)
    name = name or config.stage_study(stage)
    relevant = study_config(config, stage)
    fingerprint = study_fingerprint(config, stage)
    existing = (_settled_summaries(storage, name) if not fresh
                else {s.study_name: s for s in optuna.get_all_study_summaries(storage)})
    if name in existing and fresh:
        optuna.delete_study(study_name=name, storage=storage)
        log.info("deleted study %s (--fresh)", name)
        del existing[name]
    if name in existing:
        attrs = existing[name].user_attrs
        legacy = ATTR_FINGERPRINT_VERSION not in attrs and attrs.get(ATTR_FINGERPRINT) == config.fingerprint(stage)
        if attrs.get(ATTR_FINGERPRINT) != fingerprint and not legacy:
            if not fork:
                raise ConfigError(
                    f"study {name!r} in {config.storage_url} was made with a different config "
                    f"({_config_diff(attrs.get(ATTR_CONFIG), relevant)}); "
                    "run with --fork to start a new study beside it, or --fresh to replace it")
            k = 1
            while f"{name}.fork{k}" in existing:
                k += 1
            name = f"{name}.fork{k}"
            log.info("config changed: forking into study %s", name)
        else:
            study = optuna.load_study(study_name=name, storage=storage, sampler=sampler)
            if legacy:  # made before content fingerprints: upgrade, so it can move from now on
                log.info("study %s: upgrading its fingerprint to version %d", name, FINGERPRINT_VERSION)
                study.set_user_attr(ATTR_FINGERPRINT, fingerprint)
                study.set_user_attr(ATTR_FINGERPRINT_VERSION, FINGERPRINT_VERSION)
            if attrs.get(ATTR_ROOT) != str(config.root.resolve()):
                study.set_user_attr(ATTR_ROOT, str(config.root.resolve()))
            return study, False
    dirs = directions(config) if stage == "ps" else ["maximize"]
    try:
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, directions=dirs)
    except optuna.exceptions.DuplicatedStudyError:  # another driver created it just now: join it
        return open_study(config, sampler, fork=fork, stage=stage, name=name, prepare=prepare)
    study.set_user_attr(ATTR_CONFIG, relevant)
    study.set_user_attr(ATTR_STAGE, stage)
    study.set_user_attr(ATTR_ROOT, str(config.root.resolve()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(metric_names(config, stage))
    if prepare is not None:
        prepare(study)
    study.set_user_attr(ATTR_FINGERPRINT_VERSION, FINGERPRINT_VERSION)
    study.set_user_attr(ATTR_FINGERPRINT, fingerprint)
    return study, True


SETTLE_S = 60.0  # longest wait for a study another driver is setting up


def _settled_summaries(storage: optuna.storages.BaseStorage, name: str) -> dict[str, Any]:
    """The storage's study summaries, once study ``name`` (if there) has its fingerprint: a study
    without one is being set up by another driver (a few writes), or was left half made by a
    driver killed in those writes (then, after :data:`SETTLE_S`, it is refused as made with a
    different config)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
        if name not in existing or ATTR_FINGERPRINT in existing[name].user_attrs or time.monotonic() > deadline:
            return existing
        time.sleep(0.5)


def _config_diff(old: Any, new: dict[str, Any]) -> str:
    if not isinstance(old, dict):
        return "no evomerge config recorded"
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return "changed: " + ", ".join(changed) if changed else "different content of a model or task folder"


def enqueue_baselines(study: optuna.Study, names: list[str]) -> None:
    for name in names:
        study.enqueue_trial({}, user_attrs={ATTR_BASELINE: name})


# --------------------------------------------------------------------------- trial owners
def owner() -> str:
    """This process, as recorded on the trials it runs: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_stale_trials(study: optuna.Study, running: list[optuna.trial.FrozenTrial] | None = None) -> int:
    """Trials left RUNNING by a process of this host that no longer exists (kill -9, power
    loss) are marked FAILED and interrupted, so their candidates are evaluated again.
    ``running``: the RUNNING trials if the caller has just read them (saves a storage read)."""
    host = socket.gethostname()
    n = 0
    if running is None:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in running:
        h, _, pid = t.user_attrs.get(ATTR_OWNER, "").rpartition(":")
        if h == host and pid.isdigit() and not _pid_alive(int(pid)) and int(pid) != os.getpid():
            study._storage.set_trial_user_attr(t._trial_id, ATTR_INTERRUPTED, True)
            study._storage.set_trial_user_attr(t._trial_id, ATTR_ERROR, "interrupted (its process died)")
            study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            n += 1
    if n:
        log.info("marked %d trial(s) of a dead process as interrupted", n)
    return n


# --------------------------------------------------------------------------- reading studies
class TrialReader:
    """A study's trials read incrementally, so that a driver's or a sampler's reads per trial cost
    the same at trial 10 and at trial 10,000: each :meth:`refresh` fetches only the trials that are
    new or were unfinished at the previous one (a finished trial never changes), the way Optuna's
    own cached storage does, but without rebuilding and sorting the list of every trial.

    Works on any storage; the incremental query needs an RDB storage (Optuna wraps one in its
    cache), other storages are read whole and filtered."""

    def __init__(self, study: optuna.Study) -> None:
        self._storage = study._storage
        self._study_id = study._study_id
        self._last_finished = -1  # highest trial id seen finished, all lower ones read
        self.unfinished: dict[int, optuna.trial.FrozenTrial] = {}  # trial id -> trial, as of the last refresh

    def refresh(self) -> list[optuna.trial.FrozenTrial]:
        """Read the storage; returns the trials that finished since the previous refresh (in
        trial-number order) and updates :attr:`unfinished`."""
        backend = getattr(self._storage, "_backend", self._storage)
        if isinstance(backend, optuna.storages.RDBStorage):
            fresh = backend._get_trials(self._study_id, states=None, included_trial_ids=set(self.unfinished),
                                        trial_id_greater_than=self._last_finished)
        else:
            fresh = [t for t in self._storage.get_all_trials(self._study_id, deepcopy=False)
                     if t._trial_id in self.unfinished or t._trial_id > self._last_finished]
        finished = []
        for t in sorted(fresh, key=lambda t: t.number):
            if t.state.is_finished():
                self.unfinished.pop(t._trial_id, None)
                finished.append(t)
            else:
                self.unfinished[t._trial_id] = t
        if finished:  # every trial id below the highest finished one is now read or unfinished
            self._last_finished = max(self._last_finished, max(t._trial_id for t in finished))
        return finished


class StudyTally:
    """The counted trials, the running ones and the best trial of a study, kept up to date from a
    :class:`TrialReader` (what the driver checks after every trial)."""

    def __init__(self, study: optuna.Study) -> None:
        self._reader = TrialReader(study)
        self._lock = threading.Lock()
        self.counted = 0
        self.items = 0  # item evaluations of the finished trials (racing's cost measure)
        self.best: optuna.trial.FrozenTrial | None = None

    def refresh(self) -> "StudyTally":
        with self._lock:
            finished = self._reader.refresh()
            self.counted += counted_of(finished)
            self.items += items_used(finished)
            self.best = best_of(finished + ([self.best] if self.best is not None else []))
        return self

    @property
    def running(self) -> int:
        return len(self.running_trials())

    def running_trials(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self._reader.unfinished.values() if t.state == TrialState.RUNNING]


_TALLIES: "weakref.WeakKeyDictionary[optuna.Study, StudyTally]" = weakref.WeakKeyDictionary()


def tally(study: optuna.Study) -> StudyTally:
    """The study's :class:`StudyTally`, refreshed: one per :class:`optuna.Study` object, kept while
    the object lives, so a driver's checks read only what changed since its previous one."""
    if study not in _TALLIES:
        _TALLIES[study] = StudyTally(study)
    return _TALLIES[study].refresh()


def counted(study: optuna.Study) -> int:
    """Trials that count toward the budget: completed, or failed for a reason of their own."""
    return counted_of(study.get_trials(deepcopy=False))


def counted_of(trials: list[optuna.trial.FrozenTrial]) -> int:
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and not t.user_attrs.get(ATTR_INTERRUPTED)))


def items_used(trials: list[optuna.trial.FrozenTrial]) -> int:
    """Item evaluations the trials took (racing's cost measure)."""
    return sum(int(t.user_attrs.get(ATTR_ITEM_COUNT) or 0) for t in trials)


def trial_fitness(t: optuna.trial.FrozenTrial) -> float | None:
    if t.state != TrialState.COMPLETE or t.values is None:
        return None
    return float(sum(t.values)) if len(t.values) > 1 else float(t.values[0])


def best_trial(study: optuna.Study, include_baselines: bool = True) -> optuna.trial.FrozenTrial | None:
    """The completed trial called best: the highest elite re-evaluation when the study has
    elites (:mod:`evomerge.elites`), else the highest fitness (sum of objectives for
    multi-objective studies)."""
    return best_of(study.get_trials(deepcopy=False), include_baselines, elites_of(study))


def best_of(trials: list[optuna.trial.FrozenTrial], include_baselines: bool = True,
            elites: dict[int, dict[str, Any]] | None = None) -> optuna.trial.FrozenTrial | None:
    done = [t for t in trials if t.state == TrialState.COMPLETE
            and (include_baselines or not t.user_attrs.get(ATTR_BASELINE))]
    if not done:
        return None
    elites = elites or {}
    if any(t.number in elites for t in done):  # before a trial is called best, it is re-evaluated
        done = [t for t in done if t.number in elites]
        return max(done, key=lambda t: (float(elites[t.number]["fitness"]), -t.number))
    return max(done, key=lambda t: (trial_fitness(t), -t.number))


def elites_of(study: optuna.Study) -> dict[int, dict[str, Any]]:
    """Trial number -> its elite re-evaluation (a finished trial's attrs cannot change, so they
    are kept in the study's attrs)."""
    return {int(k): v for k, v in (study.user_attrs.get(ATTR_ELITES) or {}).items() if isinstance(v, dict)}


def elite_line(elite: dict[str, Any]) -> str:
    """``0.8120 (95% interval 0.7410-0.8830, 112 items; mean of few-shot seeds 1234: 0.8036, 7: 0.8204);
    held-out 0.7900 (dev - held-out +0.0220)``"""
    pct = round(100 * float(elite.get("confidence", 0.95)))
    fewshot = elite.get("fewshot")
    seeds = ("; mean of few-shot seeds " + ", ".join(f"{s}: {f:.4f}" for s, f in zip(fewshot["seeds"], fewshot["fitness"]))
             if fewshot else "")
    line = (f"{elite['fitness']:.4f} ({pct}% interval {elite['low']:.4f}-{elite['high']:.4f}, "
            f"{elite['items']} items{seeds})")
    if "heldout_fitness" in elite:
        gap = elite["fitness"] - elite["heldout_fitness"]
        line += f"; held-out {elite['heldout_fitness']:.4f} (dev - held-out {gap:+.4f})"
    return line


def searched_methods(study: optuna.Study) -> list[str]:
    """The merge method(s) the study searches (``merge.method`` of its recorded config)."""
    method = ((study.user_attrs.get(ATTR_CONFIG) or {}).get("merge") or {}).get("method")
    return method if isinstance(method, list) else [method] if method else []


def baseline_note(study: optuna.Study, name: str | None, method: str | None) -> str:
    """How status and export label a baseline: its name, and its method when the search uses
    another (the uniform baseline is a plain linear average whatever the search's method)."""
    if not name:
        return ""
    searched = searched_methods(study)
    if method and searched and method not in searched:
        return f"baseline {name}: {method}, not the search's {', '.join(searched)}"
    return f"baseline {name}"


def leaderboard(study: optuna.Study, top: int = 10) -> list[dict[str, Any]]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.state not in (TrialState.COMPLETE, TrialState.FAIL):
            continue
        rows.append({
            "number": t.number,
            "state": t.state.name,
            "fitness": trial_fitness(t),
            "scores": t.user_attrs.get(ATTR_SCORES, {}),
            "seconds": t.user_attrs.get(ATTR_SECONDS),
            "baseline": t.user_attrs.get(ATTR_BASELINE),
            "method": (t.user_attrs.get(ATTR_RECIPE) or {}).get("merge_method"),
            "error": t.user_attrs.get(ATTR_ERROR),
        })
    complete = sorted((r for r in rows if r["fitness"] is not None), key=lambda r: (-r["fitness"], r["number"]))
    baselines = [r for r in complete if r["baseline"]]
    best = [r for r in complete if not r["baseline"]][:top]
    return best + [b for b in baselines if b not in best]
