#!/usr/bin/env bash
# The trust features measured (tables for bench/README.md): label audit against injected
# noise, the near-duplicate threshold, "unknown" answers against photos of other subjects
# and a held-out class, export size and time. Usage: bench/trust.sh [DATA_DIR]
#
# Photos of other subjects come from the sample data bundled with scikit-image, scikit-learn
# and matplotlib (installed from bench/peers/requirements-trust.txt); the cat photos among
# them (scikit-image's chelsea and cat) are left out, since a cat is no foreign subject for
# a dogs-and-cats model.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA="${1:-../shared/datasets/dogcat-sub}"
python3 -m pip install --quiet -r bench/peers/requirements-trust.txt
FOREIGN="$(mktemp -d)"
trap 'rm -rf "$FOREIGN"' EXIT
python3 - "$FOREIGN" <<'PY'
import os, shutil, sys, glob
import skimage, sklearn, matplotlib
out = sys.argv[1]
sources = {
    "skimage": os.path.join(os.path.dirname(skimage.__file__), "data"),
    "sklearn": os.path.join(os.path.dirname(sklearn.__file__), "datasets", "images"),
    "matplotlib": os.path.join(matplotlib.get_data_path(), "sample_data"),
}
skip = {"chelsea.png", "cat.png"}
for name, folder in sources.items():
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        base = os.path.basename(path)
        if base.lower().endswith((".png", ".jpg", ".jpeg")) and base not in skip:
            shutil.copy(path, os.path.join(out, f"{name}-{base}"))
PY
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs); $(nproc) cores; avx2: $(grep -qw avx2 /proc/cpuinfo && echo yes || echo no), avx512f: $(grep -qw avx512f /proc/cpuinfo && echo yes || echo no)"
echo "commit: $(git rev-parse --short HEAD)"
CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}" cargo run --release --locked --quiet --bin trust_bench -- "$DATA" "$FOREIGN"
