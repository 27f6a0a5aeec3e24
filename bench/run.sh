#!/usr/bin/env bash
# transferd side by side with the tutorial's Keras pipeline and ONNX Runtime (not a test).
# Usage: bench/run.sh [ROUNDS] [DATASET_DIR] [--generic-baseline] [--skip-training]
#   ROUNDS (default 2): training runs of each, alternating which goes first;
#   DATASET_DIR (default ../shared/datasets/dogcat-sub): one folder per class, two classes;
#   --generic-baseline: also runs transferd on burn's generic convs (the CPU kernels' "before").
# Builds the release binaries, makes the peers' virtual environments (cached in
# ~/.cache/transferd/bench-venvs), and prints the markdown tables of bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-2}"
DATASET="${2:-../shared/datasets/dogcat-sub}"
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/transferd"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
cargo build --release --locked -q --bins
BIN="$CARGO_TARGET_DIR/release"
"$BIN/transferd" --data-dir data weights fetch >/dev/null
WEIGHTS="$("$BIN/transferd" --data-dir data weights path | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')"

. bench/venv.sh
KERAS_PY="$(venv keras bench/peers/requirements-keras.txt)"
ONNX_PY="$(venv onnx bench/peers/requirements-onnx.txt)"

echo "## $(date -u +%Y-%m-%d), $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -m)"
python3 bench/side_by_side.py --data "$DATASET" --rounds "$ROUNDS" \
    --transferd "$BIN/transferd" --bench "$BIN/bench" --weights "$WEIGHTS" \
    --keras-python "$KERAS_PY" --onnx-python "$ONNX_PY" "${@:3}"
