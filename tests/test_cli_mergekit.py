"""`evomerge merge` as a drop-in for `mergekit-yaml`: its options, the files it writes (recipe,
model card, shards) next to mergekit's, and the rough edges of writing a model folder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from conftest import load_state, one_line_error
from evomerge.checkpoint import TOKENIZER_FILES, clean_stale_temps
from evomerge.cli import main
from evomerge.cli_mergekit import parse_size


def _recipe(tmp: Path, m: dict) -> Path:
    path = tmp / "recipe.yml"
    path.write_text(textwrap.dedent(f"""\
        # a comment mergekit keeps in mergekit_config.yml
        merge_method: ties
        base_model: {m['base']}
        models:
          - model: {m['a']}
            parameters: {{weight: 0.6, density: 0.5}}
          - model: {m['b']}
            parameters: {{weight: [0.3, 0.8], density: 0.7}}
        dtype: float32
        """))
    return path


def test_every_mergekit_yaml_option_is_accepted():
    mk = pytest.importorskip("mergekit.scripts.run_yaml")
    ours = {opt for p in main.commands["merge"].params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
    theirs = {opt for p in mk.main.params if isinstance(p, click.Option) for opt in (*p.opts, *p.secondary_opts)}
    assert theirs - ours == set()


@pytest.mark.parametrize("text, value", [("0", 0), ("123", 123), ("500K", 500_000), ("500m", 500_000_000),
                                         ("5B", 5_000_000_000), ("2b", 2_000_000_000)])
def test_out_shard_size_reads_like_mergekit(text, value):
    assert parse_size(text) == value
    common = pytest.importorskip("mergekit.common")
    assert common.parse_kmb(text) == value


def test_same_recipe_same_files_and_tensors_as_mergekit_yaml(tiny_models, tmp_path):
    """The CLI of each on one recipe, sharded small: the files that matter carry the same names
    (recipe, config, tokenizer, card, shards and index) and the tensors are equal."""
    if not Path(sys.executable).with_name("mergekit-yaml").exists():
        pytest.skip("mergekit-yaml not installed")
    recipe = _recipe(tmp_path, tiny_models)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "evomerge", "merge", str(recipe), str(ours),
                           "--out-shard-size", "50K", "--lazy-unpickle", "--no-cuda", "--copy-tokenizer"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "note: --lazy-unpickle: not needed" in proc.stderr
    proc = subprocess.run([str(Path(sys.executable).with_name("mergekit-yaml")), str(recipe), str(theirs),
                           "--out-shard-size", "50K", "--lazy-unpickle", "--no-cuda", "--copy-tokenizer"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in theirs.iterdir()}
    assert {"mergekit_config.yml", "config.json", "README.md", "model.safetensors.index.json",
            "tokenizer.json"} <= names
    assert names == {p.name for p in ours.iterdir()}
    assert (ours / "mergekit_config.yml").read_text() == recipe.read_text() == (theirs / "mergekit_config.yml").read_text()
    a, b = load_state(ours), load_state(theirs)
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] - b[name]).abs().max().item() <= 1e-6, name


def test_model_card_front_matter_and_options(tiny_models, tmp_path):
    recipe = _recipe(tmp_path, tiny_models)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(recipe), str(out), "--no-copy-tokenizer", "--random-seed", "7",
                                       "--trust-remote-code", "-j", "1", "--quiet", "-v"])
    assert result.exit_code == 0, result.output
    assert "note: --trust-remote-code: not needed" in result.stderr
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert sorted(front["base_model"]) == sorted(str(tiny_models[k]) for k in ("base", "a", "b"))
    assert {"merge", "evomerge", "mergekit"} <= set(front["tags"])
    assert "merge_method: ties" in card
    # --random-seed changes the recipe, so the written recipe is the one built (with its seed)
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["random_seed"] == 7
    assert not any((out / f).exists() for f in TOKENIZER_FILES)
    bare = tmp_path / "bare"
    assert CliRunner().invoke(main, ["merge", str(recipe), str(bare), "--no-write-model-card"]).exit_code == 0
    assert not (bare / "README.md").exists() and (bare / "mergekit_config.yml").exists()


@pytest.mark.parametrize("args, needle", [
    (["--no-safe-serialization"], "writes safetensors only"),
    (["--unsafe-truncate-embeddings"], "tokenizer_source"),
    (["--out-shard-size", "5GB"], "--out-shard-size: expected"),
    (["--seed", "1", "--random-seed", "2"], "disagree"),
])
def test_refused_options_get_one_line(tiny_models, tmp_path, args, needle):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["merge", str(_recipe(tmp_path, tiny_models)), str(out), *args])
    one_line_error(result, needle)
    assert not out.exists()


def test_unwritable_output_gets_one_line(tiny_models, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    result = CliRunner().invoke(main, ["merge", str(_recipe(tmp_path, tiny_models)), str(blocker / "out")])
    one_line_error(result, str(blocker / "out"), "cannot write")


def test_weights_respect_the_umask(tiny_models, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert CliRunner().invoke(main, ["merge", str(_recipe(tmp_path, tiny_models)), str(out)]).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}


def test_stale_temp_folders_of_dead_merges_are_cleaned(tiny_models, tmp_path):
    import socket
    import re

    host = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:24] or "host"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".out.tmp-{host}-{dead}-0123456789ab"
    alive = tmp_path / f".other.tmp-{host}-{os.getppid()}-0123456789ab"  # a running process's
    foreign = tmp_path / f".out.tmp-elsewhere-{dead}-0123456789ab"  # another host's: cannot tell
    for folder in (stale, alive, foreign):
        folder.mkdir()
        (folder / "shard-00000.safetensors.part").write_bytes(b"\0" * 10)
    assert CliRunner().invoke(main, ["merge", str(_recipe(tmp_path, tiny_models)), str(tmp_path / "out")]).exit_code == 0
    assert not stale.exists() and alive.exists() and foreign.exists()
    assert clean_stale_temps(tmp_path) == []
