"""Rough edges of the CLI (issue 17): outputs that cannot be written get one line, -v after the
subcommand, --overwrite on export, one rule for a relative --storage, report.md's commands carry
--storage, a peer driver's kill -9 does not cost a trial, -o/--output and an example everywhere."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from conftest import one_line_error
from evomerge.cli import main
from evomerge.study import ATTR_OWNER, ATTR_RECIPE, ATTR_ROOT, ATTR_SCORES


def _study(tmp: Path, m: dict) -> str:
    """A study holding one completed trial whose recipe merges the tiny models; returns its URL."""
    url = f"sqlite:///{tmp / 'runs' / 's.db'}"
    (tmp / "runs").mkdir(exist_ok=True)
    study = optuna.create_study(study_name="s", storage=url, direction="maximize")
    study.set_user_attr(ATTR_ROOT, str(tmp))
    recipe = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(m["a"]), "parameters": {"weight": 0.5}},
                         {"model": str(m["b"]), "parameters": {"weight": 0.5}}]}
    study.add_trial(optuna.create_trial(value=0.5, user_attrs={ATTR_RECIPE: recipe, ATTR_SCORES: {"t": 0.5}}))
    return url


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A plain file: any folder under it cannot be created (whoever runs the test, root included)."""
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


def test_unwritable_outputs_get_one_line(tiny_models, tmp_path, blocker):
    url = _study(tmp_path, tiny_models)
    study = ["--study", "s", "--storage", url]
    one_line_error(CliRunner().invoke(main, ["export", *study, "-o", str(blocker / "best.yml")]),
                    str(blocker / "best.yml"), "cannot write")
    one_line_error(CliRunner().invoke(main, ["export", *study, "-o", str(tmp_path / "best.yml"),
                                              "--merge", str(blocker / "merged")]), "cannot write")
    one_line_error(CliRunner().invoke(main, ["report", *study, "-o", str(blocker / "report")]), "cannot write")
    from evomerge.errors import ConfigError
    from evomerge.study import storage_for

    with pytest.raises(ConfigError, match="storage: cannot create the folder"):
        storage_for(f"sqlite:///{blocker / 'runs' / 'x.db'}")


def test_export_merge_overwrite(tiny_models, tmp_path):
    url = _study(tmp_path, tiny_models)
    merged = tmp_path / "merged"
    merged.mkdir()
    (merged / "old.txt").write_text("old")
    args = ["export", "--study", "s", "--storage", url, "-o", str(tmp_path / "best.yml"), "--merge", str(merged)]
    one_line_error(CliRunner().invoke(main, args), "--overwrite replaces it")
    result = CliRunner().invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (merged / "mergekit_config.yml").exists() and not (merged / "old.txt").exists()


def test_relative_storage_is_relative_to_the_current_folder(tiny_models, tmp_path, monkeypatch):
    _study(tmp_path, tiny_models)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["status", "--study", "s", "--storage", "sqlite:///runs/s.db"])
    assert result.exit_code == 0, result.output
    from evomerge.cli import _storage_url

    assert _storage_url("sqlite:///runs/s.db") == f"sqlite:///{tmp_path / 'runs' / 's.db'}"
    assert _storage_url("postgresql://h/db") == "postgresql://h/db"


def test_report_md_commands_carry_the_storage(tiny_models, tmp_path):
    from evomerge.report import write_report
    from evomerge.study import load_existing_study

    url = _study(tmp_path, tiny_models)
    study = load_existing_study("s", url)
    study.add_trial(optuna.create_trial(value=0.6, params={"L00.a.weight": 0.3},
                                        distributions={"L00.a.weight": optuna.distributions.FloatDistribution(0, 1)},
                                        user_attrs={ATTR_RECIPE: {"merge_method": "linear", "models": [
                                            {"model": str(tiny_models["a"]), "parameters": {"weight": [0.3]}}]}}))
    report = write_report(study, tmp_path / "report", storage=url)
    text = report.markdown.read_text()
    assert f"evomerge export --study s --storage {url} --trial 1" in text


def test_verbose_after_the_subcommand_shows_lm_eval_logs(tiny_models, tmp_path, monkeypatch):
    import logging

    from evomerge.evaluate import lm_eval_verbose, quiet_lm_eval

    monkeypatch.delenv("LMEVAL_LOG_LEVEL", raising=False)
    url = _study(tmp_path, tiny_models)
    for args in (["status", "--study", "s", "--storage", url, "-v"], ["-v", "status", "--study", "s", "--storage", url]):
        monkeypatch.delenv("LMEVAL_LOG_LEVEL", raising=False)
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.output
        assert os.environ.get("LMEVAL_LOG_LEVEL") == "DEBUG" and lm_eval_verbose()
        quiet_lm_eval()
        assert logging.getLogger("lm_eval").getEffectiveLevel() == logging.DEBUG
    logging.basicConfig(level=logging.WARNING, force=True)


def test_peer_killed_with_kill_9_does_not_cost_a_trial(tmp_path):
    from evomerge.trials import StageJob

    study = optuna.create_study(study_name="k", storage=f"sqlite:///{tmp_path / 'k.db'}")
    study.add_trial(optuna.create_trial(value=1.0))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    orphan = study.ask()  # the peer's trial, RUNNING when the peer died
    study._storage.set_trial_user_attr(orphan._trial_id, ATTR_OWNER, f"{socket.gethostname()}:{dead}")
    job = StageJob(study, None, {}, False, total=3)  # type: ignore[arg-type]
    assert job.budget_left() == 2  # one done; the dead peer's trial is not counted as running
    assert study.trials[1].state == optuna.trial.TrialState.FAIL


@pytest.mark.parametrize("command", ["merge", "search", "export", "status", "report", "sweep", "demo"])
def test_every_subcommand_has_an_example_and_output_convention(command):
    cmd = main.commands[command]
    assert cmd.epilog and f"evomerge {command}" in cmd.epilog
    opts = {o for p in cmd.params for o in p.opts}
    if command in ("export", "report", "sweep", "demo"):
        assert {"-o", "--output"} <= opts
