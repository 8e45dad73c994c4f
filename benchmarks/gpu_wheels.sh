#!/usr/bin/env bash
# The pure-Python wheels the GPU image lacks, for gpu_check.sh to install offline there:
#
#   bash benchmarks/gpu_wheels.sh DIR      # e.g. .whl (git-ignored; gpu_check.sh's default LCL_GPU_WHEELS)
#
# ftfy (the tokenizer's text cleaning), wcwidth (ftfy's dependency) and braceexpand (webdataset shard
# lists), pinned; pure-Python wheels only (any CPU, any Python 3), about 90 KB together. Needs PyPI.
set -euo pipefail
DIR=${1:?usage: bash benchmarks/gpu_wheels.sh DIR}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --dest "$DIR" \
    ftfy==6.3.1 wcwidth==0.2.13 braceexpand==0.1.7
total=$(du -ck "$DIR"/*.whl | tail -1 | cut -f1)
if [ "$total" -gt 2048 ]; then
    echo "gpu_wheels.sh: $DIR holds ${total} KB of wheels, over the 2 MB budget" >&2
    exit 1
fi
ls "$DIR"/*.whl
echo "${total} KB of wheels in $DIR"
