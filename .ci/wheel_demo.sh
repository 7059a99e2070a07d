#!/usr/bin/env bash
# Install anywhere: build the wheel, install it into a fresh venv (torch first, pinned, then the
# wheel) and run a reduced `evomerge demo` from an empty folder outside the checkout.
# Usage: .ci/wheel_demo.sh [TRIALS]   (default 6: the 3 baselines and 3 CMA-ES trials)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
trials=${1:-6}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS
$PY -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --upgrade pip wheel
"$work/venv/bin/pip" wheel --quiet --no-deps --wheel-dir "$work/dist" .
# torch first, pinned: 2.13.0 is a CPU build; an unpinned torch pulls a multi-GB CUDA build
"$work/venv/bin/pip" install --quiet torch==2.13.0
"$work/venv/bin/pip" install --quiet "$work"/dist/evomerge-*.whl
echo "wheel-demo: installed in $((SECONDS - t0)) s" >&2
mkdir "$work/empty"
t1=$SECONDS
(cd "$work/empty" && HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 "$work/venv/bin/evomerge" demo --out demo_out --trials "$trials")
test -f "$work/empty/demo_out/summary.json" && test -f "$work/empty/demo_out/merged/config.json"
echo "wheel-demo: evomerge demo --trials $trials from an empty folder took $((SECONDS - t1)) s ($((SECONDS - t0)) s in all)" >&2
