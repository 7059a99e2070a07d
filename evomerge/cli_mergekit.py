"""mergekit-yaml's options on ``evomerge merge``: each with mergekit's meaning where evomerge has
one, else accepted with one line saying why it changes nothing here, or refused with one line.

The options are declared here (not in cli.py) so that the merge command stays one screen long.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import click

from evomerge.errors import ConfigError

_SUFFIX = {"k": 10**3, "m": 10**6, "b": 10**9}
DEFAULT_OUT_SHARD_SIZE = "5B"  # mergekit-yaml's default (checkpoint.DEFAULT_SHARD_BYTES; not imported: no torch for --help)


def parse_size(text: str | int) -> int:
    """mergekit's size syntax: an integer, or one with a K, M or B suffix (powers of 1000). mergekit
    documents it as parameters per shard but compares it with each tensor's bytes; so does
    evomerge (``5B`` = 5 * 10^9 bytes). 0 writes one file however large."""
    s = str(text).strip()
    if s.isdigit():
        return int(s)
    if len(s) > 1 and s[-1].lower() in _SUFFIX and s[:-1].isdigit():
        return int(s[:-1]) * _SUFFIX[s[-1].lower()]
    raise ConfigError(f"--out-shard-size: expected a whole number with an optional K, M or B suffix "
                      f"(e.g. 500M, 5B), got {s!r}")


@dataclass(frozen=True)
class MergeSettings:
    """What ``evomerge merge`` does, once its options are read."""

    device: str
    seed: int | None
    copy_tokenizer: bool
    write_card: bool
    max_shard_bytes: int
    allow_crimes: bool
    num_threads: int | None
    quiet: bool
    notes: list[str] = field(default_factory=list)  # one line per option that changes nothing here


# (option, why it changes nothing in evomerge) - accepted so mergekit command lines run unchanged
_NOOP: dict[str, str] = {
    "trust_remote_code": "--trust-remote-code: not needed: evomerge reads config.json and safetensors only and never "
                         "runs a model's own code",
    "lazy_unpickle": "--lazy-unpickle: not needed: evomerge always reads weights lazily, one tensor at a time from "
                     "memory-mapped safetensors",
    "low_cpu_memory": "--low-cpu-memory: not needed: each merged tensor goes to the writer as soon as it is made, "
                      "so results never pile up in memory",
    "read_to_gpu": "--read-to-gpu: not needed: evomerge reads each tensor once and moves it to --device",
    "multi_gpu": "--multi-gpu: evomerge merge runs on one device (pick it with --device cuda:N)",
    "async_write": "--async-write: ignored: evomerge writes each shard as it fills",
    "write_threads": "--write-threads: ignored: evomerge writes each shard as it fills, in one thread",
    "clone_tensors": "--clone-tensors: not needed: evomerge always copies a tensor that shares memory with another",
    "transformers_cache": "--transformers-cache: ignored: set HF_HUB_CACHE for where Hub downloads go",
    "lora_merge_cache": "--lora-merge-cache: not needed: evomerge applies LoRA adapters in memory and caches nothing",
    "lora_merge_dtype": "--lora-merge-dtype: ignored: evomerge applies LoRA adapters in float32",
}

# (option, why evomerge refuses it)
_REFUSED: dict[str, str] = {
    "unsafe_truncate_embeddings": "--unsafe-truncate-embeddings is not supported: give the recipe a "
                                  "tokenizer_source (or a tokenizer: block) instead",
    "no_safe_serialization": "--no-safe-serialization is not supported: evomerge writes safetensors only",
}


def mergekit_yaml_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add mergekit-yaml's options (all keyword arguments of ``fn``; read them with :func:`settings`)."""
    opts = [
        click.option("--cuda/--no-cuda", default=False, help="Merge on the GPU (same as --device cuda)."),
        click.option("--gpu-rich", is_flag=True, help="mergekit's alias for --cuda --low-cpu-memory --read-to-gpu "
                                                      "--multi-gpu: here, --cuda."),
        click.option("--random-seed", type=int, default=None,
                     help="Seed for the randomized methods (DARE/DELLA masks); overrides the recipe's random_seed."),
        click.option("--copy-tokenizer/--no-copy-tokenizer", default=True, show_default=True,
                     help="Copy the tokenizer source's tokenizer files to the output."),
        click.option("--out-shard-size", default=DEFAULT_OUT_SHARD_SIZE, show_default=True,
                     metavar="SIZE", help="Bytes per output shard: a number with an optional K/M/B suffix "
                                          "(as mergekit reads it; 0: one file)."),
        click.option("--write-model-card/--no-write-model-card", default=True, show_default=True,
                     help="Write README.md (the model card). mergekit_config.yml is always written."),
        click.option("--allow-crimes/--no-allow-crimes", default=False,
                     help="Merge models of different architectures (their tensor names and shapes must agree)."),
        click.option("-j", "--num-threads", type=click.IntRange(min=1), default=None,
                     help="Threads for CPU tensor arithmetic (torch.set_num_threads)."),
        click.option("--quiet/--no-quiet", default=False, help="No progress bar."),
        click.option("--safe-serialization/--no-safe-serialization", default=True,
                     help="Safetensors output (the only kind evomerge writes)."),
        click.option("--unsafe-truncate-embeddings/--no-unsafe-truncate-embeddings", default=False,
                     help="Refused: use tokenizer_source in the recipe."),
    ]
    for name in ("trust_remote_code", "lazy_unpickle", "low_cpu_memory", "read_to_gpu", "multi_gpu",
                 "async_write", "clone_tensors"):
        flag = name.replace("_", "-")
        opts.append(click.option(f"--{flag}/--no-{flag}", default=False, help="Accepted from mergekit-yaml; "
                                 "has no effect here (a note says why)."))
    for name in ("write_threads", "transformers_cache", "lora_merge_cache", "lora_merge_dtype"):
        opts.append(click.option(f"--{name.replace('_', '-')}", default=None, help="Accepted from mergekit-yaml; "
                                 "has no effect here (a note says why)."))
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def settings(device: str | None, seed: int | None, **mk: Any) -> MergeSettings:
    """Read ``evomerge merge``'s options (``mk``: those :func:`mergekit_yaml_options` added) into
    one :class:`MergeSettings`; a refused option raises ConfigError (one line)."""
    if mk.pop("unsafe_truncate_embeddings"):
        raise ConfigError(_REFUSED["unsafe_truncate_embeddings"])
    if not mk.pop("safe_serialization"):
        raise ConfigError(_REFUSED["no_safe_serialization"])
    random_seed = mk.pop("random_seed")
    if seed is not None and random_seed is not None and seed != random_seed:
        raise ConfigError(f"--seed {seed} and --random-seed {random_seed} disagree (they are the same option)")
    cuda = mk.pop("cuda") | mk.pop("gpu_rich")
    if device is None:  # as mergekit: an explicit --device wins over --cuda
        device = "cuda" if cuda else "cpu"
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    notes = [why for name, why in _NOOP.items() if mk.pop(name) not in (None, False)]
    return MergeSettings(device=device, seed=seed if seed is not None else random_seed,
                         copy_tokenizer=mk.pop("copy_tokenizer"), write_card=mk.pop("write_model_card"),
                         max_shard_bytes=parse_size(mk.pop("out_shard_size")), allow_crimes=mk.pop("allow_crimes"),
                         num_threads=mk.pop("num_threads"), quiet=mk.pop("quiet"), notes=notes)
