"""The workspace (#6): its live model after ``load(recipe)`` equals ``evomerge merge`` (the engine)
for the same recipe, for every registered method, across consecutive candidates with changing
parameters, under memory limits that force streaming and recomputation, on CPU (and CUDA when
there is one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import load_state, make_tiny_llama
from evomerge.engine import merge_in_memory
from evomerge.errors import MergeError
from evomerge.methods import METHODS, Method, Param
from evomerge.methods.steps import whole_tensor
from evomerge.methods.task_arithmetic import bernoulli_thresholds
from evomerge.recipe import Recipe
from evomerge.workspace import Workspace


# --------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models3(tmp_path_factory) -> dict[str, str]:
    """A 3-layer tiny Llama and three fine-tunes (float32): gradients get a middle layer."""
    root = tmp_path_factory.mktemp("ws3")
    base = make_tiny_llama(root / "base", seed=10, num_layers=3, hidden=32, intermediate=48, vocab=64)
    out = {"base": str(base)}
    for i, name in enumerate("abc"):
        out[name] = str(make_tiny_llama(root / name, seed=11 + i, base=base, num_layers=3, hidden=32,
                                        intermediate=48, vocab=64, noise=0.02))
    return out


def _to_bf16(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        f.unlink()
    state = {k: v.to(torch.bfloat16) for k, v in load_state(src).items()}
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["dtype"] = cfg["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def models_bf16(models3, tmp_path_factory) -> dict[str, str]:
    """The same models stored in bfloat16: task vectors full of exact magnitude ties."""
    root = tmp_path_factory.mktemp("ws3bf16")
    return {k: str(_to_bf16(Path(v), root / k)) for k, v in models3.items()}


# --------------------------------------------------------------------------- recipes
def _attn_split(a: float, b: float) -> list[dict]:
    return [{"filter": "self_attn", "value": a}, {"value": b}]


def recipes_for(method: str, m: dict[str, str], dtype: str | None = None) -> list[dict]:
    """Three consecutive candidates for ``method``: per-model weights/densities change every time,
    with per-layer gradients and filters."""
    base, a, b, c = m["base"], m["a"], m["b"], m["c"]
    out = []
    for j in range(3):
        s = 0.1 * j
        gta = {
            "a": {"weight": [0.3 + s, 0.9 - s, 0.5], "density": _attn_split(0.35 + s, 0.6 - s)},
            "b": {"weight": _attn_split(0.7 - s, 0.4 + s), "density": [0.5, 0.3 + s]},
            "c": {"weight": 0.45 + s, "density": 1.0 if j == 1 else 0.55 - s},
        }
        glob: dict = {}
        if method == "linear":
            models = [{"model": x, "parameters": {"weight": gta[k]["weight"]}} for k, x in (("a", a), ("b", b), ("c", c))]
            r = {"models": models, "parameters": {"normalize": j != 1}}
        elif method in ("slerp", "nearswap"):
            t = [0.1 + s, 0.8 - s] if method == "slerp" else _attn_split(0.004 + 0.01 * j, 0.03 - 0.01 * j)
            r = {"models": [{"model": a}, {"model": base}], "base_model": base, "parameters": {"t": t}}
        elif method == "nuslerp":
            flags = [{"nuslerp_flatten": True}, {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                     {"nuslerp_flatten": False, "nuslerp_row_wise": False}][j]
            r = {"models": [{"model": a, "parameters": {"weight": [0.2 + s, 0.6]}},
                            {"model": b, "parameters": {"weight": 0.5 - s}}], "parameters": flags}
            if j != 2:
                r["base_model"] = base
                r["models"].append({"model": base})
        elif method == "model_stock":
            r = {"models": [{"model": a}, {"model": b}, {"model": c}, {"model": base}], "base_model": base,
                 "parameters": {"filter_wise": j == 1}}
        elif method == "sce":
            r = {"models": [{"model": a}, {"model": b}, {"model": c}, {"model": base}], "base_model": base,
                 "parameters": {"select_topk": [1.0, _attn_split(0.4, 0.7), [0.3, 0.8]][j]}}
        elif METHODS[method].needs:  # data-aware (fisher, regmean): statistics from calibration text
            cal = Path(a).parent / "cal.txt"
            cal.write_text("one two three\nfour five six seven\neight nine\n")
            models = [{"model": x, "parameters": {"weight": gta[k]["weight"]}} for k, x in (("a", a), ("b", b), ("c", c))]
            glob = {"alpha": [0.9, 0.5 + s]} if method == "regmean" else {"fisher_floor": [1e-6, 1e-3, 1e-8][j]}
            r = {"models": models, "parameters": glob, "calibration": {"data": str(cal), "n": 3, "max_length": 16}}
        elif method == "multislerp":  # with a base, then without
            r = {"models": [{"model": a, "parameters": {"weight": [0.2 + s, 0.6]}},
                            {"model": b, "parameters": {"weight": _attn_split(0.5 - s, 0.3)}},
                            {"model": c, "parameters": {"weight": 0.4}}],
                 "parameters": {"normalize_weights": j != 1}}
            if j != 2:
                r["base_model"] = base
        elif method == "karcher":  # the base, when named, is one more input
            r = {"models": [{"model": a}, {"model": b}, {"model": c}],
                 "parameters": {"max_iter": [10, 2, 0][j], "tol": _attn_split(1e-5, 1e-7 + 1e-6 * j)}}
            if j != 1:
                r["base_model"] = base
        elif method == "arcee_fusion":
            r = {"models": [{"model": [a, b, c][j]}, {"model": base}], "base_model": base}
        elif method in ("ram", "ramplus_tl"):  # epsilon near the task vectors' scale: masks vary
            glob = {"epsilon": _attn_split(0.01 + 0.005 * j, [0.02, 0.0, 0.02][j])}
            if method == "ramplus_tl":
                glob.update({"r": [0.1, 0.5, 1.0][j], "alpha": _attn_split(0.2 + s, 0.9)})
            r = {"models": [{"model": a}, {"model": b}, {"model": c}, {"model": base}], "base_model": base,
                 "parameters": glob}
        elif method == "passthrough":
            r = {"slices": [{"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"scale": [1.0, 1.5 + s]}}]},
                            {"sources": [{"model": b, "layer_range": [2, 3], "parameters": {"scale": 0.5 + s}}]}]}
        else:  # task-vector methods
            spec = METHODS[method]
            models = []
            for k, x in (("a", a), ("b", b), ("c", c)):
                params = {"weight": gta[k]["weight"]}
                if spec.param("density"):
                    params["density"] = gta[k]["density"]
                if spec.param("gamma"):
                    params["gamma"] = [0.02, 0.1, 0.05][j]
                if spec.param("epsilon"):
                    params["epsilon"] = 0.1 if k != "b" else 0.05 + 0.05 * j
                models.append({"model": x, "parameters": params})
            models.append({"model": base})
            glob = {"lambda": 1.0 + 0.1 * j} if j else {}
            if spec.param("rescale") and j == 2:
                glob["rescale"] = True
                glob["rescale_mode"] = "keep_prob" if spec.stochastic else "l1"
            if spec.param("normalize") and j == 1:
                glob["normalize"] = not spec.param("normalize").default
            r = {"models": models, "base_model": base, "parameters": glob}
            r["random_seed"] = 7 + j % 2
        r["merge_method"] = method
        if dtype:
            r["dtype"] = dtype
        out.append(r)
    return out


def assert_same(ws: Workspace, recipe: Recipe, device: str = "cpu") -> None:
    expected = merge_in_memory(recipe, device=device)
    live = ws.state_dict()
    for name, tensor in expected.items():
        got = live[name]
        assert got.dtype == tensor.dtype, name
        assert torch.equal(got, tensor), f"{recipe.merge_method}: {name} differs (max {float((got.float() - tensor.float()).abs().max())})"
        # bit-exact, signed zeros included
        assert torch.equal(got.view(torch.int16 if got.element_size() == 2 else torch.int32),
                           tensor.view(torch.int16 if tensor.element_size() == 2 else torch.int32)), name


def _workspace(m: dict[str, str], **kw) -> Workspace:
    refs = [m[k] for k in ("base", "a", "b", "c")]
    return Workspace(refs, template=m["base"], **kw)


# --------------------------------------------------------------------------- equivalence
@pytest.mark.parametrize("method", sorted(METHODS))
def test_workspace_equals_engine_for_every_method(models3, method):
    ws = _workspace(models3, chunk_elems=97)  # odd chunks: boundaries everywhere
    try:
        for data in recipes_for(method, models3):
            recipe = Recipe.from_dict(data)
            ws.load(recipe)
            assert_same(ws, recipe)
    finally:
        ws.close()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_workspace_equals_engine_bf16_sources(models_bf16, method):
    """bf16 storage (sources kept as stored), float32 math, bf16 live model; magnitude ties abound."""
    ws = _workspace(models_bf16, dtype=torch.bfloat16, chunk_elems=1000)
    try:
        for data in recipes_for(method, models_bf16, dtype="bfloat16"):
            recipe = Recipe.from_dict(data)
            ws.load(recipe)
            assert_same(ws, recipe)
    finally:
        ws.close()


def test_methods_switch_within_one_workspace(models3):
    """One workspace serves a mixed-method search: caches of one method never leak into another."""
    ws = _workspace(models3)
    try:
        order = ["ties", "dare_ties", "linear", "della", "ties", "sce", "breadcrumbs_ties", "dare_ties"]
        for i, method in enumerate(order):
            recipe = Recipe.from_dict(recipes_for(method, models3)[i % 3])
            ws.load(recipe)
            assert_same(ws, recipe)
    finally:
        ws.close()


def test_ties_among_magnitudes_follow_the_engine(tmp_path):
    """Task vectors with massive exact ties (quantized deltas): the cached ranks pick the same
    entries as the engine's topk-with-tie-break."""
    base = make_tiny_llama(tmp_path / "base", seed=1, num_layers=2)
    state = load_state(base)
    refs = [str(base)]
    for i in range(2):
        d = tmp_path / f"q{i}"
        shutil.copytree(base, d)
        g = torch.Generator().manual_seed(i)
        q = {k: v + 0.01 * torch.randint(-2, 3, v.shape, generator=g).float() for k, v in state.items()}
        save_file(q, str(d / "model.safetensors"), metadata={"format": "pt"})
        refs.append(str(d))
    ws = Workspace(refs, template=refs[0], chunk_elems=50)
    try:
        for dens in (0.3, 0.5, 0.77):
            for method in ("ties", "breadcrumbs", "della_linear", "sce"):
                params = {"weight": 1.0, "density": dens}
                if method == "della_linear":
                    params["epsilon"] = 0.1
                if method == "sce":
                    params = {}
                data = {"merge_method": method, "base_model": refs[0],
                        "models": [{"model": r, **({"parameters": params} if params else {})} for r in refs[1:]]
                        + [{"model": refs[0]}]}
                if method == "sce":
                    data["parameters"] = {"select_topk": dens}
                recipe = Recipe.from_dict(data)
                ws.load(recipe)
                assert_same(ws, recipe)
    finally:
        ws.close()


def _noisy_mean(base, xs, p, generators):
    """A method given only as a whole-tensor function: base + scale * mean of the task vectors,
    each kept where a seeded coin says so (stochastic) or everywhere."""
    acc = torch.zeros_like(base)
    for x, g in zip(xs, generators):
        d = x - base
        acc = acc + (d * torch.bernoulli(torch.full_like(d, 0.5), generator=g) if g is not None else d)
    return base + acc * (p["scale"] / len(xs))


@pytest.mark.parametrize("stochastic", [False, True])
def test_a_method_with_only_a_whole_tensor_function_runs_in_the_workspace(models3, monkeypatch, stochastic):
    """The registry's generic steps: a new method (one function, one entry) merges in the
    workspace exactly as in the engine, seeded draws included."""
    entry = Method(name="noisy_mean", **whole_tensor(_noisy_mean),
                   params=(Param("scale", "global", default=1.0, search=(0.5, 1.5)),),
                   base="required", min_models=1, max_models=None, stochastic=stochastic)
    monkeypatch.setitem(METHODS, "noisy_mean", entry)
    ws = _workspace(models3, chunk_elems=97)
    try:
        for scale in (1.0, 0.7):
            recipe = Recipe.from_dict({"merge_method": "noisy_mean", "base_model": models3["base"], "random_seed": 3,
                                       "parameters": {"scale": scale},
                                       "models": [{"model": models3[k]} for k in ("a", "b", "base")]})
            ws.load(recipe)
            assert_same(ws, recipe)
    finally:
        ws.close()


# --------------------------------------------------------------------------- memory planner
def test_planner_streams_and_recomputes_under_a_small_limit(models3):
    refs = [models3[k] for k in ("base", "a", "b", "c")]
    one_model = sum(t.numel() * t.element_size() for t in load_state(Path(models3["base"])).values())
    # room for the base and one fine-tune only: the rest is re-read from disk, ranks are recomputed
    ws = Workspace(refs, template=refs[0], memory_limit=int(one_model * 2.05), chunk_elems=301)
    try:
        for data in recipes_for("ties", models3) + recipes_for("dare_linear", models3):
            recipe = Recipe.from_dict(data)
            ws.load(recipe)
            assert_same(ws, recipe)
        rows = ws.memory.summary()
        where = {(r["what"], r["where"]) for r in rows}
        assert ("source", "device") in where and ("source", "disk") in where
        assert ("magnitude ranks", "recompute") in where and ("bernoulli thresholds", "recompute") in where
        # sources come first: a derived cache is on the device only where a source did not fit
        src_dev = sum(r["bytes"] for r in rows if r["what"] == "source" and r["where"] == "device")
        assert src_dev >= ws.memory.device_used - sum(r["bytes"] for r in rows if r["what"] != "source" and r["where"] == "device")
        assert ws.memory.device_used <= ws.memory.device_budget
        table = ws.memory_table()
        assert "recomputed per candidate" in table and "disk, re-read per candidate" in table
        assert ws.describe()["placements"]["disk"] > 0
    finally:
        ws.close()


def test_planner_keeps_everything_when_it_fits(models3):
    ws = _workspace(models3)
    try:
        for data in recipes_for("della", models3) + recipes_for("breadcrumbs", models3) + recipes_for("sce", models3):
            ws.load(Recipe.from_dict(data))
        rows = ws.memory.summary()
        assert {r["where"] for r in rows} == {"device"}
        kinds = {r["what"] for r in rows}
        assert {"source", "magnitude ranks", "row ranks", "bernoulli thresholds", "variance ranks"} <= kinds
    finally:
        ws.close()


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "dare_ties", "della", "sce", "model_stock", "nuslerp"])
def test_zero_memory_limit_still_identical(models3, method):
    """Nothing resident: every source re-read per candidate, every cache recomputed."""
    ws = _workspace(models3, memory_limit=0, chunk_elems=64)
    try:
        for data in recipes_for(method, models3):
            recipe = Recipe.from_dict(data)
            ws.load(recipe)
            assert_same(ws, recipe)
        assert {r["where"] for r in ws.memory.summary()} <= {"disk", "recompute"}
    finally:
        ws.close()


# --------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("shape", [(1000,), (37, 53)])
def test_bernoulli_thresholds_reproduce_torch_bernoulli(shape):
    dev = torch.device("cpu")
    fast = bernoulli_thresholds(1234, shape, dev)
    search = bernoulli_thresholds(1234, shape, dev, force_search=True)
    assert torch.equal(fast, search)
    g = torch.Generator().manual_seed(5)
    for p in (torch.full(shape, 0.3), torch.rand(shape, generator=g), torch.full(shape, 1.0), torch.zeros(shape)):
        drawn = torch.bernoulli(p, generator=torch.Generator().manual_seed(1234)).bool()
        assert torch.equal(drawn, p >= fast)


def test_non_finite_merge_fails_like_the_engine(models3):
    ws = _workspace(models3)
    try:
        data = {"merge_method": "linear", "parameters": {"normalize": False},
                "models": [{"model": models3["a"], "parameters": {"weight": 1e39}}]}
        with pytest.raises(MergeError, match="non-finite"):
            ws.load(Recipe.from_dict(data))
        with pytest.raises(MergeError, match="non-finite"):
            merge_in_memory(Recipe.from_dict(data))
        assert ws.recipe is None
        ok = Recipe.from_dict(recipes_for("linear", models3)[0])
        ws.load(ok)
        assert_same(ws, ok)
    finally:
        ws.close()


def test_describe_and_timing(models3):
    ws = _workspace(models3)
    try:
        ws.load(Recipe.from_dict(recipes_for("ties", models3)[0]))
        info = ws.describe()
        assert info["parameters"] > 0 and info["sources"] == 4 and info["memory_plan"]
        assert ws.last_load_seconds is not None and ws.last_load_seconds > 0
        assert ws.tokenizer is not None
    finally:
        ws.close()


# --------------------------------------------------------------------------- CUDA
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eager"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_cuda_workspace_equals_engine(models_bf16, method, fused):
    ws = _workspace(models_bf16, device="cuda", dtype=torch.bfloat16, fused=fused)
    try:
        if fused:
            assert ws.kernels is not None, "Triton kernels did not load"
        for data in recipes_for(method, models_bf16, dtype="bfloat16"):
            recipe = Recipe.from_dict(data)
            ws.load(recipe)
            assert_same(ws, recipe, device="cuda")
        if fused:
            assert ws.kernels is not None, f"a fused kernel failed: {ws.kernel_error}"
    finally:
        ws.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_streaming_from_host_is_identical(models_bf16):
    one = sum(t.numel() * t.element_size() for t in load_state(Path(models_bf16["base"])).values())
    ws = _workspace(models_bf16, device="cuda", dtype=torch.bfloat16, memory_limit=int(one * 2.05))
    try:
        for method in ("ties", "dare_ties", "della_linear", "linear"):
            for data in recipes_for(method, models_bf16, dtype="bfloat16"):
                recipe = Recipe.from_dict(data)
                ws.load(recipe)
                assert_same(ws, recipe, device="cuda")
        assert ("source", "host") in {(r["what"], r["where"]) for r in ws.memory.summary()}
    finally:
        ws.close()


# --------------------------------------------------------------------------- fused kernels without a GPU
def _interpreting() -> bool:
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _interpreting(), reason="run with TRITON_INTERPRET=1 and Triton installed")
@pytest.mark.parametrize("stored", ["fp32", "bf16"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_fused_kernels_in_the_triton_interpreter(models3, models_bf16, method, stored):
    """The Triton kernels (run by Triton's CPU interpreter) perform the engine's exact operations.
    (float32 outputs: the interpreter's own bf16 store rounds differently from a GPU's.)"""
    m = models3 if stored == "fp32" else models_bf16
    ws = _workspace(m, fused=True)
    try:
        assert ws.kernels is not None
        for data in recipes_for(method, m, dtype="float32"):
            recipe = Recipe.from_dict(data)
            ws.load(recipe)
            assert_same(ws, recipe)
        assert ws.kernels is not None, f"a fused kernel failed: {ws.kernel_error}"
    finally:
        ws.close()


def test_memory_plan_logged_once_at_info(models3, caplog):
    """The plan grows with each new method (ties, then della's caches): shown once at info, its
    growth at debug only, so it does not fill (and tear) the search's progress display."""
    import logging

    ws = _workspace(models3)
    try:
        with caplog.at_level(logging.DEBUG, logger="evomerge.workspace"):
            for data in recipes_for("ties", models3) + recipes_for("della", models3):
                ws.load(Recipe.from_dict(data))
        plans = [r for r in caplog.records if r.getMessage().startswith("memory plan")]
        assert len(plans) >= 2  # it did change
        assert [r.levelno for r in plans] == [logging.INFO] + [logging.DEBUG] * (len(plans) - 1)
    finally:
        ws.close()
