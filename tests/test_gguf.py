"""GGUF sources: a GGUF-only model folder is refused with the command that converts it; the
converter's bad input gets one line. (The conversion itself runs on SmolLM2 in test_smollm2.py.)"""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from evomerge.checkpoint import Checkpoint
from evomerge.cli import main
from evomerge.errors import CheckpointError


def test_a_gguf_only_folder_is_refused_with_the_conversion_command(tmp_path):
    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "b.Q8_0.gguf").write_bytes(b"GGUF")
    (folder / "a.Q4_1.gguf").write_bytes(b"GGUF")
    with pytest.raises(CheckpointError) as e:
        Checkpoint.open(folder)
    assert str(e.value) == (f"{folder}: no config.json in the model folder; it holds a.Q4_1.gguf: convert it first "
                            f"with `evomerge convert-gguf {folder / 'a.Q4_1.gguf'} {folder}-hf`")


def test_a_folder_without_config_or_gguf_keeps_the_plain_message(tmp_path):
    with pytest.raises(CheckpointError, match=r"no config.json in the model folder$"):
        Checkpoint.open(tmp_path)


@pytest.mark.parametrize("name, exists", [("missing.gguf", False), ("model.bin", True)])
def test_convert_gguf_bad_input_is_one_line(tmp_path, name, exists):
    if exists:
        (tmp_path / name).write_bytes(b"not a gguf file")
    result = CliRunner().invoke(main, ["convert-gguf", str(tmp_path / name), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {tmp_path / name}: expected a .gguf file"]
    assert not (tmp_path / "out").exists()


def test_convert_gguf_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = CliRunner().invoke(main, ["convert-gguf", str(tmp_path / "m.gguf"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "output folder is not empty (pass --overwrite to replace it)" in result.output
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
