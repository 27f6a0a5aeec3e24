#!/usr/bin/env bash
# Bounded fuzzing of the upload validation with cargo fuzz (libFuzzer); not part of the tests.
# Targets: `ingest` (any bytes as a dataset zip) and `image` (any bytes as an image).
# Usage: bench/fuzz.sh [SECONDS_PER_TARGET]   (default 120)
# A crash leaves its input in fuzz/artifacts/<target>/; turn it into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS="${1:-120}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
# cargo-fuzz passes sanitizer flags that stable rustc only accepts with this switch.
export RUSTC_BOOTSTRAP=1

# Seed corpora: small valid zips (plain, wrapped, train/val) and the fixture images.
mkdir -p fuzz/corpus/ingest fuzz/corpus/image
python3 - <<'PY'
import pathlib, zipfile
pets = sorted(pathlib.Path("tests/fixtures/pets").rglob("*.jpg"))
few = [p for p in pets if p.stem.endswith((".0", ".1"))]
for name, prefix in [("plain", ""), ("wrapped", "data/"), ("split", "data/train/")]:
    with zipfile.ZipFile(f"fuzz/corpus/ingest/seed-{name}.zip", "w", zipfile.ZIP_DEFLATED) as z:
        for p in few:
            z.write(p, f"{prefix}{p.parent.name}/{p.name}")
for p in few + sorted(pathlib.Path("tests/fixtures/samples").glob("*")):
    (pathlib.Path("fuzz/corpus/image") / p.name).write_bytes(p.read_bytes())
PY

echo "| target | seconds | executions | crashes |"
echo "|---|---|---|---|"
for target in ingest image; do
    log="$(mktemp)"
    status=0
    (cd fuzz && cargo fuzz run --release "$target" "corpus/$target" -- \
        -max_total_time="$SECS" -rss_limit_mb=2048 -max_len=1048576 -print_final_stats=1) >"$log" 2>&1 || status=$?
    runs=$(grep -o 'Done [0-9]* runs' "$log" | awk '{print $2}' | tail -1)
    crashes=$(ls "fuzz/artifacts/$target" 2>/dev/null | wc -l)
    echo "| $target | $SECS | ${runs:-?} | $crashes (exit $status) |"
    [ "$status" = 0 ] || tail -40 "$log" >&2
done
