#!/usr/bin/env bash
# On a CUDA machine, in under 8 minutes: the device-parametrised tests' CUDA cases (augmentation identity,
# exact resume after SIGKILL/SIGTERM, non-finite detection, evaluation), then experiments/bench.py for every
# seed family's main variant, then compile mode and the memory-efficient DenseNet on ResNet-20/DenseNet-BC-100.
# Writes everything under $OUT (default ./gpu-check); docs/BENCHMARKS.md says what to publish from it.
#   bash experiments/gpu_check.sh                       # data from $DATA_DIR (default ../shared/data)
#   DATA_DIR=none bash experiments/gpu_check.sh         # 50,000 synthetic images instead
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check}
PY=${PY:-python}
mkdir -p "$OUT"
if ! $PY -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device visible to torch; nothing to check" >&2
    exit 2
fi
DATA_DIR=${DATA_DIR:-../shared/data}
if [ "$DATA_DIR" != none ] && [ -e "$DATA_DIR" ]; then DATA=(--data-dir "$DATA_DIR"); else DATA=(--synthetic 50000); fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.txt, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*" | tee "$OUT/$name.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc" | tee -a "$OUT/$name.txt"
    [ "$rc" = 0 ] || status=1
}
step tests 150 $PY -m pytest -q -rs -m cuda tests/experiments/test_data.py tests/experiments/test_harness.py
step families 200 $PY experiments/bench.py --device cuda --modes baseline,fp32,harness --no-memory-efficient \
    --steps 30 --warmup 5 "${DATA[@]}" --json "$OUT/families.json"
step compile 110 $PY experiments/bench.py --device cuda --arch resnet20,resnet110,densenet_bc --modes harness,compile \
    --steps 50 --warmup 5 "${DATA[@]}" --json "$OUT/compile.json"
exit $status
