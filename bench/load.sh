#!/usr/bin/env bash
# Load test of POST /api/predict (not part of the test suite):
#   1. 10,000 requests at concurrency 32 from wrk (a second process, loopback) against a
#      trained model: errors, p50/p99, throughput, server RSS before and after;
#   2. predict latency while a default run trains on the tutorial's photos (if present).
# Usage: bench/load.sh [DATASET_DIR]   (default ../shared/datasets/dogcat-sub)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "needs wrk (Debian: apt-get install wrk)" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/transferd/target}"
cargo build --release --locked -q
BIN="$CARGO_TARGET_DIR/release/transferd"
WEIGHTS="$("$BIN" --data-dir data weights path | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')"
DATASET="${1:-../shared/datasets/dogcat-sub}"
WORK="$(mktemp -d)"
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
BASE="http://127.0.0.1:$PORT"
"$BIN" --data-dir "$WORK/data" serve --addr "127.0.0.1:$PORT" --weights "$WEIGHTS" \
    --min-images-per-class 2 >"$WORK/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; rm -rf "$WORK"' EXIT
until curl -sf "$BASE/readyz" >/dev/null; do sleep 0.2; done
rss() { awk '/VmRSS/ {print int($2/1024)}' "/proc/$SERVER/status"; }
json() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }
wait_run() {
    while :; do
        s=$(curl -s "$BASE/api/runs/$1" | json '["status"]')
        case "$s" in succeeded) return 0;; failed|cancelled) echo "run $1 $s" >&2; exit 1;; esac
        sleep 1
    done
}

# A small model to predict with: the test fixtures, tiny config.
python3 - "$WORK/pets.zip" <<'PY'
import sys, zipfile, pathlib
with zipfile.ZipFile(sys.argv[1], "w") as z:
    for f in sorted(pathlib.Path("tests/fixtures/pets").rglob("*.jpg")):
        z.write(f, f.relative_to("tests/fixtures/pets"))
PY
DS=$(curl -sf -F file=@"$WORK/pets.zip" "$BASE/api/datasets" | json '["id"]')
RUN=$(curl -sf -H 'content-type: application/json' \
    -d "{\"dataset_id\":\"$DS\",\"config\":{\"finetune\":{\"enabled\":true,\"epochs\":1}}}" \
    "$BASE/api/runs" | json '["id"]')
wait_run "$RUN"

IMAGE="tests/fixtures/samples/test_cat.jpg"
curl -sf --data-binary @"$IMAGE" "$BASE/api/predict" >/dev/null   # load the model
RSS0=$(rss)
served() { curl -s "$BASE/metrics" | awk '/^transferd_predict_images_total/ {print int($2)}'; }
START_COUNT=$(served)
# wrk keeps its threads' results until its duration ends, so it runs in the background and
# is interrupted (it then prints its report) once the server has answered 10,000 requests.
IMAGE="$IMAGE" wrk -t4 -c32 -d3600s --latency -s bench/predict.lua "$BASE/api/predict" >"$WORK/wrk.txt" &
WRK=$!
T0=$(date +%s.%N)
: >"$WORK/rss.txt"
while [ $(( $(served) - START_COUNT )) -lt 10000 ]; do rss >>"$WORK/rss.txt"; sleep 2; done
T1=$(date +%s.%N)
kill -INT $WRK; wait $WRK || true
RSS1=$(rss)
RSS_MAX=$(sort -n "$WORK/rss.txt" | tail -1)
# Memory over the run: the samples at each quarter of it.
RSS_Q=$(awk '{a[NR]=$1} END {printf "%s / %s / %s / %s", a[int(NR/4)+1], a[int(NR/2)], a[int(3*NR/4)], a[NR]}' "$WORK/rss.txt")
ACTIVE=$(python3 -c "print(f'{10000/($T1-$T0):.1f}')")
cat "$WORK/wrk.txt"

field() { awk -v k="$1" '$1 == k {print $2}' "$2"; }
REQS=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
ERRS=$(awk '/Non-2xx/ {print $NF} /Socket errors/ {print}' "$WORK/wrk.txt")

# Predict latency while a default run trains (the frozen pass keeps every core busy).
TRAINING="n/a (no dataset at $DATASET)"
if [ -d "$DATASET" ]; then
    (cd "$(dirname "$DATASET")" && python3 -m zipfile -c "$WORK/train.zip" "$(basename "$DATASET")")
    DS2=$(curl -sf -F file=@"$WORK/train.zip" "$BASE/api/datasets" | json '["id"]')
    RUN2=$(curl -sf -H 'content-type: application/json' -d "{\"dataset_id\":\"$DS2\"}" "$BASE/api/runs" | json '["id"]')
    sleep 10
    IMAGE="$IMAGE" wrk -t2 -c4 -d20s --latency -s bench/predict.lua \
        "$BASE/api/predict?model=$RUN" >"$WORK/wrk-train.txt"
    PHASE=$(curl -s "$BASE/api/runs/$RUN2" | json '["phase"]')
    TRAINING="p50 $(field 50% "$WORK/wrk-train.txt"), p99 $(field 99% "$WORK/wrk-train.txt"), $(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-train.txt") req/s at concurrency 4 (run in $PHASE)"
    curl -s -X POST "$BASE/api/runs/$RUN2/cancel" >/dev/null
fi

echo
echo "| measure | value |"
echo "|---|---|"
echo "| requests | $REQS (concurrency 32, 4 wrk threads) |"
echo "| errors (non-2xx, socket) | ${ERRS:-0} |"
echo "| p50 / p90 / p99 latency | $(field 50% "$WORK/wrk.txt") / $(field 90% "$WORK/wrk.txt") / $(field 99% "$WORK/wrk.txt") |"
echo "| throughput | $ACTIVE req/s (10,000 answers over the time they took) |"
echo "| server RSS before, at each quarter of the run, peak, after | $RSS0 / $RSS_Q / $RSS_MAX / $RSS1 MiB |"
echo "| predict while a run trains | $TRAINING |"
