#!/usr/bin/env bash
# The GPU checks in one run, for a machine with CUDA and torch (the `device` tool's H200: its
# python3 holds a CUDA build of torch, numba, numpy and pytest). Here first: bench/gpu_wheels.sh
# (the wheels it lacks, into .whl/); then one call from the repository's root, e.g.
#   device run --carry .whl --timeout 600 'bash bench/gpu_check.sh'
# Writes its logs and JSON under $OUT (default gpu-check/): the CUDA tests (`pytest -m gpu`),
# the demo with its hot tier and model on the GPU (logits checked bit-identical to the tables in
# memory), the Engram benchmark at its default size with the model, the in-memory tables and
# the hot tiers on the GPU (6 rounds), the cold path on that machine's disk without fio (what
# limits the store against a GPU's forward: docs/benchmarks.md#gpu-checks), lookups promoting
# rows from the warm tier into a CUDA hot tier against a host table's gather and copy
# (bench/test_promotion_speed.py), the hashed row index's torch probe on the GPU at V4.1's size
# against the dense index's gather (bench/test_row_index_speed.py), and the all-hit lookup cost
# of online counting with the hot tier's counts on the GPU. About 5 minutes on the H200. Each
# step has a time limit (a hang costs that step, not the run's device time); tables and
# pytest's temporary files go to $SCRATCH (default /var/tmp/gpu-check: a disk, since O_DIRECT
# refuses tmpfs).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
SCRATCH=${SCRATCH:-/var/tmp/gpu-check}
mkdir -p "$OUT" "$SCRATCH/pytest"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD TMPDIR=$SCRATCH
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
python3 -c "import torch, numba, numpy; assert torch.cuda.is_available(), 'no CUDA device'; \
print('torch', torch.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__, \
torch.cuda.get_device_name())" | tee "$OUT/gpu.txt" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
status=0
run() {  # one step under a time limit: its output to the terminal and $OUT/NAME.log
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || status=1
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}
per_test=()  # a hung test fails alone, with its stacks, where pytest-timeout is installed
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout 120)
run pytest_gpu 200 python3 -m pytest -m gpu -q -p no:cacheprovider -rs "${per_test[@]}" --basetemp "$SCRATCH/pytest" tests/
run demo_cuda 90 python3 -m tiered_store.cli demo --device cuda
run engram_cuda 200 python3 bench/bench_engram.py --device cuda --rounds 6 --dir "$SCRATCH" \
  --out "$OUT/engram_cuda.json"
run cold_path 150 python3 bench/bench_cold_path.py --no-fio --dir "$SCRATCH" --table-gib 2 \
  --rounds 2 --pairs 6 --out "$OUT/cold_path.json"
run promote_cuda 120 env TIERED_STORE_BENCH_DIR="$SCRATCH" python3 -m pytest \
  bench/test_promotion_speed.py -q -p no:cacheprovider --benchmark-enable \
  --benchmark-json="$OUT/promote.json"
run row_index_cuda 120 python3 -m pytest bench/test_row_index_speed.py -q -p no:cacheprovider \
  --benchmark-enable --benchmark-json="$OUT/row_index.json"
run online_repin_cuda 60 python3 bench/bench_online_repin.py --skip-replay --hit-device cuda \
  --rounds 5 --dir "$SCRATCH" --out "$OUT/online_repin_all_hit_cuda.json"
exit $status
