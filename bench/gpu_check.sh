#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA and torch (the `device` tool's H200: its
# python3 holds a CUDA build of torch, numba, numpy and pytest). Here first: bench/gpu_wheels.sh
# (the wheels it lacks, into .whl/); then one call from the repository's root, e.g.
#   device run --carry .whl --timeout 600 'bash bench/gpu_check.sh'
# Writes its logs and JSON under $OUT (default gpu-check/): the CUDA tests (`pytest -m gpu`),
# the demo with its hot tier and model on the GPU (logits checked bit-identical to the tables in
# memory), the Engram benchmark at its default size with the model, the in-memory tables and
# the hot tiers on the GPU (6 rounds), and the all-hit lookup cost of online counting with the
# hot tier's counts on the GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, torch.cuda.get_device_name())" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
status=0
run() {  # one step: its output to the terminal and to $OUT/NAME.log; remembers a failure
  local name=$1
  shift
  echo "== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log" || status=1
}
run pytest_gpu python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/
run demo_cuda python3 -m tiered_store.cli demo --device cuda
run engram_cuda python3 bench/bench_engram.py --device cuda --rounds 6 \
  --out "$OUT/engram_cuda.json"
run online_repin_cuda python3 bench/bench_online_repin.py --skip-replay --hit-device cuda \
  --rounds 5 --dir /tmp --out "$OUT/online_repin_all_hit_cuda.json"
exit $status
