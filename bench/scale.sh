#!/usr/bin/env bash
# Scale-out benchmark (not part of the test suite), everything side by side in one run:
#   1. the queue: runs claimed per second by 1, 2 and 4 concurrent workers on SQLite and on
#      PostgreSQL, and the double claims found (bin/queue_bench.rs);
#   2. the API: upload and predict latency of `transferd serve` on PostgreSQL + S3
#      (SeaweedFS) against SQLite + local files (bench/scale_api.py), same binary, same
#      machine, requests alternating between the two.
# PostgreSQL runs as a throwaway cluster with its default durability (fsync on), SeaweedFS
# as `weed mini`, both on loopback. Usage: bench/scale.sh [UPLOADS] [PREDICTS]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/transferd/target}"
cargo build --release --locked -q --bin transferd --bin queue_bench
BIN="$CARGO_TARGET_DIR/release/transferd"
WEIGHTS="$("$BIN" --data-dir data weights path | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')"
UPLOADS="${1:-20}"
PREDICTS="${2:-200}"
WORK="$(mktemp -d)"
chmod 755 "$WORK"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
PIDS=()
PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
cleanup() {
    # weed mini does not exit on SIGTERM: SIGKILL after a moment.
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    sleep 2
    for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
    rm -rf "$WORK"
}
trap cleanup EXIT

echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores," \
    "$(grep -m1 -o -w -E 'avx512f|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')"
WEED="$(tests/tools/weed.sh)"
echo "PostgreSQL: $("$PGBIN/postgres" --version); SeaweedFS: $("$WEED" version 2>/dev/null | grep -m1 '^version')"

mkdir "$WORK/pg"
[ "$(id -u)" = 0 ] && chown postgres "$WORK/pg"
as_pg "$PGBIN/initdb" -D "$WORK/pg/data" -U postgres --auth=trust -E UTF8 >/dev/null
PGPORT=$(port)
as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
    -o "-p $PGPORT -k $WORK/pg -c listen_addresses=127.0.0.1" start >/dev/null
psql -q -h 127.0.0.1 -p "$PGPORT" -U postgres -c "CREATE DATABASE queue" -c "CREATE DATABASE api"
PG="postgres://postgres@127.0.0.1:$PGPORT"

echo
echo "## The queue"
"$CARGO_TARGET_DIR/release/queue_bench" --postgres "$PG/queue"

S3=$(port)
mkdir "$WORK/s3"
"$WEED" mini -dir="$WORK/s3" -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.port="$S3" \
    -master.port="$(port)" -volume.port="$(port)" -filer.port="$(port)" -admin.port="$(port)" \
    -webdav.port="$(port)" -s3.port.iceberg="$(port)" -master.port.grpc="$(port)" \
    -volume.port.grpc="$(port)" -filer.port.grpc="$(port)" -s3.port.grpc="$(port)" \
    -admin.port.grpc="$(port)" >"$WORK/weed.log" 2>&1 &
PIDS+=($!)
until curl -sf -X PUT "http://127.0.0.1:$S3/bench" >/dev/null; do sleep 0.3; done

serve() { # NAME PORT [FLAGS...]
    local name=$1 p=$2
    shift 2
    "$BIN" --data-dir "$WORK/$name" serve --addr "127.0.0.1:$p" --weights "$WEIGHTS" \
        --device cpu --min-images-per-class 2 "$@" >"$WORK/$name.log" 2>&1 &
    PIDS+=($!)
    until curl -sf "http://127.0.0.1:$p/readyz" >/dev/null; do sleep 0.2; done
}
LOCAL=$(port)
SHARED=$(port)
serve local "$LOCAL"
AWS_ENDPOINT_URL="http://127.0.0.1:$S3" AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench \
    AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true \
    serve shared "$SHARED" --database-url "$PG/api" --object-store s3://bench/transferd

echo
echo "## The API"
python3 bench/scale_api.py "http://127.0.0.1:$LOCAL" "http://127.0.0.1:$SHARED" \
    tests/fixtures "$UPLOADS" "$PREDICTS"
