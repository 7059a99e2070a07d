"""GGUF files into Hugging Face folders.

evomerge reads safetensors folders lazily, tensor by tensor; a GGUF file is one quantised blob.
:func:`convert_gguf` has transformers read it (``gguf_file=``, dequantised to float) and writes a
plain safetensors folder with the tokenizer (chat template included) and the generation config:
``evomerge convert-gguf FILE.gguf OUT`` runs it.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from evomerge.errors import CheckpointError

__all__ = ["convert_gguf", "gguf_files", "gguf_hint"]

logger = logging.getLogger(__name__)


def gguf_files(folder: Path) -> list[Path]:
    """The GGUF files directly inside ``folder``, sorted."""
    return sorted(p for p in Path(folder).glob("*.gguf") if p.is_file())


def gguf_hint(folder: Path) -> str:
    """The conversion command for a folder holding GGUF files, or '' when it holds none."""
    files = gguf_files(folder)
    if not files:
        return ""
    return f"it holds {files[0].name}: convert it first with `evomerge convert-gguf {files[0]} {folder}-hf`"


def convert_gguf(gguf_file: Path, out_dir: Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write ``gguf_file`` as a safetensors folder in ``out_dir`` (dequantised to ``dtype``).

    The GGUF's ``quantization_config`` is dropped from the written config: the weights are plain
    floats once transformers has dequantised them.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    if not gguf_file.is_file() or gguf_file.suffix != ".gguf":
        raise CheckpointError(f"{gguf_file}: expected a .gguf file")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise CheckpointError(f"{out_dir}: output folder is not empty (pass --overwrite to replace it)")
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype) or not torch_dtype.is_floating_point:
        raise CheckpointError(f"dtype {dtype!r}: expected float32, bfloat16 or float16")
    try:
        import gguf  # noqa: F401  - transformers needs it to read the file
    except ImportError:
        raise CheckpointError(f"{gguf_file}: reading GGUF needs the gguf package (pip install gguf)") from None
    folder, name = gguf_file.parent, gguf_file.name
    logger.info("reading %s (dequantising to %s)", gguf_file, dtype)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch_dtype)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # a plain model of the same config takes the dequantised tensors (transformers refuses to save
    # the loaded one: it still carries the GGUF quantizer)
    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    del loaded
    model.generation_config = GenerationConfig.from_model_config(config)
    if out_dir.exists() and overwrite:
        shutil.rmtree(out_dir)  # no stale files from an earlier model
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("wrote %s", out_dir)
    return out_dir
