#!/usr/bin/env bash
# Load test of POST /api/predict (not part of the test suite):
#   0. one client at a time for 20 s: p50/p99 of a single photo through the service;
#   1. $REQUESTS (default 10,000) requests at concurrency 32 from wrk (a second process, loopback) against a
#      trained Lite0 model: errors, p50/p99, throughput, mean micro-batch, server RSS; then
#      ONNX Runtime's model-only time at batch 1 and throughput at batch 32 with the same
#      Lite0 weights, on the same machine in the same run (bench/peers/onnx_peer.py), and
#      the ratios of 0 and 1 to them;
#   2. overload: 30 s at concurrency 256 with the default --predict-queue and
#      --request-timeout: answers by status, the slowest request, how fast a refusal comes,
#      /healthz polled throughout, server RSS;
#   3. predict latency while a default run trains on the tutorial's photos (if present).
# Usage: bench/load.sh [DATASET_DIR]   (default ../shared/datasets/dogcat-sub)
set -euo pipefail
cd "$(dirname "$0")/.."
command -v wrk >/dev/null || { echo "needs wrk (Debian: apt-get install wrk)" >&2; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/transferd/target}"
cargo build --release --locked -q
BIN="$CARGO_TARGET_DIR/release/transferd"
WEIGHTS="$("$BIN" --data-dir data weights path | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')"
# The ONNX Runtime peer's environment, made before anything starts (a failed install stops
# the script here, not after the long phases).
. bench/venv.sh
ONNX_PY="$(venv onnx bench/peers/requirements-onnx.txt)"
DATASET="${1:-../shared/datasets/dogcat-sub}"
REQUESTS="${REQUESTS:-10000}"
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

# A small model to predict with: the test fixtures, tiny config. Lite0 (224 px) by name, not
# `auto` (which picks Lite1 for so few photos): the network ONNX Runtime runs below.
python3 - "$WORK/pets.zip" <<'PY'
import sys, zipfile, pathlib
with zipfile.ZipFile(sys.argv[1], "w") as z:
    for f in sorted(pathlib.Path("tests/fixtures/pets").rglob("*.jpg")):
        z.write(f, f.relative_to("tests/fixtures/pets"))
PY
DS=$(curl -sf -F file=@"$WORK/pets.zip" "$BASE/api/datasets" | json '["id"]')
RUN=$(curl -sf -H 'content-type: application/json' \
    -d "{\"dataset_id\":\"$DS\",\"config\":{\"backbone\":\"lite0\",\"finetune\":{\"enabled\":true,\"epochs\":1}}}" \
    "$BASE/api/runs" | json '["id"]')
wait_run "$RUN"

IMAGE="tests/fixtures/samples/test_cat.jpg"
curl -sf --data-binary @"$IMAGE" "$BASE/api/predict" >/dev/null   # load the model
RSS0=$(rss)
# One client at a time: a single photo's latency through the whole service.
IMAGE="$IMAGE" wrk -t1 -c1 -d20s --timeout 60s --latency -s bench/predict.lua "$BASE/api/predict" >"$WORK/wrk1.txt"
served() { curl -s "$BASE/metrics" | awk '/^transferd_predict_images_total/ {print int($2)}'; }
# The micro-batch histogram's sum and count.
passes() { awk '/^transferd_predict_batch_size_sum/ {s=$2} /^transferd_predict_batch_size_count/ {c=$2} END {print s+0, c+0}'; }
PASSES0=$(curl -s "$BASE/metrics" | passes)
START_COUNT=$(served)
# wrk keeps its threads' results until its duration ends, so it runs in the background and
# is interrupted (it then prints its report) once the server has answered $REQUESTS requests.
# Its timeout is raised from 2 s so that slow answers are measured, not cut off.
IMAGE="$IMAGE" wrk -t4 -c32 -d3600s --timeout 60s --latency -s bench/predict.lua "$BASE/api/predict" >"$WORK/wrk.txt" &
WRK=$!
T0=$(date +%s.%N)
: >"$WORK/rss.txt"
while [ $(( $(served) - START_COUNT )) -lt "$REQUESTS" ]; do rss >>"$WORK/rss.txt"; sleep 2; done
T1=$(date +%s.%N)
kill -INT $WRK; wait $WRK || true
RSS1=$(rss)
RSS_MAX=$(sort -n "$WORK/rss.txt" | tail -1)
# Memory over the run: the samples at each quarter of it.
RSS_Q=$(awk '{a[NR]=$1} END {printf "%s / %s / %s / %s", a[int(NR/4)+1], a[int(NR/2)], a[int(3*NR/4)], a[NR]}' "$WORK/rss.txt")
ACTIVE=$(python3 -c "print(f'{$REQUESTS/($T1-$T0):.1f}')")
cat "$WORK/wrk.txt"

field() { awk -v k="$1" '$1 == k {print $2}' "$2"; }
REQS=$(awk '/requests in/ {print $1}' "$WORK/wrk.txt")
ERRS=$(awk '/Non-2xx/ {print $NF} /Socket errors/ {print}' "$WORK/wrk.txt")
# Images per forward pass during phase 1, from the server's own histogram.
BATCH=$(curl -s "$BASE/metrics" | passes | awk -v before="$PASSES0" '{split(before, b);
    if ($2 > b[2]) printf "%.1f", ($1-b[1])/($2-b[2]); else printf "n/a (no pass counted)"}')

# The same weights in ONNX Runtime, model only, at batch 1 and 32, while the server is idle.
"$ONNX_PY" bench/peers/onnx_peer.py "$WEIGHTS" tests/fixtures/samples >"$WORK/ort.json"
ORT1=$(json '["batch1_ms_per_call"]' <"$WORK/ort.json")
ORT32=$(json '["batch32_images_per_second"]' <"$WORK/ort.json")
RATIO=$(python3 -c "print(f'{$ACTIVE/$ORT32:.3f}')")
# wrk prints the median in its own unit (us, ms, s or m); in ms here.
P50_1=$(awk '$1 == "50%" {v=$2; u=v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v);
    print v * (u == "us" ? 0.001 : u == "s" ? 1000 : u == "m" ? 60000 : 1)}' "$WORK/wrk1.txt")
RATIO1=$(python3 -c "print(f'{$P50_1/$ORT1:.3f}')")

# Overload: far more clients than the queue holds. Meanwhile /healthz is polled, and single
# predictions probe how fast a refusal comes.
REFUSED0=$(curl -s "$BASE/metrics" | awk '/^transferd_predict_refused_total/ {n+=$2} END {print n+0}')
IMAGE="$IMAGE" wrk -t4 -c256 -d30s --timeout 60s --latency -s bench/predict.lua \
    "$BASE/api/predict" >"$WORK/wrk256.txt" &
WRK=$!
: >"$WORK/health.txt"; : >"$WORK/probe.txt"; : >"$WORK/rss256.txt"
sleep 2
while kill -0 $WRK 2>/dev/null; do
    curl -s -o /dev/null --max-time 10 -w '%{http_code} %{time_total}\n' "$BASE/healthz" >>"$WORK/health.txt" || echo "000 10" >>"$WORK/health.txt"
    curl -s -o /dev/null --max-time 60 -w '%{http_code} %{time_total}\n' --data-binary @"$IMAGE" \
        "$BASE/api/predict" >>"$WORK/probe.txt" || true
    rss >>"$WORK/rss256.txt"
    sleep 0.5
done
wait $WRK || true
cat "$WORK/wrk256.txt"
REFUSED=$(( $(curl -s "$BASE/metrics" | awk '/^transferd_predict_refused_total/ {n+=$2} END {print n+0}') - REFUSED0 ))
STATUSES=$(awk -F': ' '/^statuses:/ {print $2}' "$WORK/wrk256.txt")
MAXLAT=$(awk '$1 == "Latency" {print $4}' "$WORK/wrk256.txt")
HEALTH=$(awk '{n++; if ($1 != 200) bad++; if ($2 > m) m = $2} END {printf "%d polls, %d failed, slowest %.0f ms", n, bad, m*1000}' "$WORK/health.txt")
PROBES=$(wc -l <"$WORK/probe.txt")
PROBE=$(awk '$1 == 503 {print $2}' "$WORK/probe.txt" | sort -n | awk -v all="$PROBES" '{t[NR]=$1} END {if (NR) printf "%d of %d probes refused: median %.1f ms, slowest %.1f ms", NR, all, t[int((NR+1)/2)]*1000, t[NR]*1000; else printf "no probe refused (%d sent)", all}')
RSS256=$(sort -n "$WORK/rss256.txt" | tail -1)

# Predict latency while a default run trains (the frozen pass keeps every core busy).
TRAINING="n/a (no dataset at $DATASET)"
if [ -d "$DATASET" ]; then
    (cd "$(dirname "$DATASET")" && python3 -m zipfile -c "$WORK/train.zip" "$(basename "$DATASET")")
    DS2=$(curl -sf -F file=@"$WORK/train.zip" "$BASE/api/datasets" | json '["id"]')
    RUN2=$(curl -sf -H 'content-type: application/json' -d "{\"dataset_id\":\"$DS2\"}" "$BASE/api/runs" | json '["id"]')
    sleep 10
    IMAGE="$IMAGE" wrk -t2 -c4 -d20s --timeout 60s --latency -s bench/predict.lua \
        "$BASE/api/predict?model=$RUN" >"$WORK/wrk-train.txt"
    PHASE=$(curl -s "$BASE/api/runs/$RUN2" | json '["phase"]')
    TRAINING="p50 $(field 50% "$WORK/wrk-train.txt"), p99 $(field 99% "$WORK/wrk-train.txt"), $(awk '/Requests\/sec/ {print $2}' "$WORK/wrk-train.txt") req/s at concurrency 4 (run in $PHASE)"
    curl -s -X POST "$BASE/api/runs/$RUN2/cancel" >/dev/null
fi

CPU="$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo), $(nproc) cores, $(grep -m1 '^flags' /proc/cpuinfo | grep -ow 'avx2\|fma\|avx512f' | sort -u | tr '\n' ' ')"
echo
echo "| measure | value |"
echo "|---|---|"
echo "| machine | $CPU|"
echo "| model | Lite0 at 224 px, trained on the 24 fixture photos |"
echo "| one client at a time (20 s): answers by status | $(awk -F': ' '/^statuses:/ {print $2}' "$WORK/wrk1.txt") |"
echo "| one client at a time: p50 / p99 | $(field 50% "$WORK/wrk1.txt") / $(field 99% "$WORK/wrk1.txt") |"
echo "| ONNX Runtime, same Lite0 weights, model only, batch 1 | $ORT1 ms |"
echo "| one client's p50 against ONNX Runtime's batch 1 | ${RATIO1}× |"
echo "| requests | $REQS (concurrency 32, 4 wrk threads) |"
echo "| errors (non-2xx, socket) | ${ERRS:-0} |"
echo "| answers by status | $(awk -F': ' '/^statuses:/ {print $2}' "$WORK/wrk.txt") |"
echo "| p50 / p90 / p99 latency | $(field 50% "$WORK/wrk.txt") / $(field 90% "$WORK/wrk.txt") / $(field 99% "$WORK/wrk.txt") |"
echo "| throughput | $ACTIVE req/s ($REQUESTS answers over the time they took) |"
echo "| mean micro-batch (from /metrics) | $BATCH images per forward pass |"
echo "| ONNX Runtime, same Lite0 weights, model only, batch 32 | $ORT32 img/s |"
echo "| throughput against ONNX Runtime's | ${RATIO}× |"
echo "| server RSS before, at each quarter of the run, peak, after | $RSS0 / $RSS_Q / $RSS_MAX / $RSS1 MiB |"
echo "| overload, concurrency 256 for 30 s: answers | $STATUSES; refusals counted in /metrics: $REFUSED |"
echo "| overload: slowest request (wrk) | $MAXLAT (request timeout 30 s) |"
echo "| overload: a refusal's latency | $PROBE |"
echo "| overload: /healthz throughout | $HEALTH |"
echo "| overload: server RSS peak | $RSS256 MiB |"
echo "| predict while a run trains | $TRAINING |"
