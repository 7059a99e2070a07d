#!/usr/bin/env python
"""Benchmark in-memory candidate building (#6): evomerge's workspace vs the memory-bandwidth floor
and vs mergekit's in-memory path (what mergekit-evolve runs per candidate), same checkpoints, same run.

    python scripts/bench_merge.py --params 100M --sources 3 --dtype bf16 --device cpu
    python scripts/bench_merge.py --params 1.1B --sources 3 --dtype bf16 --device cuda --json out.json

Synthetic Llama-shaped checkpoints (a base and N fine-tunes = base + noise) are written to a temp
folder as safetensors. Per method, a *candidate* is one ``Workspace.load(recipe)``: planning the
recipe and writing every merged parameter into the live model, synchronised; the per-model weights
and densities change between repeats, so nothing is reused from the previous candidate beyond the
parameter-independent caches. The first load per method builds those caches and is reported as
``setup``. The floor is (bytes read once + bytes written once) / measured device copy bandwidth.

mergekit (optional, benchmark only: ``pip install mergekit``) runs on the same checkpoints with the
recipe as a mergekit config (its ``dtype`` = the storage dtype, as mergekit-evolve does).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evomerge.config import parse_count as config_parse_count  # noqa: E402
from evomerge.methods import METHODS  # noqa: E402
from evomerge.recipe import Recipe  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
VOCAB = 32000


# --------------------------------------------------------------------------- synthetic models
def parse_count(text: str) -> int:
    return int(config_parse_count(text))  # 100M, 1.1B, 20G


def llama_shape(params: int) -> dict[str, int]:
    """A Llama config with about ``params`` parameters (vocab 32000, untied head)."""
    presets = [(2.5e8, 768, 2048, 12, 4), (7e8, 1024, 2816, 16, 8), (3e9, 2048, 5632, 32, 4),
               (5e9, 3072, 8192, 24, 8), (float("inf"), 4096, 11008, 32, 32)]
    _, h, inter, heads, kv = next(p for p in presets if params < p[0])
    kv_dim = kv * (h // heads)
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * inter + 2 * h
    layers = max(1, round((params - 2 * VOCAB * h - h) / per_layer))
    return {"hidden_size": h, "intermediate_size": inter, "num_attention_heads": heads,
            "num_key_value_heads": kv, "num_hidden_layers": layers, "vocab_size": VOCAB}


def write_models(root: Path, shape: dict[str, int], sources: int, dtype: torch.dtype, gen_device: str) -> list[str]:
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=2048, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2)
    config.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        meta = LlamaForCausalLM(config)
    specs = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    g = torch.Generator(device=gen_device).manual_seed(0)
    base: dict[str, torch.Tensor] = {}
    for name, s in specs.items():
        if name.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(s, generator=g, device=gen_device)
        else:
            t = 0.02 * torch.randn(s, generator=g, device=gen_device)
        base[name] = t.to(dtype).cpu()
    refs = []
    for i in range(sources + 1):
        path = root / ("base" if i == 0 else f"ft{i}")
        path.mkdir(parents=True)
        if i == 0:
            state = base
        else:
            state = {}
            for name, t in base.items():
                noise = torch.randn(t.shape, generator=g, device=gen_device) * (0.002 * (1 + 0.3 * i))
                state[name] = (t.to(gen_device, torch.float32) + noise).to(dtype).cpu()
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        config.dtype = dtype
        config.save_pretrained(path)
        refs.append(str(path))
        del state
    return refs


CALIBRATION_WORDS = "the a of to and in is it you that he was for on are with as i his they be at one have this".split()


def write_calibration(root: Path, refs: list[str]) -> Path:
    """For data-aware methods (``needs``): a word-level tokenizer in every checkpoint (ids below
    the vocabulary size) and a calibration text of 32 pseudo-sentences."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *CALIBRATION_WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    for ref in refs:
        if not (Path(ref) / "tokenizer.json").exists():
            fast.save_pretrained(ref)
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(CALIBRATION_WORDS[int(k)] for k in torch.randint(len(CALIBRATION_WORDS), (64,), generator=g))
             for _ in range(32)]
    path = root / "calibration.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- recipes
def _frac(x: float) -> float:
    return x - math.floor(x)


def recipe_for(method: str, refs: list[str], j: int, dtype: str) -> dict[str, Any]:
    """Candidate ``j`` for ``method``: per-model weights/densities change with ``j``."""
    base, fts = refs[0], refs[1:]
    m = METHODS[method]
    n = len(fts) if m.max_models is None else min(len(fts), m.max_models)
    fts = fts[:n]

    def w(i: int) -> float:
        return round(0.2 + 0.6 * _frac(0.37 * (i + 1) + 0.61 * j), 4)

    def dens(i: int) -> float:
        return round(0.25 + 0.5 * _frac(0.23 * (i + 1) + 0.41 * j), 4)

    r: dict[str, Any] = {"merge_method": method, "dtype": dtype}
    if method == "linear":
        r["models"] = [{"model": x, "parameters": {"weight": w(i)}} for i, x in enumerate(fts)]
    elif method in ("slerp", "nearswap"):
        t = round(0.2 + 0.6 * _frac(0.61 * j + 0.1), 4) if method == "slerp" else round(0.001 + 0.004 * _frac(0.61 * j), 5)
        r.update(base_model=base, models=[{"model": fts[0]}, {"model": base}], parameters={"t": t})
    elif method == "nuslerp":
        r.update(base_model=base, models=[{"model": x, "parameters": {"weight": w(i)}} for i, x in enumerate(fts)]
                 + [{"model": base}])
    elif method == "passthrough":
        r["models"] = [{"model": fts[0], "parameters": {"scale": round(0.8 + 0.4 * _frac(0.61 * j), 4)}}]
    elif m.needs:  # data-aware: statistics on calibration text (write_calibration), per-trial knobs vary
        r["models"] = [{"model": x, "parameters": {"weight": w(i)}} for i, x in enumerate(fts)]
        r["parameters"] = ({"alpha": round(0.5 + 0.5 * _frac(0.61 * j), 4)} if method == "regmean"
                           else {"fisher_floor": 1e-6})
        r["calibration"] = {"data": str(Path(base).parent / "calibration.txt"), "n": 32, "max_length": 64}
    elif method == "model_stock":
        r.update(base_model=base, models=[{"model": x} for x in fts] + [{"model": base}])
    elif method == "sce":
        r.update(base_model=base, models=[{"model": x} for x in fts] + [{"model": base}],
                 parameters={"select_topk": round(0.3 + 0.6 * _frac(0.61 * j + 0.2), 4)})
    elif method == "multislerp":
        r.update(base_model=base, models=[{"model": x, "parameters": {"weight": w(i)}} for i, x in enumerate(fts)]
                 + [{"model": base}])
    elif method == "karcher":  # the base is one more input; the step count changes per candidate
        r.update(base_model=base, models=[{"model": x} for x in fts],
                 parameters={"max_iter": 5 + j % 6, "tol": round(1e-6 * (1 + 9 * _frac(0.61 * j)), 9)})
    elif method == "arcee_fusion":  # no knobs: every candidate is the same merge
        r.update(base_model=base, models=[{"model": fts[0]}, {"model": base}])
    elif method in ("ram", "ramplus_tl"):  # task vectors here are ~0.002-0.004 per entry
        glob: dict[str, Any] = {"epsilon": round(0.001 + 0.004 * _frac(0.61 * j), 6) if method == "ram" else 0.003}
        if method == "ramplus_tl":
            glob.update(r=round(0.1 + 0.8 * _frac(0.61 * j), 4), alpha=round(0.1 + 0.8 * _frac(0.37 * j + 0.2), 4))
        r.update(base_model=base, models=[{"model": x} for x in fts] + [{"model": base}], parameters=glob)
    else:
        models = []
        for i, x in enumerate(fts):
            p: dict[str, Any] = {"weight": w(i)}
            if m.param("density"):
                p["density"] = dens(i)
            if m.param("gamma"):
                p["gamma"] = 0.02
            if m.param("epsilon"):
                p["epsilon"] = 0.1
            models.append({"model": x, "parameters": p})
        r.update(base_model=base, models=models + [{"model": base}])
        if m.stochastic:
            r["random_seed"] = 0
    return r


# --------------------------------------------------------------------------- measurements
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int) -> float:
    """Bytes per second moved by a device-to-device copy (read + write counted)."""
    n = nbytes // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(7):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * src.nbytes / statistics.median(times[2:])


def io_bytes(recipe: Recipe, sources: dict[str, Any], out_itemsize: int) -> tuple[int, int]:
    """(bytes read once, bytes written once) for a recipe: every distinct input tensor, every output."""
    from evomerge.engine import plan_merge

    plan = plan_merge(recipe, sources)
    read: set = set()
    written = 0
    for t in plan.tasks:
        numel = math.prod(sources[(t.base or t.inputs[0])[0]].shape((t.base or t.inputs[0])[1]))
        written += numel * out_itemsize
        for ref in ([t.base] if t.base else []) + list(t.inputs):
            read.add(ref)
    nread = sum(math.prod(sources[m].shape(n)) * sources[m].dtype(n).itemsize for m, n in read)
    return nread, written


class MergekitRunner:
    """mergekit's in-memory candidate path: plan, execute, copy into a live model's parameters."""

    def __init__(self, device: torch.device):
        import transformers  # noqa: F401
        from mergekit.architecture import arch_info_for_config  # noqa: F401

        self.device = device

    def run(self, recipe: dict[str, Any], params: dict[str, torch.Tensor]) -> None:
        import transformers
        from mergekit.architecture import arch_info_for_config
        from mergekit.config import MergeConfiguration
        from mergekit.graph import Executor
        from mergekit.io.tasks import ReturnTensor
        from mergekit.merge import _model_out_config
        from mergekit.options import MergeOptions
        from mergekit.plan import MergePlanner

        data = {k: v for k, v in recipe.items() if k != "random_seed"}
        config = MergeConfiguration.model_validate(data)
        hf = transformers.AutoConfig.from_pretrained(data.get("base_model") or data["models"][0]["model"])
        arch = arch_info_for_config(hf)
        options = MergeOptions(device=str(self.device))
        planner = MergePlanner(config, arch, options, _model_out_config(config, arch, trust_remote_code=False))
        try:
            tasks = planner.plan_in_memory()
        except Exception:  # noqa: BLE001 - mergekit 0.1.5: pydantic rejects Task[Optional[Tensor]]; same path
            planner._plan()
            tasks = [ReturnTensor.model_construct(weight_info=w, tensor_task=t,
                                                  dtype=w.force_dtype or planner.config.out_dtype)
                     for w, t in planner._tensors]
        dev = str(self.device)
        for task, value in Executor(tasks, math_device=dev, storage_device=dev).run(quiet=True):
            params[task.weight_info.name].data.copy_(value, non_blocking=True)
        sync(self.device)


def busy_note() -> str:
    try:
        load = os.getloadavg()[0]
    except OSError:
        return "unknown"
    return f"load average {load:.2f} on {os.cpu_count()} CPUs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", default="100M", help="model size, e.g. 100M, 1.1B, 7B")
    ap.add_argument("--sources", type=int, default=3, help="fine-tunes besides the base")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--methods", default="all", help="comma-separated, or all")
    ap.add_argument("--repeats", type=int, default=5, help="timed candidates per method (ours)")
    ap.add_argument("--mergekit-repeats", type=int, default=3)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--mergekit-warmup", choices=["each", "once"], default="each",
                    help="an untimed mergekit run before each method's timed runs, or only before the first")
    ap.add_argument("--memory-limit", default=None, help="workspace device memory limit, e.g. 20G")
    ap.add_argument("--chunk-elems", type=int, default=None)
    ap.add_argument("--no-fused", action="store_true", help="CUDA: eager kernels instead of Triton")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--json", nargs="?", const="-", default=None, help="write JSON (to a file, or - for stdout)")
    ap.add_argument("--show-plan", action="store_true", help="print the memory plan")
    args = ap.parse_args()

    logging.basicConfig(level=logging.WARNING)
    from evomerge.checkpoint import Checkpoint
    from evomerge.workspace import Workspace

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    methods = sorted(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
    shape = llama_shape(parse_count(args.params))
    mergekit = None
    mk_error = None
    if not args.no_mergekit:
        try:
            mergekit = MergekitRunner(device)
        except Exception as e:  # noqa: BLE001
            mk_error = f"{type(e).__name__}: {e}"
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_merge_"))
    log = (lambda *a: print(*a, file=sys.stderr, flush=True))
    results: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        if (root / "base" / "model.safetensors").exists():
            refs = [str(root / "base")] + [str(root / f"ft{i}") for i in range(1, args.sources + 1)]
        else:
            refs = write_models(root, shape, args.sources, dtype, "cuda" if device.type == "cuda" else "cpu")
        log(f"checkpoints: {shape} x {args.sources + 1} in {root} ({time.perf_counter() - t0:.1f} s)")
        if any(METHODS[m].needs for m in methods):
            write_calibration(root, refs)
        sources = {r: Checkpoint.open(r) for r in refs}
        n_params = sum(math.prod(sources[refs[0]].shape(n)) for n in sources[refs[0]].tensor_names())
        limit = parse_count(args.memory_limit) if args.memory_limit else None
        t0 = time.perf_counter()
        ws = Workspace(refs, template=refs[0], device=args.device, dtype=dtype, memory_limit=limit,
                       chunk_elems=args.chunk_elems, fused=False if args.no_fused else None)
        log(f"workspace ready ({time.perf_counter() - t0:.1f} s); fused kernels: {ws.kernels is not None}")
        params = dict(ws.model.named_parameters())
        bw = copy_bandwidth(device, min(1 << 30, max(1 << 26, 2 * n_params)))
        log(f"device copy bandwidth: {bw / 1e9:.1f} GB/s; {busy_note()}")
        mk_warmed = False
        for method in methods:
            recipes = [recipe_for(method, refs, j, DTYPE_NAMES[args.dtype]) for j in range(args.repeats + 1)]
            parsed = [Recipe.from_dict(r) for r in recipes]
            nread, nwritten = io_bytes(parsed[0], sources, dtype.itemsize)
            floor_ms = (nread + nwritten) / bw * 1e3
            sync(device)
            t0 = time.perf_counter()
            stats_before = ws.stats_seconds
            ws.load(parsed[0])  # builds this method's caches (and statistics, for a method with needs)
            sync(device)
            stats_s = ws.stats_seconds - stats_before
            setup = time.perf_counter() - t0 - stats_s
            times = []
            for rec in parsed[1:]:
                sync(device)
                t0 = time.perf_counter()
                ws.load(rec)
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
            ours = statistics.median(times)
            row: dict[str, Any] = {"method": method, "ours_ms": ours, "ours_ms_all": times, "setup_s": setup,
                                   "floor_ms": floor_ms, "ratio_to_floor": ours / floor_ms,
                                   "bytes_read": nread, "bytes_written": nwritten}
            if METHODS[method].needs:
                row["statistics_s"] = stats_s  # computed once (then cached on disk), not in setup_s
            if mergekit is not None and not METHODS[method].needs:  # mergekit has no data-aware method
                try:
                    mk_times = []
                    warm = 1 if args.mergekit_warmup == "each" or not mk_warmed else 0
                    for j in range(args.mergekit_repeats + warm):
                        rec = recipes[(j + 1 - warm) % len(recipes)]
                        sync(device)
                        t0 = time.perf_counter()
                        mergekit.run(rec, params)
                        if j >= warm:  # a warm-up run fills mergekit's loader cache and imports
                            mk_times.append((time.perf_counter() - t0) * 1e3)
                    mk_warmed = True
                    row["mergekit_ms"] = statistics.median(mk_times)
                    row["mergekit_ms_all"] = mk_times
                    row["speedup_vs_mergekit"] = row["mergekit_ms"] / ours
                except Exception as e:  # noqa: BLE001
                    row["mergekit_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            results.append(row)
            mk = (f"  mergekit {row['mergekit_ms']:9.1f} ms  x{row['speedup_vs_mergekit']:.1f}"
                  if "mergekit_ms" in row else (f"  mergekit: {row['mergekit_error']}" if "mergekit_error" in row else ""))
            st = f"  statistics {stats_s:6.2f} s" if METHODS[method].needs else ""
            log(f"{method:<17} {ours:9.2f} ms  floor {floor_ms:8.2f} ms  x{ours / floor_ms:5.1f}  setup {setup:6.2f} s{st}{mk}")
        if args.show_plan:
            log(ws.memory_table())
        info = {
            "params": n_params, "shape": shape, "sources": args.sources, "dtype": args.dtype, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "copy_bandwidth_GBps": bw / 1e9,
            "fused_kernels": ws.kernels is not None, "busy": busy_note(), "mergekit": mergekit is not None,
            "mergekit_error": mk_error, "memory_plan": ws.memory.summary() if ws.memory else None,
        }
        ws.close()
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    print_table(info, results, sys.stderr if args.json == "-" else sys.stdout)
    if args.json:
        payload = json.dumps({"info": info, "results": results}, indent=2)
        if args.json == "-":
            print(payload)
        else:
            Path(args.json).write_text(payload + "\n")
    return 0


def print_table(info: dict[str, Any], results: list[dict[str, Any]], out: Any) -> None:
    print(f"\n{info['params'] / 1e6:.0f}M parameters x {info['sources']} sources + base, {info['dtype']}, "
          f"{info['device']} ({info['device_name']}, {info['cpus']} CPUs), torch {info['torch']}, "
          f"copy bandwidth {info['copy_bandwidth_GBps']:.1f} GB/s, fused kernels: {info['fused_kernels']}, "
          f"{info['busy']}", file=out)
    head = f"{'method':<17} {'ours ms':>9} {'floor ms':>9} {'x floor':>8} {'setup s':>8}"
    if info["mergekit"]:
        head += f" {'mergekit ms':>12} {'speed-up':>9}"
    print(head, file=out)
    for r in results:
        line = f"{r['method']:<17} {r['ours_ms']:9.2f} {r['floor_ms']:9.2f} {r['ratio_to_floor']:8.1f} {r['setup_s']:8.2f}"
        if info["mergekit"]:
            line += (f" {r['mergekit_ms']:12.1f} {r['speedup_vs_mergekit']:9.1f}" if "mergekit_ms" in r
                     else f" {'error':>12} {'':>9}")
        print(line, file=out)
    if info.get("mergekit_error"):
        print(f"mergekit not run: {info['mergekit_error']}", file=out)


if __name__ == "__main__":
    raise SystemExit(main())
