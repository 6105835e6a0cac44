#!/usr/bin/env bash
# Wheels for the GPU check (make gpu-wheels), fetched here, where a package index is
# reachable, for a GPU machine that has none: its python3 (3.12 by default) has a CUDA
# torch, pytest, PyYAML, numpy and tqdm, but not pydantic, which dkd.config needs.
# The versions are the ones this checkout's .venv runs, so both machines import the same
# code. gpu_check.sh installs .whl/*.whl into a scratch folder when the folder is there.
#   PYVER=3.12 bash launch/gpu_wheels.sh      # -> .whl/
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER="${PYVER:-3.12}"
DEST="${DEST:-.whl}"
VPY=.venv/bin/python
[ -x "$VPY" ] || { echo "gpu_wheels: run 'make install' first (the versions come from .venv)" >&2; exit 2; }
# pydantic and its own requirements; typing_extensions too (pydantic needs a recent one).
pkgs=(pydantic pydantic_core annotated_types typing_inspection typing_extensions)
pins=()
for p in "${pkgs[@]}"; do
    v=$("$VPY" -c "import importlib.metadata as m; print(m.version('$p'))")
    pins+=("$p==$v")
done
rm -rf "$DEST" && mkdir -p "$DEST"
plats=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    plats+=(--platform "$tag")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
    --implementation cp "${plats[@]}" -d "$DEST" "${pins[@]}"
ls "$DEST"
