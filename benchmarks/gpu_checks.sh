#!/usr/bin/env bash
# The GPU checks in one call (for a lent H100/H200 with torch + Triton already installed):
# correctness of the compiled kernels first, then kernel speed, then end-to-end tokens/s.
# Writes logs and JSON to ${OUT:-gpu-results}; each stage has its own time limit so one slow stage
# cannot take the others' time.  Usage: bash benchmarks/gpu_checks.sh
set -o pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee "$out/gpu.txt"
$py -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"
timeout "${TESTS_S:-180}" $py -m pytest -q -p no:cacheprovider -m gpu -rs \
    tests/test_kernels.py tests/test_validate.py tests/test_fp8.py 2>&1 | tee "$out/gpu_tests.log"
echo "tests rc=$?"
timeout "${KERNELS_S:-200}" $py benchmarks/bench_kernels.py --json "$out/kernels-h200.json" 2>&1 | tee "$out/kernels.log"
echo "kernels rc=$?"
timeout "${E2E_S:-170}" $py benchmarks/bench_e2e_gpu.py --json "$out/e2e-h200.json" 2>&1 | tee "$out/e2e.log"
echo "e2e rc=$?"
