"""The README's examples name configs that exist and load; its search example is configs/example.yml."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.config import SearchConfig
from evomerge.sweep import SweepConfig

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
NAMED = sorted(set(re.findall(r"configs/([A-Za-z0-9_]+\.yml)", README)))


def test_the_readme_names_configs():
    assert {"example.yml", "smollm2.yml", "sweep_example.yml"} <= set(NAMED)


@pytest.mark.parametrize("name", NAMED)
def test_every_config_the_readme_names_exists_and_loads(name):
    path = ROOT / "configs" / name
    assert path.is_file(), f"README names configs/{name}, which does not exist"
    kind = SweepConfig if "sweep" in yaml.safe_load(path.read_text()) else SearchConfig
    kind.load(path)  # raises ConfigError with one line if it does not validate


def test_the_search_example_is_configs_example_yml_and_dry_runs_offline():
    block = re.search(r"```yaml\n# configs/example.yml \(paths are relative to this file\)\n(.*?)```", README, re.S)
    assert block, "README: the search example block is gone"
    file_lines = (ROOT / "configs" / "example.yml").read_text().splitlines(keepends=True)
    assert "".join(line for line in file_lines if not line.startswith("# ")) == block.group(1)
    result = CliRunner().invoke(main, ["search", str(ROOT / "configs" / "example.yml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1] == "dry run only: nothing downloaded, no study created"
