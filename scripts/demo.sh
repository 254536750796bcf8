#!/usr/bin/env bash
# The README's main job: set up, quantize the embedded demo model with SmoothQuant W8A8, calibrated on
# real text that ships with the project (400 GSM8K training problems, offline), then evaluate it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
quantkit calibrate smollm2-135m --scheme smq_q8i8f16_2 --dataset gsm8k \
    --data-files benchmarks/data/gsm8k_train_head.jsonl --out out/smq2 --overwrite
quantkit eval out/smq2
