"""Build the demo world: a tiny base model and specialists whose merge beats every parent.

The world (all offline and deterministic; a few minutes at most on 2 CPU cores):

* a word-level vocabulary over English and a made-up second language "b" (every English word has
  one b word; see :mod:`evomerge.demo.data`);
* ``base``: a 4-layer Llama (hidden 128, tied embeddings, ~0.9M parameters) pre-trained on
  English, b and code-switched sentences, English<->b parallel pairs, facts and arithmetic facts
  stated as sentences in both languages, and English question/answer pairs about the facts (half
  of them with code-switched questions). It has never seen arithmetic asked as a question, nor a
  question answered in b;
* ``math``: base fine-tuned (every layer, embeddings frozen) on arithmetic questions asked and
  answered in English;
* ``lang``: base fine-tuned in its upper layers on fact questions (no arithmetic) asked and
  answered in b, then briefly in its lower layers on those and on English arithmetic questions
  answered in b: a drift that breaks math's answers in a merge.

Tasks (see :mod:`evomerge.demo.tasks`): ``demo_math``, ``demo_lang``, the merge target
``demo_target`` (half of each: every parent is poor on the half it was not trained for; a merge
that takes lang's upper layers and not its lower ones is good on both, one weight per model is
not) and ``demo_compose`` (arithmetic asked in b: the compositional skill; parents are poor,
merges gain there too but less). ``PRESETS['v1']`` rebuilds world version 1 (one full fine-tune
per specialist, where one weight per model does as well as a per-layer search).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from evomerge.demo import data
from evomerge.demo import train as T
from evomerge.demo.tasks import write_task_data, write_tasks
from evomerge.errors import ConfigError

WORLD_VERSION = 2  # 1: one full fine-tune per specialist (PRESETS['v1'])
MODEL_NAMES = ("base", "math", "lang")
STAMP = "world.json"
THREADS = 1  # fixed: kernels may round differently with another count; 1 also copes best with a busy CPU

SKILLS = {  # each specialist's own skill: what a phase-less fine-tune trains on
    "math": {"items": "arith", "ask": "en", "answer": "en"},
    "lang": {"items": "lookup", "ask": "b", "answer": "b"},
}

DEFAULT_CONFIG: dict = {
    "arch": {"hidden": 128, "mlp": 384, "layers": 4, "heads": 4, "tie": True},
    "batch": 64,
    # base pre-training mix: plain/parallel sentences and English Q/A about facts
    "base_mix": {"sentence": 0.6, "parallel": 0.2, "en_qa": 0.2},
    "base_arith": "cs",  # arithmetic statements in English, b and code-switched
    "arith_frac": 0.3,  # share of "sentence" samples that are arithmetic statements
    "qa_cs": 0.5,  # share of English Q/A whose question is code-switched
    "base_pack": 32,  # pack base sequences into rows of this many tokens (0: one per row)
    "base_steps": 1000,
    "base_lr": 3e-3,
    "math_steps": 200,
    "math_lr": 1e-3,
    "lang_steps": 150,
    "lang_lr": 3e-4,
    # share of the facts whose held-out items form the dev split (the search's fitness); the rest
    # form test. Training items, hence the models, do not depend on it.
    "dev_share": 1 / 3,
    # how each specialist is fine-tuned: None = one phase on its own skill, every layer and the
    # embeddings trained; otherwise a list of phases run in order, each
    # {"layers": "all" | "lower" | "upper" | [layer, ...], "embed": bool,
    #  "data": [{"items": "arith" | "lookup", "ask": "en" | "b", "answer": "en" | "b"}, ...]}
    # (lower/upper: the first/second half of the layers; texts drawn uniformly from the data
    # entries; a phase runs its own "steps" and "lr" if it has them, else <name>_steps and <name>_lr)
    # A fine-tune whose useful change sits in some layers while others drift: math is fine-tuned in
    # every layer; lang learns to answer in b in the upper half of the layers (gently: it needs its
    # whole change), then a short stretch of training on the lower half also teaches it to answer
    # English arithmetic in b, which breaks math's answers in a merge. The best merge takes lang's
    # upper layers and not its lower ones, which one weight per model cannot express. Embeddings
    # stay frozen (in a per-layer search they follow layer 0's weight).
    "math_phases": [{"layers": "all", "embed": False, "data": [SKILLS["math"]]}],
    "lang_phases": [
        {"layers": "upper", "embed": False, "lr": 2e-4, "data": [SKILLS["lang"]]},
        {"layers": "lower", "embed": False, "lr": 1e-3, "steps": 60,
         "data": [SKILLS["lang"], {"items": "arith", "ask": "en", "answer": "b"}]},
    ],
}

PRESETS: dict[str, dict] = {
    # the default world (version 2), spelled out: a per-layer search beats one weight per model
    "layered": {k: copy.deepcopy(DEFAULT_CONFIG[k]) for k in ("math_lr", "math_phases", "lang_phases")},
    # world version 1: each specialist one full fine-tune (every layer and the embeddings); a
    # per-layer search gains nothing over one weight per model there
    "v1": {"math_lr": 3e-4, "math_phases": None, "lang_phases": None},
}

__all__ = [
    "DEFAULT_CONFIG",
    "MODEL_NAMES",
    "PRESETS",
    "WORLD_VERSION",
    "add_world_config_option",
    "build_world",
    "world_arg",
    "world_config",
    "world_settings",
    "write_task_data",
    "write_tasks",
]


def world_config(overrides: dict | None = None) -> dict:
    """``DEFAULT_CONFIG`` with ``overrides`` applied: KeyError for an unknown setting, ValueError
    for a value of the wrong kind (each top-level value is checked against its default's kind)."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    for k, v in (overrides or {}).items():
        if k not in cfg:
            raise KeyError(f"unknown demo world setting {k!r}")
        _kind_checked(k, v)
        cfg[k] = copy.deepcopy(v)
    if not 0 < cfg["dev_share"] < 1:
        raise ValueError(f"demo world setting dev_share: expected a number between 0 and 1, got {cfg['dev_share']!r}")
    for name in SKILLS:
        _phase_layers_checked(cfg, name)
    return cfg


def _kind_checked(key: str, value: object) -> None:
    """A setting's value has its default's kind (an int also does for a float; phases may be None)."""
    default = DEFAULT_CONFIG[key]
    if key.endswith("_phases"):
        ok, want = value is None or isinstance(value, list), "a list of phases or null"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    else:
        ok, want = isinstance(value, type(default)), {dict: "an object", str: "a string"}[type(default)]
    if not ok:
        raise ValueError(f"demo world setting {key}: expected {want}, got {value!r}")


def world_settings(text: str | None, option: str = "--world") -> dict | None:
    """Parse a command line's world option: None stays None (the default world); a name of
    ``PRESETS`` gives a copy of that preset; anything else must be a JSON object of
    ``DEFAULT_CONFIG`` overrides, checked here by :func:`world_config`. Otherwise ConfigError: one
    line that names ``option`` (no prefix if it is empty)."""
    if text is None:
        return None
    if text in PRESETS:
        return copy.deepcopy(PRESETS[text])
    where = f"{option}: " if option else ""
    expected = f"expected a preset ({', '.join(PRESETS)}) or a JSON object of demo world settings"
    if not text.lstrip().startswith("{"):
        raise ConfigError(f"{where}{expected}, got {text!r}")
    try:
        overrides = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{where}{expected}; {text!r} is not valid JSON ({e})") from None
    # text parsed as JSON and starts with "{": an object
    try:
        world_config(overrides)
    except KeyError as e:
        raise ConfigError(f"{where}{e.args[0]} (known: {', '.join(DEFAULT_CONFIG)})") from None
    except ValueError as e:
        raise ConfigError(f"{where}{e}") from None
    return overrides


def world_arg(text: str) -> dict | None:
    """:func:`world_settings` as an argparse ``type=`` (the scripts' ``--world-config``): a bad
    value becomes argparse's one-line usage error."""
    try:
        return world_settings(text, option="")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_world_config_option(parser: argparse.ArgumentParser) -> None:
    """The scripts' ``--world-config PRESET|JSON`` (parsed by :func:`world_arg`; default None, the
    default world)."""
    parser.add_argument("--world-config", type=world_arg, default=None, metavar="PRESET|JSON",
                        help=f"world settings: a preset ({', '.join(PRESETS)}; v1: the world of earlier releases) "
                             "or a JSON object of evomerge.demo.world.DEFAULT_CONFIG overrides; give each world "
                             "its own --out")


def _phases(cfg: dict, name: str) -> list[dict]:
    phases = cfg[f"{name}_phases"]
    return [{"layers": "all", "embed": True, "data": [SKILLS[name]]}] if phases is None else phases


def _phase_layers(layers: str | list[int], n: int) -> set[int]:
    halves = {"all": range(n), "lower": range(n // 2), "upper": range(n // 2, n)}
    return set(halves[layers]) if isinstance(layers, str) else set(layers)


def _phase_layers_checked(cfg: dict, name: str) -> None:
    """Each phase names layers of the model and data the builder knows (ValueError otherwise)."""
    n = cfg["arch"]["layers"]
    for i, ph in enumerate(_phases(cfg, name)):
        where = f"demo world setting {name}_phases[{i}]"
        if not isinstance(ph, dict):
            raise ValueError(f"{where}: expected an object {{layers, embed, data[, steps, lr]}}, got {ph!r}")
        layers = ph.get("layers")
        if isinstance(layers, str) and layers not in ("all", "lower", "upper"):
            raise ValueError(f"{where}.layers: expected all, lower, upper or a list of layers, got {layers!r}")
        if not isinstance(layers, str) and not (
            isinstance(layers, list) and all(isinstance(x, int) and 0 <= x < n for x in layers)
        ):
            raise ValueError(f"{where}.layers: expected layer numbers in 0..{n - 1}, got {layers!r}")
        if not _phase_layers(layers, n) and not ph.get("embed"):
            raise ValueError(f"{where}: trains nothing (no layers and embed false)")
        if "steps" in ph and not (isinstance(ph["steps"], int) and ph["steps"] > 0):
            raise ValueError(f"{where}.steps: expected a positive integer, got {ph['steps']!r}")
        if "lr" in ph and not (isinstance(ph["lr"], float) and ph["lr"] > 0):
            raise ValueError(f"{where}.lr: expected a positive number, got {ph['lr']!r}")
        for d in ph.get("data") or [None]:
            if not (isinstance(d, dict) and d.get("items") in ("arith", "lookup")
                    and d.get("ask") in ("en", "b") and d.get("answer") in ("en", "b")):
                raise ValueError(f"{where}.data: expected entries {{items: arith|lookup, ask: en|b, answer: en|b}}, "
                                 f"got {d!r}")


def _code_hash() -> str:
    """Hash of the builder's source, so a changed recipe is never mistaken for a built world."""
    h = hashlib.sha256()
    here = Path(__file__).resolve().parent
    for name in ("data.py", "train.py", "world.py", "tasks.py"):
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


def _stamp(seed: int, cfg: dict) -> dict:
    return {"version": WORLD_VERSION, "code": _code_hash(), "seed": seed, "config": cfg}


def _is_built(out_dir: Path, stamp: dict) -> bool:
    p = out_dir / STAMP
    if not p.is_file():
        return False
    try:
        old = json.loads(p.read_text())
    except (OSError, ValueError):
        return False
    if {k: old.get(k) for k in stamp} != stamp:
        return False
    return all((out_dir / "models" / n / "model.safetensors").is_file() for n in MODEL_NAMES)


def build_world(
    out_dir: Path,
    *,
    seed: int = 0,
    force: bool = False,
    log: Callable[[str], None] | None = None,
    config: dict | None = None,
) -> dict[str, Path]:
    """Build (or reuse) the demo world under ``out_dir``; return {model name: model folder}.

    Writes ``out_dir/models/{base,math,lang}/`` (Hugging Face folders: config.json,
    model.safetensors, tokenizer files), ``out_dir/tasks/`` (the lm-eval task suite, data split
    with ``seed``, identical to the repository's ``tasks/`` for seed 0) and ``out_dir/world.json``
    (a stamp: version, code hash, seed, settings, timings). A world already built with the same
    seed, settings and code is reused unless ``force``. ``config`` overrides entries of
    ``DEFAULT_CONFIG`` (e.g. fewer steps for tests). Same seed and settings give bit-identical
    weights.
    """
    out_dir = Path(out_dir)
    cfg = world_config(config)
    stamp = _stamp(seed, cfg)
    paths = {n: out_dir / "models" / n for n in MODEL_NAMES}
    say = log or (lambda _msg: None)
    if not force and _is_built(out_dir, stamp):
        say(f"demo world already built in {out_dir} (seed {seed}); reusing it")
        return paths

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STAMP).unlink(missing_ok=True)
    for p in [*paths.values(), out_dir / "tasks"]:
        if p.exists():
            shutil.rmtree(p)
    write_tasks(out_dir / "tasks", seed, cfg["dev_share"])

    tok = T.build_tokenizer()
    splits = data.split_items(seed, cfg["dev_share"])
    timings: dict[str, float] = {}
    t_all = time.perf_counter()
    with T.deterministic(THREADS):
        t0 = time.perf_counter()
        say(f"pre-training base ({cfg['base_steps']} steps)")
        base = T.new_model(cfg["arch"], seed)
        T.train(
            base,
            data.base_stream(T.rng_for(seed, "base"), cfg),
            steps=cfg["base_steps"],
            lr=cfg["base_lr"],
            batch=cfg["batch"],
            pack=cfg["base_pack"],
            seed=seed,
            log=say,
        )
        T.save(base, tok, paths["base"])
        timings["base"] = time.perf_counter() - t0

        n_layers = cfg["arch"]["layers"]
        for name in SKILLS:
            t0 = time.perf_counter()
            model = copy.deepcopy(base)
            for k, phase in enumerate(_phases(cfg, name)):
                layers = _phase_layers(phase["layers"], n_layers)
                everything = phase.get("embed", False) and layers == set(range(n_layers))
                steps = phase.get("steps", cfg[f"{name}_steps"])
                say(f"fine-tuning {name} ({steps} steps"
                    + ("" if everything else f", layers {sorted(layers)}{' and embeddings' if phase.get('embed') else ''}")
                    + ")")
                parts = [(splits[f"{d['items']}_train"], d["ask"], d["answer"]) for d in phase["data"]]
                T.train(
                    model,
                    data.qa_mix_stream(T.rng_for(seed, name if k == 0 else f"{name}-{k}"), parts),
                    steps=steps,
                    lr=phase.get("lr", cfg[f"{name}_lr"]),
                    batch=cfg["batch"],
                    warmup=20,
                    answer_only=True,
                    seed=seed,
                    log=say,
                    trainable=None if everything else T.layer_filter(layers, phase.get("embed", False)),
                )
            T.save(model, tok, paths[name])
            timings[name] = time.perf_counter() - t0
            del model
    timings["total"] = time.perf_counter() - t_all
    (out_dir / STAMP).write_text(json.dumps({**stamp, "timings_s": timings}, indent=2) + "\n")
    say(f"demo world built in {timings['total']:.0f}s: {out_dir}")
    return paths


def main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Build the evomerge demo world.")
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--preset", choices=sorted(PRESETS), default=None, help="build a preset world instead of the default")
    a = ap.parse_args(argv)
    paths = build_world(a.out_dir, seed=a.seed, force=a.force, log=print,
                        config=None if a.preset is None else PRESETS[a.preset])
    for name, p in paths.items():
        print(f"{name}: {p}")


if __name__ == "__main__":
    main()
