#!/usr/bin/env bash
# GPU benchmark in one go, for a machine with a real GPU: device info, Lite0 inference at
# batch 1 and 64, a full-network fine-tune step at batch 32, and the whole default run with
# full fine-tuning (bench/gpu-config.json) on the tutorial's photos, with accuracy and wall
# time per phase.
#
#   bench/gpu.sh [DATA_DIR]        (default ../shared/datasets/dogcat-sub)
#
# Needs the weights in data/weights/ (`transferd weights fetch` beforehand on a machine with
# network) and a Vulkan loader plus the GPU's Vulkan driver. Uses target/release/bench, or
# $TRANSFERD_BENCH_BIN, building it when absent.
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-../shared/datasets/dogcat-sub}"
bin="${TRANSFERD_BENCH_BIN:-${CARGO_TARGET_DIR:-target}/release/bench}"
if [ ! -x "$bin" ]; then
    cargo build --release --locked --bin bench
fi
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$bin" --device wgpu --batches 1,64 --config bench/gpu-config.json "$data"
