#!/usr/bin/env bash
# Downloads, into .whl/ at the repository root (git-ignored), the cp312 manylinux
# wheels that the GPU test machine lacks (H200 image: Python 3.12, torch 2.11,
# cupy-cuda13x 14.2 already there; no network).  bench/gpu_check.sh installs them.
#
#   bench/fetch_gpu_wheels.sh            # everything (about 10 MiB)
#   SKIP_KVIKIO=1 bench/fetch_gpu_wheels.sh   # without kvikio: the NVMe -> GPU
#                                             # benchmark then reports kvikio absent
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
mkdir -p "$DEST"
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
           --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# Missing on the H200 image (see /work/.library/device/KINDS.md's package list):
# the project's lmdb, zstandard and grpcio-health-checking, and kvikio with its
# C++ library and logger (cuda-toolkit, cuda-pathfinder, nvidia-cufile and
# cupy-cuda13x are there already).
PKGS=("lmdb==3.0.0" "zstandard==0.25.0" "grpcio-health-checking==1.85.1")
if [[ -z "${SKIP_KVIKIO:-}" ]]; then
    PKGS+=("kvikio-cu13==26.10.0" "libkvikio-cu13==26.10.0" "rapids-logger==0.3.0")
fi
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$DEST" "${PKGS[@]}"
ls -la "$DEST"
total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1024 / 1024)) MiB in $(ls "$DEST"/*.whl | wc -l) wheels"
if (( total > 60 * 1024 * 1024 )); then
    echo "warning: more than 60 MiB of wheels; the device run carries at most 64 MiB" >&2
fi
